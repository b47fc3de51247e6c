"""`Handle`: the cache operations as one C call each.

This is the only module that calls the compiled core. Each method converts its
arguments, makes one call (two for values larger than the scratch buffer) and
builds its result once; everything that is policy rather than a C call
(loaders, eviction callbacks, statistics records, reservation objects, the
mapping protocol) lives in `aiovmc._cache.Cache`, which subclasses this.

Results come back through a per-thread scratch buffer: the core copies the
value there while holding the shard lock, and slicing the buffer builds the
`bytes` result. A value larger than the buffer is copied by the core straight
into a fresh `bytes` object of the right size, with the GIL released: one copy
from the mapping to the result.

On CPython, `get`, `_get_inline`, `in`, `get_into`, `put` and `get_many` are
replaced by the compiled fast path of native/vmc_fast.c (a result built in one
copy, with no scratch buffer), unless the environment sets AIOVMC_PURE_CFFI=1;
`FAST_PATH` says which path is in use. The methods below are the pure cffi
binding.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .._convert import MAX_SIZE, TTL, Key, encode_key, ttl_to_ns, value_buffer
from .._errors import RepairNeeded
from ._binding import _aiovmc_native, ffi, lib
from ._status import error_for, raise_for

if TYPE_CHECKING:
    from typing_extensions import Buffer

D = TypeVar("D")
T = TypeVar("T")

__all__ = [
    "ABSENT",
    "ADD",
    "COUNTED",
    "END_FAILED",
    "END_NONE",
    "END_VALUE",
    "FAST_PATH",
    "FLIGHT_FULL",
    "FLIGHT_LEAD",
    "FLIGHT_NONE",
    "FLIGHT_TAKEOVER",
    "FLIGHT_VALUE",
    "FLIGHT_WAIT",
    "NO_REPAIR",
    "SCRATCH_SIZE",
    "Handle",
    "NativeInfo",
    "compiled_async_get",
    "new_ticket",
    "peek",
    "ready",
    "set_clock_offset",
]

SCRATCH_SIZE = lib.VMC_SCRATCH_SIZE  # >= the largest key: evicted keys come back here too

_WHOLE = lib.VMC_F_WHOLE
_QUIET = lib.VMC_F_QUIET
_FRESH = lib.VMC_F_FRESH
_ADD = ADD = lib.VMC_F_ADD  # put: store only if absent (`_store` flags)
_NO_EVICT = lib.VMC_F_NO_EVICT
_CONTIGUOUS = lib.VMC_F_CONTIGUOUS
#: The flag of a call that must not repair the file (it raises RepairNeeded):
#: the `flags` argument of the private methods below is 0 or this.
NO_REPAIR: int = lib.VMC_F_NO_REPAIR
#: The flag of a copy that finishes a get already counted as a hit (the value
#: was sized by one call, is copied by another): if the key has gone between
#: the two, the core counts that get as a miss instead.
COUNTED: int = lib.VMC_F_COUNTED
_RECORDS = SCRATCH_SIZE + 2  # room for the record of any one evicted key, and more
_MISS = lib.VMC_MISS
_REPAIR = lib.VMC_E_REPAIR
_NEED_ROOM = lib.VMC_E_NEED_ROOM
_NULL = ffi.NULL
_get = lib.vmc_get

# What vmc_flight_join answers, and how a leader ends its wave.
FLIGHT_LEAD: int = lib.VMC_FLIGHT_LEAD
FLIGHT_TAKEOVER: int = lib.VMC_FLIGHT_TAKEOVER
FLIGHT_WAIT: int = lib.VMC_FLIGHT_WAIT
FLIGHT_VALUE: int = lib.VMC_FLIGHT_VALUE
FLIGHT_NONE: int = lib.VMC_FLIGHT_NONE
FLIGHT_FULL: int = lib.VMC_FLIGHT_FULL
END_VALUE: int = lib.VMC_END_VALUE
END_NONE: int = lib.VMC_END_NONE
END_FAILED: int = lib.VMC_END_FAILED


#: The default of a lookup that never loads (`Cache._missed` returns it as given).
ABSENT: Any = object()


def new_ticket() -> Any:
    """A fresh ticket for joining a wave (slot 0: none joined yet)."""
    return ffi.new("struct vmc_ticket *")
_get_scratch = lib.vmc_get_scratch
_put = lib.vmc_put


def set_clock_offset(seconds: float) -> None:
    """For tests: shift this process's view of the clock (TTL deadlines, expiry,
    access times) by `seconds`, so that TTL tests need no sleeps."""
    lib.vmc_set_clock_offset(round(seconds * 1e9))


class _Scratch(threading.local):
    """This thread's view of the core's per-thread result buffer.

    `busy` is set from a core call until its result is sliced out: Python may
    run a signal handler or a finalizer in between, on this very thread, and if
    that calls the cache it must not overwrite the buffer (it takes the
    two-call path instead)."""

    def __init__(self) -> None:
        ptr = lib.vmc_scratch()
        if ptr == _NULL:
            raise MemoryError("no memory for aiovmc's per-thread result buffer")
        self.ptr = ptr
        self.view = ffi.buffer(ptr, SCRATCH_SIZE)
        self.busy = False


_scratch = _Scratch()


def _map(fd: int, length: int, offset: int) -> mmap.mmap:
    """A shared mapping of the file open on `fd`, a descriptor on an open file
    description of its own (see `vmc_map_fd`), which this closes: mmap keeps a dup
    of what it maps, and a dup of the handle's own descriptor would keep the
    handle's OFD locks held in every forked child, after the handle itself has
    re-locked or died."""
    try:
        return mmap.mmap(fd, length, mmap.MAP_SHARED, offset=offset)
    finally:
        os.close(fd)


class NativeInfo:
    """What the file says about itself, read once at open."""

    __slots__ = (
        "capacity",
        "created",
        "default_ttl_ns",
        "dropped_entries",
        "extent_size",
        "file_size",
        "max_entries",
        "max_value_size",
        "policy",
        "recovered",
        "recovered_entries",
    )

    def __init__(self, info: Any) -> None:
        self.file_size: int = info.file_size
        self.capacity: int = info.capacity
        self.extent_size: int = info.extent_size
        self.policy: str = "none" if info.policy == lib.VMC_POLICY_NONE else "lru"
        self.default_ttl_ns: int = info.default_ttl_ns
        self.max_entries: int = info.max_entries
        self.max_value_size: int = info.max_value_size
        self.created = bool(info.created)
        self.recovered = bool(info.recovered)
        self.recovered_entries: int = info.recovered_entries
        self.dropped_entries: int = info.dropped_entries

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"NativeInfo({fields})"


def _as_char_pointer(value: object) -> tuple[Any, int]:
    """A value as something cffi passes as `const char *`, and its length."""
    if type(value) is bytes:
        return value, len(value)
    view = value_buffer(value)
    return ffi.from_buffer(view), view.nbytes


def peek(path: str) -> tuple[Any, int, int]:
    """A cache file's raw statistics, its last timestamp and its persisted
    timestamp, read without changing a byte of the file (see vmc_peek)."""
    stats = ffi.new("struct vmc_stats *")
    times = ffi.new("uint64_t[2]")
    status = lib.vmc_peek(os.fsencode(path), stats, times)
    if status < 0:
        raise_for(status)
    return stats, int(times[0]), int(times[1])


class Handle:
    """An open cache file, mapped. Thread-safe: the core locks, not the GIL."""

    __slots__ = ("__weakref__", "_base", "_fast", "_h", "_mmap", "info")

    _on_evict: Any  # provided by the subclass: None, or a callable

    def _open(
        self,
        path: str,
        *,
        size: int,
        extent_size: int,
        max_entries: int,
        policy: str,
        default_ttl_ns: int,
        mode: int,
        create: bool,
        reset: bool,
        any_owner: bool,
    ) -> None:
        config = ffi.new(
            "struct vmc_config *",
            {
                "size": size,
                "extent_size": extent_size,
                "max_entries": max_entries,
                "policy": lib.VMC_POLICY_NONE if policy == "none" else lib.VMC_POLICY_LRU,
                "default_ttl_ns": default_ttl_ns,
                "mode": mode,
            },
        )
        flags = (
            (lib.VMC_F_CREATE if create else 0)
            | (lib.VMC_F_RESET if reset else 0)
            | (lib.VMC_F_ANY_OWNER if any_owner else 0)
        )
        out = ffi.new("vmc_cache **")
        info = ffi.new("struct vmc_info *")
        status = lib.vmc_open(os.fsencode(path), config, flags, out, info)
        if status < 0:
            raise_for(status)
        try:
            # vmc_map_fd's reopen, before the handle is attached (and usable).
            own = os.open(f"/proc/self/fd/{info.fd}", os.O_RDWR | os.O_CLOEXEC)
            mapping = _map(own, info.file_size, 0)
        except BaseException:
            lib.vmc_abort(out[0])
            raise
        handle = ffi.gc(out[0], lib.vmc_free)
        base = ffi.from_buffer(mapping)  # keeps the mapping alive, and exported
        status = lib.vmc_attach(handle, base, info)
        if status < 0:
            lib.vmc_close(handle)
            raise_for(status)
        self._h = handle
        self._fast = _aiovmc_native.FastHandle(handle) if FAST_PATH else None
        self._mmap: mmap.mmap | None = mapping
        self._base: Any = base
        self.info = NativeInfo(info)

    # ---- lookups ----

    @overload
    def get(self, key: Key, default: None = None) -> bytes | None: ...

    @overload
    def get(self, key: Key, default: D) -> bytes | D: ...

    def get(self, key: Key, default: Any = None) -> Any:
        """The value of `key` as bytes; on a miss the loader's result (see
        `Cache`), else `default`."""
        if type(key) is not bytes:
            key = encode_key(key)
        s = _scratch
        if s.busy:  # re-entered: size the value, then copy it below
            n = _get(self._h, key, len(key), _NULL, 0, 0, _WHOLE)
        else:
            s.busy = True
            try:
                n = _get_scratch(self._h, key, len(key))
                if 0 <= n <= SCRATCH_SIZE:
                    return s.view[0:n]
            finally:
                s.busy = False
        if n >= 0:  # counted, not copied: too large for the scratch buffer
            value = self._copy_whole(key, n, COUNTED)
            if value is not None:
                return value
            n = _MISS  # removed between the two calls
        if n == _MISS:
            return self._missed(key, default)
        raise_for(n)

    def _missed(self, key: bytes, default: Any) -> Any:
        return default

    def _get_entry(
        self, key: bytes, limit: int, flags: int = 0
    ) -> tuple[bytes, int, int] | int | None:
        """(value, publication timestamp, expiry in ns or 0) of a hit, read in
        one core call; a hit larger than `limit` (or, with NO_REPAIR, one whose
        copy met a repair) as its size, not copied (the caller fetches it with
        `_get_entry(key, sys.maxsize, COUNTED)` from a worker thread, which
        takes a second call for values past the scratch buffer); None on a
        miss. Counts the get like `get` (with COUNTED in `flags`: finishes a
        get counted already); never loads."""
        meta = ffi.new("uint64_t[2]")
        s = _scratch
        cap = limit if limit < SCRATCH_SIZE else SCRATCH_SIZE
        if s.busy:  # re-entered: see _Scratch
            n = lib.vmc_get_entry(self._h, key, len(key), _NULL, 0, flags, meta)
            cap = -1
        else:
            s.busy = True
            try:
                n = lib.vmc_get_entry(self._h, key, len(key), s.ptr, cap, flags, meta)
                if 0 <= n <= cap:
                    return s.view[0:n], int(meta[0]), int(meta[1])
            finally:
                s.busy = False
        if n > limit:
            return int(n)
        size = -1
        while n >= 0:  # counted, not copied: copy into a result of the right size
            out = _fresh_result(n)  # every byte filled below, or dropped unseen
            size = n
            n = lib.vmc_get_entry(
                self._h, key, len(key), ffi.from_buffer(out), size, COUNTED | _FRESH | flags, meta
            )
            if n == size:
                return out, int(meta[0]), int(meta[1])
        if n == _MISS:
            return None
        if n == _REPAIR and size >= 0:  # counted: finished where a repair may run
            return int(size)
        raise_for(n)

    def _copy_whole(self, key: bytes, size: int, flags: int = 0) -> bytes | None:
        """Copy a value whose size is already known (no statistics, no LRU touch)
        straight into a new bytes object; None if it has gone meanwhile (with
        COUNTED in `flags`, the hit counted for it then becomes a miss)."""
        flags |= _WHOLE | _QUIET | _FRESH
        while True:
            # A fresh bytes object nobody else can see yet: the core fills it
            # with the GIL released (_FRESH: backed by huge pages where it can
            # be, so that freeing it is cheap too), and it is immutable from
            # here on.
            out = bytes(size)
            n = _get(self._h, key, len(key), ffi.from_buffer(out), size, 0, flags)
            if n == size:
                return out
            if n == _MISS:
                return None
            if n < 0:
                raise_for(n)
            size = n  # replaced by a value of another size meanwhile: again

    def _size(self, key: bytes, flags: int = 0) -> int | None:
        """The size of a value, or None if absent; counts nothing, touches nothing."""
        n = _get(self._h, key, len(key), _NULL, 0, 0, _WHOLE | _QUIET | flags)
        if n >= 0:
            return int(n)
        if n == _MISS:
            return None
        raise_for(n)

    def _fetch(self, key: bytes) -> bytes | None:
        """A whole value, without statistics or LRU touch (for worker threads)."""
        size = self._size(key)
        return None if size is None else self._copy_whole(key, size)

    def _get_inline(self, key: bytes, limit: int) -> bytes | int | None:
        """A hit of at most `limit` bytes as bytes; a larger hit as its size
        (not copied: finish it with ``_copy_whole(key, size, COUNTED)``); a miss
        as None. Counts the get either way. Never repairs the file:
        `RepairNeeded` instead, having counted nothing (it is AsyncCache's get
        on the loop), or, for a hit counted before its copy met the repair,
        its size (to finish where a repair may run, as a larger hit)."""
        s = _scratch
        cap = limit if limit < SCRATCH_SIZE else SCRATCH_SIZE
        if s.busy:  # re-entered: see _Scratch
            n = _get(self._h, key, len(key), _NULL, 0, 0, _WHOLE | NO_REPAIR)
            cap = -1
        else:
            s.busy = True
            try:
                n = _get(self._h, key, len(key), s.ptr, cap, 0, _WHOLE | NO_REPAIR)
                if 0 <= n <= cap:
                    return s.view[0:n]
            finally:
                s.busy = False
        if n > limit:
            return n
        if n >= 0:
            try:
                return self._copy_whole(key, n, NO_REPAIR | COUNTED)
            except RepairNeeded:
                return n  # counted: not to be looked up (and counted) again
        if n == _MISS:
            return None
        raise_for(n)

    def _get_many_inline(
        self,
        keys: list[Key],
        limit: int,
        found: dict[bytes, bytes | None],
        large: dict[bytes, tuple[int, int]],
        start: int,
    ) -> int:
        """Look ``keys[start:]`` up in order, each as `_get_inline` (counted; never
        repairs the file): hits of at most `limit` bytes into `found` (keyed by the
        encoded key); the others `_get_inline` answers with a size into `large`
        as (size, asks), asks being how many of the keys were such hits of it
        (each to be finished), and, unless an earlier ask of it found a value,
        into `found` as None (holding their place).
        Returns the number of keys done: fewer than ``len(keys)`` when the next
        one needs a repair (`RepairNeeded`).
        The fast path looks them up in batches, one C call per 64 keys."""
        for at in range(start, len(keys)):
            key = keys[at]
            k = key if type(key) is bytes else encode_key(key)
            try:
                value = self._get_inline(k, limit)
            except RepairNeeded:
                return at
            if isinstance(value, int):
                large[k] = (value, large[k][1] + 1 if k in large else 1)
                found.setdefault(k, None)
            elif value is not None:
                found[k] = value
        return len(keys)

    def get_into(self, key: Key, buffer: Buffer, *, offset: int = 0) -> int | None:
        """Copy value[offset:offset+len(buffer)] into `buffer`; return the value's
        total size, or None on a miss. Never calls a loader."""
        return self._get_into(key, buffer, offset, 0)

    def _get_into(self, key: Key, buffer: Buffer, offset: int, flags: int) -> int | None:
        if type(key) is not bytes:
            key = encode_key(key)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        offset = min(offset, MAX_SIZE)  # past any value: nothing to copy
        try:
            dst = ffi.from_buffer(buffer, require_writable=True)
        except (TypeError, BufferError):
            raise TypeError(
                f"buffer must be a writable bytes-like object, not {type(buffer).__name__}"
            ) from None
        n = _get(self._h, key, len(key), dst, len(dst), offset, flags)
        if n >= 0:
            return int(n)
        if n == _MISS:
            return None
        raise_for(n)

    def get_many(self, keys: Iterable[Key]) -> dict[bytes, bytes]:
        """``{key: value}`` for the keys present; never calls the loader."""
        found: dict[bytes, bytes] = {}
        get = Handle.get
        for key in keys:
            encoded = encode_key(key)
            value = get(self, encoded, ABSENT)
            if value is not ABSENT:
                found[encoded] = value
        return found

    def __contains__(self, key: Any) -> bool:
        if type(key) is not bytes:
            key = encode_key(key)
        status = lib.vmc_contains(self._h, key, len(key))
        if status < 0:
            raise_for(status)
        return bool(status)

    def __len__(self) -> int:
        n = lib.vmc_count(self._h)
        if n < 0:
            raise_for(n)
        return int(n)

    def _shard_keys(self) -> Iterator[bytes]:
        cap = SCRATCH_SIZE
        dst = ffi.new("char[]", cap)
        for shard in range(lib.vmc_shard_count(self._h)):
            while True:
                needed = lib.vmc_shard_keys(self._h, shard, dst, cap)
                if needed < 0:
                    raise_for(needed)
                if needed <= cap:
                    break
                cap = needed * 2
                dst = ffi.new("char[]", cap)
            records = ffi.buffer(dst, needed)[:]
            at = 0
            while at < needed:
                length = int.from_bytes(records[at : at + 2], "little")
                yield records[at + 2 : at + 2 + length]
                at += 2 + length

    # ---- writes ----

    def put(self, key: Key, value: Buffer, *, ttl: TTL = None) -> int:
        """Insert or replace; returns the publication timestamp."""
        return self._store(key, value, ttl, 0)

    def add(self, key: Key, value: Buffer, *, ttl: TTL = None) -> bool:
        """Insert only if absent: True if stored; evicts nothing when the key exists."""
        return self._store(key, value, ttl, _ADD) > 0

    def _store(self, key: Key, value: Buffer, ttl: TTL, flags: int) -> int:
        """put (flags 0) or add (_ADD), | NO_REPAIR: the timestamp, 0 if add
        found the key."""
        if type(key) is not bytes:
            key = encode_key(key)
        if type(value) is bytes:
            data, size = value, len(value)
        else:
            data, size = _as_char_pointer(value)
        ttl_ns = -1 if ttl is None else ttl_to_ns(ttl)
        if self._on_evict is None:
            ts = _put(self._h, key, len(key), data, size, ttl_ns, flags)
            if ts >= 0:
                return int(ts)
            raise_for(ts)
        return self._stored(
            *self._evicting_for(
                lambda flags: _put(self._h, key, len(key), data, size, ttl_ns, flags),
                flags,
                len(key),
                size,
            )
        )

    def _evicting_for(
        self, call: Callable[[int], int], flags: int, klen: int, size: int
    ) -> tuple[int, list[bytes]]:
        """Run a core call that may need room (flags: _CONTIGUOUS for a
        reservation, NO_REPAIR), evicting from here what the core says the entry lacks
        room for (`vmc_evict_for`), so that the caller can hand the evicted
        keys to on_evict once no lock is held. Returns the call's final status
        and the evicted keys."""
        evicted: list[bytes] = []
        records = None
        stalled = 0
        while True:
            status = call((flags & ~_CONTIGUOUS) | _NO_EVICT)
            if status != _NEED_ROOM:
                return status, evicted
            if stalled > 2:  # a run the allocator's bounded search keeps missing
                victim = self._evict_lru(flags & NO_REPAIR)
                if victim is None:
                    return call(flags & ~_CONTIGUOUS), evicted
                evicted.append(victim)
                continue
            if records is None:
                records = ffi.new("char[]", _RECORDS)
            n = lib.vmc_evict_for(
                self._h, klen, size, flags & (_CONTIGUOUS | NO_REPAIR), records, _RECORDS
            )
            if n == _MISS:  # nothing left to evict: let the core conclude
                return call(flags & ~_CONTIGUOUS), evicted
            if n < 0:
                raise_for(n)
            stalled = stalled + 1 if n == 0 else 0
            data = ffi.buffer(records, n)[:]
            at = 0
            while at < n:
                length = int.from_bytes(data[at : at + 2], "little")
                evicted.append(data[at + 2 : at + 2 + length])
                at += 2 + length

    def _stored(self, status: int, evicted: list[bytes]) -> int:
        """Notify evictions, then raise for a failed status (which wins, with
        the message of the call that failed, taken before any callback ran)."""
        error = error_for(status) if status < 0 else None
        try:
            if evicted:
                self._notify_evicted(evicted)
        finally:
            if error is not None:
                raise error
        return status

    def _notify_evicted(self, keys: list[bytes]) -> None:
        raise NotImplementedError

    def _evict_lru(self, flags: int = 0) -> bytes | None:
        """Evict the least recently used entry; its key, or None if none."""
        s = _scratch
        if s.busy:  # re-entered: see _Scratch
            ptr = ffi.new("char[]", SCRATCH_SIZE)
            n = lib.vmc_evict(self._h, _NULL, 0, ptr, SCRATCH_SIZE, flags)
            key = ffi.buffer(ptr, n)[:] if n >= 0 else None
        else:
            s.busy = True
            try:
                n = lib.vmc_evict(self._h, _NULL, 0, s.ptr, SCRATCH_SIZE, flags)
                key = s.view[0:n] if n >= 0 else None
            finally:
                s.busy = False
        if n >= 0 or n == _MISS:
            return key
        raise_for(n)

    def _evict_key(self, key: bytes, flags: int = 0) -> bool:
        n = lib.vmc_evict(self._h, key, len(key), _NULL, 0, flags)
        if n >= 0:
            return True
        if n == _MISS:
            return False
        raise_for(n)

    def delete(self, key: Key) -> bool:
        """Remove `key`; True if it was there. No on_evict."""
        return self._delete(key, 0)

    def _delete(self, key: Key, flags: int) -> bool:
        if type(key) is not bytes:
            key = encode_key(key)
        status = lib.vmc_delete(self._h, key, len(key), flags)
        if status < 0:
            raise_for(status)
        return bool(status)

    def clear(self) -> None:
        """Remove every entry, with no callbacks (one shard per core call)."""
        for shard in range(lib.vmc_shard_count(self._h)):
            status = lib.vmc_clear_shard(self._h, shard)
            if status < 0:
                raise_for(status)

    def purge_expired(self) -> int:
        """Remove expired entries; returns how many."""
        purged = 0
        for shard in range(lib.vmc_shard_count(self._h)):
            n = lib.vmc_purge_shard(self._h, shard)
            if n < 0:
                raise_for(n)
            purged += n
        return purged

    def _raw_statistics(self) -> Any:
        stats = ffi.new("struct vmc_stats *")
        status = lib.vmc_statistics(self._h, stats)
        if status < 0:
            raise_for(status)
        return stats

    # ---- host-wide single-flight (vmc_flight.h) ----

    def _flight_join(self, key: bytes, load_timeout_ns: int, ticket: Any) -> int:
        """Join the wave of `key`: a FLIGHT_* status; `ticket` carries our place."""
        status = lib.vmc_flight_join(self._h, key, len(key), load_timeout_ns, ticket)
        if status < 0:
            raise_for(status)
        return int(status)

    def _flight_wait(self, ticket: Any) -> None:
        """Sleep (GIL released) until the ticket's wave changes or its wait_ns pass."""
        status = lib.vmc_flight_wait(self._h, ticket)
        if status < 0:
            raise_for(status)

    def _flight_kick(self, ticket: Any) -> None:
        """Wake every sleeper on the ticket's slot (they join again)."""
        status = lib.vmc_flight_kick(self._h, ticket)
        if status < 0:
            raise_for(status)

    def _flight_end(self, ticket: Any, outcome: int) -> bool:
        """End the wave the ticket leads; False if it had been taken over."""
        status = lib.vmc_flight_end(self._h, ticket, outcome)
        if status < 0:
            raise_for(status)
        return status == 1

    def _flights_in_use(self) -> int:
        """Loads in flight on the host that hold a slot of the table."""
        n = lib.vmc_flights_in_use(self._h)
        if n < 0:
            raise_for(n)
        return int(n)

    def _count_loads(
        self,
        key: bytes,
        *,
        loader_calls: int = 0,
        takeovers: int = 0,
        coalesced: int = 0,
        coalesced_hits: int = 0,
        flags: int = 0,
    ) -> None:
        """Add to the file-wide load counters (see vmc_count_loads)."""
        status = lib.vmc_count_loads(
            self._h, key, len(key), loader_calls, takeovers, coalesced, coalesced_hits, flags
        )
        if status < 0:
            raise_for(status)

    # ---- reservations ----

    def _reserve(
        self, key: bytes, size: int, ttl_ns: int, flags: int = 0
    ) -> tuple[int, int, list[bytes]]:
        """Reserve room: (id, offset of the value in the file, keys evicted for
        it). The caller owns the reservation before it notifies the evictions."""
        offset = ffi.new("uint64_t *")
        reserve = lib.vmc_reserve
        evicted: list[bytes] = []
        if self._on_evict is None:
            rid = reserve(self._h, key, len(key), size, ttl_ns, flags, offset)
        else:
            rid, evicted = self._evicting_for(
                lambda flags: reserve(self._h, key, len(key), size, ttl_ns, flags, offset),
                _CONTIGUOUS | flags,
                len(key),
                size,
            )
        if rid < 0:
            self._stored(rid, evicted)
        return int(rid), int(offset[0]), evicted

    def _map_view(self, offset: int, size: int) -> tuple[mmap.mmap | None, memoryview]:
        """A writable view of file bytes [offset, offset+size) through a mapping
        of its own, which `_detach_view` later swaps for private memory: views
        of the buffer that outlive the reservation then write nowhere in the
        file (the core's main mapping is never handed out for writing)."""
        if size == 0:
            return None, memoryview(bytearray())
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        fd = lib.vmc_map_fd(self._h)
        if fd < 0:
            raise_for(fd)
        mapping = _map(fd, offset + size - start, start)
        return mapping, memoryview(mapping)[offset - start : offset - start + size]

    @staticmethod
    def _detach_view(mapping: mmap.mmap | None) -> None:
        """Swap a `_map_view` mapping for private memory, then let it go (at
        once, or when the last view of it is released)."""
        if mapping is None or mapping.closed:
            return
        with ffi.from_buffer(mapping) as address:
            status = lib.vmc_detach_view(address, len(mapping))
        if status < 0:
            raise_for(status)
        try:
            mapping.close()
        except BufferError:
            pass  # views remain: they see private memory, unmapped with the last of them

    def _publish(self, rid: int, key: bytes, size: int) -> int:
        ts = lib.vmc_publish(self._h, rid, key, len(key), size)
        if ts < 0:
            raise_for(ts)
        return int(ts)

    def _cancel(self, rid: int) -> None:
        status = lib.vmc_cancel(self._h, rid)
        if status < 0:
            raise_for(status)

    # ---- timestamps ----

    @property
    def committed_timestamp(self) -> int:
        """Every publication up to this timestamp is visible in every process."""
        return self._committed(0)

    def _committed(self, flags: int) -> int:
        ts = lib.vmc_committed_timestamp(self._h, flags)
        if ts < 0:
            raise_for(ts)
        return int(ts)

    def _repair(self) -> None:
        """Repair the file if it needs it, or wait for the repair in progress
        (O(pool), every lock held: for a thread that may wait)."""
        status = lib.vmc_repair_file(self._h)
        if status < 0:
            raise_for(status)

    @property
    def persisted_timestamp(self) -> int:
        """Every publication up to this timestamp is durable in the file."""
        return self._persisted(0)

    def _persisted(self, flags: int) -> int:
        ts = lib.vmc_persisted_timestamp(self._h, flags)
        if ts < 0:
            raise_for(ts)
        return int(ts)

    def persist(self) -> int:
        """Flush the file (msync); returns the new persisted timestamp."""
        ts = lib.vmc_persist(self._h)
        if ts < 0:
            raise_for(ts)
        return int(ts)

    # ---- life cycle ----

    def _close_native(self) -> None:
        """Detach (waits for calls in flight on other threads) and let the
        mapping go once no memoryview into it remains."""
        lib.vmc_close(self._h)
        self._mmap = None
        self._base = None

    def _after_fork(self) -> None:
        """In a fork()ed child: give the handle a liveness lock of the child's
        own. If that fails, the core has closed the handle in this process
        (without touching the parent's lock); it then reports closed here too."""
        if lib.vmc_after_fork(self._h) < 0:
            self._mmap = None
            self._base = None

    @property
    def closed(self) -> bool:
        """True once `close()` has been called."""
        return self._mmap is None


