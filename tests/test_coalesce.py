"""The single-flight rules of `aiovmc._coalesce`, each with a forced interleaving.

No test sleeps to synchronise: tasks are parked on events and
`anyio.wait_all_tasks_blocked()` tells when every task has reached its wait.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable

import anyio
import pytest

from aiovmc._coalesce import SingleFlight, current_loop_tag

pytestmark = pytest.mark.anyio

# Built at import time, outside any event loop, and reused by test_no_loop_affinity.
MODULE_FLIGHT: SingleFlight[str | None] = SingleFlight()


class Loader:
    """A loader whose calls block on `release` and are counted and tracked."""

    def __init__(self, result: str | None = "value", error: Exception | None = None) -> None:
        self.result = result
        self.error = error
        self.release = anyio.Event()
        self.calls = 0
        self.running = 0
        self.max_running = 0
        self.cancelled = 0

    async def __call__(self) -> str | None:
        self.calls += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await self.release.wait()
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if self.error is not None:
            raise self.error
        return self.result


async def collect(
    flight: SingleFlight[str | None],
    key: str,
    loader: Callable[[], Awaitable[str | None]],
    results: list[object],
    scope: anyio.CancelScope | None = None,
) -> None:
    """Run one `flight.run` and append its value, exception or "cancelled"."""
    with scope or anyio.CancelScope():
        try:
            results.append(await flight.run(key, loader))
        except Exception as exc:
            results.append(exc)
        return
    results.append("cancelled")


async def test_concurrent_misses_share_one_call() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    loader = Loader()
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        for _ in range(500):
            tg.start_soon(collect, flight, "k", loader, results)
        await anyio.wait_all_tasks_blocked()
        assert loader.calls == 1
        assert flight.in_flight() == 1
        loader.release.set()
    assert results == ["value"] * 500
    assert (flight.loader_calls, flight.coalesced_gets) == (1, 499)
    assert flight.in_flight() == 0


async def test_keys_are_independent() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    loaders = {k: Loader(result=k) for k in ("a", "b")}
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        for k in ("a", "b", "a", "b"):
            tg.start_soon(collect, flight, k, loaders[k], results)
        await anyio.wait_all_tasks_blocked()
        assert [ld.calls for ld in loaders.values()] == [1, 1]
        loaders["b"].release.set()
        await anyio.wait_all_tasks_blocked()
        assert sorted(map(str, results)) == ["b", "b"]
        loaders["a"].release.set()
    assert sorted(map(str, results)) == ["a", "a", "b", "b"]


async def test_nothing_is_kept_after_a_load() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    loader = Loader()
    loader.release.set()
    assert await flight.run("k", loader) == "value"
    assert await flight.run("k", loader) == "value"
    assert loader.calls == 2
    assert flight.coalesced_gets == 0


async def test_error_fans_out_and_is_not_cached() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    error = LookupError("backend down")
    loader = Loader(error=error)
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(collect, flight, "k", loader, results)
        await anyio.wait_all_tasks_blocked()
        loader.release.set()
    assert len(results) == 10
    assert all(r is error for r in results)
    assert (loader.calls, flight.coalesced_gets) == (1, 9)
    assert flight.in_flight() == 0

    # Each waiter re-raises with the loader's traceback; it does not grow per waiter.
    depth = 0
    tb = error.__traceback__
    while tb is not None:
        depth += 1
        tb = tb.tb_next
    assert depth < 10

    # The error was not cached: the next call loads again.
    ok = Loader()
    ok.release.set()
    assert await flight.run("k", ok) == "value"
    assert ok.calls == 1


async def test_none_result_goes_to_every_waiter() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    loader = Loader(result=None)
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(collect, flight, "k", loader, results)
        await anyio.wait_all_tasks_blocked()
        loader.release.set()
    assert results == [None, None, None]
    assert loader.calls == 1


async def test_cancelling_a_waiter_cancels_only_that_waiter() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    loader = Loader()
    results: list[object] = []
    scopes = [anyio.CancelScope() for _ in range(3)]
    async with anyio.create_task_group() as tg:
        for scope in scopes:
            tg.start_soon(collect, flight, "k", loader, results, scope)
            await anyio.wait_all_tasks_blocked()  # start in order: scopes[0] leads
        scopes[1].cancel()
        await anyio.wait_all_tasks_blocked()
        assert results == ["cancelled"]
        assert (loader.calls, loader.cancelled) == (1, 0)
        loader.release.set()
    assert results == ["cancelled", "value", "value"]
    assert (flight.loader_calls, flight.coalesced_gets) == (1, 1)


async def test_cancelled_leader_hands_over_to_one_waiter() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    first, second = Loader(result="first"), Loader(result="second")
    results: list[object] = []
    leader_scope = anyio.CancelScope()
    async with anyio.create_task_group() as tg:
        tg.start_soon(collect, flight, "k", first, results, leader_scope)
        await anyio.wait_all_tasks_blocked()
        for _ in range(5):
            tg.start_soon(collect, flight, "k", second, results)
        await anyio.wait_all_tasks_blocked()
        assert (first.calls, second.calls) == (1, 0)

        leader_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        # The leader's loader was cancelled and ended before a waiter took over.
        assert results == ["cancelled"]
        assert (first.cancelled, first.running) == (1, 0)
        assert (second.calls, second.running) == (1, 1)
        assert flight.in_flight() == 1
        second.release.set()
    assert results == ["cancelled"] + ["second"] * 5
    assert first.max_running == second.max_running == 1
    assert (flight.loader_calls, flight.coalesced_gets) == (2, 4)
    assert flight.in_flight() == 0


async def test_successive_leaders_never_overlap() -> None:
    """Cancel the leader three times in a row: loads run strictly one after another."""
    flight: SingleFlight[str | None] = SingleFlight()
    running = 0
    overlaps = 0
    leaders: list[anyio.CancelScope] = []
    scopes: dict[int, anyio.CancelScope] = {}
    release = anyio.Event()

    async def loader() -> str:
        nonlocal running, overlaps
        leaders.append(scopes[anyio.get_current_task().id])
        running += 1
        overlaps += running > 1
        try:
            await release.wait()
        finally:
            running -= 1
        return "v"

    async def task() -> None:
        scope = scopes[anyio.get_current_task().id] = anyio.CancelScope()
        await collect(flight, "k", loader, results, scope)

    results: list[object] = []
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(task)
        await anyio.wait_all_tasks_blocked()
        for n in range(3):
            assert len(leaders) == n + 1
            leaders[-1].cancel()  # whichever waiter took over last
            await anyio.wait_all_tasks_blocked()
        release.set()
    assert results == ["cancelled"] * 3 + ["v"]
    assert (len(leaders), len(set(map(id, leaders))), overlaps) == (4, 4, 0)


async def test_newcomer_takes_over_an_orphaned_load() -> None:
    """A task arriving between the leader's exit and the waiters' wake-up leads."""
    flight: SingleFlight[str | None] = SingleFlight()
    first, second = Loader(result="first"), Loader(result="second")
    results: list[object] = []
    leader_scope = anyio.CancelScope()

    async def leader_then_newcomer() -> None:
        with leader_scope:
            await flight.run("k", first)
        # No checkpoint since the leader left: the waiters have not run yet.
        results.append(await flight.run("k", second))

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader_then_newcomer)
        await anyio.wait_all_tasks_blocked()
        for _ in range(3):
            tg.start_soon(collect, flight, "k", first, results)
        await anyio.wait_all_tasks_blocked()
        leader_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert (first.calls, second.calls, second.running) == (1, 1, 1)
        second.release.set()
    assert results == ["second"] * 4
    assert first.max_running == second.max_running == 1


async def test_cancelled_leader_without_waiters_forgets_the_key() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    loader = Loader()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await flight.run("k", loader)
    assert (loader.calls, loader.cancelled) == (1, 1)
    assert flight.in_flight() == 0


async def test_everyone_cancelled_at_once_forgets_the_key() -> None:
    flight: SingleFlight[str | None] = SingleFlight()
    loader = Loader()
    results: list[object] = []
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(collect, flight, "k", loader, results)
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()
    assert loader.calls == 1
    assert flight.in_flight() == 0
    loader.release.set()
    assert await flight.run("k", loader) == "value"


def test_no_loop_affinity() -> None:
    """One SingleFlight, made at import time, used by successive loops of both kinds."""

    async def main() -> object:
        loader = Loader()  # its Event belongs to this loop
        results: list[object] = []
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(collect, MODULE_FLIGHT, "k", loader, results)
            await anyio.wait_all_tasks_blocked()
            loader.release.set()
        assert results == ["value"] * 3
        return current_loop_tag()

    before = MODULE_FLIGHT.loader_calls
    tags = [anyio.run(main, backend=b) for b in ("asyncio", "trio", "asyncio", "trio")]
    assert len({id(t) for t in tags}) == 4
    assert MODULE_FLIGHT.loader_calls - before == 4
    assert MODULE_FLIGHT.in_flight() == 0


def test_loops_in_two_threads_do_not_share_state() -> None:
    """Two loops load the same key at the same time through one SingleFlight.

    Each loop coalesces its own tasks; neither ever waits on the other's event.
    """
    flight: SingleFlight[str] = SingleFlight()
    barrier = threading.Barrier(2, timeout=10)
    outcomes: dict[str, list[str]] = {}

    async def loader() -> str:
        # Both loaders are in flight at once, for the same key, in different loops.
        await anyio.to_thread.run_sync(barrier.wait)
        return "v"

    async def main(name: str) -> None:
        got: list[str] = []

        async def one() -> None:
            got.append(await flight.run("k", loader))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
        outcomes[name] = got

    threads = [
        threading.Thread(target=anyio.run, args=(main, name), kwargs={"backend": name})
        for name in ("asyncio", "trio")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert outcomes == {"asyncio": ["v"] * 3, "trio": ["v"] * 3}
    assert flight.loader_calls == 2
    assert flight.in_flight() == 0
