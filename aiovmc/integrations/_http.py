"""The HTTP caching rules shared by the ASGI and aiohttp integrations.

Both adapters translate their framework's request and response into the
neutral types here (`Request`, `Entry`) and let `ResponseCache` decide: what is
looked up, what is stored, under which key, for how long, and what a stored
response is replayed as. The rules (docs/web.md has them as a table):

Requests
    * Only GET is looked up and filled; HEAD is answered from the GET entry when
      there is one (and otherwise goes to the app, unstored). Other methods go to
      the app; an unsafe method (POST, PUT, PATCH, DELETE) answered with a status
      below 400 invalidates its URL, as RFC 9111 §4.4 asks.
    * A request carrying ``Authorization`` or ``Cookie`` goes to the app and is
      neither served nor stored, unless ``allow_authorization`` /
      ``allow_cookies``.
    * The request's own ``Cache-Control`` is ignored by default, as nginx and
      Varnish do: browsers send ``no-cache`` on every reload and Postman on every
      request, so honouring it hands any client a way to send every request to
      the app. With ``honor_request_cache_control=True``: ``no-store`` bypasses
      the cache (not served, not stored); ``no-cache`` or ``max-age=0`` drops the
      stored response so that this request refills it (still coalesced).

Responses
    * Stored: statuses in ``statuses`` (200, 203, 204, 300, 301, 308, 404, 410);
      fresh for ``s-maxage``, else ``max-age``, else the cache's ``ttl``
      (``ttl=None``: only responses that state their freshness are stored); never
      a response with ``Cache-Control`` ``no-store``, ``no-cache`` or ``private``,
      or ``Set-Cookie``, or ``Vary: *``, or a body above ``max_body_size``.
    * Key: scheme, host (lower case, default port dropped), path and query
      (parameters sorted), then the values of the request headers that the stored
      response names in ``Vary``; ``key=`` replaces the URL part.
    * Replay: the stored status, headers and body; ``Age`` (whole seconds since
      it was stored) and ``X-Cache: HIT`` (``MISS`` on the response that filled the
      entry, ``COALESCED`` on requests that waited for that fill). A strong
      ``ETag`` is computed from the body (blake2b, so it is the same in every
      worker and after a restart) unless the app set one; ``If-None-Match``
      matching it (weak comparison, or ``*``) gets ``304 Not Modified``.

Storage layout (all keys start with ``KEY_PREFIX``)
    * ``g`` + URL: the URL's generation, 16 random hex digits. Every other key of
      the URL contains it, so `invalidate` replacing it makes every stored
      variant unreachable at once, from any process, with no read-modify-write.
    * ``e`` + generation + URL + NUL: the URL's *base* key. It holds the stored
      response (`Entry`, format version 1, below) when the response names no
      ``Vary``, else a Vary record (`AVMV`, below): the header names whose
      values tell the variants apart. So a hit costs two lookups (generation,
      response), three with ``Vary``.
    * ``e`` + generation + URL + NUL + header values: one stored variant of a
      URL whose responses name ``Vary``.
    * ``s`` + generation + URL + NUL + n: variant n's entry key, claimed with
      `add` (insert-if-absent, so concurrent writers never lose one); `invalidate`
      deletes what they list, to free the room at once and count the entries.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from .._async_cache import AsyncCache
from .._errors import AiovmcError, KeyTooLargeError
from ._open import LazyCache

__all__ = [
    "DEFAULT_STATUSES",
    "Entry",
    "Options",
    "Request",
    "ResponseCache",
    "identity_from_url",
    "invalidate",
]

DEFAULT_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
KEY_PREFIX = b"aiovmc.http\x00"
MAX_VARIANTS = 64  # variants listed per URL for invalidate(); more are still made unreachable
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

# Hop-by-hop headers (RFC 9110 §7.6.1), and the length and age, which a replay sets itself.
_NOT_STORED = frozenset(
    {
        b"age",
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# What a 304 carries of the stored response (RFC 9110 §15.4.5).
_NOT_MODIFIED_KEEPS = frozenset(
    {b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"}
)

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class Request:
    """What the rules need of a request. Header names are lower case; a header
    sent several times has its values joined with ", "."""

    method: str
    scheme: str
    host: str
    path: str
    query: str
    headers: Mapping[str, str]


# ---- stored responses ----

_MAGIC = b"AVMH"
_VERSION = 1
_HEAD = struct.Struct("<4sBxHddI")  # magic, version, status, stored_at, expires_at, n_headers
_HEADER = struct.Struct("<HI")  # name length, value length


@dataclass(frozen=True, slots=True)
class Entry:
    """A complete response as stored: status, headers (names lower case), body,
    when it was stored and when it stops being fresh (UNIX seconds)."""

    status: int
    headers: Headers
    body: bytes
    stored_at: float
    expires_at: float

    def encode(self) -> bytes:
        parts = [_HEAD.pack(_MAGIC, _VERSION, self.status, self.stored_at, self.expires_at,
                            len(self.headers))]
        for name, value in self.headers:
            parts.append(_HEADER.pack(len(name), len(value)))
            parts.append(name)
            parts.append(value)
        parts.append(self.body)
        return b"".join(parts)

    @classmethod
    def decode(cls, blob: bytes) -> Entry | None:
        """The entry, or None for anything that is not a sound version-1 entry
        (another version, or damage: then it is a miss, and the next fill
        replaces it)."""
        view = memoryview(blob)
        try:
            magic, version, status, stored_at, expires_at, count = _HEAD.unpack_from(view)
            if magic != _MAGIC or version != _VERSION:
                return None
            at = _HEAD.size
            headers: Headers = []
            for _ in range(count):
                nlen, vlen = _HEADER.unpack_from(view, at)
                at += _HEADER.size
                if at + nlen + vlen > len(view):
                    return None
                name, at = bytes(view[at : at + nlen]), at + nlen
                headers.append((name, bytes(view[at : at + vlen])))
                at += vlen
        except struct.error:
            return None
        return cls(status, headers, bytes(view[at:]), stored_at, expires_at)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


_VARY_MAGIC = b"AVMV\x01"  # a Vary record: magic, version 1, then the names (", ", latin-1)


def _vary_record(names: Sequence[str]) -> bytes:
    return _VARY_MAGIC + ", ".join(names).encode("latin-1")


def _vary_of(blob: bytes) -> list[str] | None:
    """The names of a Vary record, or None if `blob` is not one (a response)."""
    if not blob.startswith(_VARY_MAGIC):
        return None
    return _vary_names(blob[len(_VARY_MAGIC) :].decode("latin-1"))


# ---- header parsing ----


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """``Cache-Control`` directives, names lower case, quotes removed."""
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    for part in value.split(","):
        name, sep, arg = part.strip().partition("=")
        if name:
            directives[name.strip().lower()] = arg.strip().strip('"') if sep else None
    return directives


def _seconds(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        seconds = int(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _vary_names(value: str | None) -> list[str]:
    if not value:
        return []
    return sorted({name.strip().lower() for name in value.split(",") if name.strip()})


def _etag_matches(if_none_match: str, etag: bytes) -> bool:
    """If-None-Match uses the weak comparison (RFC 9110 §13.1.2)."""
    ours = etag.decode("latin-1").strip().removeprefix("W/")
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == ours:
            return True
    return False


# ---- keys ----


@functools.lru_cache(maxsize=4096)  # the hot URLs of a site: parsing is most of a hit's cost
def identity(scheme: str, host: str, path: str, query: str) -> str:
    """A URL as one string, equal for equal URLs: lower-case scheme and host,
    default port dropped, path percent-decoded, query parameters sorted."""
    scheme = scheme.lower()
    host = host.lower()
    default = {"http": ":80", "https": ":443", "ws": ":80", "wss": ":443"}.get(scheme)
    if default and host.endswith(default):
        host = host[: -len(default)]
    pairs = sorted(parse_qsl(query, keep_blank_values=True))
    return f"{scheme}://{host}{unquote(path) or '/'}?{urlencode(pairs)}"


def identity_from_url(url: str) -> str:
    """`identity` of an absolute URL such as ``str(request.url)``; a string
    that is not an http(s) URL is taken as is (what a ``key=`` function returned)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return url
    return identity(parts.scheme, parts.netloc, parts.path, parts.query)


