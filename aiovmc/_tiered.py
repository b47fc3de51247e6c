"""`TieredCache`: the host's file as L1 over redis as L2 (DESIGN.md §11, docs/tiered.md).

How it is built, in the order a `get` meets it:

- **L1** is an `AsyncCache` on the host's file. A hit is the `AsyncCache` fast path
  and never touches the network. A miss goes through ``AsyncCache.get`` with an L1
  loader (`TieredCache._miss`), so it is coalesced exactly as an `AsyncCache` miss
  is (host-wide with ``coalesce="host"``, §9): a cold key costs one redis lookup per
  host, not per worker.
- **L2** is redis (or valkey). The L1 loader runs one script: GET the value with its
  PTTL, or, on a miss and when the caller has a loader, take the key's *lease*
  (``SET NX PX``). A redis hit is stored in L1 with redis's remaining TTL. The lease
  holder calls the caller's loader while renewing the lease (up to ``load_timeout``)
  and publishes the value (``SET NX PX``, lease released, waiters notified on the
  key's channel) in one script. Other hosts subscribe to that channel, look again,
  and wait for a message (not polling) until the lease runs out; then one of them
  takes the lease over.
- **Invalidation**: `put`, `delete` and `clear` write redis and publish on the
  namespace's channel in one transaction. One thread per host, the *listener*,
  subscribes to it and drops the keys from L1. It is elected with an OFD write lock
  on a byte of the sidecar file (released by the kernel when its process dies); the
  other processes' listener threads wait for that lock in ``F_OFD_SETLKW``.
- **Races between a fill and an invalidation** are closed by *stamps* in the sidecar
  (a generation word and 4096 per-key-hash words, see docs/format.md): a process
  filling L1 reads the key's stamp before its redis lookup and drops its own fill if
  the stamp moved by the time the fill is stored. Whoever invalidates changes the
  stamp before deleting from L1.
- **Outages**: redis is driven by redis-py's synchronous client in worker threads
  (anyio.to_thread), so the same code runs under asyncio and trio, and every call is
  bounded by socket timeouts with no retries. A failed call is counted, logged once
  per outage, and opens a circuit for ``timeout`` seconds during which misses call
  the loader directly. When the listener (re)subscribes — after an outage, or on
  taking over from another process — it bumps the generation and empties L1, since
  invalidations may have been missed meanwhile.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import inspect
import logging
import mmap
import os
import secrets
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Coroutine, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, overload

import anyio
import anyio.to_thread

from ._async_cache import AsyncCache, Loader, StoreWithTTL, ttl_until
from ._cache import CacheCore, CacheStatistics
from ._convert import TTL, Key, encode_key, ttl_to_ns, value_buffer
from ._errors import CacheConfigError, CacheFormatError, RepairNeeded
from ._native import compiled_async_get, ready

if TYPE_CHECKING:
    import redis as redis_py
    from typing_extensions import Buffer, Self

__all__ = ["TieredCache", "TieredStatistics"]

log = logging.getLogger("aiovmc.tiered")

D = TypeVar("D")

# -- the sidecar file ------------------------------------------------------------------
# Layout (docs/format.md, "TieredCache sidecar"): all integers little-endian.
_MAGIC: Final = b"AIOVMCT1"
_HOST_ID: Final = slice(8, 24)  # 16 random bytes naming the host in invalidations
_GENERATION: Final = 24  # u32, changed whenever L1 is emptied by a resync or a clear
_NAMESPACE_LEN: Final = 28  # u16
_NAMESPACE: Final = 32  # the namespace, UTF-8, at most _MAX_NAMESPACE bytes
_MAX_NAMESPACE: Final = 256
_STAMPS: Final = 512  # _SLOTS u32 stamps, one per key-hash bucket
_SLOTS: Final = 4096
_SIDECAR_SIZE: Final = _STAMPS + 4 * _SLOTS
# OFD byte-range locks, far beyond the end of the file (a lock needs no bytes there).
_INIT_LOCK: Final = 1 << 40  # held while a process creates or checks the sidecar
_LISTENER_LOCK: Final = (1 << 40) + 1  # held by the host's elected listener
_U32 = struct.Struct("<I")


def _flock(kind: int, offset: int) -> bytes:
    """A `struct flock` for one byte at ``offset`` (l_pid 0, as OFD locks require)."""
    return struct.pack("@hhqqi4x", kind, os.SEEK_SET, offset, 1, 0)


def _ofd_lock(fd: int, offset: int, *, wait: bool) -> bool:
    """Take an OFD write lock on byte ``offset``; False if busy and not ``wait``."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK,
                    _flock(fcntl.F_WRLCK, offset))
    except OSError as exc:
        if not wait and exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _ofd_unlock(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, offset))


