"""The aiohttp integration in process (aiohttp's own test server and client).

aiohttp runs on asyncio only; the rules themselves are shared with the ASGI
middleware and tested in full, on both backends, in tests/test_web_asgi.py.
These tests cover what the aiohttp adapter translates."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

import aiovmc
from aiovmc.integrations.aiohttp import invalidate, setup_cache


class Site:
    def __init__(self, cache: aiovmc.AsyncCache, **options: Any) -> None:
        self.calls = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()

        async def page(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            self.entered.set()
            await self.gate.wait()
            headers = {k[2:]: v for k, v in request.query.items() if k.startswith("h-")}
            return web.Response(text=f"page {request.path} {self.calls}", headers=headers)

        async def stream(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"streamed")
            await response.write_eof()
            return response

        async def cookie(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            response = web.Response(text="with a cookie")
            response.set_cookie("session", "s3cret")
            return response

        async def post(request: web.Request) -> web.StreamResponse:
            if "X-Redirect" in request.headers:  # post, redirect, get
                raise web.HTTPSeeOther(request.path)
            return web.Response(text="posted")

        async def missing(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            raise web.HTTPNotFound(text="nothing here")

        self.app = web.Application()
        setup_cache(self.app, cache=cache, **options)
        self.app.router.add_get("/page/{name}", page)
        self.app.router.add_post("/page/{name}", post)
        self.app.router.add_get("/stream", stream)
        self.app.router.add_get("/missing", missing)
        self.app.router.add_get("/cookie", cookie)


def run(cache_path: str, test: Callable[[TestClient[Any, Any], Site, aiovmc.AsyncCache],
                                        Awaitable[None]], **options: Any) -> Site:
    async def main() -> Site:
        async with aiovmc.AsyncCache(cache_path, size="4MiB") as cache:
            site = Site(cache, **options)
            async with TestClient(TestServer(site.app)) as client:
                await test(client, site, cache)
            return site

    return asyncio.run(main())


def test_miss_hit_etag_304_head(cache_path: str) -> None:
    async def test(client: TestClient[Any, Any], site: Site, cache: aiovmc.AsyncCache) -> None:
        first = await client.get("/page/a?y=1&x=2")
        body = await first.read()
        assert first.headers["X-Cache"] == "MISS"
        second = await client.get("/page/a?x=2&y=1")
        assert second.headers["X-Cache"] == "HIT" and await second.read() == body
        assert second.headers["Age"] == "0"
        digest = hashlib.blake2b(body, digest_size=16).hexdigest()
        assert first.headers["ETag"] == second.headers["ETag"] == f'"{digest}"'
        assert second.headers["Content-Type"].startswith("text/plain")
        nm = await client.get("/page/a?x=2&y=1", headers={"If-None-Match": f'"{digest}"'})
        assert nm.status == 304 and await nm.read() == b""
        head = await client.head("/page/a?x=2&y=1")
        assert head.headers["X-Cache"] == "HIT" and head.headers["Content-Length"] == str(len(body))
        assert await head.read() == b""

    assert run(cache_path, test).calls == 1


def test_coalesced_vary_invalidate_and_unsafe_methods(cache_path: str) -> None:
    async def test(client: TestClient[Any, Any], site: Site, cache: aiovmc.AsyncCache) -> None:
        site.gate.clear()
        pending = [asyncio.ensure_future(client.get("/page/c")) for _ in range(20)]
        await site.entered.wait()  # one request is in the handler
        site.gate.set()
        responses = await asyncio.gather(*pending)
        assert site.calls == 1
        labels = [r.headers["X-Cache"] for r in responses]
        assert labels.count("MISS") == 1 and set(labels) <= {"MISS", "COALESCED", "HIT"}
        assert len({await r.text() for r in responses}) == 1

        url = "/page/v?h-vary=accept-language"
        for lang in ("en", "fr", "en", "fr"):
            await client.get(url, headers={"Accept-Language": lang})
        assert site.calls == 3
        assert await invalidate(cache, str(client.make_url(url))) == 2
        again = await client.get(url, headers={"Accept-Language": "en"})
        assert again.headers["X-Cache"] == "MISS"

        await client.post("/page/c")
        assert (await client.get("/page/c")).headers["X-Cache"] == "MISS"
        assert (await client.get("/page/c")).headers["X-Cache"] == "HIT"
        posted = await client.post("/page/c", headers={"X-Redirect": "1"}, allow_redirects=False)
        assert posted.status == 303  # raised as an HTTPException: invalidates all the same
        assert (await client.get("/page/c")).headers["X-Cache"] == "MISS"

    run(cache_path, test)


def test_never_stored(cache_path: str) -> None:
    async def test(client: TestClient[Any, Any], site: Site, cache: aiovmc.AsyncCache) -> None:
        for _ in range(2):
            streamed = await client.get("/stream")
            assert await streamed.read() == b"streamed" and "X-Cache" not in streamed.headers
            missing = await client.get("/missing")
            assert missing.status == 404 and await missing.text() == "nothing here"
            cookie = await client.get("/page/s?h-set-cookie=a%3D1")
            assert "X-Cache" not in cookie.headers
            private = await client.get("/page/p", headers={"Authorization": "Bearer t"})
            assert "X-Cache" not in private.headers
            set_cookie = await client.get("/cookie")
            assert "X-Cache" not in set_cookie.headers and "session" in set_cookie.cookies

    assert run(cache_path, test).calls == 10


def test_ttl_and_clock(cache_path: str) -> None:
    now = [1000.0]

    async def test(client: TestClient[Any, Any], site: Site, cache: aiovmc.AsyncCache) -> None:
        assert (await client.get("/page/t")).headers["X-Cache"] == "MISS"
        now[0] += 29
        hit = await client.get("/page/t")
        assert hit.headers["X-Cache"] == "HIT" and hit.headers["Age"] == "29"
        now[0] += 1
        assert (await client.get("/page/t")).headers["X-Cache"] == "MISS"

    assert run(cache_path, test, ttl=30, clock=lambda: now[0]).calls == 2


def test_option_errors() -> None:
    with pytest.raises(TypeError, match=r"path= .* or cache="):
        setup_cache(web.Application())
    with pytest.raises(TypeError, match=r"^setup_cache: unknown option tll \(options: allow_"):
        setup_cache(web.Application(), path="/dev/shm/x.cache", tll=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match=r"^setup_cache: max_body_size must be a number of "
                                         r"bytes >= 0, not -1"):
        setup_cache(web.Application(), path="/dev/shm/x.cache", max_body_size=-1)
    with pytest.raises(TypeError, match=r"^setup_cache: max_body_size must be a number of "
                                        r"bytes >= 0, not float 1.5"):
        setup_cache(web.Application(), path="/dev/shm/x.cache", max_body_size=1.5)  # type: ignore[arg-type]


def _mapped(path: str) -> bool:
    """True if this process maps the file at `path`."""
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(path) for line in maps)


async def _hello(request: web.Request) -> web.StreamResponse:
    return web.Response(text="hello")


def test_the_file_is_opened_at_startup_and_closed_at_cleanup(cache_path: str) -> None:
    app = web.Application()
    setup_cache(app, path=cache_path, size="1MiB")
    app.router.add_get("/", _hello)

    async def main() -> None:
        assert not _mapped(cache_path)
        async with TestClient(TestServer(app)) as client:
            assert _mapped(cache_path)  # at startup, before any request
            assert (await client.get("/")).headers["X-Cache"] == "MISS"
            assert (await client.get("/")).headers["X-Cache"] == "HIT"
        assert not _mapped(cache_path)  # closed at cleanup

    asyncio.run(main())


def test_a_given_cache_is_left_open(cache_path: str) -> None:
    async def main() -> None:
        async with aiovmc.AsyncCache(cache_path, size="1MiB") as cache:
            site = Site(cache)
            async with TestClient(TestServer(site.app)) as client:
                assert (await client.get("/page/o")).headers["X-Cache"] == "MISS"
            # Still open after the app's cleanup: the URL's generation, page and slot.
            stored = cache.cache.keys()
            assert sum(k.startswith(b"aiovmc.http") for k in stored) == 3

    asyncio.run(main())


def test_a_cache_file_that_cannot_be_opened_fails_the_startup(cache_path: str) -> None:
    aiovmc.Cache(cache_path, size="2MiB").close()
    app = web.Application()
    setup_cache(app, path=cache_path, size="1MiB")

    async def main() -> None:
        server = TestServer(app)
        try:
            with pytest.raises(aiovmc.CacheConfigError, match="holds a cache of 2097152 bytes"):
                await server.start_server()
        finally:
            await server.close()

    asyncio.run(main())
