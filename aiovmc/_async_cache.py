"""`AsyncCache`: the anyio facade over the synchronous `Cache` (DESIGN.md §4).

The facade is thin on purpose (as httpx's async client is over its shared base):
key encoding, TTL arithmetic, errors and statistics are the sync `Cache`'s, and
`AsyncCache` only adds what waits — coalesced loads, copies moved off the loop,
group-committed flushes and timestamp waits.

No loop affinity: nothing here creates an anyio or asyncio object before it is
needed inside a running loop, and what is created there (events, the copy limiter)
is kept per loop, so one `AsyncCache` made at import time serves any number of
successive or concurrent event loops, asyncio and trio alike.

Checkpoints: an operation is a checkpoint exactly when it waits — a load, an
off-loop copy, a flush, a timestamp wait, `clear` and `aclose`. A hit, a miss
without a loader, and small writes return without yielding to the loop. See
docs/cancellation.md.

Repairs: the operations run on the loop go through `CacheCore`, whose inline
calls never repair the file. One that finds a repair needed (a process died
holding a lock of the file) raises `RepairNeeded`; the operation then waits for
the repair, run in a worker thread (one per loop at a time, `_repaired`), and
calls again: the loop never runs an O(pool) rebuild, nor waits for one.
`aclose` closes the handle in a worker thread too: closing waits for the calls
in flight on it (an off-loop copy, a repair) to return.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, TypeVar, Union, cast, overload

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._cache import Cache, CacheCore, CacheEntry, CacheStatistics, Reservation, entry_of
from ._coalesce import HostWave, LoadMark, Peek, SingleFlight, Wait, load_steps
from ._convert import TTL, Key, encode_key, parse_size
from ._errors import CacheClosedError, RepairNeeded
from ._native import compiled_async_get, ready

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

__all__ = [
    "DEFAULT_OFFLOAD_THRESHOLD",
    "OFFLOAD_CONCURRENCY",
    "WAIT_CONCURRENCY",
    "AsyncCache",
    "AsyncReservation",
    "Loader",
    "StoreWithTTL",
    "ttl_until",
]

#: Values of at least this many bytes are copied by a worker thread rather than on
#: the event loop thread. Measured (docs/benchmarks.md, "offload threshold"): a
#: thread round trip costs ~170 µs; inline, a 1 MiB get takes ~60 µs and a put
#: ~113 µs, and the slower of the two reaches 100 µs at ~930 KiB. Below 1 MiB a
#: copy on the loop is cheaper than handing it to a thread, and short enough.
DEFAULT_OFFLOAD_THRESHOLD: Final = 1024 * 1024


def _default_offload_concurrency() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


#: At most this many off-loop copies run at once per event loop (all handles
#: together): half the CPUs this process may use, between 1 and 4. Copies are
#: bound by memory bandwidth, so more threads add little throughput, and copy
#: threads occupying every CPU delay the event loop thread's wake-ups (measured
#: on 2 CPUs: 4 copy threads stall a 1 ms ticker for ~20 ms, 1 thread for ~5 ms).
OFFLOAD_CONCURRENCY: Final = _default_offload_concurrency()

# Polling of `committed_timestamp` by `wait_committed` (a publication by another
# process signals nothing to this one): first interval, backing off to the last.
_COMMIT_POLL_FIRST: Final = 0.0001
_COMMIT_POLL_MAX: Final = 0.01

T = TypeVar("T")
D = TypeVar("D")

#: An async loader: ``async def load(key: bytes) -> bytes | None`` (a buffer to
#: store, or None for "no value"). A plain function returning the same is accepted
#: and called on the loop thread.
Loader = Callable[[bytes], Union[Awaitable[Union["Buffer", None]], "Buffer", None]]

_copy_limiter: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "aiovmc.copy_limiter"
)

#: At most this many threads per event loop wait for loads led by other
#: processes (one per key being waited for); further waits queue for a thread.
#: A thread sleeps in the kernel (a futex) and wakes for the wave's end, or every
#: 200 ms (``VMC_FLIGHT_PROBE_MS`` in ``native/vmc.h``) to check on the leader.
WAIT_CONCURRENCY: Final = 64

_wait_limiter: anyio.lowlevel.RunVar[anyio.CapacityLimiter] = anyio.lowlevel.RunVar(
    "aiovmc.wait_limiter"
)


class StoreWithTTL(NamedTuple):
    """A loader result stored with its own expiry instead of the TTL `get` was given.

    Private to the package: `TieredCache` returns it from its L1 loader so that a
    value read from redis expires in the file no later than in redis (DESIGN.md
    §11): `deadline` is a `time.monotonic()` instant (None: never), turned into a
    TTL only when the value is stored.
    """

    value: bytes
    deadline: float | None


def ttl_until(deadline: float | None) -> float | None:
    """The TTL that ends at `deadline` (`time.monotonic()`; None: never) if stored
    now: at least 1 ms."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.001)