def _generation_key(ident: bytes) -> bytes:
    return KEY_PREFIX + b"g" + ident


def _slot_key(gen: bytes, ident: bytes, n: int) -> bytes:
    return KEY_PREFIX + b"s" + gen + ident + b"\x00" + str(n).encode()


def _base_key(gen: bytes, ident: bytes) -> bytes:
    """The key of the URL's response if it names no Vary, else of its Vary record."""
    return KEY_PREFIX + b"e" + gen + ident + b"\x00"


def _entry_key(gen: bytes, ident: bytes, names: Sequence[str], headers: Mapping[str, str]) -> bytes:
    """The key of the request's variant (with no `names`: the base key)."""
    values = "\x00".join(f"{name}={headers.get(name, '')}" for name in names)
    return KEY_PREFIX + b"e" + gen + ident + b"\x00" + values.encode("utf-8", "surrogateescape")


async def _generation(cache: AsyncCache, ident: bytes, *, create: bool) -> bytes | None:
    key = _generation_key(ident)
    gen = await cache.get(key)
    if gen is not None or not create:
        return gen
    fresh = os.urandom(8).hex().encode()
    if await cache.add(key, fresh):
        return fresh
    return await cache.get(key, fresh)  # another process created it first


async def _invalidate_identity(cache: AsyncCache, ident: bytes) -> int:
    """Make every stored variant of the URL `ident` unreachable from every
    process and delete the ones listed; returns how many entries were deleted."""
    old = await _generation(cache, ident, create=False)
    if old is None:
        return 0
    # Replacing the generation is the invalidation: from here on no process
    # finds the old entries. Deleting them afterwards only frees their room.
    await cache.put(_generation_key(ident), os.urandom(8).hex().encode())
    removed = 0
    for n in range(MAX_VARIANTS):
        slot = _slot_key(old, ident, n)
        entry_key = await cache.get(slot)
        if entry_key is None:
            break
        removed += await cache.delete(entry_key)
        await cache.delete(slot)
    await cache.delete(_base_key(old, ident))  # the Vary record, if it is one
    return removed


