"""Host-wide single-flight (DESIGN.md §9): real processes sharing one file.

Each child process opens the file, starts its gets of one cold key and reports
over a pipe: ``("joined",)`` once every task of its is blocked (waiting for a
load, or loading), ``("loading", pid)`` when its loader is called. Its loader
then waits for the parent's answer (a value, ``"none"`` or ``"raise"``), so the
parent decides every interleaving by events; nothing here sleeps to
synchronise. Children run on asyncio or trio, started by "spawn" or "fork".
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from typing import Any

import anyio
import pytest

import aiovmc
from aiovmc import AsyncCache, Cache

from .helpers import WAIT

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

KEY = b"cold-key"
DEFAULT = b"<default>"

# (start method, children's backend): every scenario runs both start methods and
# both backends; the basic one runs all four pairs.
PAIRS = [("spawn", "trio"), ("fork", "asyncio")]
ALL_PAIRS = [*PAIRS, ("spawn", "asyncio"), ("fork", "trio")]


class LoadError(Exception):
    """What a child's loader raises when told to."""


# ---------------------------------------------------------------------------
# Children (module level, so that "spawn" children can import them)
# ---------------------------------------------------------------------------


def _async_child(
    path: str, backend: str, n_tasks: int, load_timeout: float | None, conn: Connection
) -> None:
    """n_tasks gets of KEY; commands from the parent: an answer for the loader
    (bytes, "none", "raise"), "cancel" (cancel every get), "close" (close the
    handle), and "bye" after "done" (read by the abandoned pipe reader)."""

    async def main() -> None:
        acache = AsyncCache(path, load_timeout=load_timeout)
        send, receive = anyio.create_memory_object_stream[object](16)
        results: list[object] = []
        calls = 0

        async def loader(key: bytes) -> bytes | None:
            nonlocal calls
            calls += 1
            conn.send(("loading", os.getpid()))
            answer = await receive.receive()
            if answer == "raise":
                raise LoadError(f"loader of {os.getpid()} failed")
            return None if answer == "none" else answer  # type: ignore[return-value]

        async def one_get() -> None:
            try:
                results.append(await acache.get(KEY, DEFAULT, on_miss=loader))
            except LoadError:
                results.append("error")
            except aiovmc.CacheClosedError:
                results.append("closed")

        async def dispatch(gets: anyio.CancelScope) -> None:
            while True:
                msg = await anyio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
                if msg == "cancel":
                    gets.cancel()
                elif msg == "close":
                    await acache.aclose()
                else:
                    await send.send(msg)

        async with anyio.create_task_group() as outer:
            with anyio.CancelScope() as gets:
                outer.start_soon(dispatch, gets)
                async with anyio.create_task_group() as tg:
                    for _ in range(n_tasks):
                        tg.start_soon(one_get)
                    await anyio.wait_all_tasks_blocked()
                    conn.send(("joined",))
            outer.cancel_scope.cancel()
        conn.send(("done", results, calls))
        await acache.aclose()

    anyio.run(main, backend=backend)


def _sync_child(path: str, n_threads: int, conn: Connection) -> None:
    """n_threads threads get KEY from a sync Cache; the loader's answer comes
    from the parent."""
    import threading

    calls = 0
    results: list[object] = []
    lock = threading.Lock()

    def loader(key: bytes) -> bytes | None:
        nonlocal calls
        with lock:
            calls += 1
        conn.send(("loading", os.getpid()))
        answer = conn.recv()
        return None if answer == "none" else answer  # type: ignore[no-any-return]

    with Cache(path, on_miss=loader) as cache:

        def one_get() -> None:
            value = cache.get(KEY, DEFAULT)
            with lock:
                results.append(value)

        threads = [threading.Thread(target=one_get) for _ in range(n_threads)]
        for t in threads:
            t.start()
        conn.send(("joined",))
        for t in threads:
            t.join()
    conn.send(("done", results, calls))


# ---------------------------------------------------------------------------
# The parent's side
# ---------------------------------------------------------------------------


