"""The compiled fast path (native/vmc_fast.c: `get`, `_get_inline`, `in`,
`get_into`, `put`, `get_many`) and the pure cffi one.

The whole suite runs on the path the environment selects (the fast one on
CPython; the pure cffi binding with AIOVMC_PURE_CFFI=1, as `.ci/run` does for
the core tests); these tests aim at what the fast path does differently: the
result allocated under the shard lock, the back-off to the blocking path (an
expired entry, a contended lock), the values too large to copy with the GIL
held, and statistics that stay exact through all of it.
"""

from __future__ import annotations

import collections.abc
import os
import platform
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from aiovmc import AsyncCache, Cache, CacheConfigError
from aiovmc._native import FAST_PATH, SCRATCH_SIZE, ready

from .conftest import Clock
from .helpers import run_threads

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


def test_the_async_get_and_its_ready_result_follow_the_path() -> None:
    assert (type(AsyncCache.get).__name__ == "method_descriptor") is FAST_PATH
    done = ready(b"v")
    assert isinstance(done, collections.abc.Coroutine)
    assert type(done).__name__ == ("Ready" if FAST_PATH else "coroutine")
    done.close()


def test_the_compiled_helpers_check_their_arguments(cache: Cache) -> None:
    if not FAST_PATH:
        pytest.skip("the compiled helpers exist on the fast path only")
    from aiovmc._native._binding import _aiovmc_native as native

    with pytest.raises(TypeError):
        native.Ready()
    with pytest.raises(TypeError):
        native.Ready(b"v", b"w")
    with pytest.raises(ValueError):
        native.fresh_bytes(-1)
    assert len(native.fresh_bytes(10)) == 10
    with pytest.raises(TypeError):
        cache._get_many_inline((b"k",), 10, {}, {}, 0)  # type: ignore[arg-type]  # a tuple
    with pytest.raises(TypeError):
        cache._get_many_inline([b"k", 3.5], 10, {}, {}, 0)  # type: ignore[list-item]
    found: dict[bytes, bytes | None] = {}
    cache.put(b"k", b"v")
    assert cache._get_many_inline([b"k", "k"], 10, found, {}, 5) == 2  # from past the end
    assert found == {}


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
        run_threads(threads)
        assert not errors, errors
        stats = c.statistics()
        assert (stats.gets, stats.hits, stats.misses) == (4 * rounds * 2, 4 * rounds, 4 * rounds)
        assert (stats.puts, stats.evictions, stats.entries) == (
            len(present) + 2 * rounds, 0, len(present))


def test_get_many_with_duplicates_missing_expired_and_large_keys(
    cache: Cache, clock: Clock
) -> None:
    """More keys than one core call takes (64), in order: duplicates counted
    each time, misses and an expired key left out (the expired one removed and
    counted once), a value too large to copy with the GIL held fetched whole,
    str keys encoded; every get counted once."""
    big = bytes(i % 253 for i in range(SCRATCH_SIZE + 1))
    cache.put(b"big", big)
    cache.put(b"old", b"o", ttl=10)
    clock.advance(11)
    present = [f"p{i}".encode() for i in range(150)]
    for key in present:
        cache.put(key, key * 3)
    asked: list[Any] = []
    for i, key in enumerate(present):
        asked.append(key if i % 3 else key.decode())
        if i % 10 == 0:
            asked.append(f"absent{i}".encode())
        if i % 25 == 0:
            asked += [key, b"big", b"old"]
    found = cache.get_many(iter(asked))
    wanted = {k: k * 3 for k in present}
    wanted[b"big"] = big
    assert found == wanted and all(type(v) is bytes for v in found.values())
    stats = cache.statistics()
    hits = len(asked) - sum(1 for k in asked if k == b"old" or str(k).startswith("b'absent"))
    assert (stats.gets, stats.hits, stats.misses) == (len(asked), hits, len(asked) - hits)
    assert (stats.expirations, stats.entries) == (1, len(present) + 1)
    assert cache.get_many([]) == {}
    with pytest.raises(TypeError, match="key"):
        cache.get_many([b"p1", 2.5])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        cache.get_many(7)  # type: ignore[arg-type]