def _limiter() -> anyio.CapacityLimiter:
    """The running loop's limiter for off-loop copies (made on first use)."""
    limiter = _copy_limiter.get(None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(OFFLOAD_CONCURRENCY)
        _copy_limiter.set(limiter)
    return limiter


def _finish_asks(
    finish: Callable[[bytes, int], bytes | None], key: bytes, size: int, asks: int
) -> bytes | None:
    """`finish` a key that one `get_many` asked for `asks` times, each ask a
    hit counted and not copied: the value; or, while the key is gone, the
    next ask (each then counted a miss). None if it is gone for all."""
    for _ in range(asks):
        value = finish(key, size)
        if value is not None:
            return value
    return None


async def _wait_for_wave(wave: HostWave) -> None:
    """Sleep in a worker thread until the wave changes (or a probe interval
    passes). Cancellable at once: the task leaves, and its thread is woken so
    that it returns to the pool rather than sleep on."""
    limiter = _wait_limiter.get(None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(WAIT_CONCURRENCY)
        _wait_limiter.set(limiter)
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_task():
        await _wait_for_wave_on_trio(trio, wave, limiter)
        return
    try:
        await anyio.to_thread.run_sync(wave.wait, abandon_on_cancel=True, limiter=limiter)
    except BaseException:
        wave.kick()
        raise


async def _wait_for_wave_on_trio(
    trio: Any, wave: HostWave, limiter: anyio.CapacityLimiter
) -> None:
    """`_wait_for_wave` on trio, through trio's thread cache itself
    (`trio.lowlevel.start_thread_soon`): `trio.to_thread.run_sync` names the
    thread for each job (two system calls) and wraps the result twice before
    it wakes the loop, which put trio's waiters ~0.1-0.3 ms behind asyncio's
    (docs/async.md, "Waking a waiter"). The limiter's slot is held until the
    thread has returned, as `to_thread` holds it, even after a cancellation."""
    await trio.lowlevel.checkpoint_if_cancelled()
    borrower = object()
    await limiter.acquire_on_behalf_of(borrower)
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()
    waiting = True

    def back_on_the_loop(result: Any) -> None:
        limiter.release_on_behalf_of(borrower)
        if waiting:
            trio.lowlevel.reschedule(task, result)

    def deliver(result: Any) -> None:  # in the thread, once `wave.wait` returned
        try:
            token.run_sync_soon(back_on_the_loop, result)
        except trio.RunFinishedError:
            pass  # the run is over: nobody waits any more

    def abort(_raise_cancel: Any) -> Any:
        nonlocal waiting
        waiting = False
        wave.kick()  # the thread returns at once (and releases the slot)
        return trio.lowlevel.Abort.SUCCEEDED

    try:
        trio.lowlevel.start_thread_soon(wave.wait, deliver)
    except BaseException:  # no thread: nothing will give the slot back
        limiter.release_on_behalf_of(borrower)
        raise
    await trio.lowlevel.wait_task_rescheduled(abort)  # the thread's outcome, unwrapped


async def _offload(func: Callable[[], T]) -> T:
    """Run ``func`` in a worker thread, bounded by the loop's copy limiter.

    A cancel before the thread starts skips ``func``; once started, it runs to the
    end and the cancel takes effect afterwards.
    """
    return await anyio.to_thread.run_sync(func, limiter=_limiter())


def _nbytes(value: object) -> int:
    """The size of a buffer, or 0 for a non-buffer (the sync call then says why)."""
    if value.__class__ is bytes:
        return len(value)
    try:
        with memoryview(value) as view:  # type: ignore[arg-type]
            return view.nbytes
    except TypeError:
        return 0


def _parse_threshold(value: int | str | None) -> int:
    if value is None:
        return DEFAULT_OFFLOAD_THRESHOLD
    return parse_size(value, "offload_threshold")


class AsyncReservation:
    """Room for one value, reserved by `AsyncCache.reserve` (DESIGN.md §5).

    Fill `buffer`, then `publish()`; or use ``async with``: leaving the block
    normally publishes, leaving it with an exception — cancellation included —
    cancels, so a half-written value is never published. Nothing here waits: entering
    and leaving the block are not checkpoints. To fill a large buffer without
    stalling the loop, write it from a worker thread
    (``await anyio.to_thread.run_sync(fill, r.buffer)``).
    """

    __slots__ = ("_reservation",)

    def __init__(self, reservation: Reservation) -> None:
        self._reservation = reservation

    @property
    def key(self) -> bytes:
        """The key the value will be published under."""
        return self._reservation.key

    @property
    def size(self) -> int:
        """The size of the value in bytes."""
        return self._reservation.size

    @property
    def buffer(self) -> memoryview:
        """A writable view of exactly `size` bytes inside the cache file."""
        return self._reservation.buffer

    @property
    def timestamp(self) -> int | None:
        """The publication timestamp; None until published."""
        return self._reservation.timestamp

    @property
    def state(self) -> str:
        """The state: "open", "published" or "cancelled"."""
        return self._reservation.state

    @property
    def reservation(self) -> Reservation:
        """The underlying synchronous `Reservation`."""
        return self._reservation

    def publish(self) -> int:
        """Make the value visible to every process; return its timestamp. Never waits."""
        return self._reservation.publish()

    def cancel(self) -> None:
        """Free the reserved room without publishing. Never waits."""
        self._reservation.cancel()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Same rules as the sync context manager: publish on success, cancel on any
        # exception (a cancellation is one).
        self._reservation.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<AsyncReservation of {self._reservation!r}>"


class AsyncCache:
    """An anyio facade over `Cache`, usable from asyncio and trio (DESIGN.md §4).

    ``AsyncCache(path, on_miss=..., offload_threshold=..., **cache_options)`` opens
    the file as ``Cache(path, **cache_options)`` would; `from_cache` wraps an open
    `Cache`. ``on_miss`` is an async loader ``async def load(key: bytes) -> bytes |
    None``, coalesced per key (see `get`). Values of at least ``offload_threshold``
    bytes (default `DEFAULT_OFFLOAD_THRESHOLD`; sizes such as ``"1MiB"`` accepted)
    are copied in a worker thread. `aclose` closes the underlying `Cache`, whether
    this handle opened it or was given it.
    """

    __slots__ = (
        "_cache",
        "_core",
        "_flushes",
        "_get_inline",
        "_limit",
        "_loads",
        "_repairs",
        "_threshold",
        "on_miss",
    )

    #: The handle's loader, used by `get` when the call gives none.
    on_miss: Loader | None
    _get_inline: Callable[[bytes, int], bytes | int | None]

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        on_miss: Loader | None = None,
        offload_threshold: int | str | None = None,
        **cache_options: Any,
    ) -> None:
        threshold = _parse_threshold(offload_threshold)
        self._setup(Cache(path, **cache_options), on_miss, threshold)

    @classmethod
    def from_cache(
        cls,
        cache: Cache,
        *,
        on_miss: Loader | None = None,
        offload_threshold: int | str | None = None,
    ) -> AsyncCache:
        """Wrap an open `Cache`. Without ``on_miss``, the cache's own ``on_miss``
        (a plain function, called on the loop thread) is the loader."""
        if not isinstance(cache, Cache):
            raise TypeError(f"from_cache() needs an aiovmc.Cache, not {type(cache).__name__}")
        self = cls.__new__(cls)
        loader = on_miss if on_miss is not None else cache.on_miss
        self._setup(cache, loader, _parse_threshold(offload_threshold))
        return self

    def _setup(self, cache: Cache, on_miss: Loader | None, threshold: int) -> None:
        self._cache = cache
        self.on_miss = on_miss
        self._threshold = threshold
        # _get_inline returns values of at most `_limit` bytes, sizes beyond.
        self._limit = max(threshold - 1, 0)
        self._core = core = CacheCore(cache)
        self._get_inline = core.get_inline
        self._loads: SingleFlight[bytes | None] = SingleFlight()
        self._flushes: SingleFlight[int] = SingleFlight()
        self._repairs: SingleFlight[None] = SingleFlight()

    @property
    def offload_threshold(self) -> int:
        """Values of at least this many bytes are copied in a worker thread."""
        return self._threshold

    @property
    def cache(self) -> Cache:
        """The underlying synchronous `Cache` (same file, same statistics)."""
        return self._cache

    def __repr__(self) -> str:
        return f"<AsyncCache of {self._cache!r}>"

    async def _repaired(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)` (a `CacheCore` inline call) raised `RepairNeeded`: wait
        for the repair, run in a worker thread, then call again. The tasks of
        this loop that need it meanwhile share one thread; other threads and
        processes that run one meanwhile are waited for in the core (each
        repair takes every lock in order: one rebuilds, the others sleep)."""
        for _ in range(self._core.REPAIR_ROUNDS):
            await self._repairs.run(None, self._repair)
            # The repair's thread is shielded: a cancellation of this task
            # during the wait is delivered here, before the call is made.
            await anyio.lowlevel.checkpoint_if_cancelled()
            try:
                return call(*args)
            except RepairNeeded:
                pass
        raise self._core.unmendable()

    async def _repair(self) -> None:
        await anyio.to_thread.run_sync(self._core.repair)

    # -- reads ---------------------------------------------------------------------

    @overload
    def get(
        self,
        key: Key,
        default: None = None,
        *,
        on_miss: Loader | None = None,
        ttl: TTL = None,
    ) -> Coroutine[Any, Any, bytes | None]: ...

    @overload
    def get(
        self,
        key: Key,
        default: D,
        *,
        on_miss: Loader | None = None,
        ttl: TTL = None,
    ) -> Coroutine[Any, Any, bytes | D]: ...

    def get(
        self,
        key: Key,
        default: object = None,
        *,
        on_miss: Loader | None = None,
        ttl: TTL = None,
    ) -> Coroutine[Any, Any, object]:
        """Return the value of ``key``; on a miss, load it (coalesced) or return
        ``default``. Use as ``await cache.get(key)``.

        A hit returns without waiting (no checkpoint), unless the value is at least
        ``offload_threshold`` bytes: then it is copied in a worker thread. A miss
        calls the loader (``on_miss`` here, else the handle's); all tasks missing the
        same key meanwhile share that call (see `aiovmc._coalesce`). A loaded value
        is stored with ``ttl`` (None: the cache's default) before anyone gets it; a
        loader returning None stores nothing and every waiter gets its own
        ``default``. Loader exceptions propagate to every waiter and are not cached.
        Cancelling a waiting task cancels only it; a cancelled loader is retried by
        another waiter.

        Not an ``async def``: the lookup runs in the call, and what it returns is
        awaitable (a `collections.abc.Coroutine`, which create_task and task
        groups take too). A hit, or a miss without a loader, returns an awaitable
        already done (`aiovmc._native.ready`): no coroutine to create and run,
        the largest part of what an awaited hit cost beyond the sync get
        (docs/async.md, "The cost of an awaited hit"). A bad key raises here.
        """
        # On the fast path, the compiled `get` (native/vmc_fast.c) stands in for
        # this method: the same steps, without a Python frame.
        k = key if key.__class__ is bytes else encode_key(key)
        found: object
        try:
            found = self._get_inline(k, self._limit)
        except RepairNeeded:
            found = RepairNeeded
        if found.__class__ is bytes:
            return ready(found)
        return self._get_rest(k, found, default, on_miss, ttl)

    def _get_rest(
        self, k: bytes, found: object, default: object, on_miss: Loader | None, ttl: TTL
    ) -> Coroutine[Any, Any, object]:
        """The rest of `get` when its lookup found no value to return at once:
        ``found`` is the size of a value to copy off the loop, None (a miss), or
        `RepairNeeded` (the lookup is made again once the file is repaired). A
        miss without a loader is answered at once, with ``default``."""
        if found is None and on_miss is None and self.on_miss is None:
            return ready(default)
        return self._get_waiting(k, found, default, on_miss, ttl)

    async def _get_waiting(
        self, k: bytes, found: object, default: object, on_miss: Loader | None, ttl: TTL
    ) -> object:
        """`_get_rest` when it waits: for a repair, an off-loop copy or a load."""
        if found is RepairNeeded:
            found = await self._repaired(self._get_inline, k, self._limit)
            if found.__class__ is bytes:
                return found
        if isinstance(found, int):  # a hit too large for the loop: its size
            value = await _offload(functools.partial(self._core.finish, k, found))
            if value is not None:
                return value
            # Deleted between the lookup and the copy: a miss after all (so counted).
        loader = on_miss if on_miss is not None else self.on_miss
        if loader is None:
            return default
        ran = LoadMark()
        try:
            loaded = await self._loads.run(k, functools.partial(self._load, k, loader, ttl, ran))
        except Exception:
            await self._count_answer(ran, k, None)
            raise
        await self._count_answer(ran, k, loaded)
        return default if loaded is None else loaded

    async def _count_answer(self, ran: LoadMark, key: bytes, value: object) -> None:
        count = self._core.count_loads
        try:
            ran.count_answer(count, key, value)
        except RepairNeeded:
            await self._repaired(ran.count_answer, count, key, value)

    async def _peek(self, key: bytes) -> bytes | None:
        """The value of `key` if stored, read quietly (no statistics, no LRU
        touch); a large one is copied in a worker thread."""
        core = self._core
        try:
            size = core.size(key, inline=True)
            if size is None:
                return None
            if size < self._threshold:
                return core.copy(key, size, inline=True)
        except RepairNeeded:
            return await _offload(functools.partial(core.fetch, key))  # which repairs
        return await _offload(functools.partial(core.copy, key, size, inline=False))

    async def _load(self, key: bytes, loader: Loader, ttl: TTL, ran: LoadMark) -> bytes | None:
        """Carry out `aiovmc._coalesce.load_steps` on the loop (the part of a miss
        played by the task leading this loop's load): waits for other processes
        in a worker thread."""
        steps = load_steps(self._core, key)
        reply: bytes | None = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Peek):
                reply = await self._peek(key)
            elif isinstance(step, Wait):
                await _wait_for_wave(step.wave)
                reply = None
            else:
                try:
                    reply = await self._call_loader(key, loader, ttl, ran, takeover=step.takeover)
                except BaseException as exc:
                    steps.throw(exc)  # ends the wave as failed, then re-raises
                    raise

    async def _call_loader(
        self, key: bytes, loader: Loader, ttl: TTL, ran: LoadMark, *, takeover: bool
    ) -> bytes | None:
        """Call the loader (counted) and store what it returns; None if nothing."""
        count = self._core.count_loads
        try:
            ran.mark(count, key, takeover)
        except RepairNeeded:
            await self._repaired(ran.mark, count, key, takeover)
        result = loader(key)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            return None
        if isinstance(result, StoreWithTTL):
            result, ttl = result.value, ttl_until(result.deadline)
        if _nbytes(result) < self._threshold:
            await self._store(key, result, ttl)
            return result if result.__class__ is bytes else bytes(result)

        def store_large() -> bytes:
            self._cache.put(key, result, ttl=ttl)
            return result if result.__class__ is bytes else bytes(result)

        # Once the loader has produced a value, finish storing it even if we are
        # cancelled meanwhile, so the waiters get it rather than load again.
        with anyio.CancelScope(shield=True):
            stored = await _offload(store_large)
        return stored

    def get_nowait(self, key: Key, default: D | None = None) -> bytes | D | None:
        """Return the value of ``key`` or ``default``. Synchronous: never loads and
        never waits (a large value is copied on the calling thread)."""
        k = key if key.__class__ is bytes else encode_key(key)
        try:
            found = self._get_inline(k, sys.maxsize)
        except RepairNeeded:  # synchronous: repaired on the calling thread
            found = self._core.repaired(self._get_inline, k, sys.maxsize)
        if isinstance(found, int):  # a copy that met a repair: finished here
            found = self._core.finish(k, found)
        return default if found is None else found

    async def get_entry(self, key: Key) -> CacheEntry | None:
        """As `Cache.get_entry`: the value with its timestamp and expiry, or None.
        Never loads; a value of at least ``offload_threshold`` bytes is copied in
        a worker thread."""
        k = key if key.__class__ is bytes else encode_key(key)
        get_entry = self._core.get_entry
        try:
            found = get_entry(k, self._limit, inline=True)
        except RepairNeeded:
            found = await self._repaired(functools.partial(get_entry, k, self._limit, inline=True))
        if isinstance(found, int):  # large: counted, copied by a worker thread
            found = await _offload(
                functools.partial(get_entry, k, sys.maxsize, inline=False, counted=True)
            )
        return entry_of(found)

    async def get_into(self, key: Key, buffer: Buffer, *, offset: int = 0) -> int | None:
        """As `Cache.get_into`: copy ``value[offset:offset+len(buffer)]`` into
        ``buffer``; return the value's total size, or None on a miss (no loader).

        Waits (in a worker thread) only when ``buffer`` is at least
        ``offload_threshold`` bytes; a cancel then takes effect after the copy.
        """
        if _nbytes(buffer) < self._threshold:
            try:
                return self._core.get_into(key, buffer, offset)
            except RepairNeeded:
                return await self._repaired(self._core.get_into, key, buffer, offset)
        return await _offload(
            functools.partial(self._cache.get_into, key, buffer, offset=offset)
        )

    async def get_many(self, keys: Iterable[Key]) -> dict[bytes, bytes]:
        """As `Cache.get_many`: ``{key: value}`` for the hits, keyed by the encoded
        keys, in the order given; never loads.

        The keys are looked up in batches (one C call per 64 keys on the fast
        path), the values under ``offload_threshold`` bytes copied there, on the
        loop; the larger ones are then copied in a worker thread (a checkpoint).
        """
        asked = keys if keys.__class__ is list else list(keys)
        found: dict[bytes, bytes | None] = {}  # None: a large value's place
        large: dict[bytes, tuple[int, int]] = {}  # (size, asks): each key copied once
        get_many_inline, limit = self._core.get_many_inline, self._limit
        done = get_many_inline(asked, limit, found, large, 0)
        if done < len(asked):  # the next key needs a repair first

            def the_rest() -> None:
                nonlocal done
                done = get_many_inline(asked, limit, found, large, done)
                if done < len(asked):
                    raise RepairNeeded("get_many: a key still needs a repair")

            await self._repaired(the_rest)
        finish = self._core.finish
        for k, (size, asks) in large.items():
            copied = await _offload(functools.partial(_finish_asks, finish, k, size, asks))
            if copied is not None:
                found[k] = copied
            elif found[k] is None:  # deleted meanwhile, and no other ask found it
                del found[k]
        return cast("dict[bytes, bytes]", found)  # every place filled or dropped

    # -- writes --------------------------------------------------------------------

    async def put(self, key: Key, value: Buffer, *, ttl: TTL = None) -> int:
        """As `Cache.put`: store ``value``; return its timestamp once committed.

        A value of at least ``offload_threshold`` bytes is copied into the file by a
        worker thread (a checkpoint; a cancel takes effect after the copy, so the
        value may have been stored). A smaller one is stored without waiting.
        """
        if _nbytes(value) < self._threshold:
            return await self._store(key, value, ttl)
        return await _offload(functools.partial(self._cache.put, key, value, ttl=ttl))

    async def _store(self, key: Key, value: Buffer, ttl: TTL, *, add: bool = False) -> int:
        """A put (or add) on the loop: not a checkpoint, unless it must wait
        for a repair."""
        store = self._core.store
        try:
            return store(key, value, ttl, add=add)
        except RepairNeeded:
            return await self._repaired(functools.partial(store, key, value, ttl, add=add))

    async def add(self, key: Key, value: Buffer, *, ttl: TTL = None) -> bool:
        """As `Cache.add`: store only if ``key`` is absent; True if stored.
        Waits as `put` does."""
        if _nbytes(value) < self._threshold:
            return await self._store(key, value, ttl, add=True) > 0
        return await _offload(functools.partial(self._cache.add, key, value, ttl=ttl))

    async def put_many(
        self,
        items: Mapping[Any, Buffer] | Iterable[tuple[Any, Buffer]],
        *,
        ttl: TTL = None,
    ) -> int:
        """As `Cache.put_many`: store every pair; return the last timestamp.

        When the values add up to at least ``offload_threshold`` bytes the whole
        batch is stored by a worker thread (a checkpoint; a cancel takes effect after
        the batch), otherwise without waiting.
        """
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        if sum(_nbytes(v) for _, v in pairs) >= self._threshold:
            return await _offload(functools.partial(self._cache.put_many, pairs, ttl=ttl))
        ts = 0
        for key, value in pairs:
            ts = await self._store(key, value, ttl)
        return ts

    async def delete(self, key: Key) -> bool:
        """As `Cache.delete`: remove ``key``; True if it was there. Never waits
        (but for a repair)."""
        try:
            return self._core.delete(key)
        except RepairNeeded:
            return await self._repaired(self._core.delete, key)

    async def evict(self, key: Key | None = None) -> bool:
        """As `Cache.evict`: evict ``key`` (None: the least recently used entry) and
        call ``on_evict``; True if something was evicted. Never waits (but for a
        repair)."""
        try:
            return self._core.evict(key)
        except RepairNeeded:
            return await self._repaired(self._core.evict, key)

    async def clear(self) -> None:
        """As `Cache.clear`: remove every entry. Runs in a worker thread (its work
        grows with the cache); a cancel takes effect after it has finished."""
        await anyio.to_thread.run_sync(self._cache.clear)

    def reserve(self, key: Key, size: int, *, ttl: TTL = None) -> AsyncReservation:
        """Reserve room for a ``size``-byte value (as `Cache.reserve`, evicting as
        needed); use the result with ``async with``. Never waits."""
        return AsyncReservation(self._cache.reserve(key, size, ttl=ttl))

    # -- timestamps ----------------------------------------------------------------

    async def wait_committed(self, timestamp: int) -> int:
        """Wait until publication ``timestamp`` is visible to every process; return
        the committed timestamp then (>= ``timestamp``).

        Always a checkpoint. A timestamp returned by this process's put or publish
        is committed already; one published by another process may take a moment
        (the wait polls). Waits forever for a timestamp never published: bound it
        with ``anyio.fail_after``. A cancel leaves nothing behind.
        """
        committed = await self._committed()
        if committed >= timestamp:
            await anyio.lowlevel.checkpoint()
            return committed
        delay = _COMMIT_POLL_FIRST
        while True:
            await anyio.sleep(delay)
            committed = await self._committed()
            if committed >= timestamp:
                return committed
            delay = min(delay * 2, _COMMIT_POLL_MAX)

    async def _committed(self) -> int:
        try:
            return self._core.committed()
        except RepairNeeded:
            return await self._repaired(self._core.committed)

    async def _persisted(self) -> int:
        try:
            return self._core.persisted()
        except RepairNeeded:
            return await self._repaired(self._core.persisted)

    async def wait_persisted(self, timestamp: int) -> int:
        """Wait until publication ``timestamp`` is durable in the file; return the
        persisted timestamp then (>= ``timestamp``).

        Always a checkpoint. Waits for the publication to be committed, then for a
        flush (`Cache.persist`, in a worker thread). Concurrent waiters on one loop
        share flushes (group commit): at most one flush runs at a time, and those
        who arrive during a flush that may not cover them share the next one.
        Cancelling a waiter cancels only its wait; a flush already started
        completes.
        """
        persisted = await self._persisted()
        if persisted >= timestamp:
            await anyio.lowlevel.checkpoint()
            return persisted
        await self.wait_committed(timestamp)
        while True:
            persisted = await self._flushes.run(None, functools.partial(self._flush, timestamp))
            if persisted >= timestamp:
                return persisted
            persisted = await self._persisted()
            if persisted >= timestamp:
                return persisted

    async def _flush(self, timestamp: int) -> int:
        """One group flush (the leader's part of `wait_persisted`)."""
        persisted = await self._persisted()
        if persisted >= timestamp:
            return persisted  # a flush that covers us ended while we took over
        return await anyio.to_thread.run_sync(self._cache.persist)

    # -- statistics and lifetime ---------------------------------------------------

    def statistics(self) -> CacheStatistics:
        """The file's `CacheStatistics`, shared by every process (loader counts
        included: see `CacheStatistics`). Never waits."""
        return self._cache.statistics()

    async def aclose(self) -> None:
        """Close the underlying `Cache` (idempotent). A checkpoint; the handle is
        closed even if the caller is cancelled (the cancellation is raised
        once it is).

        Closing waits for the calls in flight on the handle in other threads
        (an off-loop copy, a repair, `clear`, a flush) to return: it does so
        in a worker thread, the loop running meanwhile. Operations this loop
        starts before the close takes effect run as usual; later ones raise
        `CacheClosedError`."""
        if not self._cache.closed:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._cache.close)
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        if self._cache.closed:
            raise CacheClosedError("the cache handle is closed")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_compiled_get = compiled_async_get(AsyncCache)
if _compiled_get is not None:
    AsyncCache.get = _compiled_get  # type: ignore[method-assign]
