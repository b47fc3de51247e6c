"""Single-flight: one loader call per cold key, within a process and across the host.

Three layers, each relying on the one below it:

- `SingleFlight` coalesces the tasks of one event loop (rules 1-6 below);
- `ThreadFlight` coalesces the threads of one process calling a sync `Cache`;
- `HostWave` is one handle's part in the host-wide wave of a key, through the
  flight table in the file (DESIGN.md §9, ``native/vmc_flight.h``). Only the
  task or thread that leads its process's load joins the host-wide wave, so a
  process has at most one waiter per key (and event loop) on the table.

The host-wide rules, as `AsyncCache` and `Cache` drive `HostWave` (tested with
real processes in ``tests/test_host_flight.py``):

A. **One leader on the host.** The first handle to join the wave of a key leads:
   it looks in the cache once more, then calls its loader, stores the value and
   ends the wave. Every other handle waits (in a worker thread for `AsyncCache`,
   on the calling thread for `Cache`) without polling: the end wakes it through
   a futex, and it reads the value from the file.
B. **No value.** A loader returning None ends the wave with no value: every
   waiter on the host returns its own ``default``; nobody loads again for that
   wave.
C. **Errors stay home.** A loader exception ends the wave as failed. It reaches
   the tasks coalesced with the leader in its process only; a waiter of another
   process takes over and calls its own loader, so a failing key costs at most
   one call per process per wave, one after another.
D. **Takeover.** A leader that is cancelled, or whose handle closes, ends the
   wave as failed at once and a waiter takes over. A leader whose process died
   holds no owner lock any more: a waiter notices within 200 ms (a probe) and
   takes over. A leader alive but loading for longer than a waiter's
   ``load_timeout`` gets a second leader, that waiter; the value published last
   stays. Each takeover that calls a loader counts in ``load_takeovers``.
E. **Table full.** With no room near the key's home slot, the load is coalesced
   within the process only: never blocked, never failed.

Per event loop, `SingleFlight.run(key, loader)` awaits ``loader()`` for tasks that missed ``key``,
making sure concurrent callers share one call. The rules, each covered by
``tests/test_coalesce.py`` on both backends:

1. **One call.** Any number of tasks calling `run` with the same key while a load of
   that key is in flight share that load: the loader is called once, and every
   task gets its result. The task that found no load in flight (the *leader*) runs
   the loader in its own task, under its own cancel scopes and deadlines; the
   others (*waiters*) wait for it. The loader that runs is the one passed by the
   task that runs it.
2. **Errors fan out and are never cached.** If the loader raises an `Exception`,
   the leader and every waiter of that load raise the same exception object (with
   the loader's traceback). The flight is over at that point: the next call with
   the key calls the loader again.
3. **Results are handed out, never kept.** Once the load ends, its state is
   dropped; `SingleFlight` stores nothing. (`AsyncCache` stores the loaded value in
   the cache *before* the load ends, so a task arriving just afterwards hits.)
   A loader result of ``None`` is handed out like any other value; `AsyncCache`
   turns it into each caller's own ``default``.
4. **Cancelling a waiter cancels only that waiter.** The load goes on for the
   others.
5. **A cancelled leader hands over.** If the leader is cancelled (or interrupted by
   any other `BaseException` that is not an `Exception`), its loader call ends with
   it and the exception propagates in the leader only. One of the remaining
   waiters then becomes the leader and calls *its* loader. At no time do two loader
   calls for one key run at once on one event loop. With no waiter left, the key is
   simply forgotten.
6. **No loop affinity.** Nothing is created at construction or import time. The
   in-flight table is keyed by (event loop, key), and the per-key state (one
   `anyio.Event` and a few fields) exists only while a load is in flight, inside
   the loop that runs it. One `SingleFlight` can therefore serve successive
   `anyio.run` calls on either backend, or several loops in several threads at
   once; coalescing happens among the tasks of one loop.

A loader that awaits `run` for its own key (directly or through a task it spawns)
waits for itself forever: don't.

`run` is a checkpoint only when it waits: the leader's first checkpoint is whatever
its loader awaits; a waiter always waits on an event.

`SingleFlight`'s counters (`loader_calls`, `coalesced_gets`) are plain integers
updated on the loop thread, exact for one loop at a time; the cache's own
counters are file-wide and kept by `AsyncCache` and `Cache` (docs/api.md).

`ThreadFlight` follows rules 1-5 for threads: one call per key among the threads
of a process; errors reach every waiting thread; a leader interrupted by a
`BaseException` that is not an `Exception` (KeyboardInterrupt) hands over to a
waiting thread.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Awaitable, Callable, Generator, Hashable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import anyio
from anyio.lowlevel import RunVar

from ._errors import CacheClosedError
from ._native import (
    END_FAILED,
    END_NONE,
    END_VALUE,
    FLIGHT_FULL,
    FLIGHT_NONE,
    FLIGHT_TAKEOVER,
    FLIGHT_VALUE,
    FLIGHT_WAIT,
    new_ticket,
)

if TYPE_CHECKING:  # _cache imports this module
    from ._cache import CacheCore

__all__ = [
    "HostWave",
    "Load",
    "LoadMark",
    "Peek",
    "SingleFlight",
    "Step",
    "ThreadFlight",
    "Wait",
    "current_loop_tag",
    "load_steps",
]

T = TypeVar("T")

_loop_tag: RunVar[object] = RunVar("aiovmc.loop_tag")


def current_loop_tag() -> object:
    """Return an object identifying the running event loop (created on first use).

    It lives as long as the loop does, so it is a safe dictionary key for state
    that must not cross from one loop to another. Never waits.
    """
    tag = _loop_tag.get(None)
    if tag is None:
        tag = object()
        _loop_tag.set(tag)
    return tag


class _Flight(Generic[T]):
    """The state of one in-flight load of one key on one event loop."""

    __slots__ = ("error", "error_tb", "event", "finished", "leading", "value", "waiters")

    def __init__(self) -> None:
        self.event = anyio.Event()  # set when the load ends or its leader leaves
        self.leading = True  # a task is running the loader
        self.waiters = 0  # tasks waiting for the outcome (the leader excluded)
        self.finished = False  # the outcome below is final
        self.value: T | None = None
        self.error: BaseException | None = None
        self.error_tb: TracebackType | None = None

    def outcome(self) -> T:
        if self.error is not None:
            raise self.error.with_traceback(self.error_tb)
        return self.value  # type: ignore[return-value]  # set with `finished`


class SingleFlight(Generic[T]):
    """Coalesces concurrent loads of the same key (see the module docstring).

    ``loader_calls`` counts the loader calls made; ``coalesced_gets`` counts the
    `run` calls served by another task's load (with a value or an error).
    """

    __slots__ = ("_flights", "coalesced_gets", "loader_calls")

    def __init__(self) -> None:
        self._flights: dict[tuple[object, Hashable], _Flight[T]] = {}
        self.loader_calls = 0
        self.coalesced_gets = 0

    def in_flight(self) -> int:
        """Number of keys being loaded right now, over all event loops. Never waits."""
        return len(self._flights)

    async def run(self, key: Hashable, loader: Callable[[], Awaitable[T]]) -> T:
        """Return ``await loader()``, sharing one call among concurrent callers.

        Waits for the load (a checkpoint for waiters). Cancelling a waiter cancels
        only it; cancelling the leader hands the load over to a waiter.
        """
        fkey = (current_loop_tag(), key)
        flight = self._flights.get(fkey)
        if flight is None:
            flight = self._flights[fkey] = _Flight()
            return await self._lead(fkey, flight, loader)
        if not flight.leading:
            # The previous leader was cancelled and no waiter has taken over yet.
            flight.leading = True
            return await self._lead(fkey, flight, loader)
        return await self._follow(fkey, flight, loader)

    async def _lead(
        self,
        fkey: tuple[object, Hashable],
        flight: _Flight[T],
        loader: Callable[[], Awaitable[T]],
    ) -> T:
        self.loader_calls += 1
        try:
            value = await loader()
        except Exception as exc:
            flight.error, flight.error_tb = exc, exc.__traceback__
            self._finish(fkey, flight)
            raise
        except BaseException:
            # Cancelled (or interrupted): the loader call has ended with us. Wake the
            # waiters on a fresh event so that the first one to run takes over.
            flight.leading = False
            woken = flight.event
            if flight.waiters:
                flight.event = anyio.Event()
            else:
                self._forget(fkey, flight)
            woken.set()
            raise
        flight.value = value
        self._finish(fkey, flight)
        return value

    async def _follow(
        self,
        fkey: tuple[object, Hashable],
        flight: _Flight[T],
        loader: Callable[[], Awaitable[T]],
    ) -> T:
        flight.waiters += 1
        waiting = True
        try:
            while True:
                await flight.event.wait()
                if flight.finished:
                    self.coalesced_gets += 1
                    return flight.outcome()
                if not flight.leading:
                    # The leader left without an outcome: we are the first waiter to
                    # run since, so we take over.
                    flight.leading = True
                    flight.waiters -= 1
                    waiting = False
                    return await self._lead(fkey, flight, loader)
                # Another waiter took over; wait on the event it will set.
        finally:
            if waiting:
                flight.waiters -= 1
                if not flight.finished and not flight.leading and not flight.waiters:
                    # We were the last one who could have taken an orphaned load over.
                    self._forget(fkey, flight)

    def _finish(self, fkey: tuple[object, Hashable], flight: _Flight[T]) -> None:
        flight.finished = True
        self._forget(fkey, flight)
        flight.event.set()

    def _forget(self, fkey: tuple[object, Hashable], flight: _Flight[T]) -> None:
        if self._flights.get(fkey) is flight:
            del self._flights[fkey]


class _ThreadCall(Generic[T]):
    """One load of one key among the threads of a process."""

    __slots__ = ("done", "error", "handed_over", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.handed_over = False  # the leader left without an outcome
        self.value: T | None = None
        self.error: BaseException | None = None


class ThreadFlight(Generic[T]):
    """Coalesces concurrent loads of the same key among threads (module docstring)."""

    __slots__ = ("_calls", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _ThreadCall[T]] = {}

    def run(self, key: Hashable, loader: Callable[[], T]) -> T:
        """Return ``loader()``, sharing one call among concurrent threads; its
        errors reach them all."""
        while True:
            with self._lock:
                call = self._calls.get(key)
                leading = call is None
                if call is None:
                    call = self._calls[key] = _ThreadCall()
            if leading:
                return self._lead(key, call, loader)
            call.done.wait()
            if call.handed_over:
                continue  # the leader was interrupted: the first thread here leads
            if call.error is not None:
                raise call.error
            return call.value  # type: ignore[return-value]  # set with `done`

    def _lead(self, key: Hashable, call: _ThreadCall[T], loader: Callable[[], T]) -> T:
        try:
            call.value = value = loader()
        except Exception as exc:
            call.error = exc
            raise
        except BaseException:
            call.handed_over = True
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()
        return value


class LoadMark:
    """Whether one get ran the loader itself; counts the get once it is answered.

    Each get passes its own mark with its loader; only the leader's loader runs,
    so only the leader's mark is set. Counting (file-wide, DESIGN.md §9): a get
    that ran the loader counts a loader call (and a takeover if it took over);
    any other get answered by the load counts as coalesced, and as a hit if it
    received a value (it was counted as a miss when it looked the key up)."""

    __slots__ = ("ran",)

    def __init__(self) -> None:
        self.ran = False

    def mark(self, count: Callable[..., None], key: bytes, takeover: bool) -> None:
        """The loader is about to be called by the get owning this mark.
        `count` adds to the file's load counters (`CacheCore.count_loads`)."""
        count(key, loader_calls=1, takeovers=int(takeover))
        self.ran = True

    def count_answer(self, count: Callable[..., None], key: bytes, value: object) -> None:
        """The get owning this mark was answered with `value` (None: no value)."""
        if not self.ran:
            count(key, coalesced=1, coalesced_hits=int(value is not None))


