"""The store adapters under their frameworks' own machinery: litestar's
ResponseCacheConfig on AiovmcStore, fastapi-cache2's @cache on AiovmcBackend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

import aiovmc

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cache(cache_path: str) -> AsyncIterator[aiovmc.AsyncCache]:
    async with aiovmc.AsyncCache(cache_path, size="4MiB") as c:
        yield c


# ---- litestar ----


async def test_store_operations(cache: aiovmc.AsyncCache) -> None:
    from aiovmc.integrations.litestar import AiovmcStore

    store = AiovmcStore(cache=cache)
    await store.set("a", "text")
    await store.set("b", b"bytes", expires_in=100)
    await store.set("c", b"timedelta", expires_in=timedelta(seconds=50))
    await store.set("d", b"zero", expires_in=0)
    assert await store.get("a") == b"text" and await store.get("missing") is None
    assert await store.expires_in("a") is None and await store.expires_in("d") is None
    assert 98 <= (await store.expires_in("b") or 0) <= 100
    assert 48 <= (await store.expires_in("c") or 0) <= 50
    assert await store.expires_in("missing") is None
    assert await store.exists("a") and not await store.exists("missing")

    assert await store.get("b", renew_for=1000) == b"bytes"
    assert (await store.expires_in("b") or 0) > 900
    assert await store.get("a", renew_for=1000) == b"text"
    assert await store.expires_in("a") is None  # no expiry: renewing is a no-op

    await store.delete("a")
    await store.delete("a")  # absent: a no-op
    assert await store.get("a") is None
    with pytest.raises(ValueError, match="seconds >= 0"):
        await store.set("e", b"x", expires_in=-1)


async def test_store_namespaces(cache: aiovmc.AsyncCache) -> None:
    from aiovmc.integrations.litestar import AiovmcStore

    root = AiovmcStore(cache=cache, namespace="app")
    child = root.with_namespace("sessions")
    grandchild = child.with_namespace("x")
    sibling = AiovmcStore(cache=cache, namespace="other")
    assert child.namespace == "app_sessions"
    for store in (root, child, grandchild, sibling):
        await store.set("k", store.namespace or "")
    assert await child.get("k") == b"app_sessions" and await root.get("k") == b"app"
    await child.delete_all()  # the namespace and its children, not its parent
    assert await child.get("k") is None and await grandchild.get("k") is None
    assert await root.get("k") == b"app" and await sibling.get("k") == b"other"
    await root.delete_all()
    assert await root.get("k") is None and await sibling.get("k") == b"other"
    await AiovmcStore(cache=cache, namespace=None).delete_all()  # everything
    assert len(cache.cache) == 0


async def test_litestar_response_cache_shared_by_two_apps(cache_path: str) -> None:
    """Two app instances (as two workers would be) on one file: the second
    serves what the first cached."""
    from litestar import Litestar, get
    from litestar.config.response_cache import ResponseCacheConfig
    from litestar.testing import AsyncTestClient

    from aiovmc.integrations.litestar import AiovmcStore

    calls = 0

    @get("/report", cache=60)
    async def report() -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"calls": calls}

    def make_app() -> Litestar:
        return Litestar(
            route_handlers=[report],
            stores={"response_cache": AiovmcStore(cache_path, size="4MiB")},
            response_cache_config=ResponseCacheConfig(store="response_cache"),
        )

    bodies = []
    for app in (make_app(), make_app()):
        async with AsyncTestClient(app) as client:
            for _ in range(2):
                bodies.append((await client.get("/report")).json())
    assert bodies == [{"calls": 1}] * 4 and calls == 1


# ---- fastapi-cache2 ----


async def test_fastapi_cache_decorator(cache: aiovmc.AsyncCache) -> None:
    from fastapi import FastAPI
    from fastapi_cache import FastAPICache
    from fastapi_cache.decorator import cache as cached

    from aiovmc.integrations.fastapi_cache import AiovmcBackend

    backend = AiovmcBackend(cache=cache)
    FastAPICache.reset()  # its configuration is global: a test's own backend
    FastAPICache.init(backend, prefix="api")
    calls = 0
    app = FastAPI()

    @app.get("/items/{n}")
    @cached(expire=60)
    async def item(n: int) -> dict[str, int]:
        nonlocal calls
        calls += 1
        return {"n": n, "calls": calls}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.get("/items/1")
        second = await client.get("/items/1")
        other = await client.get("/items/2")
    assert first.json() == second.json() == {"n": 1, "calls": 1} and other.json()["calls"] == 2
    assert second.headers["x-fastapi-cache"] == "HIT"
    assert 55 <= int(second.headers["cache-control"].removeprefix("max-age=")) <= 60
    assert await backend.clear(namespace="api") == 2
    assert await backend.get_with_ttl("nothing") == (0, None)


async def test_fastapi_cache_backend(cache: aiovmc.AsyncCache, cache_path: str) -> None:
    from aiovmc.integrations.fastapi_cache import AiovmcBackend

    backend = AiovmcBackend(cache=cache)
    await backend.set("forever", b"1")
    await backend.set("minute", b"2", expire=60)
    assert await backend.get_with_ttl("forever") == (-1, b"1")
    ttl, value = await backend.get_with_ttl("minute")
    assert value == b"2" and 58 <= ttl <= 60
    other = AiovmcBackend(cache_path)  # another worker's backend on the same file
    assert await other.get("minute") == b"2"
    assert await other.clear(key="minute") == 1 and await backend.get("minute") is None
    assert await backend.clear() == 0


def test_adapters_check_their_arguments() -> None:
    from aiovmc.integrations.fastapi_cache import AiovmcBackend
    from aiovmc.integrations.litestar import AiovmcStore

    with pytest.raises(TypeError, match=r"path= .* or cache="):
        AiovmcStore()
    with pytest.raises(TypeError, match="AsyncCache"):
        AiovmcBackend(cache="/dev/shm/x")  # type: ignore[arg-type]
