"""`Cache`: the synchronous handle on a cache file shared by every process.

The operations themselves are one C call each (`aiovmc._native.Handle`); this
module adds what is policy: argument checking, the read-through loader, the
eviction callback, statistics records, reservations and the mapping protocol.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import secrets
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from ._convert import TTL, Key, encode_key, parse_size, ttl_to_ns
from ._errors import AiovmcError, CacheClosedError, CacheConfigError, ValueTooLargeError
from ._native import Handle

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Cache", "CacheInternals", "CacheStatistics", "Reservation"]

_POLICIES = ("lru", "none")
_MIN_EXTENT, _MAX_EXTENT = 256, 1 << 31


@dataclasses.dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of a cache's counters.

    The first nine fields belong to the file and are shared by every process
    using it; `loader_calls` and `coalesced_gets` belong to the handle that
    produced the snapshot.
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
    loader_calls: int = 0
    """Loader (on_miss) calls made by this handle."""
    coalesced_gets: int = 0
    """Gets of this handle served by joining another task's load."""


class CacheInternals(NamedTuple):
    """What the async layer uses of a `Cache` beyond its public API: the one
    named interface between the two layers (`Cache._internals()`). Each is a
    call that never waits; `AsyncCache` decides which of them run on the event
    loop and which in a worker thread."""

    get_inline: Callable[[bytes, int], bytes | int | None]
    """A hit of at most `limit` bytes as bytes, a larger hit as its size (not
    copied), a miss as None; counts the get."""
    fetch: Callable[[bytes], bytes | None]
    """A whole value, or None; counts nothing, touches no LRU order (the copy
    after `get_inline` returned a size)."""
    size: Callable[[bytes], int | None]
    """A value's size, or None; counts nothing, touches nothing."""
    copy_whole: Callable[[bytes, int], bytes | None]
    """A value whose size is known, or None if it has gone meanwhile."""
    store_loaded: Callable[[bytes, Any, TTL], int]
    """Store a loader's result (a put); returns the timestamp."""


class Cache(Handle):
    """A cache in a memory-mapped file, shared by every process that opens it.

    ``Cache(path=None, *, size=None, extent_size=256, policy="lru", ttl=None,
    reset=False, mode=0o600, on_evict=None, on_miss=None)``

    Every operation is safe from many threads and many processes at once.
    """

    __slots__ = (
        "_load_lock",
        "_loader_calls",
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
        policy: str = "lru",
        ttl: float | None = None,
        reset: bool = False,
        mode: int = 0o600,
        on_evict: Callable[[bytes], object] | None = None,
        on_miss: Callable[[bytes], Buffer | None] | None = None,
        allow_other_owner: bool = False,
    ) -> None:
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
                f"extent_size {extent_size!r} must be a power of two between 256 and 2**31"
            )
        for name, callback in (("on_evict", on_evict), ("on_miss", on_miss)):
            if callback is not None and not callable(callback):
                raise TypeError(f"{name} must be callable or None")
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
        self._loader_calls = 0
        self._load_lock = threading.Lock()
        self._reservations: weakref.WeakSet[Reservation] = weakref.WeakSet()
        if not self.info.created:
            self._check_attached_config(unit, policy, ttl_ns, extent_size, ttl)
        _open_caches.add(self)

    def _check_attached_config(
        self, unit: int, policy: str, ttl_ns: int, extent_size: object, ttl: object
    ) -> None:
        """Geometry and policy belong to the file: a conflicting request is an error."""
        info = self.info
        conflicts = []
        if extent_size != 256 and unit != info.extent_size:
            conflicts.append(f"extent_size={info.extent_size}, not extent_size={extent_size!r}")
        if policy != "lru" and policy != info.policy:
            conflicts.append(f"policy={info.policy!r}, not policy={policy!r}")
        if ttl is not None and ttl_ns != info.default_ttl_ns:
            created = f"{info.default_ttl_ns / 1e9:g}" if info.default_ttl_ns else "None"
            conflicts.append(f"ttl={created}, not ttl={ttl!r}")
        if conflicts:
            self.close()
            raise CacheConfigError(
                f"{self._path} was created with {'; '.join(conflicts)}: geometry and policy "
                "belong to the file (open it without them, or pass reset=True to recreate it)"
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

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"capacity={self.capacity}"
        return f"<aiovmc.Cache {self._path!r} {state}>"

    # ---- loader and callbacks ----

    def _missed(self, key: bytes, default: Any) -> Any:
        loader = self.on_miss
        if loader is None or default is _ABSENT:  # _ABSENT: a lookup that never loads
            return default
        with self._load_lock:
            self._loader_calls += 1
        value = loader(key)
        if value is None:
            return default
        self._store_loaded(key, value, None)
        return value if type(value) is bytes else bytes(value)

    def _internals(self) -> CacheInternals:
        """The calls `AsyncCache` builds on (not part of the public API)."""
        return CacheInternals(
            self._get_inline, self._fetch, self._size, self._copy_whole, self._store_loaded
        )

    def _store_loaded(self, key: bytes, value: Any, ttl: Any) -> int:
        """Store a loader's result (counts as a put); returns the timestamp."""
        return self.put(key, value, ttl=ttl)

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
        if key is None:
            victim = self._evict_lru()
        else:
            victim = encode_key(key)
            if not self._evict_key(victim):
                victim = None
        if victim is None:
            return False
        self._notify_evicted([victim])
        return True

    def keys(self) -> list[bytes]:
        """A snapshot list of the unexpired keys."""
        return list(self._shard_keys())

    def get_many(self, keys: Iterable[Key]) -> dict[bytes, bytes]:
        """``{key: value}`` for the keys present; never calls the loader."""
        found: dict[bytes, bytes] = {}
        get = Handle.get
        for key in keys:
            encoded = encode_key(key)
            value = get(self, encoded, _ABSENT)
            if value is not _ABSENT:
                found[encoded] = value
        return found

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
        """A frozen snapshot of the file's counters and this handle's loader calls."""
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
            loader_calls=self._loader_calls,
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
        value = Handle.get(self, key, _ABSENT)
        if value is _ABSENT:
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


_ABSENT: Any = object()

_open_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child shares its parent's liveness lock through the inherited
    # descriptor; give every open handle a lock of its own.
    for cache in list(_open_caches):
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