class HostWave:
    """One handle's part in the host-wide wave of one key (module docstring, A-E).

    `join` answers a ``FLIGHT_*`` status: LEAD or TAKEOVER (load, then `finish`
    or `fail`), WAIT (`wait`, then `join` again), VALUE or NONE (the wave waited
    for ended with or without a value), FULL (no slot: load without the table).
    """

    __slots__ = ("_core", "_key", "_ticket", "_timeout_ns", "takeover")

    def __init__(self, core: CacheCore, key: bytes, load_timeout_ns: int) -> None:
        self._core = core
        self._key = key
        self._timeout_ns = load_timeout_ns
        self._ticket: Any = new_ticket()
        self.takeover = False  # the last LEAD was a takeover

    def join(self) -> int:
        """Join (or rejoin) the wave; never waits beyond a short lock."""
        status = self._core.flight_join(self._key, self._timeout_ns, self._ticket)
        self.takeover = status == FLIGHT_TAKEOVER
        return status

    def restart(self) -> None:
        """Forget the wave joined: the next `join` treats us as a new arrival."""
        self._ticket.slot = 0

    def wait(self) -> None:
        """Block this thread until the wave changes, or for a probe interval."""
        self._core.flight_wait(self._ticket)

    def kick(self) -> None:
        """Wake the thread sleeping in `wait` (it joins again and finds nothing
        to do for a cancelled task); the other sleepers on the slot rejoin too."""
        try:
            self._core.flight_kick(self._ticket)
        except CacheClosedError:
            pass  # closed: the sleeper's next join fails and ends it

    def finish(self, value: object) -> None:
        """End the wave we lead with the loader's result (None: no value)."""
        self._end(END_NONE if value is None else END_VALUE)

    def fail(self) -> None:
        """End the wave we lead without an outcome: the loader raised, or we
        were cancelled. A waiter takes over."""
        self._end(END_FAILED)

    def _end(self, outcome: int) -> None:
        try:
            self._core.flight_end(self._ticket, outcome)
        except CacheClosedError:
            pass  # closing the handle orphaned the wave already


