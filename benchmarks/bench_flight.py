"""Host-wide single-flight (DESIGN.md §9 and §8).

Worker processes are `spawn`ed once per library and kept across rounds; a round
starts when every worker and the parent meet at a barrier, and uses a key no round
used before (a cold key). Four figures:

* **Loader calls for one cold key, 4 processes × 100 tasks**, the loader taking
  50 ms (a backend call): aiovmc with `coalesce="host"` (the default) and with
  `coalesce="process"`, cashews (`@cache(..., lock=True)`, its stampede lock
  in redis) and aiocache (`@cached` on its redis backend), both on a local
  `redis-server` on 127.0.0.1 started for the run. Median and maximum over
  rounds; target exactly 1.
* **Wake latency**: per wave, one process's loader returns (its time is taken just
  before it returns: the value is stored and the wave ended a few µs later) and the
  three other processes, each with one task waiting, note when their `get`
  returns. Latency = return − loader return, on CLOCK_MONOTONIC (one clock for
  the host). Median and p99 over every waiter of every wave, on asyncio and trio.
* **Waiters' CPU during a 2 s load**: 4 processes × 100 tasks, the leader's loader
  sleeping 2 s; each waiting process reports the CPU time it used (every thread)
  from the start of its gets to their return, over the wall time: the share of one
  core. Maximum over waiting processes and rounds; target ≤ 2 %.
* **Takeover after SIGKILL**: a leader process's loader never returns; three
  waiting processes; the parent SIGKILLs the leader and notes the time; the
  process that takes over notes when its loader is called. Median and maximum;
  target ≤ 0.5 s.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import anyio
from harness import (
    SPAWN,
    Family,
    RedisServer,
    Settings,
    Table,
    WorkerGroup,
    median,
    percentile,
    say,
    scratch,
)

import aiovmc

TITLE = "Host-wide single-flight"
TABLES = [
    Table("loader calls", "Loader calls for one cold key, 4 processes × 100 tasks, the loader "
                          "taking 50 ms"),
    Table("wake latency", "From the leader's loader return to each waiting process's get "
                          "return (1 leader, 3 waiting processes)"),
    Table("waiters' CPU", "CPU of each waiting process during a 2 s load, % of a core"),
    Table("takeover", "From the leader's SIGKILL to the takeover's loader call"),
]  # fmt: skip
N_PROCS = 4
N_TASKS = 100
LOAD_S = 0.05
LONG_LOAD_S = 2.0
VALUE = b"v" * 100


# --------------------------------------------------------------------------- workers


def _getter(lib: str, target: str, load_s: float) -> Any:
    """An async `get(key) -> bytes` for `lib` that calls a loader on a miss, and a
    counter of loader calls (a one-item list). Made inside the running loop."""
    calls = [0]
    stamp = [0]

    async def backend(key: str) -> bytes:
        calls[0] += 1
        await anyio.sleep(load_s)
        stamp[0] = time.monotonic_ns()
        return VALUE

    if lib.startswith("aiovmc"):
        acache = aiovmc.AsyncCache(
            target, coalesce="process" if lib == "aiovmc process" else "host"
        )

        async def load_bytes(key: bytes) -> bytes:
            return await backend(key.decode())

        async def get(key: str) -> bytes:
            return await acache.get(key, on_miss=load_bytes)

        return get, calls, stamp, acache.aclose
    if lib == "cashews":
        from cashews import Cache

        cache = Cache()
        cache.setup(target)

        @cache(ttl=600, key="flight:{key}", lock=True)
        async def cashews_get(key: str) -> bytes:
            return await backend(key)

        async def close() -> None:
            await cache.close()

        return cashews_get, calls, stamp, close
    if lib == "aiocache":
        from aiocache import RedisCache, cached
        from aiocache.serializers import PickleSerializer

        host, port = target.split("//")[1].split("/")[0].split(":")

        @cached(ttl=600, cache=RedisCache, endpoint=host, port=int(port), namespace="flight",
                serializer=PickleSerializer())
        async def aiocache_get(key: str) -> bytes:
            return await backend(key)

        async def noop() -> None:
            pass

        return aiocache_get, calls, stamp, noop
    raise ValueError(lib)


def _worker(
    index: int, rounds: int, barrier: Any, queue: Any, lib: str, target: str, backend: str,
    n_tasks: int, load_s: float,
) -> None:  # fmt: skip
    """Per round: meet at the barrier, then `n_tasks` gets of the round's cold key.
    Reports (loader calls, the loader's return time or 0, the last get's return time,
    CPU seconds, wall seconds)."""

    async def one_round(r: int) -> tuple[int, int, int, float, float]:
        get, calls, stamp, close = _getter(lib, target, load_s)
        key = f"cold-{os.getppid()}-{r}"
        done = [0]

        async def one() -> None:
            await get(key)
            done[0] = max(done[0], time.monotonic_ns())

        await anyio.to_thread.run_sync(barrier.wait)
        cpu0, wall0 = time.process_time(), time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(n_tasks):
                tg.start_soon(one)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        await close()
        return calls[0], stamp[0], done[0], cpu, wall

    for r in range(rounds):
        queue.put(anyio.run(one_round, r, backend=backend))


def _group(lib: str, target: str, backend: str, n_tasks: int, load_s: float, rounds: int
           ) -> list[list[tuple[int, int, int, float, float]]]:  # fmt: skip
    """Every worker's report of each round, 4 processes."""
    with WorkerGroup(N_PROCS, rounds, _worker, lib, target, backend, n_tasks, load_s) as g:
        return [g.round() for _ in range(rounds)]