def test_get_into_and_put_take_their_arguments_like_python_methods(cache: Cache) -> None:
    assert cache.put(key="k", value=b"abcdef") > 0
    assert cache.put(b"b", bytearray(b"xy"), ttl=30) > 0  # a buffer: the pure put takes it
    buf = bytearray(4)
    assert cache.get_into("k", buf) == 6 and buf == b"abcd"
    assert cache.get_into(b"k", buffer=memoryview(buf)[1:], offset=4) == 6 and buf == b"aefd"
    assert cache.get_into(b"k", buf, offset=10**30) == 6  # past the value: nothing copied
    assert cache.get_into(b"b", buf) == 2 and cache.get_into(b"zz", buf) is None
    wrong: Any = cache  # called wrongly on purpose
    for call, error in [
        (lambda: wrong.get_into(b"k", b"read-only"), TypeError),
        (lambda: wrong.get_into(b"k", buf, offset=-1), ValueError),
        (lambda: wrong.get_into(b"k", buf, offset=True), ValueError),
        (lambda: wrong.get_into(b"k", buf, 0), TypeError),  # offset is keyword-only
        (lambda: wrong.put(b"k"), TypeError),
        (lambda: wrong.put(b"k", "text"), TypeError),
        (lambda: wrong.put(b"k", b"v", ttl="soon"), TypeError),
        (lambda: wrong.put(b"k", b"v", ttl=-1), CacheConfigError),
        (lambda: wrong.put(b"k", b"v", b"x"), TypeError),
    ]:
        with pytest.raises(error):
            call()  # type: ignore[no-untyped-call]
    stats = cache.statistics()
    assert (stats.puts, stats.gets, stats.hits, stats.misses) == (2, 5, 4, 1)
    assert cache.get(b"k") == b"abcdef"


@pytest.mark.parametrize("touch", ["get_many", "get_into"])
def test_lookups_touch_the_lru_order_in_the_order_asked(cache_path: str, touch: str) -> None:
    evicted: list[bytes] = []
    with Cache(cache_path, size=MiB, on_evict=evicted.append) as c:
        keys = [f"k{i:04d}".encode() for i in range(400)]
        for key in keys:
            c.put(key, bytes(1000))
        touched = random.Random(7).sample(keys, 200)
        if touch == "get_many":
            assert len(c.get_many(touched)) == len(touched)
        else:
            buf = bytearray(10)
            assert all(c.get_into(key, buf) == 1000 for key in touched)
        untouched = [k for k in keys if k not in set(touched)]
        fresh = 0
        while len(evicted) < len(keys):
            c.put(f"new{fresh}", bytes(1000))
            fresh += 1
        assert evicted[: len(keys)] == untouched + touched


class ReentrantKey(str):
    """A str key whose encoding (called by the fast path in the middle of its
    call) runs Python code: here, another call on the same cache."""

    during: Callable[[], object]

    def __new__(cls, text: str, during: Callable[[], object]) -> ReentrantKey:
        self = super().__new__(cls, text)
        self.during = during
        return self

    def encode(self, *args: object, **kwargs: object) -> bytes:
        self.during()
        return str(self).encode(*args, **kwargs)  # type: ignore[arg-type]


