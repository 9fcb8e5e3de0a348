"""The nex and Kiki platforms' chat clients against apex's /api/v1/chat/stream, as their
documents write them: nex's `aiohttp` reader prints data['content'] of every `data:` line;
Kiki's `requests` reader looks at the event names. Prints what each saw, one JSON line each.

Environment: APEX_HUB_URL (http://host:port), APEX_API_KEY, APEX_SESSION.
"""

import asyncio
import json
import os
import sys

import aiohttp
import requests

BASE = os.environ["APEX_HUB_URL"]
KEY = os.environ["APEX_API_KEY"]
SESSION = os.environ["APEX_SESSION"]


async def nex_stream_chat():
    # nex-api.md, "Python客户端调用", with the session kept.
    out = []
    async with aiohttp.ClientSession() as session:
        async with session.post(
            BASE + "/api/v1/chat/stream",
            json={"message": "你好", "session_id": SESSION},
            headers={"Authorization": "Bearer " + KEY},
        ) as response:
            async for line in response.content:
                line = line.decode("utf-8").strip()
                if line.startswith("data: "):
                    data = json.loads(line[6:])
                    print(data["content"], end="", flush=True, file=sys.stderr)
                    out.append(data["content"])
    return "".join(out)


def kiki_stream():
    # kiki-api.md, "客户端示例 (Python)".
    response = requests.post(
        BASE + "/api/v1/chat/stream",
        json={"message": "写一首关于春天的诗", "session_id": SESSION, "user_id": "user_123"},
        headers={"Authorization": "Bearer " + KEY},
        stream=True,
    )
    events = []
    for line in response.iter_lines():
        if line:
            text = line.decode()
            if text.startswith("event: "):
                events.append(text[len("event: "):])
    return events


def main():
    nex = asyncio.run(nex_stream_chat())
    print(json.dumps({"nex_text": nex}))
    print(json.dumps({"kiki_events": kiki_stream()}))


if __name__ == "__main__":
    main()
