"""Drives the apex hub with the official `openai` Python package, unmodified.

Run by `tests/tests/llm_gateway.rs` with:
  APEX_HUB_URL     the hub's base URL including /v1
  APEX_API_KEY     an API key of the hub
  APEX_MODEL       a model answering the fake upstream's text (8 tokens "t0 " .. "t7 ")
  APEX_SLOW_MODEL  a slowly streaming model (the mock at 20 tokens/s), for the interrupt

Prints "<case> ok" per passing case; exits non-zero on the first failure.
"""

import json
import os
import sys
import urllib.request
import uuid

import openai

URL = os.environ["APEX_HUB_URL"]
KEY = os.environ["APEX_API_KEY"]
MODEL = os.environ["APEX_MODEL"]
SLOW = os.environ["APEX_SLOW_MODEL"]
EXPECTED = "".join(f"t{i} " for i in range(8))

client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=60)


def plain():
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=50
    )
    assert r.choices[0].message.content == EXPECTED, r
    assert r.choices[0].finish_reason == "stop", r
    assert r.usage is not None and r.usage.completion_tokens == 8, r.usage
    assert r.model == MODEL, r.model


def stream():
    text, finishes, usage = "", [], None
    with client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as s:
        for chunk in s:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    text += c.delta.content
                if c.finish_reason:
                    finishes.append(c.finish_reason)
    assert text == EXPECTED, text
    assert finishes == ["stop"], finishes
    assert usage is not None and usage.completion_tokens == 8, usage


def models():
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids and SLOW in ids, ids
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model", m


def not_found():
    try:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert e.code == "model_not_found", e.body
        return
    raise AssertionError("expected openai.NotFoundError")


def interrupt():
    rid = f"py-{uuid.uuid4()}"
    text, finishes, interrupted = "", [], False
    s = client.chat.completions.create(
        model=SLOW,
        messages=[{"role": "user", "content": "tell me a long story"}],
        stream=True,
        extra_body={"requestId": rid},
    )
    assert s.response.headers.get("x-request-id") == rid, s.response.headers
    for chunk in s:
        for c in chunk.choices:
            if c.delta.content:
                text += c.delta.content
            if c.finish_reason:
                finishes.append(c.finish_reason)
        if text and not interrupted:
            req = urllib.request.Request(
                URL + "/interrupt",
                data=json.dumps({"requestId": rid}).encode(),
                headers={
                    "Authorization": f"Bearer {KEY}",
                    "Content-Type": "application/json",
                },
                method="POST",
            )
            with urllib.request.urlopen(req, timeout=30) as r:
                assert r.status == 200, r.status
                body = json.loads(r.read())
            assert body["interrupted"] is True, body
            interrupted = True
    assert interrupted
    assert finishes == ["stop"], finishes
    # 200 tokens at 20/s take 10 s; the stream ended long before.
    assert 0 < len(text.split()) < 200, text


for name, case in [
    ("plain", plain),
    ("stream", stream),
    ("models", models),
    ("not_found", not_found),
    ("interrupt", interrupt),
]:
    case()
    print(f"{name} ok", flush=True)
sys.exit(0)
