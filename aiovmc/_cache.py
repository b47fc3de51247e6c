"""`Cache`: the synchronous handle on a cache file shared by every process.

The operations themselves are one C call each (`aiovmc._native.Handle`); this
module adds what is policy: argument checking, the read-through loader, the
eviction callback, statistics records, reservations and the mapping protocol.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import mmap
import os
import secrets
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._coalesce import LoadMark, Peek, ThreadFlight, Wait, load_steps
from ._convert import TTL, Key, encode_key, parse_size, ttl_to_ns
from ._errors import (
    AiovmcError,
    CacheClosedError,
    CacheConfigError,
    CacheFormatError,
    RepairNeeded,
    ValueTooLargeError,
)
from ._native import ABSENT, ADD, COUNTED, NO_REPAIR, Handle

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "Cache",
    "CacheCore",
    "CacheEntry",
    "CacheStatistics",
    "Reservation",
    "entry_of",
]

T = TypeVar("T")

_POLICIES = ("lru", "none")
_MIN_EXTENT, _MAX_EXTENT = 64, 1 << 31
_MAX_ENTRIES = 0xFFFFFFF0  # VMC_MAX_UNITS: the budget is a 32-bit count
_COALESCE = ("host", "process")


_MAX_LOAD_TIMEOUT = 1e9  # ~31 years: int64 nanoseconds stay far from overflow


def _load_timeout_ns(seconds: object) -> int:
    """``load_timeout`` in nanoseconds for the core; -1 for None (wait for ever)."""
    if seconds is None:
        return -1
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        kind = type(seconds).__name__
        raise TypeError(f"load_timeout is a number of seconds or None, not {kind}")
    if not 0 < seconds < _MAX_LOAD_TIMEOUT:
        raise CacheConfigError(
            f"load_timeout must be positive seconds below {_MAX_LOAD_TIMEOUT:g} (or None), "
            f"not {seconds!r}"
        )
    return int(seconds * 1e9)


@dataclasses.dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of a cache file's counters, shared by every process using it.

    ``gets == hits + misses`` always. A get answered by a load that another task,
    thread or process ran counts in `coalesced_gets`, and as a hit if it received
    a value (a miss if the load ended with none); the get that ran the loader is
    a miss. So ``hits / gets`` is the share of gets that did not pay for a load.
    """

    puts: int
    """Successful put, add and publish calls, including values stored from loaders."""
    gets: int
    """Keys looked up by get, get_into and get_many."""
    hits: int
    misses: int
    evictions: int
    """Entries removed to make room, and evict() calls."""
    expirations: int
    entries: int
    used_bytes: int
    """Pool bytes held by entries and open reservations, overhead included."""
    capacity: int
    """Usable pool bytes."""
    loader_calls: int
    """Loader (on_miss) calls made on the host."""
    coalesced_gets: int
    """Gets answered by a load that another task, thread or process ran."""
    load_takeovers: int
    """Loads started because the previous leader of the key failed, was cancelled,
    closed its handle, died or ran past a waiter's load_timeout."""


@dataclasses.dataclass(frozen=True, slots=True)
class CacheEntry:
    """A stored value with what the file knows about it (`Cache.get_entry`)."""

    value: bytes
    timestamp: int
    """The publication timestamp (`put`'s return value)."""
    expires_at: float | None
    """When the entry expires, in UNIX seconds; None if it never does."""


_SYNC_LOADER: Final = (
    "the synchronous Cache calls on_miss on the calling thread and cannot await it; "
    "an async loader goes with AsyncCache"
)


