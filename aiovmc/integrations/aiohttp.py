"""An HTTP response cache for aiohttp.web, shared by every worker on the host
through one aiovmc file.

    from aiovmc.integrations.aiohttp import setup_cache
    app = web.Application()
    setup_cache(app, path="/dev/shm/app.cache", size="256MiB", ttl=60)

The rules are those of `aiovmc.integrations._http` (docs/web.md), shared with
the ASGI middleware. A handler's `web.Response` is stored when the rules allow;
a `web.StreamResponse` that the handler prepared and wrote itself has already
gone to the client and is never stored. aiohttp is imported when
`setup_cache` is called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from ._http import (
    UNSAFE_METHODS,
    Entry,
    Headers,
    Options,
    Request,
    ResponseCache,
    invalidate,
)

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Middleware
    from typing_extensions import Unpack

__all__ = ["invalidate", "setup_cache"]

Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


def setup_cache(app: web.Application, **options: Unpack[Options]) -> None:
    """Cache the GET responses of `app` in an aiovmc file shared by its workers.

    Adds the cache's middleware to ``app.middlewares``, after those already
    there (it runs inside them: add the ones it should wrap later), and ties
    the file to the app's life (``app.cleanup_ctx``): with `path` (and `size`
    to create the file), each worker opens it when the app starts -- a file
    that cannot be opened fails the startup with the reason -- and closes it at
    cleanup; an open `AsyncCache` given as `cache` is used and left open. The
    options are `CacheMiddleware`'s (`aiovmc.integrations.asgi`). Works under
    ``gunicorn -k aiohttp.GunicornWebWorker -w N`` and ``web.run_app`` alike."""
    rules = ResponseCache("setup_cache", options)
    app.middlewares.append(_middleware(rules))

    async def opened(app: web.Application) -> AsyncIterator[None]:
        rules.open()
        yield
        await rules.cache.aclose()

    app.cleanup_ctx.append(opened)


def _middleware(rules: ResponseCache) -> Middleware:
    from aiohttp import web

    def replay(entry: Entry, request: Request, label: str) -> web.Response:
        # aiohttp sets Content-Length itself, and sends no body for HEAD or 304.
        status, headers, body = rules.reply(entry, request, label, length=False)
        response = web.Response(status=status, body=body or None)
        for name, value in headers:
            response.headers.add(name.decode("latin-1"), value.decode("latin-1"))
        return response

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        view = _request(request)
        if view.method in UNSAFE_METHODS:
            try:
                response = await handler(request)
            except web.HTTPException as exc:  # e.g. raise HTTPSeeOther(...) after a POST
                if exc.status < 400:
                    await rules.invalidate(view)
                raise
            if response.status < 400:
                await rules.invalidate(view)
            return response
        if view.method not in ("GET", "HEAD") or rules.bypasses(view):
            return await handler(request)
        if view.method == "HEAD":
            outcome = await rules.serve(view, None)
        else:
            own: list[web.StreamResponse] = []
            error: list[BaseException] = []

            async def fill() -> Entry | None:
                try:
                    response = await handler(request)
                except Exception as exc:  # raised for this request only, below
                    error.append(exc)
                    return None
                own.append(response)
                return _entry(rules, response)

            outcome = await rules.serve(view, fill)
            if error:
                raise error[0]
            if outcome.entry is None and own:
                return own[0]
        if outcome.entry is not None:
            return replay(outcome.entry, view, outcome.label)
        return await handler(request)

    return middleware


def _entry(rules: ResponseCache, response: web.StreamResponse) -> Entry | None:
    """`response` as an Entry if it may be stored: a plain `web.Response`
    with a bytes body, not yet sent, and storable by the rules."""
    from aiohttp import web

    if type(response) is not web.Response or response.prepared or response.cookies:
        return None  # streamed already, or setting cookies (set_cookie is not in .headers)
    body = response.body
    if not isinstance(body, bytes) or len(body) > rules.max_body_size:
        return None
    headers: Headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers.items()
    ]
    lifetime = rules.storable(response.status, headers)
    if lifetime is None:
        return None
    return rules.entry(response.status, headers, body, lifetime)


def _request(request: web.Request) -> Request:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        name = name.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return Request(
        method=request.method,
        scheme=request.scheme,
        host=request.host,
        path=request.path,
        query=request.query_string,
        headers=headers,
    )
