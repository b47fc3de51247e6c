"""The FastAPI apps that bench_web.py serves under gunicorn, one per variant.

BENCH_WEB_MODE picks the variant: "aiovmc" (CacheMiddleware), "plain" (the same
app answering its constant with no cache), "fc-memory" (fastapi-cache2's
InMemoryBackend) or "fc-redis" (fastapi-cache2's RedisBackend on
BENCH_REDIS_SOCK). Every handler call appends a line to BENCH_CALLS.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

MODE = os.environ.get("BENCH_WEB_MODE", "plain")
CALLS = os.environ.get("BENCH_CALLS", "/dev/null")
ITEM = {"id": 42, "name": "a cached item", "tags": ["x", "y", "z"], "price": 12.5}


def _log_call() -> None:
    fd = os.open(CALLS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"call\n")
    finally:
        os.close(fd)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if MODE == "fc-memory":
        from fastapi_cache import FastAPICache
        from fastapi_cache.backends.inmemory import InMemoryBackend

        FastAPICache.init(InMemoryBackend(), prefix="bench")
    elif MODE == "fc-redis":
        from fastapi_cache import FastAPICache
        from fastapi_cache.backends.redis import RedisBackend
        from redis.asyncio import Redis

        FastAPICache.init(RedisBackend(Redis(unix_socket_path=os.environ["BENCH_REDIS_SOCK"])),
                          prefix="bench")
    yield


app = FastAPI(lifespan=lifespan)

if MODE.startswith("fc-"):
    from fastapi_cache.decorator import cache

    @app.get("/item")
    @cache(expire=600)
    async def item() -> dict[str, object]:
        _log_call()
        return ITEM

    @app.get("/cold/{n}")
    @cache(expire=600)
    async def cold(n: int) -> dict[str, object]:
        _log_call()
        await anyio.sleep(0.2)
        return ITEM

else:

    @app.get("/item")
    async def item() -> dict[str, object]:
        _log_call()
        return ITEM

    @app.get("/cold/{n}")
    async def cold(n: int) -> dict[str, object]:
        _log_call()
        await anyio.sleep(0.2)
        return ITEM

    if MODE == "aiovmc":
        from aiovmc.integrations.asgi import CacheMiddleware

        app.add_middleware(CacheMiddleware, path=os.environ["BENCH_WEB_CACHE"], size="64MiB",
                           ttl=600)
