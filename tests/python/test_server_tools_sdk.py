"""Drives server-side tools of the apex hub with the official `openai` Python package.

Run by `tests/tests/server_tools.rs` with:
  APEX_HUB_URL   the hub's base URL including /v1
  APEX_API_KEY   an API key of the hub
  APEX_MODEL     a model served by the scripted fake upstream (knob `fake.calls`)
  APEX_EXPECTED  the SHA-256 of "hello"

`server_tools` and the fake's script go in `extra_body`; `apex_tool_runs` comes back in
`model_extra` (of the completion, or of the last chunk of a stream).

Prints "<case> ok" per passing case; exits non-zero on the first failure.
"""

import os

import openai

URL = os.environ["APEX_HUB_URL"]
KEY = os.environ["APEX_API_KEY"]
MODEL = os.environ["APEX_MODEL"]
EXPECTED = os.environ["APEX_EXPECTED"]

client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=60)
SCRIPT = {"calls": [[{"name": "sha256", "arguments": {"text": "hello"}}]]}


def plain():
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "sha256 of hello?"}],
        extra_body={"server_tools": ["sha256"], "fake": SCRIPT},
    )
    assert EXPECTED in r.choices[0].message.content, r
    assert r.choices[0].finish_reason == "stop", r
    runs = r.model_extra["apex_tool_runs"]
    assert len(runs) == 1 and runs[0]["tool"] == "sha256", runs
    assert runs[0]["status"] == "succeeded" and runs[0]["task_id"], runs


def stream():
    text, last = "", None
    with client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "sha256 of hello?"}],
        stream=True,
        extra_body={"server_tools": ["sha256"], "fake": SCRIPT},
    ) as s:
        for chunk in s:
            last = chunk
            for c in chunk.choices:
                if c.delta.content:
                    text += c.delta.content
    assert EXPECTED in text, text
    runs = last.model_extra["apex_tool_runs"]
    assert runs[0]["status"] == "succeeded", runs


def unknown():
    try:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"server_tools": ["no_such_tool"]},
        )
    except openai.BadRequestError as e:
        assert "no_such_tool" in str(e), e
        return
    raise AssertionError("no 400 for an unknown server tool")


for name, case in [("plain", plain), ("stream", stream), ("unknown", unknown)]:
    case()
    print(f"{name} ok", flush=True)
