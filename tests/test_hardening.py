"""Regression tests for the defects of issue 10 (hardening), one or more per defect.

Each test failed before its fix. Multi-process ones run real processes on a
real file; nothing is mocked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest

import aiovmc
from aiovmc._async_cache import _limiter

from .conftest import Clock
from .helpers import WAIT

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_python(code: str, *args: str, timeout: float = WAIT) -> str:
    """Run `code` in a fresh interpreter; its stdout (it must exit with 0)."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc.stdout.decode()


# ---- 1. a child whose after-fork re-lock fails ------------------------------------

_FORK_WITHOUT_DESCRIPTORS = """
import os, resource, sys
import aiovmc

paths = sys.argv[1:]
caches = [aiovmc.Cache(p, size="1MiB") for p in paths]
for cache in caches:
    cache.put(b"k", b"v")
# No descriptor left: the child's re-open through /proc/self/fd fails for
# every handle.
holes = []
while True:
    fd = os.open("/dev/null", os.O_RDONLY)
    holes.append(fd)
    if fd >= 64:
        break
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (65, hard))
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    # The first handle's re-open fails (its inherited descriptor is closed,
    # which frees a slot for the next ones): a handle is closed exactly when
    # it cannot be used.
    seen = []
    for c in caches:
        closed = c.closed
        try:
            usable = c.get(b"k") == b"v"
        except aiovmc.CacheClosedError:
            usable = False
        seen.append((closed, usable))
        c.close()  # must not unlock the parent's liveness lock
    print("child", sorted(seen), flush=True)
    os._exit(0)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
_, status = os.waitpid(pid, 0)
assert status == 0, status
for fd in holes:
    os.close(fd)
# The parent still uses both files: a third opener must not recover them.
import subprocess
third = "import aiovmc, sys; c = aiovmc.Cache(sys.argv[1]); print(c.info.recovered, c.get(b'k'))"
out = [
    subprocess.run([sys.executable, "-c", third, p], capture_output=True, check=True)
    .stdout.decode().strip()
    for p in paths
]
print("third", out, flush=True)
for cache in caches:
    assert cache.get(b"k") == b"v"
    cache.close()
"""


def test_failed_after_fork_relock_closes_every_handle_and_keeps_the_parents_lock(
    tmp_path: Any,
) -> None:
    paths = [str(tmp_path / "a.cache"), str(tmp_path / "b.cache")]
    out = _run_python(_FORK_WITHOUT_DESCRIPTORS, *paths).splitlines()
    assert out[0] == "child [(False, True), (True, False)]", out
    assert out[1] == "third [\"False b'v'\", \"False b'v'\"]", out


# ---- 5. views of a reservation's buffer outliving it ----------------------------


@pytest.mark.parametrize("end", ["publish", "cancel", "close"])
def test_views_of_a_finished_reservation_write_nowhere_in_the_file(
    tmp_path: Any, end: str
) -> None:
    import numpy as np

    path = str(tmp_path / "views.cache")
    with aiovmc.Cache(path, size="1MiB") as cache:
        r = cache.reserve(b"mine", 8192)
        r.buffer[:] = b"m" * 8192
        piece = r.buffer[100:200]
        array = np.frombuffer(r.buffer, dtype=np.uint8)
        if end == "publish":
            r.publish()
        elif end == "cancel":
            r.cancel()
        else:
            cache.close()
            cache = aiovmc.Cache(path)
        # the room is reused by other keys (a cancelled or closed one), or holds ours
        others = {b"other-%d" % i: bytes([65 + i % 26]) * 4000 for i in range(40)}
        for key, value in others.items():
            cache.put(key, value)
        piece[:] = b"x" * 100
        array[:] = 7
        for key, value in others.items():
            assert cache.get(key) == value
        if end == "publish":
            assert cache.get(b"mine") == b"m" * 8192
        else:
            assert cache.get(b"mine") is None
        cache.close()