class Cache(Handle):
    """A cache in a memory-mapped file, shared by every process that opens it.

    ``Cache(path=None, *, size=None, extent_size=256, max_entries=None, policy="lru",
    ttl=None, reset=False, mode=0o600, on_evict=None, on_miss=None, coalesce="host",
    load_timeout=30.0)``

    Every operation is safe from many threads and many processes at once. A miss
    in `get` calls ``on_miss`` once for all the threads missing the key at once
    and, with ``coalesce="host"``, for every process using the file
    (`aiovmc._coalesce`); ``load_timeout`` (seconds, or None for ever) is how long
    a waiter lets a live leader load before loading too.
    """

    __slots__ = (
        "_coalesce",
        "_load_timeout",
        "_load_timeout_ns",
        "_loads",
        "_on_evict",
        "_path",
        "_reservations",
        "on_miss",
    )

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        size: int | str | None = None,
        extent_size: int | str = 256,
        max_entries: int | None = None,
        policy: str = "lru",
        ttl: float | None = None,
        reset: bool = False,
        mode: int = 0o600,
        on_evict: Callable[[bytes], object] | None = None,
        on_miss: Callable[[bytes], Buffer | None] | None = None,
        allow_other_owner: bool = False,
        coalesce: str = "host",
        load_timeout: float | None = 30.0,
    ) -> None:
        if coalesce not in _COALESCE:
            raise CacheConfigError(f"coalesce must be 'host' or 'process', not {coalesce!r}")
        load_timeout_ns = _load_timeout_ns(load_timeout)
        size_bytes = None if size is None else parse_size(size)
        unit = parse_size(extent_size, "extent_size")
        if policy not in _POLICIES:
            raise CacheConfigError(f"policy must be 'lru' or 'none', not {policy!r}")
        ttl_ns = ttl_to_ns(ttl) or 0
        if isinstance(mode, bool) or not isinstance(mode, int):
            raise TypeError(f"mode is an int such as 0o600, not {type(mode).__name__}")
        if not 0 <= mode <= 0o7777:
            raise CacheConfigError(f"mode {mode!r} is not a permission mode (0 to 0o7777)")
        if not _MIN_EXTENT <= unit <= _MAX_EXTENT or unit & (unit - 1):
            raise CacheConfigError(
                f"extent_size {extent_size!r} must be a power of two between "
                f"{_MIN_EXTENT} and 2**31"
            )
        if max_entries is not None and (
            isinstance(max_entries, bool) or not isinstance(max_entries, int)
        ):
            raise TypeError(f"max_entries is an int or None, not {type(max_entries).__name__}")
        if max_entries is not None and not 1 <= max_entries <= _MAX_ENTRIES:
            raise CacheConfigError(
                f"max_entries {max_entries!r} must be between 1 and {_MAX_ENTRIES} (or None)"
            )
        for name, callback in (("on_evict", on_evict), ("on_miss", on_miss)):
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} must be callable or None")
        if inspect.iscoroutinefunction(on_miss):
            raise TypeError(_SYNC_LOADER)
        private = path is None
        if path is None:
            if size_bytes is None:
                raise CacheConfigError("size is required to create a private cache (path=None)")
            path = _private_path()
        self._path = os.fspath(path)
        if "\0" in self._path:
            raise CacheConfigError(f"path {self._path!r} contains a NUL character")
        if reset and size_bytes is None:
            raise CacheConfigError(f"reset=True needs a size to recreate {self._path} with")
        self._open(
            self._path,
            size=size_bytes or 0,
            extent_size=unit,
            max_entries=max_entries or 0,
            policy=policy,
            default_ttl_ns=ttl_ns,
            mode=mode,
            create=size_bytes is not None,
            reset=reset,
            any_owner=allow_other_owner,
        )
        if private:
            # Nobody else may open a private cache, and its file must not outlive its
            # processes even when they are killed: unlink it at once. The mapping and
            # the descriptor (inherited by forked children) keep it alive until the
            # last of them exits.
            os.unlink(self._path)
        self._on_evict = on_evict
        self.on_miss = on_miss
        self._coalesce = coalesce
        self._load_timeout = load_timeout
        self._load_timeout_ns = load_timeout_ns
        self._loads: ThreadFlight[bytes | None] = ThreadFlight()
        self._reservations: weakref.WeakSet[Reservation] = weakref.WeakSet()
        if not self.info.created:
            self._check_attached_config(unit, max_entries, policy, ttl_ns, extent_size, ttl)
        _open_caches.add(self)

    def _check_attached_config(
        self,
        unit: int,
        max_entries: int | None,
        policy: str,
        ttl_ns: int,
        extent_size: object,
        ttl: object,
    ) -> None:
        """Geometry and policy belong to the file: a conflicting request is an error."""
        info = self.info
        conflicts = []
        if extent_size != 256 and unit != info.extent_size:
            conflicts.append(f"extent_size={info.extent_size}, not extent_size={extent_size!r}")
        if max_entries is not None and max_entries != info.max_entries:
            conflicts.append(f"max_entries={info.max_entries}, not max_entries={max_entries!r}")
        if policy != "lru" and policy != info.policy:
            conflicts.append(f"policy={info.policy!r}, not policy={policy!r}")
        if ttl is not None and ttl_ns != info.default_ttl_ns:
            created = f"{info.default_ttl_ns / 1e9:g}" if info.default_ttl_ns else "None"
            conflicts.append(f"ttl={created}, not ttl={ttl!r}")
        if conflicts:
            self.close()
            raise CacheConfigError(
                f"{self._path} was created with {'; '.join(conflicts)}: geometry and policy "
                "belong to the file (open it without them; to change them, recreate it once with "
                "reset=True while no process has it open, e.g. at deploy time, not in every worker)"
            )

    # ---- properties ----

    @property
    def path(self) -> str:
        """The cache file. A private cache (``path=None``) was created under this name
        and unlinked at once: no other process can open it, and its memory goes back
        to the system when the last process using it exits, even if killed."""
        return self._path

    @property
    def capacity(self) -> int:
        """Usable pool bytes."""
        return self.info.capacity

    @property
    def coalesce(self) -> str:
        """"host" (loads coalesced across every process) or "process"."""
        return self._coalesce

    @property
    def load_timeout(self) -> float | None:
        """Seconds a waiter lets a live leader load before loading too (None: ever)."""
        return self._load_timeout

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<aiovmc.Cache {self._path!r} {state}>"

    # ---- loader and callbacks ----

    def _missed(self, key: bytes, default: Any) -> Any:
        loader = self.on_miss
        if loader is None or default is ABSENT:  # ABSENT: a lookup that never loads
            return default
        ran = LoadMark()
        core = CacheCore(self)
        try:
            value = self._loads.run(key, functools.partial(self._load, core, key, loader, ran))
        except Exception:
            ran.count_answer(self._count_loads, key, None)
            raise
        ran.count_answer(self._count_loads, key, value)
        return default if value is None else value

    def _load(
        self, core: CacheCore, key: bytes, loader: Callable[[bytes], Any], ran: LoadMark
    ) -> bytes | None:
        """Carry out `aiovmc._coalesce.load_steps` on this thread (the part of a
        miss played by the thread leading this process's load)."""
        steps = load_steps(core, key)
        reply: bytes | None = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Peek):
                reply = self._fetch(key)
            elif isinstance(step, Wait):
                step.wave.wait()
                reply = None
            else:
                try:
                    reply = self._call_loader(core, key, loader, ran, takeover=step.takeover)
                except BaseException as exc:
                    steps.throw(exc)  # ends the wave as failed, then re-raises
                    raise

    def _call_loader(
        self,
        core: CacheCore,
        key: bytes,
        loader: Callable[[bytes], Any],
        ran: LoadMark,
        *,
        takeover: bool,
    ) -> bytes | None:
        """Call the loader (counted) and store its result; None if it gave none."""
        ran.mark(self._count_loads, key, takeover)
        value = loader(key)
        if value is None:
            return None
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()  # never awaited: no warning about it
            raise TypeError(f"on_miss returned {type(value).__name__}: {_SYNC_LOADER}")
        self.put(key, value)
        return value if type(value) is bytes else bytes(value)

    def _notify_evicted(self, keys: list[bytes]) -> None:
        """Call on_evict for each key, with no lock held; every callback runs,
        and the first exception raised by one is re-raised afterwards."""
        callback = self._on_evict
        if callback is None:
            return
        error: BaseException | None = None
        for key in keys:
            try:
                callback(key)
            except BaseException as exc:
                if error is None:
                    error = exc
        if error is not None:
            raise error

    # ---- operations beyond one C call ----

    def evict(self, key: Key | None = None) -> bool:
        """Evict `key`, or with None the least recently used entry, and call
        on_evict. True if something was evicted."""
        return self._evict(key, 0)

    def _evict(self, key: Key | None, flags: int) -> bool:
        if key is None:
            victim = self._evict_lru(flags)
        else:
            victim = encode_key(key)
            if not self._evict_key(victim, flags):
                victim = None
        if victim is None:
            return False
        self._notify_evicted([victim])
        return True

    def get_entry(self, key: Key) -> CacheEntry | None:
        """The value of `key` with its publication timestamp and expiry, read in
        one core call; None on a miss. Counts a get like `get`; never loads."""
        return entry_of(self._get_entry(encode_key(key), sys.maxsize))

    def keys(self) -> list[bytes]:
        """A snapshot list of the unexpired keys."""
        return list(self._shard_keys())

    def put_many(
        self, items: Mapping[Any, Buffer] | Iterable[tuple[Any, Buffer]], *, ttl: TTL = None
    ) -> int:
        """Store every (key, value) pair; returns the last timestamp (0 if none)."""
        pairs = items.items() if isinstance(items, Mapping) else items
        ts = 0
        for key, value in pairs:
            ts = self.put(key, value, ttl=ttl)
        return ts

    def statistics(self) -> CacheStatistics:
        """A frozen snapshot of the file's counters (shared by every process)."""
        raw = self._raw_statistics()
        return CacheStatistics(
            puts=raw.puts,
            gets=raw.gets,
            hits=raw.hits,
            misses=raw.misses,
            evictions=raw.evictions,
            expirations=raw.expirations,
            entries=raw.entries,
            used_bytes=raw.used_bytes,
            capacity=raw.capacity,
            loader_calls=raw.loader_calls,
            coalesced_gets=raw.coalesced_gets,
            load_takeovers=raw.load_takeovers,
        )

    def reserve(self, key: Key, size: int | str, *, ttl: TTL = None) -> Reservation:
        """Room for a `size`-byte value that no reader sees until published."""
        encoded = encode_key(key)
        nbytes = parse_size(size)
        if nbytes > self.info.max_value_size:  # checked here: the core takes a size_t
            raise ValueTooLargeError(
                f"a reservation of {nbytes} bytes can never fit this cache (at most "
                f"{self.info.max_value_size} bytes)"
            )
        ttl_ns = -1 if ttl is None else ttl_to_ns(ttl)
        assert ttl_ns is not None
        rid, offset, evicted = self._reserve(encoded, nbytes, ttl_ns)
        reservation = Reservation(self, rid, encoded, nbytes)
        self._reservations.add(reservation)
        # A close() (another thread, a signal handler) may run at any point
        # here: the core cancels, at close, what was not registered yet, and
        # close() cancels what was; the view must outlive neither.
        if self.closed:
            reservation._finish("cancelled")
            raise CacheClosedError("the cache handle is closed")
        try:
            reservation._attach(*self._map_view(offset, nbytes))
        except BaseException:
            reservation._abandon()
            raise
        if reservation.state != "open":
            raise CacheClosedError("the cache handle was closed while reserving")
        if evicted:  # if a callback raises, the unreturned reservation is cancelled
            try:
                self._notify_evicted(evicted)
            except BaseException:
                reservation.cancel()
                raise
        return reservation

    # ---- mapping protocol (no loader: a miss is a KeyError) ----

    def __getitem__(self, key: Key) -> bytes:
        value = Handle.get(self, key, ABSENT)
        if value is ABSENT:
            raise KeyError(key)
        return value  # type: ignore[no-any-return]

    def __setitem__(self, key: Key, value: Buffer) -> None:
        self.put(key, value)

    def __delitem__(self, key: Key) -> None:
        if not self.delete(key):
            raise KeyError(key)

    # ---- life cycle ----

    def close(self) -> None:
        """Cancel this handle's open reservations and detach. Idempotent."""
        if self.closed:
            return
        for reservation in list(self._reservations):
            reservation._abandon()
        _open_caches.discard(self)
        self._close_native()

    def __enter__(self) -> Cache:
        if self.closed:
            raise CacheClosedError("the cache handle is closed")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()