# ---- the cache ----


@dataclass(slots=True)
class Outcome:
    """What `ResponseCache.serve` found: a response to replay (`entry`, with
    the X-Cache `label`), or none (the caller delivers the app's own response
    if `filled`, else calls the app itself)."""

    entry: Entry | None = None
    label: str = ""
    filled: bool = False
    ident: bytes = b""  # the URL's identity, for a second call of serve()


class Options(TypedDict, total=False):
    """The keyword options of both middlewares (`aiovmc.integrations.asgi.
    CacheMiddleware`, `aiovmc.integrations.aiohttp.setup_cache`); their defaults
    are `ResponseCache`'s, their meaning is in docs/web.md."""

    path: str | os.PathLike[str] | None
    size: int | str | None
    cache: AsyncCache | None
    ttl: float | None
    statuses: Iterable[int]
    max_body_size: int
    allow_authorization: bool
    allow_cookies: bool
    honor_request_cache_control: bool
    cache_header: str | None
    key: Callable[[Request], str] | None
    clock: Callable[[], float]


def _check_number(owner: str, name: str, value: object, what: str, *,
                  integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{owner}: {name} must be {what}, not {type(value).__name__} {value!r}")
    if not value >= 0:  # NaN too
        raise ValueError(f"{owner}: {name} must be {what}, not {value!r}")


class ResponseCache:
    """The rules, and the cache they apply to (opened lazily in each process),
    configured from a middleware's options (`Options`; `owner` names the
    middleware in the errors)."""

    __slots__ = (
        "allow_authorization",
        "allow_cookies",
        "cache",
        "cache_header",
        "clock",
        "honor_request_cache_control",
        "key",
        "max_body_size",
        "statuses",
        "ttl",
    )

    def __init__(self, owner: str, options: Options) -> None:
        unknown = sorted(options.keys() - Options.__optional_keys__)
        if unknown:
            known = ", ".join(sorted(Options.__optional_keys__))
            raise TypeError(f"{owner}: unknown option {', '.join(unknown)} (options: {known})")
        self.cache = LazyCache(options.get("path"), options.get("size"), options.get("cache"))
        self.ttl = options.get("ttl", 60.0)
        if self.ttl is not None:
            _check_number(owner, "ttl", self.ttl, "None or a number of seconds >= 0")
        self.statuses = frozenset(options.get("statuses", DEFAULT_STATUSES))
        self.max_body_size = options.get("max_body_size", 1 << 20)
        _check_number(owner, "max_body_size", self.max_body_size, "a number of bytes >= 0",
                      integer=True)
        self.allow_authorization = options.get("allow_authorization", False)
        self.allow_cookies = options.get("allow_cookies", False)
        self.honor_request_cache_control = options.get("honor_request_cache_control", False)
        self.cache_header = options.get("cache_header", "x-cache")
        self.key = options.get("key")
        self.clock = options.get("clock", time.time)

    def open(self) -> AsyncCache:
        """This process's cache (see `LazyCache`)."""
        return self.cache.get()

    # -- requests --

    def bypasses(self, request: Request) -> bool:
        """True if the request must go to the app untouched."""
        headers = request.headers
        if "authorization" in headers and not self.allow_authorization:
            return True
        if "cookie" in headers and not self.allow_cookies:
            return True
        if self.honor_request_cache_control:
            return "no-store" in parse_cache_control(headers.get("cache-control"))
        return False

    async def invalidate(self, request: Request) -> None:
        """After an unsafe method succeeded: drop the stored variants of its URL."""
        try:
            await _invalidate_identity(self.open(), self._identity(request))
        except KeyTooLargeError:
            pass

    def _identity(self, request: Request) -> bytes:
        ident = (
            self.key(request)
            if self.key is not None
            else identity(request.scheme, request.host, request.path, request.query)
        )
        return ident.encode("utf-8", "surrogateescape")

    async def serve(
        self,
        request: Request,
        fill: Callable[[], Awaitable[Entry | None]] | None,
        ident: bytes = b"",
    ) -> Outcome:
        """Look `request` (GET or HEAD) up; on a GET miss let one request on the
        host call `fill` (which runs the app and returns its response as an
        Entry if it may be stored, else None) and store what it returns.

        A request that waited for another's fill looks again; the fill may have
        stored nothing this request may use (not storable, or another Vary
        variant), so after two waits it gives up and the caller goes to the app.
        `ident` is `Outcome.ident` of an earlier call for the same request."""
        cache = self.open()
        ident = ident or self._identity(request)
        try:
            outcome = Outcome(ident=ident)
            waited = False
            tried: list[str] | None = None
            for attempt in range(3):
                gen = await _generation(cache, ident, create=True)
                assert gen is not None
                key = _base_key(gen, ident)
                blob = await cache.get(key)
                names = [] if blob is None else _vary_of(blob)
                if names is None:  # a response: the URL names no Vary
                    names = []
                elif names:  # a Vary record: look the request's variant up
                    key = _entry_key(gen, ident, names, request.headers)
                    blob = await cache.get(key)
                if attempt == 0 and blob is not None and self._refreshes(request):
                    await cache.delete(key)
                    blob = None
                if blob is None and fill is not None and not (waited and names == tried):
                    # Not after a wait that stored nothing for this variant: that
                    # response was not storable, so this request goes to the app.
                    tried = names

                    async def load(_: bytes, gen: bytes = gen) -> None:
                        outcome.filled = True
                        entry = await fill()
                        if entry is not None:
                            try:
                                await self._store(cache, request, ident, gen, entry)
                            except AiovmcError:
                                pass  # full (policy "none"), or too large: served, not stored
                        outcome.entry = entry
                        return None  # stored by _store, with the response's own lifetime

                    blob = await cache.get(key, on_miss=load)
                    if outcome.filled:
                        outcome.label = "MISS"
                        return outcome
                    waited = True
                    continue  # look again: the fill stored under the key it chose
                if blob is None:
                    break
                entry = Entry.decode(blob)
                if entry is not None and entry.expires_at > self.clock():
                    return Outcome(entry, "COALESCED" if waited else "HIT", ident=ident)
                await cache.delete(key)  # stale by our clock, or unreadable: refill
        except KeyTooLargeError:
            pass  # a URL too long to be a key: not cached
        return Outcome(ident=ident)

    def _refreshes(self, request: Request) -> bool:
        if not self.honor_request_cache_control:
            return False
        directives = parse_cache_control(request.headers.get("cache-control"))
        return "no-cache" in directives or directives.get("max-age") == "0"

    async def _store(
        self,
        cache: AsyncCache,
        request: Request,
        ident: bytes,
        gen: bytes,
        entry: Entry,
    ) -> None:
        ttl = entry.expires_at - entry.stored_at
        names = _vary_names((entry.header(b"vary") or b"").decode("latin-1"))
        if names:  # (without Vary, the entry itself replaces any record at the base key)
            await cache.put(_base_key(gen, ident), _vary_record(names), ttl=ttl)
        key = _entry_key(gen, ident, names, request.headers)
        await cache.put(key, entry.encode(), ttl=ttl)
        for n in range(MAX_VARIANTS):
            slot = _slot_key(gen, ident, n)
            if await cache.add(slot, key) or await cache.get(slot) == key:
                break

    # -- responses --

    def storable(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> float | None:
        """The freshness lifetime in seconds of a response that may be stored,
        else None. Decided from the status and headers alone."""
        if status not in self.statuses:
            return None
        cache_control = vary = None
        for name, value in headers:
            name = name.lower()
            if name == b"set-cookie":
                return None
            if name == b"cache-control":
                cache_control = value.decode("latin-1")
            elif name == b"vary":
                vary = value.decode("latin-1")
            elif name == b"content-length":
                try:
                    if int(value) > self.max_body_size:
                        return None
                except ValueError:
                    return None
        if vary is not None and "*" in vary:
            return None
        directives = parse_cache_control(cache_control)
        if {"no-store", "no-cache", "private"} & directives.keys():
            return None
        lifetime = _seconds(directives.get("s-maxage"))
        if lifetime is None:
            lifetime = _seconds(directives.get("max-age"))
        if lifetime is None:
            return self.ttl or None
        return lifetime or None

    def entry(self, status: int, headers: Headers, body: bytes, lifetime: float) -> Entry:
        """A response as stored: hop-by-hop headers dropped, an ETag added."""
        kept = [(name.lower(), value) for name, value in headers if name.lower() not in _NOT_STORED]
        if not any(name == b"etag" for name, _ in kept):
            digest = hashlib.blake2b(body, digest_size=16).hexdigest()
            kept.append((b"etag", f'"{digest}"'.encode()))
        now = self.clock()
        return Entry(status, kept, body, now, now + lifetime)

    def reply(
        self, entry: Entry, request: Request, label: str, *, length: bool = True
    ) -> tuple[int, Headers, bytes]:
        """Status, headers and body answering `request` from `entry` (a HEAD
        gets no body; `length=False` leaves Content-Length and the HEAD body to
        a framework that sets them itself)."""
        extra: Headers = []
        if label != "MISS":
            age = max(0, int(self.clock() - entry.stored_at))
            extra.append((b"age", str(age).encode()))
        if self.cache_header:
            extra.append((self.cache_header.lower().encode("latin-1"), label.encode()))
        etag = entry.header(b"etag")
        if_none_match = request.headers.get("if-none-match")
        if etag is not None and if_none_match is not None and _etag_matches(if_none_match, etag):
            kept = [(n, v) for n, v in entry.headers if n in _NOT_MODIFIED_KEEPS]
            return 304, kept + extra, b""
        if not length:
            return entry.status, [*entry.headers, *extra], entry.body
        headers = [*entry.headers, (b"content-length", str(len(entry.body)).encode()), *extra]
        return entry.status, headers, b"" if request.method == "HEAD" else entry.body


def open_for_invalidation(cache: AsyncCache | str | os.PathLike[str]) -> AsyncCache:
    """`cache` itself, or an AsyncCache on the file at that path."""
    if isinstance(cache, AsyncCache):
        return cache
    if isinstance(cache, (str, os.PathLike)):
        return AsyncCache(cache)
    raise TypeError(
        f"cache must be an AsyncCache or a cache file's path, not {type(cache).__name__}"
    )


async def invalidate(cache: AsyncCache | str | os.PathLike[str], url: str) -> int:
    """Remove every stored variant (all ``Vary`` values) of `url` — as the app
    saw it, e.g. ``str(request.url)`` — from the cache shared by every worker.

    `cache` is an open `AsyncCache` or the cache file's path. Works from any
    process; returns how many stored responses were removed. (Exported by
    `aiovmc.integrations.asgi` and `aiovmc.integrations.aiohttp`.)"""
    if not isinstance(url, str):
        raise TypeError(f"url must be a str such as str(request.url), not {type(url).__name__}")
    ident = identity_from_url(url).encode("utf-8", "surrogateescape")
    handle = open_for_invalidation(cache)
    try:
        return await _invalidate_identity(handle, ident)
    finally:
        if handle is not cache:
            await handle.aclose()

