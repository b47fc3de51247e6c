# ruff: noqa: RUF001, RUF002, RUF003  (µ, × are meant: they are printed)
"""TieredCache (DESIGN §11) side by side with redis-py alone and cashews' client-side
mode, on one local redis-server (127.0.0.1, a free port; TCP so every client can use
it). Run: ``python benchmarks/bench_tiered.py [--quick]``; figures go to
docs/benchmarks.md ("TieredCache") by hand.

1. Hit path: one task awaits ``get`` hits on 10k keys (100 B values) in a random
   order: ``AsyncCache.get`` (the L1 alone), ``TieredCache.get`` (L1 hits), cashews
   client-side (its in-process memory hits), redis-py's asyncio ``GET`` (every get a
   round trip). asyncio, and trio for aiovmc. Medians of interleaved rounds.
2. One wave of one key over 2 hosts × 2 processes × 50 tasks: loader calls in all,
   and redis data commands by name (``INFO commandstats`` before and after; commands
   run by scripts are counted too), for a key already in redis and a key in no tier.
   cashews client-side, 4 processes × 50 tasks, ``@cache(lock=True)``: the same.
3. Invalidation: a writer process puts a new value; a reader process on another host
   (not its host's listener) checks every 0.1 ms, first ``get_nowait`` until its L1
   copy is gone, then ``get`` until it returns the new value. Latencies from before
   the put (one monotonic clock for all processes): median and p99 of N writes.
   cashews client-side: ``cache.set``, then ``cache.get`` until the new value.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import anyio

SPAWN = multiprocessing.get_context("spawn")
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
KEYS = 10_000
VALUE = b"v" * 100


def fmt(ns: float) -> str:
    return f"{ns:.0f} ns" if ns < 1000 else (f"{ns / 1e3:.2f} µs" if ns < 1e6
                                             else f"{ns / 1e6:.2f} ms")


class Server:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="aiovmc-bench-tiered-")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "ready to accept connections" in line.lower():
                self.proc.stdout.close()
                return
        raise RuntimeError("redis-server did not start")

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url)

    def commands(self) -> int:
        return int(self.client().info("stats")["total_commands_processed"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def new_path() -> str:
    return os.path.join(SHM, f"aiovmc-bench-tiered-{uuid.uuid4().hex}.cache")


def remove(*paths: str) -> None:
    for path in paths:
        for name in (path, path + ".tiered"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


# -- 1. hit path ------------------------------------------------------------------------


async def timed(get: Any, keys: list[bytes]) -> float:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for k in keys:
            await get(k)
        return (time.perf_counter_ns() - start) / len(keys)
    finally:
        gc.enable()


async def hit_path(url: str, backend: str, rounds: int) -> dict[str, list[float]]:
    import aiovmc

    keys = [b"key-%012d" % i for i in range(KEYS)]
    order = keys[:]
    random.Random(1).shuffle(order)
    a_path, t_path = new_path(), new_path()
    try:
        plain = aiovmc.AsyncCache(a_path, size="64MiB")
        tiered = aiovmc.TieredCache(t_path, size="64MiB", redis=url, namespace="bench")
        await anyio.to_thread.run_sync(tiered._listener.subscribed.wait, 10)
        for k in keys:
            await plain.put(k, VALUE)
            await tiered.put(k, VALUE)
        cases: dict[str, Any] = {"AsyncCache.get": plain.get, "TieredCache.get (L1 hit)":
                                 tiered.get}
        extra: list[Any] = []
        if backend == "asyncio":
            import redis.asyncio
            from cashews import Cache

            cashews = Cache()
            cashews.setup(url, client_side=True)
            await cashews.init()
            ckeys = {k: "cashews:" + k.decode() for k in keys}
            for k in keys:
                await cashews.set(ckeys[k], VALUE)
            for k in keys:
                await cashews.get(ckeys[k])  # into its memory tier

            async def cashews_get(k: bytes) -> Any:
                return await cashews.get(ckeys[k])

            client = redis.asyncio.Redis.from_url(url)
            for k in keys:
                await client.set(b"plain:" + k, VALUE)

            async def redis_get(k: bytes) -> Any:
                return await client.get(b"plain:" + k)

            cases["cashews client-side (memory hit)"] = cashews_get
            cases["redis-py asyncio GET"] = redis_get
            extra = [cashews, client]
        out: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(rounds + 1):
            for name, get in cases.items():
                sample = order if "redis-py" not in name else order[:1000]
                ns = await timed(get, sample)
                if r:
                    out[name].append(ns)
        if extra:
            await extra[0].close()
            await extra[1].aclose()
        await tiered.aclose()
        await plain.aclose()
        return out
    finally:
        remove(a_path, t_path)


# -- 2. cold keys across hosts ----------------------------------------------------------

DATA_COMMANDS = ("get", "mget", "set", "evalsha", "eval", "publish", "subscribe", "pttl",
                 "del", "unlink", "pexpire")


def command_counts(server: Server) -> dict[str, int]:
    stats = server.client().info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
            for name in DATA_COMMANDS}


def cold_worker(kind: str, path: str, url: str, key: bytes, counter: str, barrier: Any,
                conn: Any) -> None:
    async def load(k: bytes) -> bytes:
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"x")
        os.close(fd)
        await anyio.sleep(0.1)
        return b"loaded"

    async def main() -> None:
        if kind == "tiered":
            import aiovmc

            cache: Any = aiovmc.TieredCache(path, size="4MiB", redis=url, namespace="bench")
            if await anyio.to_thread.run_sync(cache._listener.elected.wait, 0.5):
                await anyio.to_thread.run_sync(cache._listener.subscribed.wait, 10)

            async def get() -> Any:
                return await cache.get(key, on_miss=load)
        else:
            from cashews import Cache

            cache = Cache()
            cache.setup(url, client_side=True)
            await cache.init()
            await cache.get("cashews:warm-up")

            @cache(ttl="10m", lock=True, key="cashews:{k}")
            async def loaded(k: str) -> bytes:
                return await load(k.encode())

            async def get() -> Any:
                return await loaded(key.decode())

        await anyio.to_thread.run_sync(barrier.wait)  # everyone set up; counting starts
        await anyio.to_thread.run_sync(barrier.wait)
        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(get)
        conn.send("done")
        await anyio.to_thread.run_sync(conn.recv)  # stay until every process is done
        await cache.aclose() if kind == "tiered" else await cache.close()

    asyncio.run(main())


def cold_keys(server: Server, kind: str, key: bytes, hosts: list[list[str]]
              ) -> tuple[int, dict[str, int]]:
    """Loader calls, and redis data commands by name, for one wave of ``key``."""
    counter = os.path.join(server.dir, f"calls-{uuid.uuid4().hex}")
    paths = [p for host in hosts for p in host]
    barrier = SPAWN.Barrier(len(paths) + 1)
    procs, conns = [], []
    for path in paths:
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=cold_worker,
                          args=(kind, path, server.url, key, counter, barrier, child))
        p.start()
        procs.append(p)
        conns.append(parent)
    barrier.wait()
    before = command_counts(server)
    barrier.wait()
    for c in conns:
        if not c.poll(60):
            raise RuntimeError("a worker did not finish")
        c.recv()
    after = command_counts(server)
    for c in conns:
        c.send("exit")
    for p in procs:
        p.join(30)
    calls = os.path.getsize(counter) if os.path.exists(counter) else 0
    return calls, {k: after[k] - before[k] for k in DATA_COMMANDS if after[k] != before[k]}


# -- 3. invalidation latency ------------------------------------------------------------


def reader(kind: str, path: str, url: str, conn: Any, ready: Any) -> None:
    async def main() -> None:
        if kind == "tiered":
            import aiovmc

            cache: Any = aiovmc.TieredCache(path, size="4MiB", redis=url, namespace="bench")
            key: Any = b"inv"

            def cached(old: bytes) -> bool:
                return bool(cache.get_nowait(key) == old)
        else:
            from cashews import Cache

            cache = Cache()
            cache.setup(url, client_side=True)
            await cache.init()
            key = "cashews:inv"

            def cached(old: bytes) -> bool:
                return True  # its memory tier is filled by the get below

        ready.set()
        while True:
            job = await anyio.to_thread.run_sync(conn.recv)
            if job is None:
                break
            old, new = job
            give_up = time.monotonic() + 1.0
            while not ((await cache.get(key)) == old and cached(old)):
                if time.monotonic() > give_up:
                    break  # still an older value after 1 s: measured as such below
                await anyio.sleep(0.001)
            conn.send("armed")
            give_up = time.monotonic() + 1.0
            dropped = None
            if kind == "tiered":
                while cache.get_nowait(key) == old and time.monotonic() < give_up:  # noqa: ASYNC110 - polling is what is measured
                    await anyio.sleep(0.0001)
                dropped = time.monotonic_ns()
            while (await cache.get(key)) != new:
                if time.monotonic() > give_up:
                    conn.send((None, None))  # still the old value after 1 s
                    break
                await anyio.sleep(0.0001)
            else:
                now = time.monotonic_ns()
                conn.send((now, dropped or now))
        await cache.aclose() if kind == "tiered" else await cache.close()

    asyncio.run(main())


def listener_proc(path: str, url: str, ready: Any, stop: Any) -> None:
    async def main() -> None:
        import aiovmc

        cache = aiovmc.TieredCache(path, size="4MiB", redis=url, namespace="bench")
        await anyio.to_thread.run_sync(cache._listener.subscribed.wait, 10)
        ready.set()
        await anyio.to_thread.run_sync(stop.wait)
        await cache.aclose()

    asyncio.run(main())


async def invalidation(server: Server, kind: str, samples: int
                       ) -> tuple[list[float], list[float]]:
    """Milliseconds from before a put on one host to the reader's first new value,
    and (TieredCache) to the reader's first L1 miss."""
    b_path, a_path = new_path(), new_path()
    stop, listening, ready = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    helpers = []
    if kind == "tiered":
        # Host B's listener lives in another process than the reader, as in a
        # multi-worker deployment (one listener, many readers).
        helpers.append(SPAWN.Process(target=listener_proc,
                                     args=(b_path, server.url, listening, stop)))
        helpers[0].start()
        listening.wait(30)
    parent, child = SPAWN.Pipe()
    r = SPAWN.Process(target=reader, args=(kind, b_path, server.url, child, ready))
    r.start()
    ready.wait(30)
    try:
        if kind == "tiered":
            import aiovmc

            writer: Any = aiovmc.TieredCache(a_path, size="4MiB", redis=server.url,
                                             namespace="bench")
            key: Any = b"inv"

            async def put(v: bytes) -> None:
                await writer.put(key, v)
        else:
            from cashews import Cache

            writer = Cache()
            writer.setup(server.url, client_side=True)
            await writer.init()
            key = "cashews:inv"

            async def put(v: bytes) -> None:
                await writer.set(key, v)

        out: list[float] = []
        drops: list[float] = []
        for i in range(samples):
            old, new = b"%d" % i, b"%d" % (i + 1)
            await put(old)
            parent.send((old, new))
            assert await anyio.to_thread.run_sync(parent.recv) == "armed"
            t0 = time.monotonic_ns()
            await put(new)
            t1, t_drop = await anyio.to_thread.run_sync(parent.recv)
            out.append(float("inf") if t1 is None else (t1 - t0) / 1e6)
            drops.append(float("inf") if t_drop is None else (t_drop - t0) / 1e6)
        parent.send(None)
        await writer.aclose() if kind == "tiered" else await writer.close()
        return out, drops
    finally:
        stop.set()
        r.join(30)
        for h in helpers:
            h.join(30)
        remove(a_path, b_path)


