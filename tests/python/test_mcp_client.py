"""The official MCP Python SDK (`pip install mcp`, 2.x) as a client of the hub's `/mcp`, run by
`tests/tests/mcp.rs` against real hubs and nodes.

Environment:
- `APEX_MCP_URLS`: comma-separated `/mcp` URLs of one or more hubs. With several, every HTTP
  request goes to the next one in turn (a client-side round-robin load balancer), so
  consecutive requests of one MCP session reach different hubs.
- `APEX_API_KEY`: the bearer credential.
- `APEX_MCP_EXPECT_TOOLS`: comma-separated tool names that `tools/list` must include.

Prints one `... ok` line per check; exits non-zero on the first failure.
"""

import asyncio
import hashlib
import json
import os
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

URLS = [u for u in os.environ["APEX_MCP_URLS"].split(",") if u]
KEY = os.environ["APEX_API_KEY"]
EXPECT = [t for t in os.environ.get("APEX_MCP_EXPECT_TOOLS", "").split(",") if t]


class RoundRobin(httpx2.AsyncBaseTransport):
    """Sends each request to the next hub of `URLS` and counts the hubs that answered."""

    def __init__(self):
        self.inner = httpx2.AsyncHTTPTransport()
        self.next = 0
        self.served = []

    async def handle_async_request(self, request):
        target = httpx2.URL(URLS[self.next % len(URLS)])
        self.next += 1
        request.url = request.url.copy_with(host=target.host, port=target.port)
        self.served.append(f"{target.host}:{target.port}")
        return await self.inner.handle_async_request(request)

    async def aclose(self):
        await self.inner.aclose()


def leaves(e):
    """The innermost exceptions of `e` (the SDK raises exception groups)."""
    if isinstance(e, BaseExceptionGroup):
        for inner in e.exceptions:
            yield from leaves(inner)
    else:
        yield e


def text_of(result):
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


async def main():
    balancer = RoundRobin()
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {KEY}"},
        transport=balancer,
        timeout=httpx2.Timeout(60.0),
    )
    async with http, Client(streamable_http_client(URLS[0], http_client=http)) as client:
        listed = await client.list_tools()
        names = {t.name for t in listed.tools}
        missing = [t for t in EXPECT if t not in names]
        assert not missing, f"tools/list lacks {missing}: {sorted(names)}"
        sha = next(t for t in listed.tools if t.name == "sha256")
        assert sha.input_schema.get("type") is not None or "oneOf" in json.dumps(sha.input_schema), sha
        print(f"list ok: {len(names)} tools", flush=True)

        result = await client.call_tool("sha256", {"text": "hello mcp"})
        assert not result.is_error, result
        body = json.loads(text_of(result))
        want = hashlib.sha256(b"hello mcp").hexdigest()
        assert body["sha256"] == want, body
        print("call sha256 ok", flush=True)

        result = await client.call_tool("echo", {"text": "hi from python"})
        assert not result.is_error, result
        assert json.loads(text_of(result))["echoed"] == {"text": "hi from python"}, result
        print("call echo ok", flush=True)

        # Bad arguments: the task fails and the call says isError with the node's reason.
        result = await client.call_tool("sleep", {"ms": "not a number"})
        assert result.is_error, result
        assert "invalid" in text_of(result).lower(), text_of(result)
        print("error call ok", flush=True)

        # A tool no node offers is refused, as a result or a JSON-RPC error.
        try:
            result = await client.call_tool("no_such_tool", {})
            assert result.is_error, result
        except Exception as e:  # noqa: BLE001 - either shape is an MCP error
            print(f"unknown tool refused with {type(e).__name__}: {e}", flush=True)
        print("unknown tool ok", flush=True)

        # A tool a node offers from an MCP server it mounted (tests/fixtures/mcp_server.py):
        # MCP both ways, client -> hub -> node -> MCP server.
        if "pytools.reverse" in names:
            result = await client.call_tool("pytools.reverse", {"text": "both ways"})
            assert not result.is_error, result
            assert json.loads(text_of(result)) == "syaw htob", result
            print("mounted tool call ok", flush=True)

    hubs = sorted(set(balancer.served))
    print(f"requests: {len(balancer.served)} over hubs {hubs}", flush=True)
    if len(URLS) > 1:
        assert len(hubs) == len(URLS), f"only {hubs} answered of {URLS}"
        print("round robin ok", flush=True)

    # No credential: the SDK's connection is refused.
    try:
        async with Client(URLS[0]) as anonymous:
            await anonymous.list_tools()
    except Exception as e:  # noqa: BLE001
        why = "; ".join(f"{type(x).__name__}: {x}" for x in leaves(e))
        print(f"anonymous refused ok ({why})", flush=True)
    else:
        raise AssertionError("an anonymous client listed the tools")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except BaseException as e:  # the SDK wraps errors in exception groups: show them whole
        import traceback

        traceback.print_exception(e)
        sys.exit(1)
