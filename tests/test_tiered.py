"""TieredCache (DESIGN.md §11) against a real redis-server.

"Hosts" are separate cache files; the multi-host tests give each host two real worker
processes (spawned), one on asyncio and one on trio, so both backends run in every
such test. The in-process tests run on both backends through `anyio_backend`.
"""

from __future__ import annotations

import collections.abc
import functools
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest

import aiovmc

from .helpers import wait_for
from .redis_server import RedisServer
from .tiered_worker import Worker

pytestmark = pytest.mark.timeout(90)

TIMEOUT = 0.5  # the TieredCache timeout used here: leases last 1.5 s


@pytest.fixture
def hosts(tmp_path: Any) -> Iterator[Callable[[], str]]:
    """A factory of host cache paths, removed (with their sidecars) afterwards."""
    made: list[str] = []
    directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)

    def new() -> str:
        path = os.path.join(directory, f"aiovmc-tiered-{uuid.uuid4().hex}.cache")
        made.append(path)
        return path

    yield new
    for path in made:
        for name in (path, path + ".tiered"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(path: str, url: str, backend: str, **options: Any) -> Worker:
        options.setdefault("namespace", "t")
        options.setdefault("timeout", TIMEOUT)
        worker = Worker(path, url, backend, **options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def start_host(workers: Callable[..., Worker], path: str, url: str) -> list[Worker]:
    """Two processes on one host file (asyncio and trio), the first one the listener."""
    first = workers(path, url, "asyncio")
    assert first.call("listening", 20) is True
    second = workers(path, url, "trio")
    assert second.call("is_listener") is False
    return [first, second]


async def listening(cache: aiovmc.TieredCache) -> None:
    """Wait until this process is the host's listener, subscribed (its first resync,
    which empties L1, is over)."""
    assert await anyio.to_thread.run_sync(cache._listener.subscribed.wait, 20)


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """As `wait_until`, in a task."""
    with anyio.fail_after(20):
        for _ in itertools.count():
            if condition():
                return
            await anyio.sleep(0.005)
    raise AssertionError(what)


def calls(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


# -- across hosts, with real processes --------------------------------------------------


def test_cold_key_one_loader_call_across_hosts(
    redis_server: RedisServer, hosts: Any, workers: Any, tmp_path: Any
) -> None:
    count = str(tmp_path / "calls")
    host_a = start_host(workers, hosts(), redis_server.url)
    host_b = start_host(workers, hosts(), redis_server.url)
    everyone = host_a + host_b
    storms = [(w, w.send("storm", b"cold", 50, ("value", count))) for w in everyone]
    results = [w.result(cid) for w, cid in storms]
    assert calls(count) == 1
    assert all(r == [b"loaded:cold"] * 50 for r in results)
    # Stored in redis as raw bytes under the namespace, with the handle's TTL (None).
    assert redis_server.client().get(b"t:cold") == b"loaded:cold"
    stats = [w.call("statistics") for w in everyone]
    assert sum(s["loader_calls"] for s in stats) == 1
    for host in (host_a, host_b):
        # One process per host talked to redis; the other read the file (§9).
        assert [w.call("statistics")["redis_gets"] > 0 for w in host].count(True) == 1
    # Every host got it from the file afterwards, without redis.
    assert all(w.call("get_nowait", b"cold") == b"loaded:cold" for w in everyone)


def test_redis_hit_is_one_lookup_per_host(
    redis_server: RedisServer, hosts: Any, workers: Any, tmp_path: Any
) -> None:
    redis_server.client().set(b"t:warm", b"from redis", px=60_000)
    host_a = start_host(workers, hosts(), redis_server.url)
    host_b = start_host(workers, hosts(), redis_server.url)
    count = str(tmp_path / "calls")
    storms = [(w, w.send("storm", b"warm", 50, ("value", count))) for w in host_a + host_b]
    assert all(w.result(cid) == [b"from redis"] * 50 for w, cid in storms)
    assert calls(count) == 0
    for host in (host_a, host_b):
        # The L1 miss is coalesced host-wide (§9): one process of the host looked.
        assert sum(w.call("statistics")["redis_gets"] for w in host) == 1


def test_none_and_errors_across_hosts(
    redis_server: RedisServer, hosts: Any, workers: Any, tmp_path: Any
) -> None:
    everyone = start_host(workers, hosts(), redis_server.url) + start_host(
        workers, hosts(), redis_server.url)
    count = str(tmp_path / "calls")
    storms = [(w, w.send("storm", b"nothing", 10, ("none", count))) for w in everyone]
    assert all(w.result(cid) == [b"default"] * 10 for w, cid in storms)
    assert calls(count) == 1
    assert redis_server.client().exists(b"t:nothing") == 0


def test_invalidation_across_hosts(
    redis_server: RedisServer, hosts: Any, workers: Any, tmp_path: Any
) -> None:
    host_a = start_host(workers, hosts(), redis_server.url)
    host_b = start_host(workers, hosts(), redis_server.url)
    writer = host_a[1]

    def cached_by_b(key: bytes, value: bytes) -> Callable[[], bool]:
        # A get right after the put may be dropped again by the put's own
        # invalidation, arriving after it: look until the value stays.
        return lambda: all(
            w.call("get", key) == value and w.call("get_nowait", key) == value for w in host_b)

    for key in (b"k1", b"k2"):
        writer.call("put", key, b"v1:" + key)
        wait_for(cached_by_b(key, b"v1:" + key), what="host B to cache the value")

    def seen_by_b(key: bytes, value: bytes | None) -> Callable[[], bool]:
        return lambda: all(w.call("get_nowait", key) == value for w in host_b)

    writer.call("put", b"k1", b"v2")
    wait_for(seen_by_b(b"k1", None), what="host B to drop k1 after a put")
    assert host_b[0].call("get", b"k1") == b"v2"
    assert writer.call("get_nowait", b"k1") == b"v2"  # the writer's own L1 keeps it

    assert writer.call("delete", b"k1") is True
    wait_for(seen_by_b(b"k1", None), what="host B to drop k1 after a delete")
    assert host_b[1].call("get", b"k1") is None

    wait_for(cached_by_b(b"k2", b"v1:k2"), what="host B to cache k2")
    writer.call("clear")
    wait_for(seen_by_b(b"k2", None), what="host B to drop everything after a clear")
    assert redis_server.client().keys(b"t:*") == []
    applied = sum(w.call("statistics")["invalidations"] for w in host_b)
    assert applied >= 3


def test_listener_taken_over_after_sigkill(
    redis_server: RedisServer, hosts: Any, workers: Any
) -> None:
    listener, standby = start_host(workers, hosts(), redis_server.url)
    writer = workers(hosts(), redis_server.url, "asyncio")
    writer.call("put", b"k", b"v1")
    assert standby.call("get", b"k") == b"v1"
    listener.kill()
    assert standby.call("listening", 20) is True  # elected: the kernel dropped the lock
    assert standby.call("statistics")["resyncs"] == 1
    assert standby.call("get", b"k") == b"v1"  # refilled after the resync
    writer.call("put", b"k", b"v2")
    wait_for(lambda: standby.call("get_nowait", b"k") is None, what="the new listener to act")
    assert standby.call("get", b"k") == b"v2"


def test_inherited_handle_does_not_hold_the_election(
    redis_server: RedisServer, hosts: Any, workers: Any
) -> None:
    listener, standby = start_host(workers, hosts(), redis_server.url)
    child = listener.call("fork")  # holds copies of the listener's descriptors
    try:
        listener.kill()
        assert standby.call("listening", 20) is True
    finally:
        os.kill(child, signal.SIGKILL)


def test_leading_host_killed_mid_load(
    redis_server: RedisServer, hosts: Any, workers: Any, tmp_path: Any
) -> None:
    count = str(tmp_path / "calls")
    leader = workers(hosts(), redis_server.url, "trio")
    leader.send("storm", b"cold", 5, ("block", count))
    wait_for(lambda: calls(count) == 1, what="the leading host to start loading")
    host_b = start_host(workers, hosts(), redis_server.url)
    storms = [(w, w.send("storm", b"cold", 20, ("value", count))) for w in host_b]
    leader.kill()  # its lease is no longer renewed: host B takes over when it runs out
    assert all(w.result(cid) == [b"loaded:cold"] * 20 for w, cid in storms)
    assert calls(count) == 2
    stats = [w.call("statistics") for w in host_b]
    assert sum(s["lease_waits"] for s in stats) >= 1


# -- outages, in one process (two "hosts" as two files), on both backends ---------------


@pytest.mark.anyio
async def test_redis_killed_and_restarted(redis_server: RedisServer, hosts: Any) -> None:
    loads: list[bytes] = []

    async def load(key: bytes) -> bytes:
        loads.append(key)
        return b"direct:" + key

    options: dict[str, Any] = dict(redis=redis_server.url, namespace="t", timeout=TIMEOUT,
                                   size="4MiB")
    async with aiovmc.TieredCache(hosts(), **options) as a, \
            aiovmc.TieredCache(hosts(), **options) as b:
        await listening(a)
        await listening(b)
        await a.put(b"k", b"v1")
        # b applies a's invalidation of k in its own time; wait for it, or it could
        # drop the copy b is about to read into its L1.
        await eventually(lambda: b.statistics().invalidations >= 1, "b to apply a's put")
        assert await b.get(b"k") == b"v1"
        redis_server.kill()
        with anyio.fail_after(5 * TIMEOUT):
            # L1 hits keep being served; a miss calls the loader directly.
            assert await b.get(b"k") == b"v1"
            assert await b.get(b"other", on_miss=load) == b"direct:other"
            assert loads == [b"other"]
            assert b.statistics().redis_errors >= 1
            # A write raises redis-py's error and drops the key from this host's L1.
            import redis.exceptions

            with pytest.raises(redis.exceptions.ConnectionError):
                await b.put(b"k", b"v2")
            assert b.get_nowait(b"k") is None
            with pytest.raises(redis.exceptions.ConnectionError):
                await a.delete(b"k")
            # Nothing waits on the dead server meanwhile.
            assert await a.get(b"k", on_miss=load) == b"direct:k"
        redis_server.start()
        # Another client writes while this host may not be listening yet.
        redis_server.client().set(b"t:k", b"v3")
        await eventually(lambda: a.statistics().resyncs >= 2, "the listener to resync")
        assert a.get_nowait(b"k") is None  # emptied: it may have missed invalidations
        assert await a.get(b"k") == b"v3"
        assert a.statistics().redis_errors >= 1


@pytest.mark.anyio
async def test_first_handle_on_a_host_forgets_what_l1_held(
    redis_server: RedisServer, hosts: Any
) -> None:
    options: dict[str, Any] = dict(redis=redis_server.url, namespace="t", timeout=TIMEOUT,
                                   size="4MiB")
    path_a = hosts()
    async with aiovmc.TieredCache(path_a, **options) as a:
        await listening(a)  # its first resync empties L1: over before v1 goes in
        await a.put(b"k", b"v1")
        assert a.get_nowait(b"k") == b"v1"
    async with aiovmc.TieredCache(hosts(), **options) as b:
        await b.put(b"k", b"v2")  # nobody on host A hears it
    async with aiovmc.TieredCache(path_a, **options) as a:
        # The only handle on host A: its L1 is emptied before it is used, not when
        # its listener subscribes (until then v1 would be served).
        assert a.get_nowait(b"k") is None
        assert await a.get(b"k") == b"v2"
        await listening(a)  # its resync empties L1 once more
        assert await a.get(b"k") == b"v2"
        async with aiovmc.TieredCache(path_a, **options) as second:
            assert second.get_nowait(b"k") == b"v2"  # a listener is up: L1 is kept


@pytest.fixture(params=["refused", "silent"])
def unreachable(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A redis URL nobody answers: a unix socket nobody listens on (refused at once),
    or a TCP port whose listener never accepts nor replies (a black hole: every call
    waits for its timeout)."""
    if request.param == "refused":
        yield f"unix://{tmp_path}/nobody.sock"
        return
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        yield f"redis://127.0.0.1:{hole.getsockname()[1]}/0"


@pytest.mark.anyio
async def test_unreachable_redis_never_hangs(hosts: Any, unreachable: str) -> None:
    import redis.exceptions

    async with aiovmc.TieredCache(hosts(), redis=unreachable, namespace="t", timeout=TIMEOUT,
                                  size="4MiB") as cache:
        # The first miss waits at most `timeout` for redis, then calls the loader;
        # the circuit is then open: the next misses do not wait at all.
        with anyio.fail_after(3 * TIMEOUT):
            assert await cache.get(b"a", on_miss=lambda k: b"A") == b"A"
            assert await cache.get(b"a") == b"A"
            assert await cache.get(b"b") is None
            assert await cache.get_many([b"a", b"b"]) == {b"a": b"A"}
        stats = cache.statistics()
        assert stats.redis_errors >= 1 and stats.loader_calls == 1
        with anyio.fail_after(3 * TIMEOUT), pytest.raises(
            (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        ):
            await cache.put(b"a", b"new")
        assert cache.get_nowait(b"a") is None


@pytest.mark.anyio
async def test_ttl_carried_from_redis(redis_server: RedisServer, hosts: Any) -> None:
    client = redis_server.client()
    async with aiovmc.TieredCache(hosts(), redis=redis_server.url, namespace="t",
                                  ttl=3600, timeout=TIMEOUT, size="4MiB") as cache:
        await listening(cache)
        # Long enough for the next lines on a slow machine, short for the test.
        client.set(b"t:short", b"s", px=1500)
        assert await cache.get(b"short") == b"s"
        assert cache.get_nowait(b"short") == b"s"
        entry = await cache.l1.get_entry(b"short")
        assert entry is not None and entry.expires_at is not None
        assert entry.expires_at <= time.time() + 1.5  # not the handle's hour
        await eventually(lambda: not client.exists(b"t:short"), "redis to expire the key")
        # Stored with redis's remaining TTL, not the handle's hour.
        assert cache.get_nowait(b"short") is None
        await cache.put(b"long", b"l", ttl=100)
        assert 99_000 < client.pttl(b"t:long") <= 100_000
        entry = await cache.l1.get_entry(b"long")
        assert entry is not None and entry.expires_at is not None
        assert time.time() + 50 < entry.expires_at <= time.time() + 100
        assert (await cache.get_many([b"long", b"absent"])) == {b"long": b"l"}


@pytest.mark.anyio
async def test_get_is_awaitable_once_and_runs_as_a_task(
    redis_server: RedisServer, hosts: Any, anyio_backend: str
) -> None:
    # An L1 hit is answered by an awaitable already done (as AsyncCache.get's); a
    # miss by a coroutine. Either runs as a task of its own.
    async with aiovmc.TieredCache(hosts(), redis=redis_server.url, namespace="t",
                                  timeout=TIMEOUT, size="4MiB") as cache:
        await cache.put(b"k", b"v")
        hit, miss = cache.get(b"k"), cache.get(b"absent", b"d")
        assert isinstance(hit, collections.abc.Coroutine)
        assert isinstance(miss, collections.abc.Coroutine)
        assert (await hit, await miss) == (b"v", b"d")
        with pytest.raises(RuntimeError):
            await hit
        got: list[bytes] = []

        async def keep(key: bytes) -> None:
            got.append(await cache.get(key, b"", on_miss=lambda k: b"loaded"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(cache.get, b"k")
            tg.start_soon(keep, b"k")
            tg.start_soon(keep, b"new")
        assert sorted(got) == [b"loaded", b"v"]
        if anyio_backend == "asyncio":
            import asyncio

            assert await asyncio.create_task(cache.get(b"k")) == b"v"


@pytest.mark.anyio
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
async def test_a_closed_handle_leaves_a_forked_child_its_descriptors(
    redis_server: RedisServer, hosts: Any
) -> None:
    # A fork() child closes its copies of the listeners' descriptors (they hold
    # the host's election). A listener that has ended closed its own already:
    # its number may since have been reused for anything, which the child must
    # keep. Here the number goes to a descriptor the child then uses.
    cache = aiovmc.TieredCache(hosts(), redis=redis_server.url, namespace="t",
                               timeout=TIMEOUT, size="4MiB")
    async with cache:
        await listening(cache)
        number = cache._listener._fd
    # closed: the listener has ended, and `cache` still holds it
    kept: list[int] = []
    try:
        while number not in kept:  # each open takes the lowest free number
            assert len(kept) <= number
            kept.append(os.open(os.devnull, os.O_RDONLY))
        pid = os.fork()
        if pid == 0:  # the child: is `number` still open?
            try:
                os.fstat(number)
            except OSError:
                os._exit(1)
            os._exit(0)
        _, status = await anyio.to_thread.run_sync(os.waitpid, pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for fd in kept:
            os.close(fd)


@pytest.mark.anyio
async def test_l1_counts_each_get_once(redis_server: RedisServer, hosts: Any) -> None:
    # A get that misses L1 goes on from its own lookup (redis, then the loader,
    # or a large value's copy off the loop): L1 counts it once, as AsyncCache's.
    client = redis_server.client()
    async with aiovmc.TieredCache(hosts(), redis=redis_server.url, namespace="t",
                                  timeout=TIMEOUT, size="4MiB",
                                  offload_threshold="4KiB") as cache:
        await listening(cache)
        big = bytes(range(256)) * 64  # copied off the loop
        await cache.put(b"big", big)
        client.set(b"t:remote", b"r")
        assert await cache.get(b"big") == big  # an L1 hit
        assert await cache.get(b"remote") == b"r"  # an L1 miss, a redis hit
        assert await cache.get(b"new", on_miss=lambda k: b"loaded") == b"loaded"
        assert await cache.get(b"absent") is None  # a miss everywhere
        l1 = cache.statistics().l1
        assert (l1.gets, l1.hits, l1.misses) == (4, 1, 3)


@pytest.mark.anyio
async def test_loader_error_propagates_and_is_not_cached(
    redis_server: RedisServer, hosts: Any
) -> None:
    async def fail(key: bytes) -> bytes:
        raise KeyError(key)

    async with aiovmc.TieredCache(hosts(), redis=redis_server.url, namespace="t",
                                  timeout=TIMEOUT, size="4MiB") as cache:
        with pytest.raises(KeyError):
            await cache.get(b"k", on_miss=fail)
        # The lease was released: the next caller loads at once, waiting for nobody.
        assert not redis_server.client().exists(b"aiovmc:t:lease:k")
        assert await cache.get(b"k", on_miss=lambda k: b"ok") == b"ok"
        assert cache.statistics().lease_waits == 0
        assert cache.statistics().loader_calls == 2


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", ["raises", "cancelled"])
async def test_leader_that_fails_hands_the_lease_over(
    redis_server: RedisServer, hosts: Any, outcome: str
) -> None:
    # Leases of 90 s: a waiting host that took over only on expiry would hang here.
    options: dict[str, Any] = dict(redis=redis_server.url, namespace="t", timeout=30,
                                   size="4MiB")
    loading, release = anyio.Event(), anyio.Event()

    async def stuck(key: bytes) -> bytes:
        loading.set()
        await release.wait()
        raise RuntimeError("the source is down")

    async with aiovmc.TieredCache(hosts(), **options) as a, \
            aiovmc.TieredCache(hosts(), **options) as b:
        await listening(a)
        await listening(b)
        results: list[Any] = []

        async def lead() -> None:
            with pytest.raises(RuntimeError):
                await a.get(b"k", on_miss=stuck)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                if outcome == "raises":
                    tg.start_soon(lead)
                else:
                    tg.start_soon(functools.partial(a.get, b"k", on_miss=stuck))
                await loading.wait()

                async def wait() -> None:
                    results.append(await b.get(b"k", on_miss=lambda k: b"from b"))

                tg.start_soon(wait)
                await eventually(lambda: b.statistics().lease_waits == 1, "b to wait")
                if outcome == "raises":
                    release.set()
                else:
                    tg.cancel_scope.cancel()
            if outcome == "cancelled":
                await b.get(b"k", on_miss=lambda k: b"from b")
        assert await b.get(b"k") == b"from b"
        assert b.statistics().loader_calls == 1
        assert redis_server.client().get(b"t:k") == b"from b"


# -- configuration ----------------------------------------------------------------------


def test_bad_arguments(redis_server: RedisServer, hosts: Any) -> None:
    path = hosts()
    with pytest.raises(aiovmc.CacheConfigError, match="namespace"):
        aiovmc.TieredCache(path, redis=redis_server.url, namespace="", size="4MiB")
    with pytest.raises(aiovmc.CacheConfigError, match="timeout"):
        aiovmc.TieredCache(path, redis=redis_server.url, namespace="t", timeout=0)
    with pytest.raises(TypeError, match=r"URL or a redis\.Redis"):
        aiovmc.TieredCache(path, redis=42, namespace="t")  # type: ignore[arg-type]
    import redis.asyncio

    with pytest.raises(TypeError, match=r"not a redis\.asyncio client"):
        aiovmc.TieredCache(path, redis=redis.asyncio.Redis(), namespace="t")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_one_namespace_per_file(redis_server: RedisServer, hosts: Any) -> None:
    path = hosts()
    client = redis_server.client()
    async with aiovmc.TieredCache(path, redis=client, namespace="one", size="4MiB") as cache:
        with pytest.raises(aiovmc.CacheConfigError, match="belongs to namespace 'one'"):
            aiovmc.TieredCache(path, redis=redis_server.url, namespace="two")
        await cache.put(b"k", b"v")
    assert client.get(b"one:k") == b"v"  # the caller's client is still open
    damage(path + ".tiered")
    with pytest.raises(aiovmc.CacheFormatError, match="not an aiovmc TieredCache sidecar"):
        aiovmc.TieredCache(path, redis=redis_server.url, namespace="one")


def damage(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"garbage!")


def test_import_aiovmc_does_not_import_redis() -> None:
    code = "import sys, aiovmc; aiovmc.TieredCache; assert 'redis' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