# -- main -------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="hits,wave,invalidation",
                        help="comma-separated parts: hits, wave, invalidation")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    rounds, samples = (9, 50) if args.quick else (15, 200)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed: nothing to compare with")
        return 1
    server = Server()
    try:
        if "hits" in parts:
            hit_paths(server.url, rounds)
        if "wave" in parts:
            waves(server)
        if "invalidation" in parts:
            invalidations(server, samples)
    finally:
        server.stop()
    return 0


def hit_paths(url: str, rounds: int) -> None:
    if True:
        print("== 1. hit path, 10k keys, 100 B, random order (median of rounds, per get)")
        results: dict[str, dict[str, list[float]]] = {}
        for backend in ("asyncio", "trio"):
            results[backend] = anyio.run(hit_path, url, backend, rounds, backend=backend)
            base = statistics.median(results[backend]["AsyncCache.get"])
            for name, xs in results[backend].items():
                m = statistics.median(xs)
                print(f"  {backend:8} {name:36} {fmt(m):>10}  {m / base:6.2f} × AsyncCache")



def waves(server: Server) -> None:
    if True:
        print("== 2. one wave of one key, 50 tasks per process")
        for label, key, preset in (("in redis already", b"warm", True),
                                   ("in no tier (cold)", b"cold", False)):
            if preset:
                server.client().set(b"bench:warm", b"loaded")
                cold_keys(server, "cashews", key, [[""]])  # stores it its own way
            hosts = [[new_path()] * 2, [new_path()] * 2]
            calls, commands = cold_keys(server, "tiered", key, hosts)
            remove(hosts[0][0], hosts[1][0])
            print(f"  TieredCache 2 hosts × 2 processes, {label}: loader calls {calls}, "
                  f"redis data commands {commands}")
            calls, commands = cold_keys(server, "cashews", key, [[""] * 4])
            print(f"  cashews client-side 4 processes, {label}: loader calls {calls}, "
                  f"redis data commands {commands}")



def invalidations(server: Server, samples: int) -> None:
    if True:
        print(f"== 3. invalidation: put on one host, new value read on another ({samples} "
              "writes)")
        for kind in ("tiered", "cashews"):
            read, dropped = anyio.run(invalidation, server, kind, samples)
            for what, ms in (("new value read", read), ("L1 copy dropped", dropped)):
                if kind != "tiered" and what != "new value read":
                    continue
                stale = sum(x == float("inf") for x in ms)
                q = statistics.quantiles(ms, n=100)
                print(f"  {kind:8} {what:16} median {statistics.median(ms):.3f} ms  "
                      f"p99 {q[98]:.3f} ms  max {max(ms):.3f} ms  (old value still read "
                      f"after 1 s: {stale} of {len(ms)})")


if __name__ == "__main__":
    sys.exit(main())
