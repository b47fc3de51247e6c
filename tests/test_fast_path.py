"""The compiled fast path (native/vmc_fast.c: `get`, `_get_inline`, `in`) and the
pure cffi one.

The whole suite runs on the path the environment selects (the fast one on
CPython; the pure cffi binding with AIOVMC_PURE_CFFI=1, as `.ci/run` does for
the core tests); these tests aim at what the fast path does differently: the
result allocated under the shard lock, the back-off to the blocking path (an
expired entry, a contended lock), the values too large to copy with the GIL
held, and statistics that stay exact through all of it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from aiovmc import Cache
from aiovmc._native import FAST_PATH, SCRATCH_SIZE

from .conftest import Clock

MiB = 1 << 20


@pytest.fixture
def cache(cache_path: str) -> Iterator[Cache]:
    with Cache(cache_path, size=4 * MiB) as c:
        yield c


def test_the_path_in_use_is_the_one_the_environment_asks_for() -> None:
    wanted = (
        platform.python_implementation() == "CPython"
        and os.environ.get("AIOVMC_PURE_CFFI") != "1"
    )
    assert FAST_PATH is wanted
    assert (type(Cache.get).__name__ == "method_descriptor") is wanted


def test_the_environment_variable_selects_the_pure_binding(cache_path: str) -> None:
    code = (
        "import sys, aiovmc, aiovmc._native as n\n"
        f"c = aiovmc.Cache({cache_path!r}, size='1MiB')\n"
        "c.put(b'k', b'v' * 10)\n"
        "assert c.get(b'k') == b'v' * 10 and c.get(b'x', 7) == 7\n"
        "print(n.FAST_PATH, type(aiovmc.Cache.get).__name__)\n"
    )
    cpython = platform.python_implementation() == "CPython"
    default = "True method_descriptor" if cpython else "False function"
    for pure, expected in (("1", "False function"), ("", default)):
        env = {**os.environ, "AIOVMC_PURE_CFFI": pure}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert out.startswith(expected), out


@pytest.mark.parametrize("size", [0, 1, 100, SCRATCH_SIZE - 1, SCRATCH_SIZE, SCRATCH_SIZE + 1,
                                  3 * SCRATCH_SIZE])
def test_values_of_every_size_come_back_whole(cache: Cache, size: int) -> None:
    value = bytes(i % 251 for i in range(size))
    cache.put(b"k", value)
    got = cache.get(b"k")
    assert type(got) is bytes and got == value
    assert cache.get(key="k", default=None) == value  # str keys, keyword arguments
    # What AsyncCache calls on the loop: up to a limit copied, beyond it only sized.
    assert cache._get_inline(b"k", size) == value
    assert cache._get_inline(b"k", max(size - 1, 0)) == (size if size else value)
    assert cache._get_inline(b"absent", size) is None
    assert b"k" in cache and "k" in cache and b"absent" not in cache  # counts nothing
    stats = cache.statistics()
    assert (stats.gets, stats.hits, stats.misses) == (5, 4, 1)


def test_arguments_are_checked_like_a_python_method(cache: Cache) -> None:
    with pytest.raises(TypeError):
        cache.get()  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        cache.get(b"k", None, None)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        cache.get(b"k", missing=1)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        cache.get(b"k", key=b"k")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="key"):
        cache.get(1.5)  # type: ignore[call-overload]
    assert cache.statistics().gets == 0


def test_an_expired_entry_is_removed_and_counted_once(cache: Cache, clock: Clock) -> None:
    """The fast path leaves an expired entry to the blocking path (removing it
    takes the pool lock): one miss, one expiration, nothing counted twice."""
    cache.put(b"k", b"v", ttl=10)
    clock.advance(11)
    assert b"k" not in cache
    assert cache.get(b"k", b"gone") == b"gone"
    stats = cache.statistics()
    assert (stats.gets, stats.hits, stats.misses, stats.expirations, stats.entries) == (
        1, 0, 1, 1, 0)


def test_a_finalizer_calling_the_cache_inside_a_get(cache_path: str) -> None:
    """A loader (run inside get, on a miss) drops the last reference to an
    object whose finalizer gets another key: both gets answer their own key."""
    seen: list[bytes | None] = []

    class Reads:
        def __del__(self) -> None:
            seen.append(c.get(b"other"))

    def loader(key: bytes) -> bytes:
        holder = Reads()
        del holder  # the finalizer runs here, inside the outer get
        return key * 3

    with Cache(cache_path, size=4 * MiB, on_miss=loader) as c:
        c.put(b"other", b"O" * 80)
        assert c.get(b"mine") == b"mine" * 3
        assert seen == [b"O" * 80]
        stats = c.statistics()
        assert (stats.gets, stats.hits, stats.misses) == (2, 1, 1)


def test_exact_statistics_after_threads_race_on_one_handle(cache_path: str) -> None:
    """Threads get and put on a few shards at once (puts release the GIL, so
    the fast path meets taken shard locks and backs off): every get counted
    once, each as the hit or miss it was, every value intact."""
    present = [f"p{i}".encode() for i in range(64)]
    absent = [f"a{i}".encode() for i in range(64)]
    rounds = 400
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def reader(seed: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                key = present[(seed + r) % len(present)]
                value = c.get(key)
                assert value is not None and value == key * (len(value) // len(key)), key
                assert c.get(absent[(seed * 7 + r) % len(absent)]) is None
        except BaseException as exc:
            errors.append(exc)

    def writer(seed: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                key = present[(seed + r) % len(present)]
                c.put(key, key * (1 + (r * 13 + seed) % 700))
        except BaseException as exc:
            errors.append(exc)

    with Cache(cache_path, size=8 * MiB) as c:
        for key in present:
            c.put(key, key)
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
        threads += [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        stats = c.statistics()
        assert (stats.gets, stats.hits, stats.misses) == (4 * rounds * 2, 4 * rounds, 4 * rounds)
        assert (stats.puts, stats.evictions, stats.entries) == (
            len(present) + 2 * rounds, 0, len(present))