def _install_fast_path() -> bool:
    """Put the compiled methods of native/vmc_fast.c in place of Handle's:
    True if done; False on PyPy, or when AIOVMC_PURE_CFFI=1 asks for the pure
    cffi binding (the two paths behave alike; the tests run on both)."""
    if os.environ.get("AIOVMC_PURE_CFFI") == "1":
        return False
    status = lib.vmc_fast_install()
    if status == 0:  # not CPython
        return False
    if status < 0:
        raise ImportError(
            "aiovmc's compiled fast path failed to install (the error is printed above); "
            "AIOVMC_PURE_CFFI=1 runs on the pure cffi binding instead"
        )
    for name, method in _aiovmc_native.fast_bind(
        Handle, encode_key, raise_for, ttl_to_ns, Handle.put
    ).items():
        setattr(Handle, name, method)
    return True


FAST_PATH = _install_fast_path()

#: A new bytes object of a given size for a large result the core fills: not
#: zeroed on the fast path (zeroing a large one would hold the GIL for O(size):
#: native/vmc_fast.c, fresh_bytes), `bytes(size)` on the pure binding.
_fresh_result: Callable[[int], bytes] = _aiovmc_native.fresh_bytes if FAST_PATH else bytes


async def _finished(value: T) -> T:
    """The pure binding's `ready`: a coroutine that returns `value`."""
    return value


#: ``ready(value)``: an awaitable already done, whose await returns `value` (once),
#: and a `collections.abc.Coroutine`. On the fast path, the compiled `Ready`
#: (native/vmc_fast.c): no coroutine frame to create and finish; else a coroutine.
ready: Callable[[T], Coroutine[Any, Any, T]] = _aiovmc_native.Ready if FAST_PATH else _finished
if FAST_PATH:
    Coroutine.register(_aiovmc_native.Ready)


def compiled_async_get(cls: type) -> Any | None:
    """The fast path's `get` for `cls` (aiovmc's AsyncCache or TieredCache: a hit answered as a
    compiled `Ready`, without a Python frame), or None on the pure binding."""
    if not FAST_PATH:
        return None
    return _aiovmc_native.fast_bind_async(cls, Handle, RepairNeeded)
