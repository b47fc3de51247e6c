"""Per-key single-flight for async loaders, on anyio (asyncio and trio alike).

`SingleFlight.run(key, loader)` awaits ``loader()`` for tasks that missed ``key``,
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

Counters (`loader_calls`, `coalesced_gets`) are plain integers updated on the loop
thread; they are exact for one loop at a time.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from types import TracebackType
from typing import Generic, TypeVar

import anyio
from anyio.lowlevel import RunVar

__all__ = ["SingleFlight", "current_loop_tag"]

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