class Child:
    """A child process and our end of its pipe."""

    def __init__(self, ctx: Any, target: Callable[..., None], *args: Any) -> None:
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(*args, theirs), daemon=True)
        self.process.start()
        theirs.close()
        self.results: list[object] | None = None
        self.calls = 0

    @property
    def pid(self) -> int:
        return self.process.pid  # type: ignore[no-any-return]

    def expect(self, *what: str) -> tuple[Any, ...]:
        """The next message, which must be one of `what`."""
        if not self.conn.poll(WAIT):
            raise AssertionError(f"child {self.pid} said nothing for {WAIT} s (waiting for {what})")
        msg = self.conn.recv()
        assert msg[0] in what, f"child {self.pid} said {msg!r}, expected one of {what}"
        if msg[0] == "done":
            self.results, self.calls = msg[1], msg[2]
        return msg  # type: ignore[no-any-return]

    def expect_both(self) -> None:
        """"loading" and "joined", in either order (a leader says both)."""
        said = {self.expect("loading", "joined")[0], self.expect("loading", "joined")[0]}
        assert said == {"loading", "joined"}

    def finish(self) -> list[object]:
        """Wait for the child's results and its exit."""
        if self.results is None:
            self.expect("done")
        try:  # ends the child's last pipe read (asyncio waits for its threads at exit)
            self.conn.send("bye")
        except BrokenPipeError:
            pass  # gone already (trio does not wait for abandoned threads)
        self.process.join(WAIT)
        assert self.process.exitcode == 0, f"child {self.pid} exited with {self.process.exitcode}"
        assert self.results is not None
        return self.results

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.join(WAIT)


def next_message(children: list[Child], kind: str) -> tuple[Child, tuple[Any, ...]]:
    """The first message of `kind` from any of `children` (others must not come first)."""
    ready = wait([c.conn for c in children], WAIT)
    assert ready, f"no child said {kind!r} within {WAIT} s"
    child = next(c for c in children if c.conn in ready)
    return child, child.expect(kind)


@pytest.fixture
def file(cache_path: str) -> Iterator[str]:
    Cache(cache_path, size="4MiB").close()
    yield cache_path


def stats_of(path: str) -> aiovmc.CacheStatistics:
    with Cache(path) as cache:
        return cache.statistics()


def in_use(path: str) -> int:
    with Cache(path) as cache:
        return cache._flights_in_use()


def start_leader(ctx: Any, file: str, backend: str, n: int = 20) -> Child:
    """A child whose loader is called (the wave's leader), with all its tasks in."""
    leader = Child(ctx, _async_child, file, backend, n, 30.0)
    leader.expect("loading")
    leader.expect("joined")
    return leader


def start_waiters(
    ctx: Any, file: str, backend: str, count: int, n: int = 20, load_timeout: float | None = 30.0
) -> list[Child]:
    children = [Child(ctx, _async_child, file, backend, n, load_timeout) for _ in range(count)]
    for child in children:
        child.expect("joined")
    return children


