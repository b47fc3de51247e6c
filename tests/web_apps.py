"""The apps that tests/test_web_servers.py serves with real servers.

Configured by the environment: AIOVMC_WEB_CACHE is the cache file, and
AIOVMC_WEB_CALLS a log to which every handler call appends one line
"<pid> <path>" (O_APPEND: whole lines from any number of processes). Every
response carries ``x-served-by``: the pid of the worker that answered it.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

CACHE = os.environ.get("AIOVMC_WEB_CACHE", "")
CALLS = os.environ.get("AIOVMC_WEB_CALLS", "")
_calls = 0  # this worker's handler calls
SLOW_SECONDS = 0.5  # how long the cold handler works: concurrent requests overlap it
# The middlewares' ttl: longer than any test runs, so that no entry a test expects
# a hit from expires under it (/short states its own max-age=1 to test expiry).
TTL = 3600


def _log_call(path: str) -> None:
    fd = os.open(CALLS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()} {path}\n".encode())
    finally:
        os.close(fd)


def _answer(
    path: str, query: dict[str, str], headers: dict[str, str]
) -> tuple[int, dict[str, str], str]:
    """Status, headers and body of every route, whatever the framework."""
    if path == "/health":
        return 200, {"cache-control": "no-store"}, "ok"
    _log_call(path)
    if path == "/vary":
        lang = headers.get("accept-language", "")
        return 200, {"vary": "accept-language"}, f"lang={lang} by {os.getpid()}"
    if path == "/short":
        return 200, {"cache-control": "max-age=1"}, f"short by {os.getpid()}"
    if path == "/nostore":
        return 200, {"cache-control": "no-store"}, f"nostore by {os.getpid()}"
    global _calls
    _calls += 1
    return 200, {}, f"{path} v={query.get('v', '')} call {_calls} by {os.getpid()}"


# ---- ASGI (uvicorn, gunicorn's UvicornWorker) ----

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def _asgi_inner(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    from urllib.parse import parse_qsl

    query = dict(parse_qsl(scope["query_string"].decode()))
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    if scope["path"].startswith("/slow"):
        await anyio.sleep(SLOW_SECONDS)
    status, extra, body = _answer(scope["path"], query, headers)
    raw = [(b"content-type", b"text/plain")] + [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body.encode()})


def _served_by(app: Any) -> Any:
    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        async def tag(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                pid = str(os.getpid()).encode()
                message["headers"] = [*message["headers"], (b"x-served-by", pid)]
            await send(message)

        await app(scope, receive, tag if scope["type"] == "http" else send)

    return wrapper


def _asgi() -> Any:
    from aiovmc.integrations.asgi import CacheMiddleware

    return _served_by(CacheMiddleware(_asgi_inner, path=CACHE, size="16MiB", ttl=TTL))


asgi_app = _asgi() if CACHE else None


# ---- aiohttp (gunicorn's aiohttp.GunicornWebWorker) ----


async def aiohttp_app() -> Any:
    from aiohttp import web

    from aiovmc.integrations.aiohttp import setup_cache

    @web.middleware
    async def served_by(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        response.headers["x-served-by"] = str(os.getpid())
        return response

    async def handle(request: web.Request) -> web.Response:
        if request.path.startswith("/slow"):
            await anyio.sleep(SLOW_SECONDS)
        headers = {k.lower(): v for k, v in request.headers.items()}
        status, extra, body = _answer(request.path, dict(request.query), headers)
        return web.Response(status=status, text=body, headers=extra)

    app = web.Application(middlewares=[served_by])
    setup_cache(app, path=CACHE, size="16MiB", ttl=TTL)
    app.router.add_get("/{tail:.*}", handle)
    return app