def test_a_reservation_buffer_is_released_when_it_ends(cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        r = cache.reserve(b"k", 10)
        r.buffer[:] = b"0123456789"
        r.publish()
        with pytest.raises(ValueError, match="released"):
            r.buffer[0]
        assert cache.get(b"k") == b"0123456789"


# ---- 6. close() racing reserve() ------------------------------------------------


def test_close_between_the_core_reserving_and_python_registering_leaks_nothing(
    tmp_path: Any,
) -> None:
    """A close() that runs right after the core made a reservation, before the
    Reservation object exists (another thread, a signal handler): the room is
    freed, not held for the life of the process. The profiler hook stands for
    that thread: it runs close() on the return of the core call."""
    path = str(tmp_path / "race.cache")
    keeper = aiovmc.Cache(path, size="1MiB")  # no recovery at the next open
    cache = aiovmc.Cache(path)

    def close_after_reserve(frame: Any, event: str, arg: Any) -> None:
        if event == "c_return" and getattr(arg, "__name__", "") == "vmc_reserve":
            sys.setprofile(None)
            cache.close()

    sys.setprofile(close_after_reserve)
    try:
        with pytest.raises(aiovmc.CacheClosedError):
            cache.reserve(b"k", 100_000)
    finally:
        sys.setprofile(None)
    assert cache.closed
    assert keeper.statistics().used_bytes == 0
    keeper.close()


# ---- 7. AsyncCache.get_many with a repeated key deleted meanwhile ---------------


@pytest.mark.anyio
async def test_get_many_with_a_repeated_large_key_deleted_before_the_copy(
    cache_path: str,
) -> None:
    async with aiovmc.AsyncCache(cache_path, size="4MiB", offload_threshold=1024) as cache:
        await cache.put(b"big", b"b" * 4096)
        await cache.put(b"small", b"s")
        limiter = _limiter()
        holders = [object() for _ in range(int(limiter.total_tokens))]
        for holder in holders:  # every off-loop copy waits until released below
            await limiter.acquire_on_behalf_of(holder)
        result: dict[bytes, bytes] = {}

        async def run() -> None:
            result.update(await cache.get_many([b"big", b"small", b"big"]))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await anyio.wait_all_tasks_blocked()
            await cache.delete(b"big")
            for holder in holders:
                limiter.release_on_behalf_of(holder)
        assert result == {b"small": b"s"}


# ---- 8. out-of-range integers, surrogates, NUL in paths ----------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 2**64}, "too large"),
        ({"size": 2**64 - 1}, "too large"),
        ({"size": "17179869184T"}, "too large"),
        ({"size": "1MiB", "extent_size": 2**32}, "extent_size"),
        ({"size": "1MiB", "extent_size": 300}, "extent_size"),
        ({"size": "1MiB", "mode": -1}, "mode"),
        ({"size": "1MiB", "mode": 0o10000}, "mode"),
    ],
)
def test_out_of_range_parameters_are_config_errors(
    cache_path: str, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(aiovmc.CacheConfigError, match=match):
        aiovmc.Cache(cache_path, **kwargs)


def test_a_path_with_a_nul_is_refused_not_truncated(tmp_path: Any) -> None:
    path = str(tmp_path / "a.cache") + "\0suffix"
    with pytest.raises(ValueError, match="NUL"):
        aiovmc.Cache(path, size="1MiB")
    assert not os.path.exists(str(tmp_path / "a.cache"))


def test_out_of_range_sizes_and_offsets_on_an_open_cache(cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size="1MiB") as cache:
        with pytest.raises(aiovmc.ValueTooLargeError, match="can never fit"):
            cache.reserve(b"k", 2**40)
        with pytest.raises(aiovmc.CacheConfigError, match="too large"):
            cache.reserve(b"k", 2**64)
        cache.put(b"k", b"value")
        assert cache.get_into(b"k", bytearray(4), offset=2**64) == 5
        with pytest.raises(aiovmc.CacheConfigError, match="UTF-8"):
            cache.put("bad \udc80 key", b"v")
        with pytest.raises(aiovmc.CacheConfigError, match="UTF-8"):
            cache.get("bad \udc80 key")


# ---- 11. the failing call's message, not a callback's ----------------------------


def test_the_error_message_is_the_failing_calls_even_if_a_callback_fails_too(
    cache_path: str,
) -> None:
    def on_evict(key: bytes) -> None:
        try:  # a callback's own failing call sets a message of its own
            cache.put(b"huge", b"x" * (2 << 20))
        except aiovmc.ValueTooLargeError:
            pass

    cache = aiovmc.Cache(cache_path, size="1MiB", on_evict=on_evict)
    try:
        held = cache.reserve(b"held", cache.capacity // 2)
        for i in range(20):
            cache.put(b"k%d" % i, b"v" * 1000)
        with pytest.raises(aiovmc.CacheFullError, match="open reservations hold the rest"):
            cache.reserve(b"big", cache.capacity * 6 // 10)
        held.cancel()
    finally:
        cache.close()


def test_unmendable_damage_is_a_format_error() -> None:
    from aiovmc._native import ERRORS
    from aiovmc._native._binding import lib

    assert ERRORS[lib.VMC_E_CORRUPT] is aiovmc.CacheFormatError


# ---- 9. temporaries of creators killed before linking ------------------------------


def _ofd_lock(fd: int, byte: int) -> None:
    import fcntl
    import struct

    flock = struct.pack("hhxxxxqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, flock)


def test_creators_sweep_the_temporaries_of_dead_creators(tmp_path: Any) -> None:
    path = str(tmp_path / "swept.cache")
    dead = f"{path}.{os.getpid() + 1}.deadbeef.tmp"  # as a SIGKILLed creator leaves it
    with open(dead, "wb") as f:
        f.truncate(1 << 20)
    live = f"{path}.{os.getpid()}.c0ffee.tmp"  # a creator still at work holds its lock
    live_fd = os.open(live, os.O_RDWR | os.O_CREAT, 0o600)
    unrelated = str(tmp_path / "swept.cache.notes.tmp")
    open(unrelated, "wb").close()
    try:
        _ofd_lock(live_fd, 2)
        with aiovmc.Cache(path, size="1MiB"):
            pass
        assert not os.path.exists(dead)
        assert os.path.exists(live) and os.path.exists(unrelated)
    finally:
        os.close(live_fd)


# ---- 4. contiguous room is made where it costs least ------------------------------


def _full(cache: aiovmc.Cache) -> int:
    """Fill with ~300-byte entries until evictions start, then read them in a
    random order, so that least recently used is nowhere near contiguous; the
    number of entries."""
    import random

    i = 0
    while cache.statistics().evictions == 0:
        cache.put(b"fill-%06d" % i, b"v" * 300)
        i += 1
    keys = cache.keys()
    random.Random(1).shuffle(keys)
    for key in keys:
        cache.get(key)
    return len(cache)


@pytest.mark.parametrize("callbacks", [False, True])
def test_a_reservation_in_a_full_cache_evicts_about_the_room_it_needs(
    cache_path: str, callbacks: bool
) -> None:
    called: list[bytes] = []
    with aiovmc.Cache(
        cache_path, size="4MiB", on_evict=called.append if callbacks else None
    ) as cache:
        entries = _full(cache)
        before = cache.statistics().evictions
        room = cache.capacity // 10
        cache.reserve(b"big", room).cancel()
        evicted = cache.statistics().evictions - before
        per_entry = cache.capacity / entries
        assert evicted <= 2 * room / per_entry + 16, (evicted, entries)
        if callbacks:
            assert len(called) == cache.statistics().evictions


def test_a_long_key_in_a_full_cache_evicts_about_the_room_it_needs(cache_path: str) -> None:
    with aiovmc.Cache(cache_path, size="4MiB") as cache:
        entries = _full(cache)
        before = cache.statistics().evictions
        cache.put(b"k" * 60000, b"v")
        evicted = cache.statistics().evictions - before
        assert evicted <= 2 * 60000 / (cache.capacity / entries) + 16, (evicted, entries)


def test_a_reservation_that_open_reservations_make_impossible_evicts_nothing(
    cache_path: str,
) -> None:
    with aiovmc.Cache(cache_path, size="4MiB") as cache:
        first = cache.reserve(b"a", cache.capacity * 45 // 100)
        middle = cache.reserve(b"b", 1000)  # between the free halves
        first.cancel()
        _full(cache)
        before = cache.statistics().evictions
        with pytest.raises(aiovmc.CacheFullError):
            cache.reserve(b"c", cache.capacity * 6 // 10)
        assert cache.statistics().evictions == before
        middle.cancel()


# ---- 10. bounded work per call under policy "none" ---------------------------------


def test_a_put_under_policy_none_purges_a_bounded_share_of_the_index(
    cache_path: str, clock: Clock
) -> None:
    with aiovmc.Cache(cache_path, size="16MiB", policy="none") as cache:
        n = 0
        with pytest.raises(aiovmc.CacheFullError):
            while True:
                cache.put(b"k%d" % n, bytes(900), ttl=600)
                n += 1
        clock.advance(1200)  # every entry has expired
        cache.put(b"after", bytes(900))  # reuses room found by a bounded scan
        purged = cache.statistics().expirations
        assert 0 < purged < n // 2, (purged, n)
        for i in range(20):  # later puts go on where the last scan stopped
            cache.put(b"more%d" % i, bytes(900))
        assert cache.get(b"after") == bytes(900)