# ---------------------------------------------------------------------------
# One wave, each outcome
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "backend"), ALL_PAIRS)
def test_four_processes_hundred_tasks_one_loader_call(method: str, backend: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    children = [Child(ctx, _async_child, file, backend, 100, 30.0) for _ in range(4)]
    leader, _ = next_message(children, "loading")
    for child in children:
        child.expect("joined")
    leader.conn.send(b"the value")
    for child in children:
        assert child.finish() == [b"the value"] * 100
    assert [c.calls for c in children].count(1) == 1 and sum(c.calls for c in children) == 1
    stats = stats_of(file)
    assert (stats.loader_calls, stats.coalesced_gets, stats.load_takeovers) == (1, 399, 0)
    assert (stats.gets, stats.hits, stats.misses, stats.puts) == (400, 399, 1, 1)
    assert in_use(file) == 0


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_loader_returning_none_gives_every_waiter_its_default(
    method: str, backend: str, file: str
) -> None:
    ctx = multiprocessing.get_context(method)
    leader = start_leader(ctx, file, backend)
    waiters = start_waiters(ctx, file, backend, 2)
    leader.conn.send("none")
    for child in [leader, *waiters]:
        assert child.finish() == [DEFAULT] * 20
    assert sum(c.calls for c in [leader, *waiters]) == 1
    stats = stats_of(file)
    assert (stats.loader_calls, stats.coalesced_gets, stats.load_takeovers) == (1, 59, 0)
    assert (stats.hits, stats.misses, stats.puts, stats.entries) == (0, 60, 0, 0)
    assert in_use(file) == 0


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_loader_error_stays_in_its_process_and_a_waiter_takes_over(
    method: str, backend: str, file: str
) -> None:
    ctx = multiprocessing.get_context(method)
    leader = start_leader(ctx, file, backend)
    waiters = start_waiters(ctx, file, backend, 2)
    leader.conn.send("raise")
    assert leader.finish() == ["error"] * 20
    successor, _ = next_message(waiters, "loading")
    successor.conn.send(b"second try")
    for child in waiters:
        assert child.finish() == [b"second try"] * 20
    assert [c.calls for c in waiters].count(1) == 1 and sum(c.calls for c in waiters) == 1
    stats = stats_of(file)
    assert (stats.loader_calls, stats.load_takeovers, stats.coalesced_gets) == (2, 1, 58)
    assert in_use(file) == 0


@pytest.mark.parametrize("command", ["cancel", "close"])
@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_cancelled_or_closed_leader_is_taken_over_at_once(
    method: str, backend: str, command: str, file: str
) -> None:
    ctx = multiprocessing.get_context(method)
    leader = start_leader(ctx, file, backend)
    waiters = start_waiters(ctx, file, backend, 2)
    leader.conn.send(command)
    successor, _ = next_message(waiters, "loading")
    successor.conn.send(b"after the leader left")
    for child in waiters:
        assert child.finish() == [b"after the leader left"] * 20
    if command == "close":
        leader.conn.send(b"too late")  # its loader returns, the store finds the handle closed
        assert leader.finish() == ["closed"] * 20
    else:
        assert leader.finish() == []  # every get of the leader's process was cancelled
    stats = stats_of(file)
    assert (stats.loader_calls, stats.load_takeovers) == (2, 1)
    assert in_use(file) == 0


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_sigkilled_leader_is_taken_over(method: str, backend: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    leader = start_leader(ctx, file, backend)
    waiters = start_waiters(ctx, file, backend, 2)
    leader.kill()
    successor, _ = next_message(waiters, "loading")
    successor.conn.send(b"after the kill")
    for child in waiters:
        assert child.finish() == [b"after the kill"] * 20
    stats = stats_of(file)
    assert (stats.loader_calls, stats.load_takeovers, stats.coalesced_gets) == (2, 1, 39)
    assert in_use(file) == 0


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_slow_live_leader_gets_a_second_leader_after_load_timeout(
    method: str, backend: str, file: str
) -> None:
    ctx = multiprocessing.get_context(method)
    leader = start_leader(ctx, file, backend)
    impatient = Child(ctx, _async_child, file, backend, 20, 0.3)
    # The leader is alive and still loading: 0.3 s after it started (at once if
    # that was long ago), the impatient process loads too.
    impatient.expect_both()
    impatient.conn.send(b"second leader's value")
    assert impatient.finish() == [b"second leader's value"] * 20
    leader.conn.send(b"first leader's value")
    assert leader.finish() == [b"first leader's value"] * 20
    with Cache(file) as cache:
        assert cache.get(KEY) == b"first leader's value"  # published last, so it stays
    stats = stats_of(file)
    assert (stats.loader_calls, stats.load_takeovers) == (2, 1)
    assert in_use(file) == 0


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_sync_cache_threads_coalesce_across_processes(method: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    leader = Child(ctx, _sync_child, file, 8)
    leader.expect_both()
    waiter = Child(ctx, _sync_child, file, 8)
    waiter.expect("joined")
    leader.conn.send(b"sync value")
    assert leader.finish() == [b"sync value"] * 8
    assert waiter.finish() == [b"sync value"] * 8
    assert (leader.calls, waiter.calls) == (1, 0)
    assert stats_of(file).loader_calls == 1


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_sync_cache_takes_over_from_a_sigkilled_leader(method: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    leader = Child(ctx, _sync_child, file, 4)
    leader.expect_both()
    waiter = Child(ctx, _sync_child, file, 4)
    waiter.expect("joined")
    leader.kill()
    waiter.expect("loading")
    waiter.conn.send(b"taken over")
    assert waiter.finish() == [b"taken over"] * 4
    stats = stats_of(file)
    assert (stats.loader_calls, stats.load_takeovers) == (2, 1)
