"""A Litestar app whose response cache (and any other store user: sessions,
rate limits) lives in one aiovmc file shared by every worker.

    uvicorn examples.litestar_app:app --workers 4

or run this file to see it answer a few requests (it serves on a free port).
"""

from __future__ import annotations

import os
import socket

import anyio
import httpx
import uvicorn
from litestar import Litestar, get
from litestar.config.response_cache import ResponseCacheConfig

from aiovmc.integrations.litestar import AiovmcStore

CACHE = "/dev/shm/aiovmc-litestar-example.cache"
handler_calls = 0


@get("/report", cache=60)
async def report() -> dict[str, int]:
    global handler_calls
    handler_calls += 1
    return {"report": handler_calls}


store = AiovmcStore(CACHE, size="64MiB")
app = Litestar(
    route_handlers=[report],
    stores={"response_cache": store},
    response_cache_config=ResponseCacheConfig(store="response_cache"),
    logging_config=None,
)


async def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        while not server.started:  # noqa: ASYNC110 (uvicorn offers a flag, no event)
            await anyio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            bodies = [(await client.get("/report")).json() for _ in range(3)]
        print(f"3 requests, {handler_calls} handler call: {bodies}")
        sessions = store.with_namespace("sessions")
        await sessions.set("user-1", b"logged in", expires_in=3600)
        print(f"a session from any worker: {await sessions.get('user-1')!r}, "
              f"expires in {await sessions.expires_in('user-1')} s")
        server.should_exit = True
    await store.__aexit__(None, None, None)
    os.unlink(CACHE)


if __name__ == "__main__":
    anyio.run(main)