def _bucket(key: bytes) -> int:
    return _STAMPS + 4 * (int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(),
                                         "little") % _SLOTS)


class _Sidecar:
    """The per-host state of a TieredCache beside its L1 file: ``PATH.tiered``.

    Stamps are written by several processes without a lock: a writer stores a fresh
    random word (never an increment), so the only question a reader asks — "did it
    change since I looked?" — has the right answer whatever the interleaving
    (aligned 4-byte stores and loads are single accesses on the platforms supported).
    """

    __slots__ = ("fd", "host_id", "map", "path")

    def __init__(self, cache_path: str | None, namespace: bytes, mode: int) -> None:
        if cache_path is None:
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            with tempfile.TemporaryFile(dir=shm) as handle:
                self.fd = os.dup(handle.fileno())
            self.path = None
        else:
            self.path = cache_path + ".tiered"
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                              mode)
        try:
            _ofd_lock(self.fd, _INIT_LOCK, wait=True)
            try:
                self._initialise(namespace)
            finally:
                _ofd_unlock(self.fd, _INIT_LOCK)
            self.map = mmap.mmap(self.fd, _SIDECAR_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self.host_id = bytes(self.map[_HOST_ID])

    def _initialise(self, namespace: bytes) -> None:
        where = self.path or "the private sidecar"
        size = os.fstat(self.fd).st_size
        if size == 0:
            header = bytearray(_STAMPS)
            header[:8] = _MAGIC
            header[_HOST_ID] = secrets.token_bytes(16)
            struct.pack_into("<H", header, _NAMESPACE_LEN, len(namespace))
            header[_NAMESPACE:_NAMESPACE + len(namespace)] = namespace
            os.pwrite(self.fd, bytes(header), 0)
            os.ftruncate(self.fd, _SIDECAR_SIZE)
            return
        found_header = os.pread(self.fd, _STAMPS, 0)
        if size != _SIDECAR_SIZE or found_header[:8] != _MAGIC:
            raise CacheFormatError(f"{where} is not an aiovmc TieredCache sidecar file")
        (length,) = struct.unpack_from("<H", found_header, _NAMESPACE_LEN)
        found = found_header[_NAMESPACE:_NAMESPACE + min(length, _MAX_NAMESPACE)]
        if found != namespace:
            raise CacheConfigError(
                f"{where} belongs to namespace {found.decode(errors='replace')!r}, not "
                f"{namespace.decode()!r}: one L1 file serves one namespace"
            )

    def stamp(self, key: bytes) -> tuple[bytes, bytes]:
        """What a fill compares before and after: the generation and the key's word."""
        m, at = self.map, _bucket(key)
        return m[_GENERATION:_GENERATION + 4], m[at:at + 4]

    def touch(self, key: bytes) -> None:
        """Change the key's stamp (before dropping the key from L1)."""
        at = _bucket(key)
        self.map[at:at + 4] = secrets.token_bytes(4)

    def touch_all(self) -> None:
        """Change the generation (before emptying L1)."""
        self.map[_GENERATION:_GENERATION + 4] = secrets.token_bytes(4)

    def generation(self) -> int:
        return int(_U32.unpack_from(self.map, _GENERATION)[0])

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


# -- statistics ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class TieredStatistics:
    """A snapshot of a `TieredCache`'s counters.

    ``l1`` is the file's `CacheStatistics` (shared by the host; its ``loader_calls``
    count L1 loads, i.e. redis lookups coalesced as §9 says). The other fields belong
    to the handle that produced the snapshot, its listener thread included.
    """

    l1: CacheStatistics
    redis_gets: int
    """Keys this handle looked up in redis (each with its PTTL) after an L1 miss."""
    redis_hits: int
    """Of those, the keys found in redis."""
    redis_errors: int
    """Redis calls that failed or timed out (an outage shows here)."""
    loader_calls: int
    """Calls of the caller's loader made by this handle (cold keys, and misses
    during an outage)."""
    lease_waits: int
    """Loads this handle waited for because another process or host held the lease."""
    invalidations: int
    """Invalidations from other hosts applied to L1 by this handle's listener."""
    resyncs: int
    """Times this handle's listener subscribed (elected, or back after an outage)
    and emptied L1 because invalidations may have been missed."""


class _Counters:
    __slots__ = ("invalidations", "lease_waits", "loader_calls", "redis_errors",
                 "redis_gets", "redis_hits", "resyncs")

    def __init__(self) -> None:
        self.redis_gets = self.redis_hits = self.redis_errors = 0
        self.loader_calls = self.lease_waits = self.invalidations = self.resyncs = 0


# -- redis -----------------------------------------------------------------------------

# KEYS: value, lease. ARGV: token, lease ms, "1" to take the lease on a miss.
# Returns {1, value, pttl} (hit), {2} (lease taken) or {0, lease pttl} (miss; -2: no lease).
_LOOKUP: Final = """
local v = redis.call('GET', KEYS[1])
if v then return {1, v, redis.call('PTTL', KEYS[1])} end
if ARGV[3] == '1' and redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {2}
end
return {0, redis.call('PTTL', KEYS[2])}
"""
# KEYS: value, lease. ARGV: token, value, ttl ms ("0": none), loaded channel.
# Stores the loaded value unless a put got there first; returns {value, pttl} stored.
_PUBLISH: Final = """
if ARGV[3] == '0' then redis.call('SET', KEYS[1], ARGV[2], 'NX')
else redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], 'value')
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""
# KEYS: lease. ARGV: token, loaded channel, message ("none" or "retry").
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
# KEYS: lease. ARGV: token, lease ms.
_RENEW: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_HIT, _LEAD, _MISS = 1, 2, 0


class _Unavailable(Exception):
    """A redis call failed or timed out (already counted and logged)."""


def _make_client(target: object, timeout: float) -> redis_py.Redis:
    """A synchronous redis-py client from a URL, or the caller's own client."""
    try:
        import redis as redis_py
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError:
        raise ImportError('TieredCache needs redis-py: pip install "aiovmc[redis]"') from None
    if isinstance(target, str):
        return redis_py.Redis.from_url(
            target,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            client_name="aiovmc-tiered",
        )
    if isinstance(target, redis_py.Redis):
        return target
    if type(target).__module__.startswith("redis.asyncio"):
        raise TypeError(
            "TieredCache drives redis-py's synchronous client from worker threads (so it "
            "runs under trio too): pass a URL or a redis.Redis, not a redis.asyncio client"
        )
    raise TypeError(f"redis is a URL or a redis.Redis client, not {type(target).__name__}")


def _ttl_ms(ttl: TTL) -> int:
    ns = ttl_to_ns(ttl)
    return 0 if ns is None else max(1, -(-ns // 1_000_000))


def _deadline(pttl: int, sent: float) -> float | None:
    """When a value read from redis must leave L1: redis's PTTL (-1: no expiry)
    counted from ``sent``, the `time.monotonic()` of the request (redis measured
    it later, so L1 never keeps the value longer than redis does)."""
    return None if pttl < 0 else sent + max(pttl, 1) / 1000


# -- the listener ----------------------------------------------------------------------


class _Listener(threading.Thread):
    """The host's invalidation listener, once this process wins the election.

    Tries the listener lock once when made (`elected_at_once`: nobody on the host
    was listening, so L1 may hold values invalidated meanwhile, and the caller empties
    it before serving from it); otherwise waits for it in ``F_OFD_SETLKW`` (a standby
    costs one blocked thread and no CPU). Once elected: subscribe, then change the
    generation and empty L1 (invalidations may have been missed since whoever
    listened before), then apply messages. On a connection failure: count it,
    reconnect with backoff, resync.
    """

    _PING_AFTER: Final = 5.0  # seconds of silence before checking the connection

    def __init__(self, tiered: TieredCache) -> None:
        super().__init__(name=f"aiovmc-tiered-listener-{tiered.namespace}", daemon=True)
        self._tiered = tiered
        self._halt = threading.Event()
        self.elected = threading.Event()
        self.subscribed = threading.Event()
        self._pubsub: Any = None
        # Its own open file description: the lock belongs to it, and closing it (at
        # the thread's end, or by the kernel at the process's) hands the election on.
        with _listeners_lock:  # a fork() child closes it: no fork in between
            self._fd = os.open(f"/proc/self/fd/{tiered._sidecar.fd}", os.O_RDWR | os.O_CLOEXEC)
            _listeners.add(self)
        try:
            self.elected_at_once = _ofd_lock(self._fd, _LISTENER_LOCK, wait=False)
        except BaseException:
            self.close_fd()
            raise

    def stop(self) -> None:
        self._halt.set()
        pubsub = self._pubsub
        if pubsub is not None:
            try:
                pubsub.connection.disconnect()  # wakes a blocked read
            except Exception:
                pass

    def run(self) -> None:
        try:
            if not self.elected_at_once:
                _ofd_lock(self._fd, _LISTENER_LOCK, wait=True)
            if self._halt.is_set():
                return
            self.elected.set()
            backoff = 0.05
            while not self._halt.is_set():
                try:
                    self._listen()
                    backoff = 0.05
                except Exception as exc:  # any failure means: reconnect
                    if self._halt.is_set():
                        break
                    self.subscribed.clear()
                    self._tiered._failed("listener", exc)
                    self._halt.wait(backoff)
                    backoff = min(backoff * 2, 1.0)
        finally:
            self.close_fd()

    def close_fd(self) -> None:
        """Close its descriptor (handing the election on) and leave `_listeners`,
        in one step as far as fork() is concerned: a child must not close the
        number again, which the parent may have reused for anything by then."""
        with _listeners_lock:
            _listeners.discard(self)
            os.close(self._fd)

    def _listen(self) -> None:
        tiered = self._tiered
        pubsub = tiered._client.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub = pubsub
        try:
            pubsub.subscribe(tiered._channel)
            last = time.monotonic()
            pinged = False
            while not self._halt.is_set():
                message = pubsub.get_message(timeout=0.5)
                now = time.monotonic()
                if message is None:
                    if now - last > self._PING_AFTER + tiered._timeout:
                        raise TimeoutError(f"no answer from redis for {now - last:.1f} s")
                    if now - last > self._PING_AFTER and not pinged:
                        pubsub.ping()
                        pinged = True
                    continue
                last, pinged = now, False
                kind = message["type"]
                if kind == "subscribe":
                    tiered._resync()
                    self.subscribed.set()
                elif kind == "message":
                    tiered._apply(message["data"])
        finally:
            self._pubsub = None
            pubsub.close()


#: The listeners whose descriptor is open. fork() holds `_listeners_lock`, so
#: that no listener is between opening its descriptor and joining the set, or
#: between closing it and leaving. Nothing done under it allocates Python
#: objects that could run a finalizer (which might fork): an open or a close,
#: a set's add or discard.
_listeners: weakref.WeakSet[_Listener] = weakref.WeakSet()
_listeners_lock = threading.Lock()
_listeners_held = False  # whether the fork in progress took `_listeners_lock`


def _hold_listeners() -> None:
    """Before fork: take `_listeners_lock` (noted, so that the hooks after the
    fork release it only if this took it: an exception, such as a signal
    handler's, may end the wait)."""
    global _listeners_held
    _listeners_held = False
    _listeners_lock.acquire()
    _listeners_held = True


def _release_listeners() -> None:
    """After fork, in the parent: give `_listeners_lock` back."""
    if _listeners_held:
        _listeners_lock.release()


def _forget_listeners_in_child() -> None:
    """After fork, in the child: it has no listener threads, and its copies of
    their descriptors would keep a dead parent's election lock held: close
    them (each, whatever another's close raises)."""
    try:
        for listener in list(_listeners):
            try:
                os.close(listener._fd)
            except OSError:
                pass
        _listeners.clear()
    finally:
        _release_listeners()


os.register_at_fork(
    before=_hold_listeners,
    after_in_parent=_release_listeners,
    after_in_child=_forget_listeners_in_child,
)


# -- TieredCache -----------------------------------------------------------------------


class TieredCache:
    """The host's cache file (L1) in front of redis or valkey (L2): DESIGN.md §11.

    ``TieredCache(path=None, *, redis, namespace, ttl=None, on_miss=None, timeout=1.0,
    load_timeout=30.0, **cache_options)``

    ``redis`` is a URL (``"redis://host:6379/0"``, ``"unix:///run/redis.sock"``) or a
    synchronous ``redis.Redis`` client; values live there as raw bytes under
    ``namespace:key`` with ``PX`` TTLs. ``ttl`` is the default TTL of stored values.
    ``timeout`` bounds every redis call (connect and reply, no retries) and is how
    long redis is left alone after a failure; the cross-host lease lasts
    ``3 * timeout`` seconds unless renewed, and a loading host renews it for at most
    ``load_timeout`` seconds. ``cache_options`` open the L1 file as `AsyncCache`
    does (``size``, ``offload_threshold``...). The L1 file serves one namespace; its
    sidecar ``PATH.tiered`` holds the host's shared state. See docs/tiered.md.
    """

    __slots__ = (
        "_cache",
        "_channel",
        "_client",
        "_client_owned",
        "_closed",
        "_count",
        "_down_until",
        "_get_inline",
        "_l1",
        "_lease_ms",
        "_limit",
        "_listener",
        "_load_timeout",
        "_lookup",
        "_prefix",
        "_publish",
        "_release",
        "_renew",
        "_sidecar",
        "_timeout",
        "_ttl",
        "namespace",
        "on_miss",
    )

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        redis: str | redis_py.Redis,
        namespace: str,
        ttl: TTL = None,
        on_miss: Loader | None = None,
        timeout: float = 1.0,
        load_timeout: float | None = 30.0,
        **cache_options: Any,
    ) -> None:
        if not isinstance(namespace, str) or not namespace:
            raise CacheConfigError(f"namespace must be a non-empty str, not {namespace!r}")
        ns = namespace.encode()
        if len(ns) > _MAX_NAMESPACE:
            raise CacheConfigError(
                f"namespace is {len(ns)} bytes long; at most {_MAX_NAMESPACE} are allowed"
            )
        ttl_to_ns(ttl)  # checks it
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            0 < timeout < 3600
        ):
            raise CacheConfigError(f"timeout must be a number of seconds in (0, 3600), got "
                                   f"{timeout!r}")
        if load_timeout is not None:
            ttl_to_ns(load_timeout, "load_timeout")
        if on_miss is not None and not callable(on_miss):
            raise TypeError("on_miss must be callable or None")
        client = _make_client(redis, float(timeout))
        self.namespace = namespace
        self.on_miss = on_miss
        self._ttl = ttl
        self._timeout = float(timeout)
        self._load_timeout = load_timeout
        self._lease_ms = max(1, int(3000 * timeout))
        self._prefix = ns + b":"
        self._channel = b"aiovmc:" + ns + b":invalidate"
        self._client = client
        self._client_owned = client is not redis
        self._lookup = client.register_script(_LOOKUP)
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._count = _Counters()
        self._down_until = 0.0
        self._closed = False
        self._l1 = AsyncCache(path, **cache_options)
        try:
            mode = cache_options.get("mode", 0o600)
            self._sidecar = _Sidecar(None if path is None else self._l1.cache.path, ns, mode)
        except BaseException:
            self._l1.cache.close()
            raise
        self._cache = self._l1.cache  # what the compiled `get` reads, as AsyncCache's
        self._get_inline = CacheCore(self._cache).get_inline
        self._limit = max(self._l1.offload_threshold - 1, 0)  # as AsyncCache's inline get
        try:
            self._listener = _Listener(self)
            if self._listener.elected_at_once:
                # Nobody on this host listened until now: what L1 holds may have been
                # changed in redis meanwhile. Served until the listener subscribes (and
                # resyncs), it could be of any age; emptied here, it is never older
                # than this handle.
                self._forget_l1()
        except BaseException:
            if hasattr(self, "_listener"):
                self._listener.close_fd()
            self._sidecar.close()
            self._l1.cache.close()
            raise
        self._listener.start()

    def __repr__(self) -> str:
        return f"<TieredCache {self.namespace!r} of {self._l1.cache!r}>"

    @property
    def l1(self) -> AsyncCache:
        """The host's file, as an `AsyncCache` (reading it directly skips redis)."""
        return self._l1

    # -- names in redis --------------------------------------------------------------

    def _key(self, key: bytes) -> bytes:
        return self._prefix + key

    def _lease(self, key: bytes) -> bytes:
        return b"aiovmc:" + self._prefix + b"lease:" + key

    def _loaded_channel(self, key: bytes) -> bytes:
        return b"aiovmc:" + self._prefix + b"loaded:" + key

    # -- reads -----------------------------------------------------------------------

    @overload
    def get(
        self, key: Key, default: None = None, *, on_miss: Loader | None = None, ttl: TTL = None
    ) -> Coroutine[Any, Any, bytes | None]: ...

    @overload
    def get(
        self, key: Key, default: D, *, on_miss: Loader | None = None, ttl: TTL = None
    ) -> Coroutine[Any, Any, bytes | D]: ...

    def get(
        self, key: Key, default: object = None, *, on_miss: Loader | None = None, ttl: TTL = None
    ) -> Coroutine[Any, Any, object]:
        """The value of ``key``: from L1, else from redis, else from the loader
        (``on_miss`` here, else the handle's) called once across all hosts. Use as
        ``await tiered.get(key)``.

        An L1 hit returns at once (no checkpoint) and never touches the network. A
        redis hit is stored in L1 with redis's remaining TTL; a loaded value is stored
        in redis and L1 with ``ttl`` (None: the handle's). A loader returning None
        stores nothing and every waiter gets its own ``default``; a loader exception
        propagates to the tasks of this process waiting on it (another host then
        loads in turn). With redis unreachable, a miss calls the loader directly.

        Not an ``async def``, as `AsyncCache.get` is not: the L1 lookup runs in the
        call, and a hit returns an awaitable already done (`aiovmc._native.ready`).
        """
        # On the fast path, the compiled `get` of AsyncCache (native/vmc_fast.c)
        # stands in for this method: the same steps, without a Python frame.
        k = key if key.__class__ is bytes else encode_key(key)
        found: object
        try:
            found = self._get_inline(k, self._limit)
        except RepairNeeded:
            found = RepairNeeded
        if found.__class__ is bytes:
            return ready(found)
        return self._get_rest(k, found, default, on_miss, ttl)

    async def _get_rest(
        self, k: bytes, found: object, default: object, on_miss: Loader | None, ttl: TTL
    ) -> object:
        """`get` past its L1 lookup, which found no value to return at once (``found``:
        a large value's size, None or `RepairNeeded`, as for `AsyncCache._get_rest`):
        the rest of L1's get from that lookup (counted once), which waits for a
        repair or copies a large value off the loop, and whose loader looks in
        redis, then loads."""
        loader = on_miss if on_miss is not None else self.on_miss
        effective = ttl if ttl is not None else self._ttl
        fill = _Fill()
        miss = functools.partial(self._miss, fill=fill, loader=loader, ttl=effective)
        value = await self._l1._get_waiting(k, found, None, miss, effective)  # type: ignore[arg-type]
        if fill.before is not None and self._sidecar.stamp(k) != fill.before:
            # An invalidation (or a resync) may have run between our lookup and the
            # store: what we stored may be stale for L1, though it was current when
            # read. Drop it; the next get looks again.
            self._l1.cache.delete(k)
        return default if value is None else value

    def get_nowait(self, key: Key, default: D | None = None) -> bytes | D | None:
        """The value of ``key`` in L1, or ``default``. Never touches redis, never waits."""
        return self._l1.get_nowait(key, default)

    async def get_many(self, keys: Iterable[Key]) -> dict[bytes, bytes]:
        """``{key: value}`` for the keys found in L1 or, for the others, in redis (one
        round trip; stored in L1 with their remaining TTLs). Never loads. With redis
        unreachable, the L1 hits only."""
        wanted = [k if k.__class__ is bytes else encode_key(k) for k in keys]
        found = await self._l1.get_many(wanted)
        missing = [k for k in dict.fromkeys(wanted) if k not in found]
        if missing and not self._down():
            before = [self._sidecar.stamp(k) for k in missing]
            sent = time.monotonic()
            try:
                replies = await self._call(self._get_with_pttl, missing)
            except _Unavailable:
                replies = []
            for k, stamp, (value, pttl) in zip(missing, before, replies, strict=False):
                if value is None:
                    continue
                self._count.redis_hits += 1
                found[k] = value
                await self._l1.put(k, value, ttl=ttl_until(_deadline(pttl, sent)))
                if self._sidecar.stamp(k) != stamp:
                    self._l1.cache.delete(k)
        return {k: found[k] for k in wanted if k in found}

    def _get_with_pttl(self, keys: list[bytes]) -> list[tuple[bytes | None, int]]:
        self._count.redis_gets += len(keys)
        pipe = self._client.pipeline(transaction=True)
        for k in keys:
            pipe.get(self._key(k))
            pipe.pttl(self._key(k))
        replies = pipe.execute()
        return list(zip(replies[::2], replies[1::2], strict=True))

    async def _miss(
        self, key: bytes, *, fill: _Fill, loader: Loader | None, ttl: TTL
    ) -> bytes | StoreWithTTL | None:
        """The L1 loader: redis, else the lease and the caller's loader."""
        fill.before = self._sidecar.stamp(key)
        if not self._down():
            try:
                return await self._from_redis(key, loader, ttl)
            except _Unavailable:
                pass
        if loader is None:
            return None
        self._count.loader_calls += 1
        loaded: bytes | None = await _call_loader(loader, key)
        return loaded

    async def _from_redis(
        self, key: bytes, loader: Loader | None, ttl: TTL
    ) -> bytes | StoreWithTTL | None:
        token = secrets.token_bytes(8)
        lookup = functools.partial(self._look_up, key, token, lead=loader is not None)
        sent = time.monotonic()
        reply = await self._call(lookup)
        while True:
            kind = reply[0]
            if kind == _HIT:
                self._count.redis_hits += 1
                return StoreWithTTL(reply[1], _deadline(reply[2], sent))
            if kind == _LEAD:
                assert loader is not None
                led: bytes | StoreWithTTL | None = await self._lead(key, token, loader, ttl)
                return led
            if loader is None:
                return None
            self._count.lease_waits += 1
            # Wait in a thread on the key's channel. Cancelling abandons the thread,
            # which ends by itself when the lease runs out (at most 3 * timeout); it
            # only reads, so an abandoned one never takes a lease nobody would hold.
            peek = functools.partial(self._look_up, key, token, lead=False)
            sent = time.monotonic()
            reply = await self._call(functools.partial(self._wait_for_lease, key, peek),
                                     abandon_on_cancel=True)
            if reply[0] == _MISS:
                if reply[1] == "none":
                    return None
                sent = time.monotonic()
                reply = await self._call(lookup)  # the lease is free, or taken again

    def _look_up(self, key: bytes, token: bytes, *, lead: bool) -> list[Any]:
        self._count.redis_gets += 1
        return list(self._lookup(keys=[self._key(key), self._lease(key)],
                                 args=[token, self._lease_ms, b"1" if lead else b"0"]))

    def _wait_for_lease(self, key: bytes, peek: Any) -> list[Any]:
        """Subscribe to the key's channel, look again, then wait for the leader's
        message or the end of its lease. Returns a hit, [0, "none"] (the leader's
        loader found nothing), or another miss: the lease ended or changed hands."""
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._loaded_channel(key))
            reply: list[Any] = peek()
            while reply[0] == _MISS and reply[1] != -2:
                deadline = time.monotonic() + reply[1] / 1000 + 0.01
                while (left := deadline - time.monotonic()) > 0:
                    message = pubsub.get_message(timeout=left)
                    if message is None or message["type"] != "message":
                        continue
                    if message["data"] == b"none":
                        return [_MISS, "none"]
                    answer: list[Any] = peek()  # "value", or "retry": look again
                    return answer
                reply = peek()  # the lease ran out, or was renewed: wait again
            return reply
        finally:
            pubsub.close()

    async def _lead(self, key: bytes, token: bytes, loader: Loader, ttl: TTL) -> Any:
        """Holding the key's lease: load, renewing the lease, and publish."""
        self._count.loader_calls += 1
        lease = self._lease(key)
        channel = self._loaded_channel(key)
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, lease, token)
                try:
                    result = await _call_loader(loader, key)
                except Exception as exc:
                    error = exc
                finally:
                    tg.cancel_scope.cancel()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._call_quietly(self._release, [lease], [token, channel, b"retry"])
            raise
        if error is not None:
            # Another host (or process) waiting on the lease loads in turn.
            with anyio.CancelScope(shield=True):
                await self._call_quietly(self._release, [lease], [token, channel, b"retry"])
            raise error
        if result is None:
            await self._call_quietly(self._release, [lease], [token, channel, b"none"])
            return None
        value = bytes(value_buffer(result))
        sent = time.monotonic()
        try:
            stored, pttl = await self._call(
                self._publish, keys=[self._key(key), lease],
                args=[token, value, _ttl_ms(ttl), channel],
            )
        except _Unavailable:
            return value  # stored in L1 with `ttl`; the lease runs out by itself
        except Exception:  # an error reply (e.g. OOM): the load is not lost for L1
            log.exception("redis refused the loaded value of %r (namespace %r)", key,
                          self.namespace)
            return value
        return StoreWithTTL(stored, _deadline(pttl, sent))

    async def _keep_lease(self, lease: bytes, token: bytes) -> None:
        """Renew the lease every ``timeout`` seconds, for at most ``load_timeout``."""
        deadline = None if self._load_timeout is None else (
            anyio.current_time() + _seconds(self._load_timeout))
        while True:
            await anyio.sleep(self._timeout)
            if deadline is not None and anyio.current_time() >= deadline:
                return  # stalled: let the lease run out so another host takes over
            if not await self._call_quietly(self._renew, [lease], [token, self._lease_ms]):
                return  # lost it (expired meanwhile): another host may lead now

    # -- writes ----------------------------------------------------------------------

    async def put(self, key: Key, value: Buffer, *, ttl: TTL = None) -> int:
        """Store ``value`` in redis (with ``ttl``, None: the handle's), tell the other
        hosts to drop ``key`` from their L1, then store it in L1; return its L1
        timestamp.

        If redis fails or times out (after at most ``timeout``), ``key`` is dropped
        from this host's L1 and the redis-py error propagates: the value may or may
        not have reached redis, so no host serves the old one from this L1.
        """
        k = key if key.__class__ is bytes else encode_key(key)
        data = bytes(value_buffer(value))
        effective = ttl if ttl is not None else self._ttl
        ms = _ttl_ms(effective)

        def write() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self._key(k), data, px=ms or None)
            pipe.publish(self._channel, self._sidecar.host_id + b"k" + k)
            pipe.execute()

        await self._write(k, write)
        return await self._l1.put(k, data, ttl=effective)

    async def delete(self, key: Key) -> bool:
        """Delete ``key`` from redis and from every host's L1; True if it was in
        redis or in this host's L1. On a redis failure: as `put`."""
        k = key if key.__class__ is bytes else encode_key(key)

        def write() -> int:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self._key(k))
            pipe.publish(self._channel, self._sidecar.host_id + b"k" + k)
            return int(pipe.execute()[0])

        removed = await self._write(k, write)
        dropped = await self._l1.delete(k)
        return bool(removed) or dropped

    async def _write(self, key: bytes, write: Any) -> Any:
        try:
            result = await anyio.to_thread.run_sync(write)
        except BaseException as exc:
            if _is_outage(exc):
                self._failed("write", exc)
            self._sidecar.touch(key)
            self._l1.cache.delete(key)
            raise
        self._sidecar.touch(key)
        return result

    async def clear(self) -> None:
        """Delete the namespace's keys from redis (SCAN and UNLINK, not atomic: keys
        written meanwhile may stay) and empty every host's L1. On a redis failure:
        this host's L1 is emptied and the redis-py error propagates."""

        def write() -> None:
            match = _glob_escape(self._prefix) + b"*"
            batch: list[bytes] = []
            for name in self._client.scan_iter(match=match, count=1000):
                batch.append(name)
                if len(batch) == 1000:
                    self._client.unlink(*batch)
                    batch.clear()
            if batch:
                self._client.unlink(*batch)
            self._client.publish(self._channel, self._sidecar.host_id + b"c")

        try:
            await anyio.to_thread.run_sync(write)
        except BaseException as exc:
            if _is_outage(exc):
                self._failed("clear", exc)
            raise
        finally:
            self._sidecar.touch_all()
            await self._l1.clear()

    # -- invalidation (listener thread) ----------------------------------------------

    def _apply(self, message: bytes) -> None:
        """Apply one invalidation from the namespace's channel."""
        if len(message) < 17 or message[:16] == self._sidecar.host_id:
            return  # our own write (applied by the writer), or not ours to read
        kind, key = message[16:17], message[17:]
        if kind == b"k":
            self._sidecar.touch(key)
            self._l1.cache.delete(key)
        elif kind == b"c":
            self._sidecar.touch_all()
            self._l1.cache.clear()
        else:
            return
        self._count.invalidations += 1

    def _forget_l1(self) -> None:
        """Empty L1, and make fills begun before it drop their value."""
        self._sidecar.touch_all()
        self._l1.cache.clear()

    def _resync(self) -> None:
        """Subscribed (again): forget what L1 may have missed meanwhile."""
        if self._down_until:
            self._down_until = 0.0  # misses may use redis again
            log.warning("redis is reachable again (namespace %r)", self.namespace)
        self._forget_l1()
        self._count.resyncs += 1  # last: whoever sees it sees the resync done

    # -- calls to redis --------------------------------------------------------------

    def _down(self) -> bool:
        return self._down_until != 0.0 and time.monotonic() < self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        self._count.redis_errors += 1
        if not self._down():
            log.warning("redis unavailable (%s, namespace %r): %s; L1 misses call the "
                        "loader directly for %.3g s", what, self.namespace, exc, self._timeout)
        self._down_until = time.monotonic() + self._timeout

    async def _call(self, func: Any, *args: Any, abandon_on_cancel: bool = False,
                    **kwargs: Any) -> Any:
        """Run a redis call in a worker thread; an outage becomes `_Unavailable`."""
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(func, *args, **kwargs), abandon_on_cancel=abandon_on_cancel
            )
        except Exception as exc:
            if not _is_outage(exc):
                raise
            self._failed("read", exc)
            raise _Unavailable from exc

    async def _call_quietly(self, script: Any, keys: list[bytes], args: list[Any]) -> Any:
        """A best-effort script call (lease upkeep): False if redis failed."""
        try:
            return await self._call(script, keys=keys, args=args)
        except _Unavailable:
            return False
        except Exception:  # a redis error reply: nothing to retry
            log.exception("redis refused a lease command (namespace %r)", self.namespace)
            return False

    # -- statistics and lifetime -----------------------------------------------------

    def statistics(self) -> TieredStatistics:
        """This handle's tier counters and the L1 file's statistics. Never waits."""
        c = self._count
        return TieredStatistics(
            l1=self._l1.statistics(),
            redis_gets=c.redis_gets,
            redis_hits=c.redis_hits,
            redis_errors=c.redis_errors,
            loader_calls=c.loader_calls,
            lease_waits=c.lease_waits,
            invalidations=c.invalidations,
            resyncs=c.resyncs,
        )

    async def aclose(self) -> None:
        """Stop the listener (handing the election on), close the redis client if
        this handle made it, and close L1. Idempotent; a checkpoint."""
        if not self._closed:
            self._closed = True
            self._listener.stop()
            if self._listener.elected.is_set():
                # Its read was woken by stop(); it ends within a moment.
                await anyio.to_thread.run_sync(self._listener.join, self._timeout + 1)
            if self._client_owned:
                self._client.close()
            await self._l1.aclose()
            self._sidecar.close()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class _Fill:
    """Set by the L1 loader when it runs in this task: the key's stamp before."""

    __slots__ = ("before",)

    def __init__(self) -> None:
        self.before: tuple[bytes, bytes] | None = None


async def _call_loader(loader: Loader, key: bytes) -> Any:
    result = loader(key)
    if inspect.isawaitable(result):
        result = await result
    return result


def _seconds(ttl: TTL) -> float:
    ns = ttl_to_ns(ttl)
    return 0.0 if ns is None else ns / 1e9


def _is_outage(exc: BaseException) -> bool:
    import redis.exceptions

    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                            TimeoutError, ConnectionError))


def _glob_escape(prefix: bytes) -> bytes:
    out = bytearray()
    for byte in prefix:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


_compiled_get = compiled_async_get(TieredCache)
if _compiled_get is not None:
    TieredCache.get = _compiled_get  # type: ignore[method-assign]
