"""A FastAPI app whose GET responses are cached in one file shared by every worker.

Serve it with several workers, all sharing the cache (and its statistics):

    uvicorn examples.fastapi_app:app --workers 4
    gunicorn examples.fastapi_app:app -k uvicorn.workers.UvicornWorker -w 4

or run this file to see it answer a few requests (it serves on a free port).
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import uvicorn
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import aiovmc
from aiovmc.integrations.asgi import CacheMiddleware, invalidate
from aiovmc.integrations.prometheus import CacheCollector

CACHE = "/dev/shm/aiovmc-fastapi-example.cache"
registry = CollectorRegistry()
handler_calls = 0


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The middleware opens the file itself, in each worker; this handle is for
    # invalidation and metrics (the counters are the file's: one worker reports all).
    async with aiovmc.AsyncCache(CACHE, size="64MiB") as cache:
        app.state.cache = cache
        collector = CacheCollector(cache, name="pages")
        registry.register(collector)
        yield
        registry.unregister(collector)


app = FastAPI(lifespan=lifespan)
app.add_middleware(CacheMiddleware, path=CACHE, size="64MiB", ttl=60)


@app.get("/items/{item_id}")
async def read_item(item_id: int) -> dict[str, int]:
    global handler_calls
    handler_calls += 1
    await anyio.sleep(0.1)  # a slow database
    return {"item_id": item_id, "price": item_id * 10}


@app.put("/items/{item_id}/price")
async def reprice(item_id: int, request: Request) -> dict[str, str]:
    # A successful PUT drops the stored responses of its own URL; the item's
    # page is another URL, so invalidate it by hand (works from any process).
    removed = await invalidate(app.state.cache, str(request.url_for("read_item", item_id=item_id)))
    return {"invalidated": str(removed)}


@app.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST,
                    headers={"cache-control": "no-store"})


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
            responses = []
            async with anyio.create_task_group() as burst:
                for _ in range(20):
                    burst.start_soon(lambda: _get(client, "/items/7", responses))
            labels = sorted({r.headers["x-cache"] for r in responses})
            print(f"20 concurrent requests, {handler_calls} handler call: {labels}")
            hit = await client.get("/items/7")
            print(f"then: {hit.headers['x-cache']}, age {hit.headers['age']}, {hit.json()}")
            same = await client.get("/items/7", headers={"if-none-match": hit.headers["etag"]})
            print(f"with If-None-Match: {same.status_code}")
            print(f"reprice: {(await client.put('/items/7/price')).json()}")
            print(f"after: {(await client.get('/items/7')).headers['x-cache']}")
            for line in (await client.get("/metrics")).text.splitlines():
                if line.startswith(("aiovmc_hits_total", "aiovmc_entries")):
                    print(line)
        server.should_exit = True
    os.unlink(CACHE)


async def _get(client: httpx.AsyncClient, path: str, out: list[httpx.Response]) -> None:
    out.append(await client.get(path))


if __name__ == "__main__":
    anyio.run(main)
