"""Host-wide single-flight (DESIGN.md §9): real processes sharing one file.

Each child process opens the file, starts its gets of one cold key and reports
over a pipe: ``("joined",)`` once every task of its is blocked (waiting for a
load, or loading), ``("loading", pid)`` when its loader is called. Its loader
then waits for the parent's answer (a value, ``"none"`` or ``"raise"``), so the
parent decides every interleaving by events; nothing here sleeps to
synchronise. Children run on asyncio or trio, started by "spawn" or "fork".
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import random
import signal
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import aiovmc
from aiovmc import AsyncCache, Cache
from aiovmc._async_cache import WAIT_CONCURRENCY

from .helpers import WAIT

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

KEY = b"cold-key"
DEFAULT = b"<default>"

# (start method, children's backend): every scenario runs both start methods and
# both backends; the basic one and the SIGKILL one run uvloop too.
PAIRS = [("spawn", "trio"), ("fork", "asyncio")]
ALL_PAIRS = [*PAIRS, ("spawn", "asyncio"), ("fork", "trio"), ("spawn", "uvloop")]


def run_on(backend: str, main: Callable[[], Any]) -> None:
    """anyio.run on "asyncio", "trio" or "uvloop" (asyncio with uvloop's loop)."""
    if backend == "uvloop":
        anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(main, backend=backend)


class LoadError(Exception):
    """What a child's loader raises when told to."""


# ---------------------------------------------------------------------------
# Children (module level, so that "spawn" children can import them)
# ---------------------------------------------------------------------------


def _async_child(
    path: str,
    backend: str,
    n_tasks: int,
    load_timeout: float | None,
    conn: Connection,
    coalesce: str = "host",
) -> None:
    """n_tasks gets of KEY; commands from the parent: an answer for the loader
    (bytes, "none", "raise"), "cancel" (cancel every get), "close" (close the
    handle), and "bye" after "done" (read by the abandoned pipe reader)."""

    async def main() -> None:
        acache = AsyncCache(path, load_timeout=load_timeout, coalesce=coalesce)
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

    run_on(backend, main)


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
        if answer == "raise":
            raise LoadError(f"loader of {os.getpid()} failed")
        return None if answer == "none" else bytes(answer)

    with Cache(path, on_miss=loader) as cache:

        def one_get() -> None:
            value: object
            try:
                value = cache.get(KEY, DEFAULT)
            except LoadError:
                value = "error"
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

    def __init__(
        self, ctx: Any, target: Callable[..., None], *args: Any, **kwargs: Any
    ) -> None:
        self.conn, theirs = ctx.Pipe()
        self.process = ctx.Process(
            target=target, args=(*args, theirs), kwargs=kwargs, daemon=True
        )
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
def test_cancelled_waiters_leave_the_wave_alone(method: str, backend: str, file: str) -> None:
    """Every get of a waiting process is cancelled: they return at once, the
    wave goes on, and nothing of theirs is left in the file."""
    ctx = multiprocessing.get_context(method)
    leader = start_leader(ctx, file, backend)
    quitter, stayer = start_waiters(ctx, file, backend, 2)
    quitter.conn.send("cancel")
    assert quitter.finish() == []  # cancelled while the leader still loads
    leader.conn.send(b"for those who stayed")
    assert leader.finish() == [b"for those who stayed"] * 20
    assert stayer.finish() == [b"for those who stayed"] * 20
    stats = stats_of(file)
    assert (stats.loader_calls, stats.load_takeovers, stats.coalesced_gets) == (1, 0, 39)
    assert (stats.gets, stats.hits, stats.misses) == (60, 39, 21)
    assert in_use(file) == 0


@pytest.mark.parametrize(("method", "backend"), [*PAIRS, ("fork", "uvloop")])
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
def test_sync_cache_loader_error_stays_in_its_process(method: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    # One thread in the leading process: a thread of it arriving after the failure
    # would start a wave of its own.
    leader = Child(ctx, _sync_child, file, 1)
    leader.expect_both()
    waiter = Child(ctx, _sync_child, file, 6)
    waiter.expect("joined")
    leader.conn.send("raise")
    assert leader.finish() == ["error"]
    waiter.expect("loading")  # the other process takes over with its own loader
    waiter.conn.send(b"second try")
    assert waiter.finish() == [b"second try"] * 6
    stats = stats_of(file)
    assert (stats.loader_calls, stats.load_takeovers) == (2, 1)
    assert in_use(file) == 0


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


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_coalesce_process_keeps_loads_per_process(method: str, backend: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    first = Child(ctx, _async_child, file, backend, 10, 30.0, coalesce="process")
    first.expect_both()
    second = Child(ctx, _async_child, file, backend, 10, 30.0, coalesce="process")
    second.expect_both()  # loads although the first process is loading the same key
    second.conn.send(b"second")
    first.conn.send(b"first")
    assert first.finish() == [b"first"] * 10
    assert second.finish() == [b"second"] * 10
    stats = stats_of(file)
    assert (stats.loader_calls, stats.coalesced_gets) == (2, 18)


# ---------------------------------------------------------------------------
# Many keys, many waves
# ---------------------------------------------------------------------------


def _many_keys_child(
    path: str, backend: str, n_keys: int, concurrency: int, conn: Connection
) -> None:
    """Get keys 0..n_keys-1, `concurrency` at a time, in the same order as the
    other children; each loader call yields to the loop before returning."""

    async def main() -> None:
        calls = 0
        wrong = 0
        limiter = anyio.Semaphore(concurrency)

        async def loader(key: bytes) -> bytes:
            nonlocal calls
            calls += 1
            await anyio.lowlevel.checkpoint()
            return b"value of " + key

        async def one(key: bytes) -> None:
            nonlocal wrong
            async with limiter:
                if await acache.get(key, on_miss=loader) != b"value of " + key:
                    wrong += 1

        async with AsyncCache(path) as acache:
            conn.send(("joined",))
            conn.recv()  # start together
            async with anyio.create_task_group() as tg:
                for i in range(n_keys):
                    tg.start_soon(one, b"key-%d" % i)
        conn.send(("done", [wrong], calls))

    run_on(backend, main)


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_thousands_of_distinct_cold_keys_are_each_loaded_once(
    method: str, backend: str, cache_path: str
) -> None:
    Cache(cache_path, size="16MiB").close()
    ctx = multiprocessing.get_context(method)
    n_keys = 3000
    children = [Child(ctx, _many_keys_child, cache_path, backend, n_keys, 64) for _ in range(3)]
    for child in children:
        child.expect("joined")
    for child in children:
        child.conn.send("go")
    for child in children:
        assert child.finish() == [0]  # no wrong value
    assert sum(c.calls for c in children) == n_keys
    stats = stats_of(cache_path)
    assert (stats.loader_calls, stats.entries, stats.puts) == (n_keys, n_keys, n_keys)
    assert stats.gets == 3 * n_keys and stats.hits == 2 * n_keys
    assert in_use(cache_path) == 0


def _wave_child(path: str, backend: str, n_keys: int, conn: Connection) -> None:
    """Get keys 0..n_keys-1 in order, three tasks per key; the loader reports
    ("loading", pid, key) and returns once the parent says "go" (or dies)."""

    async def main() -> None:
        calls = 0
        wrong = 0

        async def loader(key: bytes) -> bytes:
            nonlocal calls
            calls += 1
            conn.send(("loading", os.getpid(), key))
            await anyio.to_thread.run_sync(conn.recv)
            return b"value of " + key

        async def one(key: bytes) -> None:
            nonlocal wrong
            if await acache.get(key, on_miss=loader) != b"value of " + key:
                wrong += 1

        async with AsyncCache(path) as acache:
            for i in range(n_keys):
                async with anyio.create_task_group() as tg:
                    for _ in range(3):
                        tg.start_soon(one, b"wave-%d" % i)
        conn.send(("done", [wrong], calls))

    run_on(backend, main)


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_sigkill_of_leaders_during_many_waves(method: str, backend: str, file: str) -> None:
    """Three processes run the same 40 waves; the parent SIGKILLs the leader of
    randomly chosen waves (replacing the process), and lets the others finish.
    No waiter hangs, every wave ends with its value stored, and every kill
    costs one takeover."""
    ctx = multiprocessing.get_context(method)
    rng = random.Random(8)
    n_keys, kills_left = 40, 6
    # Held open throughout: a replacement that found itself the file's only user
    # would recover it (a fresh table) rather than take over.
    keep_open = Cache(file)
    live = [Child(ctx, _wave_child, file, backend, n_keys) for _ in range(3)]
    finished: list[Child] = []
    kills = 0
    while live:
        ready = wait([c.conn for c in live], WAIT)
        assert ready, "no process made progress: a waiter hangs"
        for child in [c for c in live if c.conn in ready]:
            msg = child.expect("loading", "done")
            if msg[0] == "done":
                live.remove(child)
                finished.append(child)
            elif kills_left and rng.random() < 0.3:
                kills_left -= 1
                kills += 1
                live.remove(child)
                child.kill()
                live.append(Child(ctx, _wave_child, file, backend, n_keys))
            else:
                child.conn.send("go")
    for child in finished:
        assert child.finish() == [0]
    assert kills > 0
    with Cache(file) as cache:
        for i in range(n_keys):
            assert cache.get(b"wave-%d" % i) == b"value of wave-%d" % i
    stats = keep_open.statistics()
    assert stats.load_takeovers == kills
    assert stats.loader_calls == n_keys + kills
    assert keep_open._flights_in_use() == 0
    keep_open.close()


def _storm_child(
    path: str, backend: str, seed: int, active: Any, overlaps: Any, conn: Connection
) -> None:
    """200 gets of 4 keys, each cancelled after a random short time; loaders
    take a random short time and record whether two ever ran at once."""
    import time

    async def main() -> None:
        rng = random.Random(seed)

        async def loader(key: bytes) -> bytes:
            slot = key[-1] - ord("0")
            with active.get_lock():
                active[slot] += 1
                if active[slot] > 1:
                    overlaps.value += 1
            try:
                await anyio.sleep(rng.random() * 0.004)  # the load's duration
            finally:
                with active.get_lock():
                    active[slot] -= 1
            return b"stormy " + key

        async def one(key: bytes) -> None:
            with anyio.move_on_after(rng.random() * 0.006):
                value = await acache.get(key, on_miss=loader)
                assert value == b"stormy " + key

        async with AsyncCache(path) as acache:
            async with anyio.create_task_group() as tg:
                for _ in range(200):
                    tg.start_soon(one, b"storm-%d" % rng.randrange(4))
                    if rng.random() < 0.3:
                        await anyio.lowlevel.checkpoint()
            for i in range(4):  # whatever was cancelled, every key loads in the end
                assert await acache.get(b"storm-%d" % i, on_miss=loader) == b"stormy storm-%d" % i
                await acache.delete(b"storm-%d" % i)
        conn.send(("done", [time.monotonic()], 0))

    run_on(backend, main)


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_cancellation_storm_leaves_nothing_behind(method: str, backend: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    active = ctx.Array("i", 4)
    overlaps = ctx.Value("i", 0)
    for round_ in range(3):
        children = [
            Child(ctx, _storm_child, file, backend, 10 * round_ + i, active, overlaps)
            for i in range(2)
        ]
        for child in children:
            child.finish()
    assert overlaps.value == 0  # no two loads of one key ever ran at once on the host
    assert active[:] == [0, 0, 0, 0]
    assert in_use(file) == 0


# ---------------------------------------------------------------------------
# In one process: the table full, configuration, format
# ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_full_table_falls_back_to_process_coalescing(cache_path: str) -> None:
    async with AsyncCache(cache_path, size="4MiB") as acache:
        release = anyio.Event()
        calls = 0

        async def loader(key: bytes) -> bytes:
            nonlocal calls
            calls += 1
            await release.wait()
            return key.upper()

        n_keys = 1100  # more loads at once than the table's 1024 slots
        results: dict[bytes, list[bytes | None]] = {}

        async def one(key: bytes) -> None:
            results.setdefault(key, []).append(await acache.get(key, on_miss=loader))

        async with anyio.create_task_group() as tg:
            for i in range(n_keys):
                for _ in range(2):
                    tg.start_soon(one, b"k%d" % i)
            await anyio.wait_all_tasks_blocked()
            assert calls == n_keys  # every key is loading, with a slot or without
            # Every slot is used before any key falls back (not a window per key,
            # which fell back with half the table free).
            assert acache.cache._flights_in_use() == 1024
            release.set()
        assert all(v == [k.upper()] * 2 for k, v in results.items())
        assert len(results) == n_keys
        assert acache.cache._flights_in_use() == 0
        stats = acache.statistics()
        assert (stats.loader_calls, stats.coalesced_gets) == (n_keys, n_keys)


@pytest.mark.anyio
async def test_cancelled_waiters_give_their_waiting_threads_back(cache_path: str) -> None:
    """More waiters than a loop's waiting threads (`WAIT_CONCURRENCY`), each
    cancelled while its thread sleeps on another handle's load: every slot
    comes back, and the next waiters are served."""
    n = WAIT_CONCURRENCY + 6
    async with AsyncCache(cache_path, size="4MiB") as leader, AsyncCache(cache_path) as other:
        release = anyio.Event()

        async def slow(key: bytes) -> bytes:
            await release.wait()
            return key.upper()

        async def never(key: bytes) -> bytes:
            raise AssertionError("the waiting handle loaded")

        async with anyio.create_task_group() as loads:
            for i in range(n):
                loads.start_soon(functools.partial(leader.get, b"k%d" % i, on_miss=slow))
            await anyio.wait_all_tasks_blocked()
            for i in range(n):  # one after another: each waits in a thread, then is cancelled
                async with anyio.create_task_group() as tg:
                    tg.start_soon(functools.partial(other.get, b"k%d" % i, on_miss=never))
                    await anyio.wait_all_tasks_blocked()
                    tg.cancel_scope.cancel()
            got: list[bytes | None] = []

            async def wait_for(key: bytes) -> None:
                got.append(await other.get(key, on_miss=never))

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(wait_for, b"k%d" % i)
                    await anyio.wait_all_tasks_blocked()
                    release.set()
        assert sorted(g or b"" for g in got) == sorted(b"K%d" % i for i in range(n))


def test_coalesce_and_load_timeout_are_checked(cache_path: str) -> None:
    with pytest.raises(aiovmc.CacheConfigError, match="coalesce must be 'host' or 'process'"):
        Cache(cache_path, size="1MiB", coalesce="thread")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(aiovmc.CacheConfigError, match="load_timeout must be positive"):
            AsyncCache(cache_path, size="1MiB", load_timeout=bad)
    with pytest.raises(TypeError, match="load_timeout is a number of seconds or None, not str"):
        Cache(cache_path, size="1MiB", load_timeout="30")  # type: ignore[arg-type]
    with Cache(cache_path, size="1MiB", load_timeout=None, coalesce="process") as cache:
        assert (cache.coalesce, cache.load_timeout) == ("process", None)
    with Cache(cache_path) as cache:
        assert (cache.coalesce, cache.load_timeout) == ("host", 30.0)


# 1: before the flight table; 2: 256-byte minimum extents, tables one entry per extent
@pytest.mark.parametrize("version", [1, 2])
def test_file_of_a_previous_format_is_refused_untouched(cache_path: str, version: int) -> None:
    Cache(cache_path, size="1MiB").close()
    with open(cache_path, "r+b") as f:
        f.seek(8)
        f.write(version.to_bytes(4, "little"))
    before = Path(cache_path).read_bytes()
    with pytest.raises(
        aiovmc.CacheFormatError,
        match=rf"has format version {version}; this aiovmc reads version 3 only .*reset=True",
    ):
        Cache(cache_path)
    assert Path(cache_path).read_bytes() == before


def _cached_child(path: str, backend: str, conn: Connection) -> None:
    """Ten concurrent calls of a function memoised with aiovmc.functools.cached."""
    from aiovmc.functools import cached

    async def main() -> None:
        calls = 0
        async with AsyncCache(path) as acache:

            @cached(acache)
            async def profile(user_id: int) -> dict[str, object]:
                nonlocal calls
                calls += 1
                conn.send(("loading", os.getpid()))
                name = await anyio.to_thread.run_sync(conn.recv)
                return {"id": user_id, "name": name}

            results: list[object] = []

            async def one() -> None:
                results.append(await profile(42))

            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(one)
                await anyio.wait_all_tasks_blocked()
                conn.send(("joined",))
        conn.send(("done", results, calls))

    run_on(backend, main)


@pytest.mark.parametrize(("method", "backend"), PAIRS)
def test_functools_cached_coalesces_across_processes(method: str, backend: str, file: str) -> None:
    ctx = multiprocessing.get_context(method)
    leader = Child(ctx, _cached_child, file, backend)
    leader.expect_both()
    waiter = Child(ctx, _cached_child, file, backend)
    waiter.expect("joined")
    leader.conn.send("Ada")
    for child in (leader, waiter):
        assert child.finish() == [{"id": 42, "name": "Ada"}] * 10
    assert (leader.calls, waiter.calls) == (1, 0)
    assert stats_of(file).loader_calls == 1


@pytest.mark.anyio
async def test_a_scribbled_flight_table_delays_loads_at_most_load_timeout(
    cache_path: str,
) -> None:
    """Random bytes over the whole table, and slots forged to name a live leader
    that never ends: every get still loads its value, a forged live leader's keys
    after load_timeout, and nothing crashes."""
    import struct
    import time

    from .helpers import read_header, vmc_hash

    with Cache(cache_path, size="4MiB") as keeper:
        mapping = keeper._mmap
        assert mapping is not None
        hdr = read_header(mapping[:4096])
        off, n = hdr["flights_off"], hdr["n_flights"]
        live_owner = int.from_bytes(mapping[488:496], "little")  # next_owner: the keeper's id
        mapping[off : off + n * 32] = random.Random(3).randbytes(n * 32)
        forged = [b"forged-1", b"forged-2"]
        taken: set[int] = set()
        for key in forged:
            h = vmc_hash(key, hdr["hash_seed"])
            slot = (h >> 40) & (n - 1)  # its home; a lookup goes on through the table
            while slot in taken:  # both homes alike (the seed is random): the next slot
                slot = (slot + 1) & (n - 1)
            taken.add(slot)
            at = off + slot * 32
            mapping[at : at + 32] = struct.pack(
                "<IBBHQQQ", 7, 1, 0, len(key), h, live_owner, time.monotonic_ns()
            )
        async with AsyncCache(cache_path, load_timeout=0.3) as acache:
            keys = [*forged, *(b"plain-%d" % i for i in range(40))]
            for key in keys:
                assert await acache.get(key, on_miss=lambda k: k.upper()) == key.upper()
            stats = acache.statistics()
        assert stats.loader_calls == len(keys)
        assert stats.load_takeovers >= len(forged)
