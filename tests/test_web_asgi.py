"""The HTTP caching rules through the ASGI middleware, in process (httpx's
ASGI transport), on asyncio and trio. Real servers: tests/test_web_servers.py."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import aiovmc
from aiovmc.integrations._http import Entry
from aiovmc.integrations.asgi import CacheMiddleware, invalidate

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class Site:
    """A small app counting its handler calls, behind the middleware."""

    def __init__(self, cache: aiovmc.AsyncCache, **options: Any) -> None:
        self.calls = 0
        self.clock = Clock()
        self.gate: anyio.Event | None = None

        async def page(request: Request) -> Response:
            self.calls += 1
            if self.gate is not None:
                await self.gate.wait()
            params = dict(request.query_params)
            headers = {k[2:]: v for k, v in params.items() if k.startswith("h-")}
            status = int(params.get("status", 200))
            body = params.get("body", f"page {request.url.path} {self.calls}")
            return PlainTextResponse(body, status_code=status, headers=headers)

        async def big(request: Request) -> Response:
            self.calls += 1
            n = int(request.query_params["n"])

            async def chunks() -> AsyncIterator[bytes]:
                for _ in range(n):
                    yield b"x" * 1000

            return StreamingResponse(chunks(), media_type="text/plain")

        async def boom(request: Request) -> Response:
            self.calls += 1
            raise RuntimeError("handler failed")

        async def later(request: Request) -> Response:
            self.calls += 1
            return PlainTextResponse("done", background=BackgroundTask(self._background))

        async def write(request: Request) -> Response:
            return PlainTextResponse("written", status_code=int(request.headers["x-status"]))

        app = Starlette(routes=[
            Route("/big", big),
            Route("/boom", boom),
            Route("/later", later),
            Route("/page/{name}", page, methods=["GET", "HEAD"]),
            Route("/page/{name}", write, methods=["POST"]),
        ])
        options.setdefault("clock", self.clock)
        self.app = CacheMiddleware(app, cache=cache, **options)
        self.background_done = anyio.Event()

    async def _background(self) -> None:
        self.background_done.set()

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                 base_url="http://example.test")


@pytest.fixture
async def cache(cache_path: str) -> AsyncIterator[aiovmc.AsyncCache]:
    async with aiovmc.AsyncCache(cache_path, size="4MiB") as c:
        yield c


async def test_miss_then_hit_with_stable_etag_and_age(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        first = await c.get("/page/a?y=2&x=1")
        site.clock.now += 7.9
        second = await c.get("/page/a?x=1&y=2")  # parameter order does not matter
    assert site.calls == 1
    assert first.headers["x-cache"] == "MISS" and "age" not in first.headers
    assert second.headers["x-cache"] == "HIT" and second.headers["age"] == "7"
    assert second.text == first.text == "page /page/a 1"
    digest = hashlib.blake2b(first.content, digest_size=16).hexdigest()
    assert first.headers["etag"] == second.headers["etag"] == f'"{digest}"'
    assert second.headers["content-length"] == str(len(first.content))


async def test_length_and_age_are_the_replays_own(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        await c.get("/page/x?h-age=99&h-connection=close")
        site.clock.now += 3
        hit = await c.get("/page/x?h-age=99&h-connection=close")
    assert hit.headers.get_list("age") == ["3"]
    assert hit.headers.get_list("content-length") == [str(len(hit.content))]
    assert "close" not in hit.headers.get("connection", "")


async def test_app_etag_kept_and_if_none_match_gives_304(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        first = await c.get("/page/e?h-etag=%22v1%22&h-cache-control=max-age%3D60")
        assert first.headers["etag"] == '"v1"'
        for tag in ['"v1"', 'W/"v1"', '"zz", "v1"', "*"]:
            r = await c.get("/page/e?h-etag=%22v1%22&h-cache-control=max-age%3D60",
                            headers={"if-none-match": tag})
            assert r.status_code == 304, tag
            assert r.content == b""
            assert r.headers["etag"] == '"v1"' and r.headers["cache-control"] == "max-age=60"
            assert "content-type" not in r.headers
        r = await c.get("/page/e?h-etag=%22v1%22&h-cache-control=max-age%3D60",
                        headers={"if-none-match": '"v2"'})
        assert r.status_code == 200 and r.text == "page /page/e 1"
    assert site.calls == 1


async def test_head_is_answered_from_the_get_entry(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        cold = await c.head("/page/h")  # no GET entry yet: the app answers, nothing stored
        assert cold.status_code == 200 and "x-cache" not in cold.headers
        got = await c.get("/page/h")
        head = await c.head("/page/h")
    assert got.headers["x-cache"] == "MISS"
    assert head.headers["x-cache"] == "HIT" and head.content == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert site.calls == 2


@pytest.mark.parametrize(
    "query",
    [
        "h-cache-control=no-store",
        "h-cache-control=private",
        "h-cache-control=no-cache",
        "h-cache-control=max-age%3D0",
        "h-set-cookie=a%3Db",
        "h-vary=*",
        "status=500",
        "status=201",
    ],
)
async def test_responses_that_are_never_stored(cache: aiovmc.AsyncCache, query: str) -> None:
    site = Site(cache)
    entries = len(cache.cache)
    async with site.client() as c:
        for n in range(1, 4):
            r = await c.get(f"/page/n?{query}")
            assert "x-cache" not in r.headers and r.text == f"page /page/n {n}"
    assert site.calls == 3
    stored = cache.cache.keys()
    assert not any(k.startswith(b"aiovmc.http\x00e") for k in stored)
    assert len(cache.cache) == entries + 1  # the URL's generation record only


async def test_freshness_from_s_maxage_then_max_age_then_ttl(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache, ttl=100)
    urls = {
        "/page/s?h-cache-control=max-age%3D50%2C+s-maxage%3D20": 20,
        "/page/m?h-cache-control=max-age%3D50": 50,
        "/page/t": 100,
    }
    async with site.client() as c:
        for url, lifetime in urls.items():
            calls = site.calls
            start = site.clock.now
            assert (await c.get(url)).headers["x-cache"] == "MISS"
            site.clock.now = start + lifetime - 0.5
            assert (await c.get(url)).headers["x-cache"] == "HIT"
            site.clock.now = start + lifetime
            assert (await c.get(url)).headers["x-cache"] == "MISS"
            assert site.calls == calls + 2
            site.clock.now = start


async def test_ttl_none_stores_only_responses_that_state_their_freshness(
    cache: aiovmc.AsyncCache,
) -> None:
    site = Site(cache, ttl=None)
    async with site.client() as c:
        for _ in range(2):
            await c.get("/page/plain")
            await c.get("/page/fresh?h-cache-control=max-age%3D9")
    assert site.calls == 3


async def test_authorization_and_cookie_requests_bypass_unless_allowed(
    cache: aiovmc.AsyncCache,
) -> None:
    site = Site(cache)
    async with site.client() as c:
        await c.get("/page/p")
        for headers in ({"authorization": "Bearer x"}, {"cookie": "s=1"}):
            r = await c.get("/page/p", headers=headers)
            assert "x-cache" not in r.headers
    assert site.calls == 3
    allowing = Site(cache, allow_cookies=True, allow_authorization=True)
    async with allowing.client() as c:
        r = await c.get("/page/p", headers={"cookie": "s=1", "authorization": "Bearer x"})
    assert r.headers["x-cache"] == "HIT" and allowing.calls == 0


async def test_request_cache_control_is_ignored_by_default(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        await c.get("/page/r")
        for value in ("no-cache", "no-store", "max-age=0"):
            r = await c.get("/page/r", headers={"cache-control": value})
            assert r.headers["x-cache"] == "HIT", value
    assert site.calls == 1


async def test_request_cache_control_honoured_when_asked(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache, honor_request_cache_control=True)
    async with site.client() as c:
        await c.get("/page/r")
        bypass = await c.get("/page/r", headers={"cache-control": "no-store"})
        assert "x-cache" not in bypass.headers and bypass.text == "page /page/r 2"
        assert (await c.get("/page/r")).text == "page /page/r 1"  # no-store stored nothing
        refill = await c.get("/page/r", headers={"cache-control": "no-cache"})
        assert refill.headers["x-cache"] == "MISS" and refill.text == "page /page/r 3"
        again = await c.get("/page/r", headers={"cache-control": "max-age=0"})
        assert again.headers["x-cache"] == "MISS"
        assert (await c.get("/page/r")).text == "page /page/r 4"


async def test_vary_variants_and_invalidate(cache: aiovmc.AsyncCache, cache_path: str) -> None:
    site = Site(cache)
    url = "/page/v?h-vary=accept-language"
    async with site.client() as c:
        texts = {}
        for lang in ("en", "fr", "de"):
            r = await c.get(url, headers={"accept-language": lang})
            texts[lang] = r.text
        for lang in ("en", "fr", "de"):
            r = await c.get(url, headers={"accept-language": lang})
            assert r.headers["x-cache"] == "HIT" and r.text == texts[lang]
        assert site.calls == 3  # the first fill learns the Vary and stores under its variant
        # `url` as the app saw it (str(request.url)), by path from a fresh handle
        assert await invalidate(cache_path, f"http://example.test{url}") == 3
        assert await invalidate(cache, f"http://example.test{url}") == 0
        r = await c.get(url, headers={"accept-language": "fr"})
        assert r.headers["x-cache"] == "MISS"


async def test_a_hit_costs_two_lookups_three_with_vary(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        for url, lookups in (("/page/p", 2), ("/page/p?h-vary=accept-language", 3)):
            await c.get(url)
            before = cache.statistics()
            assert (await c.get(url)).headers["x-cache"] == "HIT"
            after = cache.statistics()
            assert (after.gets - before.gets, after.hits - before.hits) == (lookups, lookups)


async def test_the_latest_response_decides_the_vary(cache: aiovmc.AsyncCache) -> None:
    """The URL's responses gain a Vary, then lose it: each lookup follows the
    latest stored response (one identity for every query, through `key`)."""
    site = Site(cache, key=lambda request: request.path, honor_request_cache_control=True)
    en, fr = {"accept-language": "en"}, {"accept-language": "fr"}
    async with site.client() as c:
        plain = await c.get("/page/x", headers=en)
        assert (await c.get("/page/x", headers=fr)).text == plain.text
        varied = await c.get("/page/x?h-vary=accept-language",
                             headers={**en, "cache-control": "no-cache"})
        assert varied.headers["x-cache"] == "MISS" and varied.headers["vary"] == "accept-language"
        again = await c.get("/page/x", headers=en)
        assert again.headers["x-cache"] == "HIT" and again.text == varied.text
        unvaried = await c.get("/page/x", headers=fr)  # its variant: filled, with no Vary
        assert unvaried.headers["x-cache"] == "MISS" and "vary" not in unvaried.headers
        last = await c.get("/page/x", headers=en)
        assert last.headers["x-cache"] == "HIT" and last.text == unvaried.text
    assert site.calls == 3
    assert await invalidate(cache, "/page/x") == 2  # the variant en, then the plain response


async def test_unsafe_method_invalidates_its_url(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        await c.get("/page/w")
        await c.post("/page/w", headers={"x-status": "409"})  # a failure changes nothing
        assert (await c.get("/page/w")).headers["x-cache"] == "HIT"
        await c.post("/page/w", headers={"x-status": "200"})
        assert (await c.get("/page/w")).headers["x-cache"] == "MISS"


async def test_cold_url_runs_the_app_once_for_concurrent_requests(
    cache: aiovmc.AsyncCache,
) -> None:
    site = Site(cache)
    site.gate = anyio.Event()
    results: list[httpx.Response] = []
    async with site.client() as c:

        async def fetch() -> None:
            results.append(await c.get("/page/cold"))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(fetch)
            await anyio.wait_all_tasks_blocked()
            site.gate.set()
    assert site.calls == 1
    labels = sorted(r.headers["x-cache"] for r in results)
    assert labels == ["COALESCED"] * 49 + ["MISS"]
    assert {r.text for r in results} == {"page /page/cold 1"}


async def test_large_bodies_stream_through_unstored(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache, max_body_size=10_000)
    async with site.client() as c:
        small = await c.get("/big?n=5")
        assert (await c.get("/big?n=5")).headers["x-cache"] == "HIT"
        for _ in range(2):
            large = await c.get("/big?n=50")
            assert large.content == b"x" * 50_000 and "x-cache" not in large.headers
    assert small.content == b"x" * 5000
    assert site.calls == 3


async def test_app_error_propagates_and_nothing_is_stored(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="handler failed"):
                await c.get("/boom")
    assert site.calls == 2


async def test_background_tasks_run_after_the_response(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        r = await c.get("/later")
    assert r.text == "done" and r.headers["x-cache"] == "MISS"
    assert site.background_done.is_set()


async def test_custom_key_and_header_name(cache: aiovmc.AsyncCache) -> None:
    seen: list[str] = []

    def key(request: Any) -> str:
        seen.append(request.path)
        return "pages"  # every URL is one entry

    site = Site(cache, key=key, cache_header="x-my-cache")
    async with site.client() as c:
        await c.get("/page/one")
        r = await c.get("/page/two")
    assert r.text == "page /page/one 1" and r.headers["x-my-cache"] == "HIT"
    assert seen == ["/page/one", "/page/two"]
    assert await invalidate(cache, "pages") == 1


async def test_unreadable_entry_is_a_miss(cache: aiovmc.AsyncCache) -> None:
    site = Site(cache)
    async with site.client() as c:
        await c.get("/page/d")
        stored = cache.cache.keys()
        (key,) = [k for k in stored if k.startswith(b"aiovmc.http\x00e")]
        await cache.put(key, b"AVMH\x09 another version")
        r = await c.get("/page/d")
    assert r.headers["x-cache"] == "MISS" and site.calls == 2


async def test_responses_with_trailers_stream_through(cache: aiovmc.AsyncCache) -> None:
    calls = 0

    async def app(scope: Any, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        nonlocal calls
        calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": [],
                    "trailers": True})
        await send({"type": "http.response.body", "body": b"body"})
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])

    middleware = CacheMiddleware(app, cache=cache)
    scope = {"type": "http", "method": "GET", "path": "/t", "query_string": b"",
             "headers": [(b"host", b"example.test")]}
    for _ in range(2):
        await middleware(scope, receive, send)
    assert calls == 2
    assert sent == ["http.response.start", "http.response.body", "http.response.trailers"] * 2


def test_entry_format_round_trip_and_damage() -> None:
    entry = Entry(200, [(b"content-type", b"text/plain"), (b"etag", b'"1"')], b"body", 1.5, 9.5)
    blob = entry.encode()
    assert blob[:5] == b"AVMH\x01"
    assert Entry.decode(blob) == entry
    for damaged in (b"", blob[:10], b"XXXX" + blob[4:], blob[:30]):
        assert Entry.decode(damaged) is None


def test_constructor_checks() -> None:
    async def app(scope: Any, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        pass

    with pytest.raises(TypeError, match=r"path= .* or cache="):
        CacheMiddleware(app)
    with pytest.raises(ValueError, match=r"^CacheMiddleware: ttl must be None or a number of "
                                         r"seconds >= 0, not -1"):
        CacheMiddleware(app, path="/dev/shm/x.cache", ttl=-1)
    with pytest.raises(TypeError, match=r"^CacheMiddleware: ttl must be None or a number of "
                                        r"seconds >= 0, not str '60'"):
        CacheMiddleware(app, path="/dev/shm/x.cache", ttl="60")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^CacheMiddleware: unknown option tll \(options: allow_"):
        CacheMiddleware(app, path="/dev/shm/x.cache", tll=1)  # type: ignore[call-arg]


async def test_response_too_large_for_the_cache_is_served_unstored(tmp_path: Any) -> None:
    async with aiovmc.AsyncCache(str(tmp_path / "small.cache"), size="1MiB") as small:
        site = Site(small, max_body_size=4 << 20)
        async with site.client() as c:
            for _ in range(2):
                r = await c.get("/big?n=1000")  # 1 MB: more than the whole pool
                assert r.headers["x-cache"] == "MISS" and len(r.content) == 1_000_000
        assert site.calls == 2


async def _lifespan(middleware: CacheMiddleware) -> list[MutableMapping[str, Any]]:
    """Run the lifespan protocol through `middleware`; the messages it sent."""
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, str]:
        return next(messages)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await middleware({"type": "lifespan"}, receive, send)
    return sent


async def _lifespan_app(scope: Any, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


async def test_lifespan_opens_the_cache_at_startup_and_closes_it_at_shutdown(
    cache_path: str,
) -> None:
    middleware = CacheMiddleware(_lifespan_app, path=cache_path, size="1MiB")
    sent = await _lifespan(middleware)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    created = await anyio.Path(cache_path).stat()  # at startup, before any request
    assert created.st_size == 1 << 20
    assert middleware.rules.cache._cache is None  # closed (and forgotten) at shutdown


async def test_a_cache_file_that_cannot_be_opened_fails_the_startup(cache_path: str) -> None:
    """A file created with other settings stops the worker at startup, with the
    reason, instead of failing every request."""
    aiovmc.Cache(cache_path, size="2MiB").close()
    middleware = CacheMiddleware(_lifespan_app, path=cache_path, size="1MiB")
    startup, _shutdown = await _lifespan(middleware)
    assert startup["type"] == "lifespan.startup.failed"
    reason = f"aiovmc CacheMiddleware: {cache_path} holds a cache of 2097152 bytes"
    assert reason in startup["message"]
