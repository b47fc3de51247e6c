"""TieredCache (DESIGN §11) beside redis-py alone and cashews' client-side mode
(`client_side=True`: an in-process memory tier per worker, invalidated through redis
`CLIENT TRACKING ... BCAST`), on one private redis-server on 127.0.0.1 (TCP, so every
client can use it).

1. Hit path: one task awaits `get` hits on 10k keys (100 B values) in a random
   order: `AsyncCache.get` (the L1 alone), `TieredCache.get` (L1 hits), cashews
   client-side (its in-process memory hits), redis-py's asyncio `GET` (every get a
   round trip); asyncio, and trio for aiovmc; medians of interleaved rounds.
2. One wave of one key over 2 hosts × 2 processes × 50 tasks: loader calls in all,
   and redis data commands (`INFO commandstats` before and after; commands run by
   scripts are counted too), for a key already in redis and a key in no tier.
   cashews client-side, 4 processes × 50 tasks, `@cache(lock=True)`: the same.
3. Invalidation: a writer process puts a new value; a reader process on another host
   (not its host's listener) checks every 0.1 ms, first `get_nowait` until its L1
   copy is gone, then `get` until it returns the new value. Latencies from before
   the put (one monotonic clock for all processes); a value still old after 1 s
   counts as infinite. cashews client-side: `cache.set`, then `cache.get` until the
   new value.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import anyio
from harness import (
    SHM,
    SPAWN,
    Case,
    Family,
    RedisServer,
    Settings,
    Table,
    ainterleaved,
    aloop_over,
    fmt,
    key_order,
    make_key,
    median,
    percentile,
    say,
)

import aiovmc

TITLE = "TieredCache"
TABLES = [
    Table("hit path", "Per get, 10k keys, 100 B values, random order"),
    Table("one wave", "One key asked by 50 tasks in each process"),
    Table("invalidation", "A put on one host until another host's reader sees the new "
                          "value (ms)"),
]  # fmt: skip
KEYS = 10_000
VALUE = b"v" * 100


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


async def hit_path(url: str, backend: str, settings: Settings, n_keys: int
                   ) -> dict[str, list[float]]:  # fmt: skip
    keys = [make_key(i) for i in range(n_keys)]
    order = [keys[i] for i in key_order(n_keys, seed=1)]
    a_path, t_path = new_path(), new_path()
    try:
        plain = aiovmc.AsyncCache(a_path, size="64MiB")
        tiered = aiovmc.TieredCache(t_path, size="64MiB", redis=url, namespace="bench")
        await anyio.to_thread.run_sync(tiered._listener.subscribed.wait, 30)
        for k in keys:
            await plain.put(k, VALUE)
            await tiered.put(k, VALUE)
        cases = [Case("AsyncCache.get", aloop_over(plain.get)),
                 Case("TieredCache.get (L1 hit)", aloop_over(tiered.get))]  # fmt: skip
        closers: list[Any] = [tiered.aclose, plain.aclose]
        if backend == "asyncio":
            import redis.asyncio
            from cashews import Cache

            cashews = Cache()
            cashews.setup(url, client_side=True)
            await cashews.init()
            ckeys = {k: "cashews:" + k.decode() for k in keys}
            for k in keys:
                await cashews.set(ckeys[k], VALUE)
                await cashews.get(ckeys[k])  # into its memory tier
            client = redis.asyncio.Redis.from_url(url)
            for k in keys:
                await client.set(b"plain:" + k, VALUE)

            async def cashews_get(k: bytes) -> Any:
                return await cashews.get(ckeys[k])

            async def redis_get(k: bytes) -> Any:
                return await client.get(b"plain:" + k)

            cases += [Case("cashews client-side (memory hit)", aloop_over(cashews_get)),
                      Case("redis-py asyncio GET", aloop_over(redis_get))]  # fmt: skip
            closers += [cashews.close, client.aclose]
        out = await ainterleaved(cases, order, settings)
        for close in closers:
            await close()
        return out
    finally:
        remove(a_path, t_path)


# -- 2. cold keys across hosts ----------------------------------------------------------

DATA_COMMANDS = ("get", "mget", "set", "evalsha", "eval", "publish", "subscribe", "pttl",
                 "del", "unlink", "pexpire")


def command_counts(server: RedisServer) -> dict[str, int]:
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


def cold_keys(server: RedisServer, kind: str, key: bytes, hosts: list[list[str]]
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
        cache = aiovmc.TieredCache(path, size="4MiB", redis=url, namespace="bench")
        await anyio.to_thread.run_sync(cache._listener.subscribed.wait, 10)
        ready.set()
        await anyio.to_thread.run_sync(stop.wait)
        await cache.aclose()

    asyncio.run(main())


async def invalidation(server: RedisServer, kind: str, samples: int
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


# -- the family -----------------------------------------------------------------------


def run(settings: Settings, fam: Family) -> None:
    n_keys = settings.pick(KEYS, KEYS, 1_000)
    samples = settings.pick(200, 50, 5)
    with RedisServer(tcp=True) as server:
        for backend in ("asyncio", "trio"):
            for name, ns in anyio.run(hit_path, server.url, backend, settings, n_keys,
                                      backend=backend).items():  # fmt: skip
                fam.add("hit path", name, backend, ns, "ns")
                say(f"  hit {backend:8} {name:36} {fmt(median(ns), 'ns'):>10}")

        for label, key, preset in (("key in redis", b"warm", True),
                                   ("cold key", b"cold", False)):  # fmt: skip
            if preset:
                server.client().set(b"bench:warm", b"loaded")
                cold_keys(server, "cashews", key, [[""]])  # stores it its own way
            hosts = [[new_path()] * 2, [new_path()] * 2]
            runs = (("TieredCache, 2 hosts × 2 processes", "tiered", hosts),
                    ("cashews client-side, 4 processes", "cashews", [[""] * 4]))  # fmt: skip
            for row, kind, where in runs:
                calls, commands = cold_keys(server, kind, key, where)
                fam.add("one wave", row, f"loader calls, {label}", calls, "")
                fam.add("one wave", row, f"redis data commands, {label}",
                        sum(commands.values()), "")  # fmt: skip
                fam.note(f"one wave, {row}, {label}: redis data commands {commands}")
            remove(hosts[0][0], hosts[1][0])

        for kind, row in (("tiered", "TieredCache"), ("cashews", "cashews client-side")):
            read, dropped = anyio.run(invalidation, server, kind, samples)
            lines = [("new value read", read)] + ([("L1 copy gone", dropped)]
                                                  if kind == "tiered" else [])  # fmt: skip
            for what, ms in lines:
                r = f"{row}: {what}"
                fam.add("invalidation", r, "median", ms, "ms")
                fam.add("invalidation", r, "p99", percentile(ms, 99), "ms")
                fam.add("invalidation", r, "max", max(ms), "ms")
                fam.add("invalidation", r, "old value after 1 s",
                        sum(x == float("inf") for x in ms), "")  # fmt: skip
                say(f"  invalidation {r}: median {median(ms):.3f} ms")
