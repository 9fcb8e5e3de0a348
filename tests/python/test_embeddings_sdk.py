"""Drives the hub's `POST /v1/embeddings` with the official `openai` Python package, unmodified.

Run by `tests/tests/embeddings.rs` with:
  APEX_HUB_URL   the hub's base URL including /v1
  APEX_API_KEY   an API key of the hub
  APEX_MODEL     the built-in mock (256-dimensional, L2-normalised vectors)
  APEX_UPSTREAM  a model of the fake upstream (8-dimensional vectors)

Prints "<case> ok" per passing case, and the vectors of "hello" as JSON lines
(`{"model": ..., "vector": [...]}`) for the Rust side to compare; exits non-zero on the first
failure. The SDK asks for `encoding_format: "base64"` unless told otherwise and decodes it.
"""

import base64
import json
import math
import os
import struct
import sys

import openai

URL = os.environ["APEX_HUB_URL"]
KEY = os.environ["APEX_API_KEY"]
MODEL = os.environ["APEX_MODEL"]
UPSTREAM = os.environ["APEX_UPSTREAM"]

client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=60)


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def default_base64():
    r = client.embeddings.create(model=MODEL, input="hello")
    assert r.object == "list", r
    assert r.model == MODEL, r.model
    assert len(r.data) == 1 and r.data[0].index == 0, r
    v = r.data[0].embedding
    assert len(v) == 256, len(v)
    assert abs(norm(v) - 1.0) < 1e-4, norm(v)
    assert r.usage.prompt_tokens == 1 and r.usage.total_tokens == 1, r.usage
    print(json.dumps({"model": MODEL, "vector": v}), flush=True)


def floats_and_batches():
    texts = ["the budget meeting", "budget meeting notes", "写一首关于春天的诗"]
    r = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in r.data] == [0, 1, 2], r.data
    a, b, c = (d.embedding for d in r.data)
    assert dot(a, b) > dot(a, c), (dot(a, b), dot(a, c))
    # Asked explicitly, base64 comes back undecoded: little-endian f32s.
    again = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="base64")
    raw = base64.b64decode(again.data[0].embedding)
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert max(abs(x - y) for x, y in zip(decoded, a)) < 1e-6
    r = client.embeddings.create(model=MODEL, input="short", dimensions=16)
    assert len(r.data[0].embedding) == 16


def upstream():
    r = client.embeddings.create(model=UPSTREAM, input="hello")
    v = r.data[0].embedding
    assert len(v) == 8, v
    print(json.dumps({"model": UPSTREAM, "vector": v}), flush=True)


def errors():
    try:
        client.embeddings.create(model="no-such-model", input="hi")
    except openai.NotFoundError as e:
        assert e.status_code == 404 and e.code == "model_not_found", e.body
    else:
        raise AssertionError("expected openai.NotFoundError")
    try:
        client.embeddings.create(model=MODEL, input="")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "input", e.body
    else:
        raise AssertionError("expected openai.BadRequestError")


for name, case in [
    ("default_base64", default_base64),
    ("floats_and_batches", floats_and_batches),
    ("upstream", upstream),
    ("errors", errors),
]:
    case()
    print(f"{name} ok", flush=True)
sys.exit(0)