class Reservation:
    """Room for one value, filled in place and then published or cancelled.

    `buffer` is a writable memoryview of exactly `size` bytes inside the cache
    file: what is written there is the value, with no further copy. As a
    context manager it publishes on success and cancels on an exception.
    Once the reservation is published or cancelled, `buffer` is released, and
    any view taken from it (a slice, a numpy array) writes into private memory
    of this process, never into the file.
    """

    __slots__ = (
        "__weakref__",
        "_cache",
        "_id",
        "_mapping",
        "_state",
        "buffer",
        "key",
        "size",
        "timestamp",
    )

    def __init__(self, cache: Cache, rid: int, key: bytes, size: int) -> None:
        self._cache = cache
        self._id = rid
        self._state = "open"
        self._mapping: mmap.mmap | None = None
        self.key = key
        self.size = size
        self.buffer = memoryview(b"")
        self.timestamp: int | None = None

    def _attach(self, mapping: mmap.mmap | None, buffer: memoryview) -> None:
        self._mapping = mapping
        self.buffer = buffer
        if self._state != "open":  # finished meanwhile (a close from a signal handler)
            self._detach()

    @property
    def state(self) -> str:
        """"open", "published" or "cancelled"."""
        return self._state

    def _require_open(self, action: str) -> None:
        if self._state != "open":
            raise AiovmcError(f"cannot {action} a reservation that is already {self._state}")

    def publish(self) -> int:
        """Make the value visible atomically, replacing any older value of the
        key; returns its timestamp (also kept as `timestamp`)."""
        self._require_open("publish")
        self._detach()  # no write through `buffer` may land in the published value
        try:
            self.timestamp = self._cache._publish(self._id, self.key, self.size)
        except BaseException:
            self._finish("cancelled")  # the core freed it: a failed publication cancels
            raise
        self._finish("published")
        return self.timestamp

    def cancel(self) -> None:
        """Free the room without publishing. Idempotent once cancelled."""
        if self._state == "cancelled":
            return
        self._require_open("cancel")
        self._detach()
        self._cache._cancel(self._id)
        self._finish("cancelled")

    def _abandon(self) -> None:
        """Cancel quietly (the handle is closing)."""
        if self._state == "open":
            self._finish("cancelled")
            try:
                self._cache._cancel(self._id)
            except AiovmcError:
                pass

    def _detach(self) -> None:
        """Point `buffer` and every view of it at private memory, then release it."""
        mapping, self._mapping = self._mapping, None
        self._cache._detach_view(mapping)
        try:
            self.buffer.release()
        except BufferError:
            pass  # views of it remain; they see private memory now

    def _finish(self, state: str) -> None:
        self._state = state
        self._cache._reservations.discard(self)
        self._detach()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "open":
            return
        if exc_type is None:
            self.publish()
        else:
            self.cancel()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            self._abandon()

    def __repr__(self) -> str:
        return f"<aiovmc.Reservation key={self.key!r} {self._state}>"