@dataclasses.dataclass(frozen=True, slots=True)
class Peek:
    """Step: look the key up quietly; send back the stored value or None."""


@dataclasses.dataclass(frozen=True, slots=True)
class Wait:
    """Step: call ``wave.wait()`` (in a worker thread, from async code); send None."""

    wave: HostWave


@dataclasses.dataclass(frozen=True, slots=True)
class Load:
    """Step: call the loader and store its result; send back what it returned
    (None: no value), or throw its exception into the generator."""

    takeover: bool


Step = Peek | Wait | Load


def load_steps(core: CacheCore, key: bytes) -> Generator[Step, bytes | None, bytes | None]:
    """The part of a miss played by the task or thread leading its process's load,
    as steps that its driver carries out (`Cache` blocking, `AsyncCache` awaiting),
    so that the protocol is written once. Returns the value (None: no value).

    First look again: a leader taking over from a cancelled one, or one whose key
    another process loaded meanwhile, may find it stored. Then, if the cache
    coalesces across the host, lead, join or wait for the host-wide wave
    (rules A-E)."""
    found = yield Peek()
    if found is not None:
        return found
    if not core.host:
        return (yield Load(takeover=False))
    wave = HostWave(core, key, core.load_timeout_ns)
    while True:
        status = wave.join()
        if status == FLIGHT_WAIT:
            yield Wait(wave)
            continue
        if status == FLIGHT_FULL:
            return (yield Load(takeover=False))
        if status == FLIGHT_NONE:
            return None
        found = yield Peek()
        if status == FLIGHT_VALUE:
            if found is not None:
                return found
            wave.restart()  # stored, then removed already: a new wave
            continue
        # FLIGHT_LEAD or FLIGHT_TAKEOVER
        if found is not None:
            wave.finish(found)
            return found
        try:
            value = yield Load(takeover=wave.takeover)
        except BaseException:
            wave.fail()
            raise
        wave.finish(value)
        return value