def _takeover_waiter(path: str, queue: Any, ready: Any) -> None:
    async def main() -> None:
        async def loader(key: bytes) -> bytes:
            queue.put(("took over", time.monotonic_ns()))
            return VALUE

        async with aiovmc.AsyncCache(path) as acache:
            ready.set()
            await acache.get(b"takeover", on_miss=loader)

    anyio.run(main)
    queue.put(("done", 0))


def _takeover_leader(path: str, queue: Any) -> None:
    async def main() -> None:
        async def loader(key: bytes) -> bytes:
            queue.put(("leading", os.getpid()))
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async with aiovmc.AsyncCache(path) as acache:
            await acache.get(b"takeover", on_miss=loader)

    anyio.run(main)


def _takeover_round(path: str) -> float:
    """Seconds from the leader's SIGKILL to the takeover's loader call."""
    aiovmc.Cache(path, size="4MiB", reset=True).close()
    keep = aiovmc.Cache(path)  # the file stays attached: no recovery in between
    queue = SPAWN.Queue()
    leader = SPAWN.Process(target=_takeover_leader, args=(path, queue), daemon=True)
    leader.start()
    assert queue.get(timeout=60)[0] == "leading"
    waiters = []
    for _ in range(3):
        ready = SPAWN.Event()
        w = SPAWN.Process(target=_takeover_waiter, args=(path, queue, ready), daemon=True)
        w.start()
        ready.wait(60)
        waiters.append(w)
    time.sleep(0.3)  # let every waiter join the wave and fall asleep (a benchmark: no test)
    killed = time.monotonic_ns()
    os.kill(leader.pid, signal.SIGKILL)
    took = None
    for _ in range(4):
        what, t = queue.get(timeout=60)
        if what == "took over":
            took = t
    for w in waiters:
        w.join(30)
    leader.join(30)
    keep.close()
    assert took is not None
    return (took - killed) / 1e9


# --------------------------------------------------------------------------- the family


def run(settings: Settings, fam: Family) -> None:
    rounds = settings.warmup + settings.rounds
    with RedisServer(tcp=True) as redis_server, scratch("flight") as d:
        path = os.path.join(d, "cache")

        def fresh() -> str:
            aiovmc.Cache(path, size="16MiB", reset=True).close()
            return path

        for lib in ("aiovmc host", "aiovmc process", "cashews", "aiocache"):
            target = fresh() if lib.startswith("aiovmc") else redis_server.url
            reports = _group(lib, target, "asyncio", N_TASKS, LOAD_S, rounds)[settings.warmup :]
            calls = [sum(rep[0] for rep in rnd) for rnd in reports]
            fam.add("loader calls", lib, "median of rounds", calls, "")
            fam.add("loader calls", lib, "max", max(calls), "")
            say(f"  loader calls, {lib}: {calls}")

        for backend in ("asyncio", "trio"):
            waves = settings.pick(30, 10, 2)
            lat = []
            for rnd in _group("aiovmc host", fresh(), backend, 1, 0.03, waves):
                leader = [rep for rep in rnd if rep[0] == 1]
                if len(leader) == 1:
                    lat += [(rep[2] - leader[0][1]) / 1e6 for rep in rnd if rep[0] == 0]
            fam.add("wake latency", backend, "median", lat, "ms")
            fam.add("wake latency", backend, "p99", percentile(lat, 99), "ms")
            fam.add("wake latency", backend, "waiters", len(lat), "")
            say(f"  wake latency ({backend}): median {median(lat):.2f} ms over {len(lat)}")

        long_load = settings.pick(LONG_LOAD_S, LONG_LOAD_S, 0.2)
        for lib in ("aiovmc host", "cashews"):
            target = fresh() if lib.startswith("aiovmc") else redis_server.url
            reports = _group(lib, target, "asyncio", N_TASKS, long_load,
                             settings.pick(3, 2, 1))  # fmt: skip
            shares = [100 * rep[3] / rep[4] for rnd in reports for rep in rnd if rep[0] == 0]
            fam.add("waiters' CPU", lib, "max per process", max(shares), "%")
            fam.add("waiters' CPU", lib, "median", shares, "%")
            say(f"  waiters' CPU ({lib}): max {max(shares):.2f} % of a core")

        takes = [_takeover_round(path) for _ in range(settings.pick(5, 3, 1))]
        fam.add("takeover", "SIGKILLed leader", "median", takes, "s")
        fam.add("takeover", "SIGKILLed leader", "max", max(takes), "s")
        say(f"  takeover after SIGKILL: max {max(takes) * 1e3:.0f} ms")