class CacheCore:
    """The internal interface of a `Cache` for the layers built on it:
    `AsyncCache`, the load steps of `aiovmc._coalesce`, `TieredCache`
    (docs/design.md, "The Python layers"). Nothing outside this module uses a
    `Cache`'s private members; they use this.

    ``CacheCore(cache)`` is cheap, holds only `cache`, and is not referenced
    by it (no cycle). Its operations are `Cache`'s, split where the async
    layer needs them split (an inline lookup, then a copy off the loop) and
    with one difference: those meant for an event loop's thread (``inline``,
    and every operation below that has no ``inline`` argument but for
    `fetch`, `finish`, `repair` and the flight steps, which never need to)
    never repair the file. Where
    `Cache`'s would stop the world to rebuild it (O(pool): after a process
    died holding a lock), they raise `RepairNeeded`, having stored nothing;
    the caller runs `repair` where it may wait, then calls again.
    """

    __slots__ = (
        "cache",
        "fetch",
        "finish",
        "flight_end",
        "flight_join",
        "flight_kick",
        "flight_wait",
        "get_inline",
        "get_many_inline",
        "host",
        "load_timeout_ns",
        "repair",
    )

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        #: Coalesce loads across the host (else within the process).
        self.host = cache._coalesce == "host"
        #: A waiter's patience with a live leader, in ns (-1: for ever).
        self.load_timeout_ns = cache._load_timeout_ns
        # Bound methods: a call costs what the Cache's own would.
        #: (key, limit) -> a counted hit of at most `limit` bytes as bytes, a
        #: larger one (or one whose copy must wait for a repair) as its size
        #: (not copied: `finish` it), a miss as None.
        self.get_inline: Callable[[bytes, int], bytes | int | None] = cache._get_inline
        #: (keys, limit, found, large, start) -> the number of keys done:
        #: `get_inline` of keys[start:] in batches (one C call per 64 keys on
        #: the fast path), fewer done when the next key needs a repair; the
        #: hits to `finish` in `large` as (size, asks).
        self.get_many_inline: Callable[
            [list[Any], int, dict[bytes, bytes | None], dict[bytes, tuple[int, int]], int], int
        ] = cache._get_many_inline
        #: (key) -> the whole value, quietly (no count, no LRU touch), or None;
        #: for worker threads (repairs).
        self.fetch: Callable[[bytes], bytes | None] = cache._fetch
        copy_whole = cache._copy_whole

        def finish(key: bytes, size: int) -> bytes | None:
            return copy_whole(key, size, COUNTED)

        #: (key, size) -> the value of a get that `get_inline` counted as a hit
        #: and sized, copied quietly; for worker threads (repairs). None if
        #: the key has gone meanwhile: the core then counts that get as a
        #: miss, as the caller answers it.
        self.finish: Callable[[bytes, int], bytes | None] = finish
        #: () -> None: repair the file, or wait for the repair in progress
        #: (O(pool), every lock held): for a worker thread.
        self.repair: Callable[[], None] = cache._repair
        # The host-wide single flight (aiovmc._coalesce.HostWave, LoadMark).
        self.flight_join: Callable[[bytes, int, Any], int] = cache._flight_join
        self.flight_wait: Callable[[Any], None] = cache._flight_wait
        self.flight_kick: Callable[[Any], None] = cache._flight_kick
        self.flight_end: Callable[[Any, int], bool] = cache._flight_end

    #: How often a call that found a repair needed waits for one and calls
    #: again before giving up (a repair clears the need: damage that comes
    #: back at once every time is a file that cannot be mended).
    REPAIR_ROUNDS: Final = 8

    def unmendable(self) -> CacheFormatError:
        """The error once `REPAIR_ROUNDS` repairs did not last."""
        return CacheFormatError(
            f"{self.cache.path}: the cache file still needs a repair after "
            f"{self.REPAIR_ROUNDS} repairs (damage that comes back at once: a lock word "
            "scribbled over?)"
        )

    def repaired(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` raised `RepairNeeded`: repair on this thread, then
        call again (for the calls that are synchronous by contract)."""
        for _ in range(self.REPAIR_ROUNDS):
            self.repair()
            try:
                return call(*args)
            except RepairNeeded:
                pass
        raise self.unmendable()

    def get_entry(
        self, key: bytes, limit: int, *, inline: bool, counted: bool = False
    ) -> tuple[bytes, int, int] | int | None:
        """As `Cache.get_entry`, raw: a hit larger than `limit` as its size.
        ``counted``: finishes a get that this call's first form counted as a hit
        and sized (as `finish`)."""
        flags = (NO_REPAIR if inline else 0) | (COUNTED if counted else 0)
        return self.cache._get_entry(key, limit, flags)

    def size(self, key: bytes, *, inline: bool) -> int | None:
        """A value's size, or None if absent; counts nothing, touches nothing."""
        return self.cache._size(key, NO_REPAIR if inline else 0)

    def copy(self, key: bytes, size: int, *, inline: bool) -> bytes | None:
        """A value of known `size` (again if it changed), quietly; None if gone."""
        return self.cache._copy_whole(key, size, NO_REPAIR if inline else 0)

    def store(self, key: Key, value: Buffer, ttl: TTL, *, add: bool = False) -> int:
        """`Cache.put` (``add``: `Cache.add`, 0 if the key was there)."""
        return self.cache._store(key, value, ttl, (ADD if add else 0) | NO_REPAIR)

    def get_into(self, key: Key, buffer: Buffer, offset: int) -> int | None:
        """`Cache.get_into`."""
        return self.cache._get_into(key, buffer, offset, NO_REPAIR)

    def delete(self, key: Key) -> bool:
        """`Cache.delete`."""
        return self.cache._delete(key, NO_REPAIR)

    def evict(self, key: Key | None) -> bool:
        """`Cache.evict` (callbacks included)."""
        return self.cache._evict(key, NO_REPAIR)

    def committed(self) -> int:
        """`Cache.committed_timestamp`."""
        return self.cache._committed(NO_REPAIR)

    def persisted(self) -> int:
        """`Cache.persisted_timestamp`."""
        return self.cache._persisted(NO_REPAIR)

    def count_loads(
        self,
        key: bytes,
        *,
        loader_calls: int = 0,
        takeovers: int = 0,
        coalesced: int = 0,
        coalesced_hits: int = 0,
    ) -> None:
        """Add to the file-wide load counters (`CacheStatistics`); counts
        nothing when it raises."""
        self.cache._count_loads(
            key,
            loader_calls=loader_calls,
            takeovers=takeovers,
            coalesced=coalesced,
            coalesced_hits=coalesced_hits,
            flags=NO_REPAIR,
        )


def entry_of(found: tuple[bytes, int, int] | int | None) -> CacheEntry | None:
    """A CacheEntry from what `Handle._get_entry` found (None for a miss)."""
    if found is None or isinstance(found, int):
        return None
    value, timestamp, expires_ns = found
    return CacheEntry(value, timestamp, expires_ns / 1e9 if expires_ns else None)

_open_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares its parent's liveness and owner locks through the inherited
    # descriptor; give every open handle locks of its own. The parent's threads
    # are gone: so are their loads (one may have held the flight's lock).
    for cache in list(_open_caches):
        cache._loads = ThreadFlight()
        if not cache.closed:
            cache._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)


def cache_directory() -> str:
    """Where a cache file lives when nobody says: /dev/shm (memory) if usable, else the temp dir."""
    directory = "/dev/shm"
    if os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
        return directory
    return tempfile.gettempdir()


def _private_path() -> str:
    """A fresh file name for a private cache."""
    return os.path.join(cache_directory(), f"aiovmc-{os.getpid()}-{secrets.token_hex(8)}.cache")
