"""The knowledge platform's plan-executor stream (`POST /api/v2/query`), read the way the
platform's sample Python client reads it (httpx, `aiter_lines`, `data: ` lines parsed as JSON),
then checked event by event.

Environment: APEX_URL (the hub), APEX_TOKEN (a bearer credential), APEX_QUERY (the question),
APEX_EXPECT: `ok` (a full run; APEX_SOURCE is a reference source that must be found) or
`error` (the run fails: a STREAM_THING starting "❌ 错误: ", then END). Prints `<case> ok`
lines; exits non-zero with the reason on the first failed check.
"""

import asyncio
import json
import os
import sys

import httpx


async def query_zhiku(url, token, question):
    """The sample client's loop: every `data: ` line is one event."""
    events = []
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=60.0) as client:
        async with client.stream("POST", url, json={"query": question}, headers=headers) as response:
            assert response.status_code == 200, f"status {response.status_code}"
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    return events


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    base = os.environ["APEX_URL"]
    events = asyncio.run(
        query_zhiku(f"{base}/api/v2/query", os.environ["APEX_TOKEN"], os.environ["APEX_QUERY"])
    )
    types = [e["event_type"] for e in events]
    check(all(e["context"]["mode"] == "plan-executor" for e in events), f"mode: {events}")
    check(all(isinstance(e["messages"], list) for e in events), "messages are lists")
    check(types[0] == "PLAN_DECLARED", f"first: {types}")
    stages = events[0]["messages"][0]["stages"]
    check([s["id"] for s in stages] == ["planning", "retrieval", "summary"], f"stages {stages}")
    check(all(s["status"] == "PENDING" for s in stages), "stages start PENDING")
    check(types[-1] == "END" and types.count("END") == 1, f"one END, last: {types}")
    print("envelope ok")

    if os.environ["APEX_EXPECT"] == "error":
        check(types[-2] == "STREAM_THING", f"error before END: {types}")
        content = events[-2]["messages"][0]["content"]
        check(content.startswith("❌ 错误: "), f"error content {content!r}")
        print("error ok")
        return

    # Stage changes: each stage RUNNING then COMPLETED, in order.
    changes = [(e["context"]["stage_id"], e["messages"][0]["status"])
               for e in events if e["event_type"] == "PLAN_CHANGE"]
    check(changes == [("planning", "RUNNING"), ("planning", "COMPLETED"),
                      ("retrieval", "RUNNING"), ("retrieval", "COMPLETED"),
                      ("summary", "RUNNING"), ("summary", "COMPLETED")], f"changes {changes}")
    # The platform's sixteen steps in order (each invocation a DECLARED then CHANGE pair, the
    # summary's appends one ARTIFACT_CHANGE step).
    inv = [t for t in types if t.startswith("INVOCATION_")]
    check(inv == ["INVOCATION_DECLARED", "INVOCATION_CHANGE"] * (len(inv) // 2), f"pairs {inv}")
    order = []
    for t in types:
        if t.startswith("INVOCATION_") and "INVOCATION_CHANGE" in order:
            continue
        if t == "ARTIFACT_CHANGE" and order[-1] == "ARTIFACT_CHANGE":
            continue
        order.append(t)
    check(order == ["PLAN_DECLARED", "PLAN_CHANGE", "STREAM_THING", "PLAN_CHANGE",
                    "PLAN_CHANGE", "INVOCATION_DECLARED", "INVOCATION_CHANGE", "PLAN_CHANGE",
                    "ARTIFACT_DECLARED", "ARTIFACT_CHANGE", "PLAN_CHANGE", "ARTIFACT_DECLARED",
                    "ARTIFACT_CHANGE", "STREAM_CONTENT", "PLAN_CHANGE", "END"], f"order {order}")
    thinking = events[types.index("STREAM_THING")]["messages"][0]["content"]
    check(isinstance(thinking, str) and thinking, "thinking content")
    print("planning ok")

    # Invocations: each declared one changes once, in the retrieval stage.
    declared = {}
    for e in events:
        if e["event_type"] == "INVOCATION_DECLARED":
            check(e["context"]["stage_id"] == "retrieval", "invocation stage")
            m = e["messages"][0]
            check(m["invocation_type"] in ("SEARCH", "TOOL_CALL", "API_CALL"), f"type {m}")
            declared[e["context"]["invocation_id"]] = m
    changed = [e for e in events if e["event_type"] == "INVOCATION_CHANGE"]
    check(sorted(e["context"]["invocation_id"] for e in changed) == sorted(declared), "pairs")
    for e in changed:
        m = e["messages"][0]
        check(m["status"] == "COMPLETED", f"invocation {m}")
        check(json.loads(m["content"])["success"] is True, f"content {m}")
    kinds = sorted({m["invocation_type"] for m in declared.values()})
    check(kinds == ["SEARCH", "TOOL_CALL"], f"memory search and a search tool: {kinds}")
    print("retrieval ok")

    # Artifacts: the reference list, then the summary report streamed as appends.
    arts = {}
    for e in events:
        if e["event_type"] == "ARTIFACT_DECLARED":
            arts[e["context"]["artifact_id"]] = e["messages"][0]
    by_type = {a["artifact_type"]: i for i, a in arts.items()}
    check(set(by_type) == {"reference_list", "summary_report"}, f"artifacts {arts}")
    refs_changes = [e for e in events if e["event_type"] == "ARTIFACT_CHANGE"
                    and e["context"]["artifact_id"] == by_type["reference_list"]]
    check(len(refs_changes) == 1 and refs_changes[0]["messages"][0]["change_type"] == "CONTENT_REPLACE",
          "one reference list")
    refs = json.loads(refs_changes[0]["messages"][0]["content"])
    sources = [r["source"] for r in refs]
    check(os.environ["APEX_SOURCE"] in sources, f"{os.environ['APEX_SOURCE']} in {sources}")
    check(any(s.startswith("memory:") for s in sources), f"a memory reference in {sources}")
    appends = [e["messages"][0] for e in events if e["event_type"] == "ARTIFACT_CHANGE"
               and e["context"]["artifact_id"] == by_type["summary_report"]]
    check(appends and all(a["change_type"] == "CONTENT_APPEND" for a in appends), "appends")
    text = "".join(a["content"] for a in appends)
    content = [e for e in events if e["event_type"] == "STREAM_CONTENT"]
    check(len(content) == 1 and content[0]["messages"][0]["content"] == text,
          "STREAM_CONTENT is the appended summary")
    check(types.index("STREAM_CONTENT") > max(i for i, t in enumerate(types) if t == "ARTIFACT_CHANGE"),
          "content after the appends")
    print("summary ok")


if __name__ == "__main__":
    main()
