"""An HTTP response cache for any ASGI app (FastAPI, Starlette, Litestar, ...),
shared by every worker on the host through one aiovmc file.

    from aiovmc.integrations.asgi import CacheMiddleware
    app.add_middleware(CacheMiddleware, path="/dev/shm/myapp.cache", size="256MiB", ttl=60)

A pure ASGI middleware (it wraps ``send``; no ``BaseHTTPMiddleware``): the
response that fills an entry is captured whole, stored, then sent; one larger
than ``max_body_size``, or one that may not be stored, streams through as the
app sends it. The rules are those of `aiovmc.integrations._http` (docs/web.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import AiovmcError
from ._http import (
    UNSAFE_METHODS,
    Entry,
    Headers,
    Options,
    Outcome,
    Request,
    ResponseCache,
    invalidate,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["CacheMiddleware", "invalidate"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class CacheMiddleware:
    """Cache GET responses of `app` in an aiovmc file shared by its workers.

    ``CacheMiddleware(app, *, path=None, size=None, cache=None, ttl=60,
    statuses=DEFAULT_STATUSES, max_body_size=1 MiB, allow_authorization=False,
    allow_cookies=False, honor_request_cache_control=False,
    cache_header="x-cache", key=None, clock=time.time)``

    Give `path` (and `size` to create the file): each worker process opens it
    at lifespan startup (at its first request if the server runs no lifespan)
    and closes it at lifespan shutdown. Or give an open `AsyncCache` as
    `cache` (left open). `key(request)` returns the string that
    identifies a URL (default: scheme, host, path and sorted query); `request`
    has ``method``, ``scheme``, ``host``, ``path``, ``query`` and ``headers``
    (lower-case names). `clock` gives UNIX seconds for ``Age`` and freshness.
    """

    def __init__(self, app: ASGIApp, **options: Unpack[Options]) -> None:
        self.app = app
        self.rules = ResponseCache("CacheMiddleware", options)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = _request(scope)
        rules = self.rules
        if request.method in UNSAFE_METHODS:
            status = await _call_seeing_status(self.app, scope, receive, send)
            if status is not None and status < 400:
                await rules.invalidate(request)
            return
        if request.method not in ("GET", "HEAD") or rules.bypasses(request):
            await self.app(scope, receive, send)
            return
        outcome = await rules.serve(request, None)  # a hit needs no task group
        if outcome.entry is not None:
            await self._reply(outcome, request, send)
            return
        if request.method == "GET":
            capture = _Capture(rules, send)
            async with anyio.create_task_group() as tg:

                async def fill() -> Entry | None:
                    tg.start_soon(capture.run, self.app, scope, receive)
                    await capture.decided.wait()
                    return capture.entry

                outcome = await rules.serve(request, fill, outcome.ident)
                if outcome.entry is not None:
                    # Sent before the app's task ends: its background tasks run after.
                    await self._reply(outcome, request, send)
            if capture.error is not None:
                raise capture.error
            if outcome.entry is not None or outcome.filled:
                return
        await self.app(scope, receive, send)  # not found, not storable: the app answers

    def _lifespan_send(self, send: Send) -> Send:
        """`send` for the lifespan scope: the cache is opened when the app has started
        (a file that cannot be opened fails the startup, with the reason, rather than
        every request), and the cache this middleware opened is closed once the app
        has shut down."""

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    self.rules.open()
                except (AiovmcError, OSError) as exc:
                    message = {"type": "lifespan.startup.failed",
                               "message": f"aiovmc CacheMiddleware: {exc}"}
            elif message["type"] == "lifespan.shutdown.complete":
                await self.rules.cache.aclose()
            await send(message)

        return lifespan_send

    async def _reply(self, outcome: Outcome, request: Request, send: Send) -> None:
        assert outcome.entry is not None
        status, headers, body = self.rules.reply(outcome.entry, request, outcome.label)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Capture:
    """Runs the app for the request that fills an entry, holding its response
    back until it is complete (then `entry` is set, unless it may not be stored)
    or known not to be storable (then it streams through to the client).
    `decided` is set at either point, or when the app ends."""

    def __init__(self, rules: ResponseCache, send: Send) -> None:
        self.rules = rules
        self.send = send
        self.decided = anyio.Event()
        self.entry: Entry | None = None
        self.error: Exception | None = None
        self.start: Message | None = None
        self.lifetime: float | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.passing = False

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        try:
            await app(scope, receive, self.capture)
            if not self.passing and self.start is not None and self.entry is None:
                # The app ended without a final body message: deliver what it sent.
                await self.pass_through({"type": "http.response.body", "body": b""})
        except Exception as exc:  # re-raised by the middleware, in the request's task
            self.error = exc
        finally:
            self.decided.set()

    async def capture(self, message: Message) -> None:
        if self.passing:
            await self.send(message)
            return
        if self.entry is not None:
            return  # the response is complete: ASGI servers ignore what follows, so do we
        kind = message["type"]
        if kind == "http.response.start" and self.start is None:
            self.start = message
            self.lifetime = self.rules.storable(message["status"], message.get("headers", []))
            if self.lifetime is None or message.get("trailers", False):
                await self.pass_through(None)
            return
        if kind != "http.response.body" or self.start is None:  # trailers, pathsend, ...
            await self.pass_through(message)
            return
        body = message.get("body", b"")
        self.size += len(body)
        if self.size > self.rules.max_body_size:
            await self.pass_through(message)
            return
        self.chunks.append(body)
        if not message.get("more_body", False):
            assert self.lifetime is not None
            headers: Headers = [(bytes(n), bytes(v)) for n, v in self.start.get("headers", [])]
            self.entry = self.rules.entry(
                self.start["status"], headers, b"".join(self.chunks), self.lifetime
            )
            self.decided.set()

    async def pass_through(self, message: Message | None) -> None:
        """Stop capturing: send what was held back, then `message`, and from
        now on everything as it comes."""
        self.passing = True
        self.decided.set()
        if self.start is not None:
            await self.send(self.start)
        if self.chunks:
            more = message is not None
            await self.send({"type": "http.response.body", "body": b"".join(self.chunks),
                             "more_body": more})
            self.chunks = []
        if message is not None:
            await self.send(message)


async def _call_seeing_status(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> int | None:
    """Call the app; the status it answered with (None if it sent none)."""
    status: int | None = None

    async def watch(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        await send(message)

    await app(scope, receive, watch)
    return status


def _request(scope: Scope) -> Request:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    host = headers.get("host")
    if host is None:
        server = scope.get("server")
        host = f"{server[0]}:{server[1]}" if server else ""
    return Request(
        method=scope["method"],
        scheme=scope.get("scheme", "http"),
        host=host,
        path=scope.get("path", "/"),
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
    )