def test_a_signal_handler_calling_the_cache_during_each_call(cache: Cache) -> None:
    """A signal arrives while a get_many, a get_into and a put are encoding a
    key (Python code inside the call); its handler reads and writes the same
    cache. Both the handler's calls and the interrupted ones answer their own
    keys, and every call is counted once."""
    cache.put(b"other", b"O" * 100)
    seen: list[object] = []

    def handler(signum: int, frame: object) -> None:
        buf = bytearray(100)
        seen.append(cache.get_many([b"other", b"p0", b"nope"]))
        seen.append(cache.get_into(b"other", buf))
        seen.append(cache.put(b"from-handler", bytes(SCRATCH_SIZE + 5)))

    def interrupt() -> None:
        signal.raise_signal(signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        for i in range(70):
            cache.put(f"p{i}", f"p{i}".encode() * 2)
        keys = [f"p{i}" for i in range(70)]
        keys[65] = ReentrantKey("p65", interrupt)  # inside the second batch
        found = cache.get_many(keys)
        assert found == {f"p{i}".encode(): f"p{i}".encode() * 2 for i in range(70)}
        buf = bytearray(3)
        assert cache.get_into(ReentrantKey("p1", interrupt), buf) == 4 and buf == b"p1p"
        assert cache.put(ReentrantKey("mine", interrupt), b"M" * 10) > 0
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen[0::3] == [{b"other": b"O" * 100, b"p0": b"p0p0"}] * 3
    assert seen[1::3] == [100] * 3
    assert cache.get(b"mine") == b"M" * 10
    assert cache.get(b"from-handler") == bytes(SCRATCH_SIZE + 5)
    stats = cache.statistics()
    assert stats.puts == 1 + 70 + 1 + 3
    assert (stats.gets, stats.misses) == (70 + 1 + 3 * 4 + 2, 3)


def test_threads_on_one_handle_put_get_into_and_get_many(cache_path: str) -> None:
    """Threads put (large values release the GIL in the middle of a call),
    get_into and get_many on one handle and a few shards: every value read is
    one that was written whole, and the statistics count every key once."""
    keys = [f"t{i}".encode() for i in range(48)]
    rounds = 150
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def value_of(key: bytes, n: int) -> bytes:
        return key * n

    def whole(key: bytes, value: bytes) -> bool:
        return len(value) % len(key) == 0 and value == key * (len(value) // len(key))

    def writer(seed: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                key = keys[(seed + r) % len(keys)]
                size = 1 + (r * 7919 + seed) % (SCRATCH_SIZE // 8)  # past the GIL limit too
                c.put(key, value_of(key, size))
        except BaseException as exc:
            errors.append(exc)

    def reader(seed: int) -> None:
        try:
            start.wait()
            buf = bytearray(3 * SCRATCH_SIZE)
            for r in range(rounds):
                key = keys[(seed * 5 + r) % len(keys)]
                n = c.get_into(key, buf)
                assert n is not None and whole(key, bytes(buf[:n])), key
                batch = [keys[(r + i) % len(keys)] for i in range(0, 100, 3)] + [b"absent"]
                found = c.get_many(batch)
                assert set(found) == set(batch) - {b"absent"}
                assert all(whole(k, v) for k, v in found.items())
        except BaseException as exc:
            errors.append(exc)

    with Cache(cache_path, size=64 * MiB) as c:
        for key in keys:
            c.put(key, key)
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        threads += [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        run_threads(threads)
        assert not errors, errors
        stats = c.statistics()
        per_round = 1 + 34 + 1
        assert (stats.gets, stats.hits, stats.misses) == (
            2 * rounds * per_round,
            2 * rounds * (per_round - 1),
            2 * rounds,
        )
        assert (stats.puts, stats.evictions, stats.entries) == (
            len(keys) + 2 * rounds,
            0,
            len(keys),
        )


def _huge_page_advised(start: int, end: int) -> list[tuple[int, int]]:
    """The mappings of this process advised MADV_HUGEPAGE (VmFlags "hg") that
    overlap [start, end)."""
    advised = []
    with open("/proc/self/smaps") as smaps:
        lo = hi = 0
        for line in smaps:
            words = line.split()
            if "-" in words[0] and not words[0].endswith(":"):  # a mapping's first line
                lo, hi = (int(x, 16) for x in words[0].split("-"))
            elif words[0] == "VmFlags:" and "hg" in words and lo < end and start < hi:
                advised.append((lo, hi))
    return advised


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
                    reason="the kernel has no transparent huge pages")
def test_a_large_result_is_backed_by_huge_pages_inside_its_own_bytes(cache_path: str) -> None:
    """A result of 32 MiB or more is advised MADV_HUGEPAGE (so that freeing
    it, with the GIL held, is cheap): 2 MiB-aligned blocks, all inside the
    value's own bytes, whichever call made it; the quiet copy behind
    AsyncCache's offloaded get follows a value that changed size and says
    None for one that has gone."""
    import ctypes

    size = 32 * MiB + 12345
    value = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    with Cache(cache_path, size=128 * MiB) as c:
        c.put(b"big", value)
        results = [c.get(b"big"), c.get_many([b"big"])[b"big"], c._copy_whole(b"big", 5)]
        entry = c.get_entry(b"big")
        assert entry is not None
        results.append(entry.value)
        for got in results:
            assert got == value
            start = ctypes.cast(ctypes.c_char_p(got), ctypes.c_void_p).value
            assert start is not None
            advised = _huge_page_advised(start, start + size)
            assert advised, "a 32 MiB result is not advised to use huge pages"
            for lo, hi in advised:
                assert start <= lo < hi <= start + size
                assert lo % (2 * MiB) == 0 and hi % (2 * MiB) == 0
        assert c._copy_whole(b"absent", 5) is None
