"""The synchronous Cache, operation by operation (DESIGN.md §2, §3, §6)."""

from __future__ import annotations

import array
import itertools
import os
import random
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aiovmc
from aiovmc import (
    AiovmcError,
    Cache,
    CacheClosedError,
    CacheConfigError,
    CacheFullError,
    KeyTooLargeError,
    ValueTooLargeError,
)
from aiovmc._convert import parse_size
from aiovmc._errors import RepairNeeded
from aiovmc._native import COUNTED, NO_REPAIR

from .conftest import Clock
from .helpers import (
    HEADER_FIELDS,
    SPARE_SLOTS,
    private_file_stats,
    read_header,
    run_threads,
    slot_hits,
    vmc_hash,
)

MiB = 1 << 20


@pytest.fixture
def cache(cache_path: str) -> Iterator[Cache]:
    with Cache(cache_path, size=4 * MiB) as c:
        yield c


def fill_until_eviction(cache: Cache, prefix: str = "fill", size: int = 1000) -> int:
    """Put fresh keys until the first eviction; returns how many were put."""
    n = 0
    while cache.statistics().evictions == 0:
        cache.put(f"{prefix}{n}", bytes(size))
        n += 1
    return n


# ---- opening, creating, attaching ----


def test_create_attach_and_geometry(cache_path: str) -> None:
    with Cache(cache_path, size="2MiB") as a:
        assert a.path == cache_path
        assert a.capacity >= 0.8 * 2 * MiB
        a.put(b"k", b"v")
        with Cache(cache_path) as b:  # attach: geometry comes from the file
            assert b.capacity == a.capacity
            assert b.get(b"k") == b"v"
            b.put(b"k2", b"v2")
        assert a.get(b"k2") == b"v2"


def test_reopen_keeps_entries(cache_path: str) -> None:
    with Cache(cache_path, size=2 * MiB) as c:
        c.put_many({f"k{i}": f"v{i}".encode() for i in range(100)})
    with Cache(cache_path) as c:
        assert c.info.recovered
        assert c.info.recovered_entries == 100
        assert all(c.get(f"k{i}") == f"v{i}".encode() for i in range(100))


def test_attach_with_other_size_is_config_error(cache_path: str) -> None:
    with Cache(cache_path, size=2 * MiB), pytest.raises(CacheConfigError, match="not 3145728"):
        Cache(cache_path, size=3 * MiB)


@pytest.mark.parametrize(
    "options, text",
    [
        ({"extent_size": 512}, "extent_size=256, not extent_size=512"),
        ({"max_entries": 100}, "max_entries=6880, not max_entries=100"),
        ({"policy": "none"}, "policy='lru', not policy='none'"),
        ({"ttl": 5}, r"ttl=None, not ttl=5:"),
    ],
)
def test_attach_with_other_geometry_is_config_error(
    cache_path: str, options: dict[str, object], text: str
) -> None:
    Cache(cache_path, size=2 * MiB).close()
    with pytest.raises(CacheConfigError, match=text):
        Cache(cache_path, **options)  # type: ignore[arg-type]


def test_creating_in_a_missing_directory_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "app.cache"
    with pytest.raises(FileNotFoundError, match=f"cannot create {path}: its directory does not"):
        Cache(path, size=MiB)
    assert os.listdir(tmp_path) == []


def test_private_cache_errors_name_no_path() -> None:
    """The user gave no path: the message must not show the private file's name."""
    with pytest.raises(CacheConfigError, match=r"^size 1000 is below the minimum of 1 MiB$"):
        Cache(size=1000)


def test_missing_file_without_size(cache_path: str) -> None:
    with pytest.raises(CacheConfigError, match="does not exist"):
        Cache(cache_path)
    assert not os.path.exists(cache_path)


@pytest.mark.parametrize(
    "options, text",
    [
        ({"size": 1000}, "minimum of 1 MiB"),
        ({"size": "512k"}, "minimum of 1 MiB"),
        ({"size": MiB, "extent_size": 300}, "power of two"),
        ({"size": MiB, "extent_size": 32}, r"power of two between 64 and 2\*\*31"),
        ({"size": MiB, "extent_size": 2 * MiB}, "power of two"),
        ({"size": MiB, "extent_size": 512 * 1024}, "less than 80%.*smaller extent_size"),
        ({"size": MiB, "extent_size": 64}, "less than 80%.*entry budget.*larger size"),
        ({"size": MiB, "max_entries": 0}, "max_entries 0 must be between 1 and 4294967280"),
        ({"size": MiB, "max_entries": 2**32}, "max_entries 4294967296 must be between"),
        ({"size": MiB, "max_entries": 4000}, "max_entries 4000 is more than .* at most 3328"),
        ({"size": MiB, "policy": "fifo"}, "policy"),
        ({"size": MiB, "ttl": -1}, "positive"),
        ({"size": "lots"}, "is not a size"),
        ({"size": -5}, "negative"),
    ],
)
def test_invalid_parameters(cache_path: str, options: dict[str, object], text: str) -> None:
    with pytest.raises(CacheConfigError, match=text):
        Cache(cache_path, **options)  # type: ignore[arg-type]
    assert not os.path.exists(cache_path)


def test_parameter_types(cache_path: str) -> None:
    with pytest.raises(TypeError):
        Cache(cache_path, size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Cache(cache_path, size=MiB, ttl="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Cache(cache_path, size=MiB, on_miss=42)  # type: ignore[arg-type]
    for bad in ("5", 5.0, True):
        with pytest.raises(TypeError, match="max_entries is an int or None"):
            Cache(cache_path, size=MiB, max_entries=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512k", 512 << 10),
        ("64MiB", 64 << 20),
        ("1GiB", 1 << 30),
        ("1.5G", 3 << 29),
        ("4kb", 4096),
        ("100", 100),
        ("2T", 2 << 40),
        (" 8 M ", 8 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


def test_private_cache_file_is_unlinked_at_once() -> None:
    """A private cache has no name anyone could open, so nothing can leak it."""
    with Cache(size=MiB) as c:
        assert not os.path.exists(c.path)
        opened = private_file_stats(c.path)  # the core's descriptor and mmap's copy
        assert opened and all(st.st_mode & 0o777 == 0o600 for st in opened)
        c.put(b"a", b"b")
        assert c.get(b"a") == b"b"
    assert private_file_stats(c.path) == []
    with pytest.raises(CacheConfigError, match="size is required"):
        Cache()


def test_reset_empties_and_changes_geometry(cache_path: str) -> None:
    with Cache(cache_path, size=2 * MiB) as c:
        c.put(b"a", b"b")
    with Cache(cache_path, size=3 * MiB, extent_size=1024, reset=True) as c:
        assert len(c) == 0 and c.get(b"a") is None
        assert c.info.extent_size == 1024
        with pytest.raises(CacheConfigError, match=r"it is open \(by another process, or another"):
            Cache(cache_path, size=3 * MiB, reset=True)


def test_reset_refuses_foreign_file(cache_path: str) -> None:
    with open(cache_path, "wb") as f:
        f.write(b"not a cache" * 1000)
    with pytest.raises(aiovmc.CacheFormatError):
        Cache(cache_path, size=MiB, reset=True)
    with open(cache_path, "rb") as f:
        assert f.read() == b"not a cache" * 1000


# ---- keys and values ----


@pytest.mark.parametrize("key", [b"key", bytearray(b"key"), memoryview(b"key"), "key"])
def test_key_types_are_equivalent(cache: Cache, key: Any) -> None:
    cache.put(b"key", b"v")
    assert cache.get(key) == b"v"
    assert key in cache


def test_str_key_is_utf8(cache: Cache) -> None:
    cache.put("clé", b"v")
    assert cache.keys() == ["clé".encode()]


@pytest.mark.parametrize("key", [1, 1.5, None, ["k"], object()])
def test_bad_key_types(cache: Cache, key: Any) -> None:
    for operation in (cache.get, cache.delete, cache.__contains__):
        with pytest.raises(TypeError, match="a key is bytes"):
            operation(key)
    with pytest.raises(TypeError):
        cache.put(key, b"v")


def test_key_size_limits(cache: Cache) -> None:
    cache.put(b"k" * 65535, b"v")
    assert cache.get(b"k" * 65535) == b"v"
    cache.put(b"", b"empty key")
    assert cache.get(b"") == b"empty key"
    for key in (b"k" * 65536, "k" * 65536):
        with pytest.raises(KeyTooLargeError, match="65536 bytes"):
            cache.put(key, b"v")
        with pytest.raises(ValueError):
            cache.get(key)


@pytest.mark.parametrize(
    "value",
    [
        b"abc",
        bytearray(b"abc"),
        memoryview(b"xabcx")[1:4],
        array.array("b", b"abc"),
        np.frombuffer(b"abc", dtype=np.uint8),
    ],
)
def test_value_types(cache: Cache, value: Any) -> None:
    cache.put(b"k", value)
    assert cache.get(b"k") == b"abc"


def test_multibyte_buffer_values(cache: Cache) -> None:
    values = np.arange(1000, dtype=np.float64)
    cache.put(b"k", values.data)
    assert np.array_equal(np.frombuffer(cache[b"k"], dtype=np.float64), values)


@pytest.mark.parametrize("value", ["text", 42, None, memoryview(b"abcdef")[::2]])
def test_bad_values(cache: Cache, value: Any) -> None:
    with pytest.raises(TypeError):
        cache.put(b"k", value)
    assert b"k" not in cache


def test_value_too_large_evicts_nothing(cache: Cache) -> None:
    fill_until_eviction(cache)
    before = cache.statistics()
    with pytest.raises(ValueTooLargeError, match="can never fit"):
        cache.put(b"huge", bytes(cache.capacity))
    with pytest.raises(ValueError):
        cache.reserve(b"huge", cache.capacity)
    assert cache.statistics() == before


def test_empty_and_large_values(cache: Cache) -> None:
    cache.put(b"empty", b"")
    assert cache.get(b"empty") == b""
    big = os.urandom(3 * MiB)
    cache.put(b"big", big)
    assert cache.get(b"big") == big


# ---- get, get_into ----


def test_get_default_and_on_miss(cache_path: str) -> None:
    calls: list[bytes] = []

    def load(key: bytes) -> bytes | None:
        calls.append(key)
        return None if key == b"none" else key.upper()

    with Cache(cache_path, size=MiB, on_miss=load) as c:
        assert c.get("abc") == b"ABC"
        assert c.get(b"abc") == b"ABC"  # stored: no second load
        assert c.get(b"none", b"dflt") == b"dflt"
        assert calls == [b"abc", b"none"]
        stats = c.statistics()
        assert (stats.gets, stats.hits, stats.misses, stats.puts) == (3, 1, 2, 1)
        assert stats.loader_calls == 2
        with pytest.raises(KeyError):
            c[b"other"]  # the mapping protocol does not load
        assert calls == [b"abc", b"none"]


def test_the_copy_that_finishes_a_counted_get_counts_a_miss_if_the_key_went(
    cache: Cache,
) -> None:
    # A get sized by one call and copied by another (values past 64 KiB, and
    # AsyncCache's off the loop): the copy carries COUNTED, and if the key went
    # in between, the hit its first call counted becomes a miss.
    def hits_and_misses() -> tuple[int, int]:
        stats = cache.statistics()
        return stats.hits, stats.misses

    value = bytes(range(256)) * 400  # past the scratch buffer
    cache.put(b"k", value)
    size = cache._get_inline(b"k", 0)  # counted, not copied
    assert isinstance(size, int)
    assert size == len(value) and hits_and_misses() == (1, 0)
    assert cache._copy_whole(b"k", size, COUNTED) == value and hits_and_misses() == (1, 0)
    assert cache._get_inline(b"k", 0) == size
    cache.delete(b"k")
    assert cache._copy_whole(b"k", size, COUNTED) is None and hits_and_misses() == (1, 1)
    cache.put(b"k", value)
    assert cache._get_entry(b"k", 0) == len(value)  # counted, not copied
    cache.delete(b"k")
    assert cache._get_entry(b"k", sys.maxsize, COUNTED) is None
    assert hits_and_misses() == (1, 2)
    cache.put(b"k", value)
    assert cache._copy_whole(b"k", size) == value  # a quiet copy counts nothing
    assert hits_and_misses() == (1, 2)
    # A copy that must not repair (on an event loop) meets a pending repair:
    # RepairNeeded, nothing counted; the get counted by the call that sized
    # it stays counted once, and is finished where a repair may run.
    assert cache._get_entry(b"k", 0, NO_REPAIR) == size
    at, width = HEADER_FIELDS["needs_repair"]
    with open(cache.path, "r+b") as f:  # the file's pages are the mapping's
        f.seek(at)
        f.write((1).to_bytes(width, "little"))
    with pytest.raises(RepairNeeded):
        cache._get_entry(b"k", sys.maxsize, NO_REPAIR | COUNTED)
    with pytest.raises(RepairNeeded):
        cache._copy_whole(b"k", size, NO_REPAIR | COUNTED)
    assert hits_and_misses() == (2, 2)
    entry = cache._get_entry(b"k", sys.maxsize, COUNTED)  # repairs, then copies
    assert isinstance(entry, tuple) and entry[0] == value
    assert hits_and_misses() == (2, 2)


def test_a_hit_taken_back_is_taken_where_one_is_counted(cache: Cache) -> None:
    # Hits are counted in the key's shard (under its lock: a value past 64 KiB)
    # or in the handle's slot (the optimistic path). A counted get whose key
    # goes before its copy takes one hit back wherever one is: its shard first.
    # Taking the slot's first, the large key's miss would take the small key's
    # hit, and the small key's miss would then find none in its own shard:
    # one hit too many, for ever.
    data = Path(cache.path).read_bytes()
    seed = read_header(data)["hash_seed"]
    keys = (b"k%d" % i for i in itertools.count())
    large = next(keys)
    small = next(k for k in keys if vmc_hash(k, seed) % 64 != vmc_hash(large, seed) % 64)
    cache.put(large, bytes(100_000))  # past the scratch buffer: counted under the lock
    cache.put(small, bytes(100))  # counted in the slot
    sizes = [cache._get_inline(key, 0) for key in (large, small)]  # counted, not copied
    assert sizes == [100_000, 100] and cache.statistics().hits == 2
    cache.delete(large)
    cache.delete(small)
    for key, size in zip((large, small), sizes, strict=True):
        assert isinstance(size, int)
        assert cache._copy_whole(key, size, COUNTED) is None
    stats = cache.statistics()
    assert (stats.hits, stats.misses) == (0, 2)


def test_get_into_edges(cache: Cache) -> None:
    value = bytes(range(256)) * 4
    cache.put(b"k", value)
    buf = bytearray(100)
    assert cache.get_into(b"k", buf) == 1024 and buf == value[:100]
    assert cache.get_into(b"k", buf, offset=1000) == 1024 and buf[:24] == value[1000:]
    buf2 = bytearray(b"x" * 10)
    assert cache.get_into(b"k", buf2, offset=1024) == 1024 and buf2 == b"x" * 10
    assert cache.get_into(b"k", buf2, offset=10**9) == 1024 and buf2 == b"x" * 10
    assert cache.get_into(b"k", bytearray(0)) == 1024
    whole = bytearray(2000)
    assert cache.get_into(b"k", whole) == 1024 and whole[:1024] == value
    arr = np.zeros(16, dtype=np.uint8)
    assert cache.get_into(b"k", arr.data, offset=16) == 1024 and bytes(arr) == value[16:32]
    assert cache.get_into(b"missing", buf) is None
    with pytest.raises(ValueError, match="offset"):
        cache.get_into(b"k", buf, offset=-1)
    with pytest.raises(TypeError, match="writable"):
        cache.get_into(b"k", b"readonly")


def test_get_into_never_loads(cache_path: str) -> None:
    with Cache(cache_path, size=MiB, on_miss=lambda k: b"loaded") as c:
        assert c.get_into(b"k", bytearray(4)) is None
        assert c.get_many([b"k"]) == {}
        assert c.statistics().loader_calls == 0


def test_get_into_spanning_extents(cache_path: str) -> None:
    """A value scattered over several extents reads back whole and by pieces."""
    with Cache(cache_path, size=MiB, extent_size=256) as c:
        for i in range(3000):  # fragment the pool: small entries, every other one deleted
            c.put(f"s{i}", bytes(200))
        for i in range(0, 3000, 2):
            c.delete(f"s{i}")
        value = os.urandom(100_000)
        c.put(b"big", value)
        assert c.get(b"big") == value
        for offset in (0, 1, 199, 4095, 55_555, 99_999):
            buf = bytearray(1234)
            assert c.get_into(b"big", buf, offset=offset) == len(value)
            piece = value[offset : offset + 1234]
            assert buf[: len(piece)] == piece


def test_checksums_at_every_length_around_a_copy_chunk(cache_path: str) -> None:
    """Puts and gets checksum a value in chunks as they copy it (vmc_hash_copy:
    6 KiB at a time, in 48-byte blocks); reopening recomputes every checksum in
    one pass over the stored bytes (vmc_hash). Values of every length around
    the block and chunk boundaries read back, and all survive the reopening."""
    rng = random.Random(11)
    lengths = {n for edge in (48, 96, 6144, 12288) for n in range(max(0, edge - 49), edge + 50)}
    values = {f"v{n}".encode(): rng.randbytes(n) for n in sorted(lengths)}
    with Cache(cache_path, size=8 * MiB) as c:
        for key, value in values.items():
            c.put(key, value)
        assert all(c.get(key) == value for key, value in values.items())
        assert c.get_many(list(values)) == values
    with Cache(cache_path) as c:
        assert c.info.recovered and c.info.dropped_entries == 0
        assert c.info.recovered_entries == len(values)
        assert c.get_many(list(values)) == values


# ---- put, add, delete, evict ----


def test_put_returns_increasing_timestamps(cache: Cache) -> None:
    stamps = [cache.put(f"k{i % 7}", b"v") for i in range(50)]
    assert stamps == sorted(stamps) and len(set(stamps)) == 50
    assert cache.committed_timestamp >= stamps[-1]


def test_put_replaces(cache: Cache) -> None:
    cache.put(b"k", b"one")
    cache.put(b"k", b"two" * 1000)
    assert cache.get(b"k") == b"two" * 1000
    assert len(cache) == 1


def test_add(cache: Cache) -> None:
    assert cache.add(b"k", b"first") is True
    assert cache.add(b"k", b"second") is False
    assert cache.get(b"k") == b"first"
    stats = cache.statistics()
    assert stats.puts == 1


def test_add_existing_key_evicts_nothing(cache: Cache) -> None:
    fill_until_eviction(cache)
    cache.put(b"k", b"v")
    before = cache.statistics().evictions
    assert cache.add(b"k", bytes(100_000)) is False
    assert cache.statistics().evictions == before


def test_delete(cache_path: str) -> None:
    evicted: list[bytes] = []
    with Cache(cache_path, size=MiB, on_evict=evicted.append) as c:
        c.put(b"k", b"v")
        assert c.delete(b"k") is True
        assert c.delete(b"k") is False
        assert evicted == []
        c[b"x"] = b"y"
        del c[b"x"]
        with pytest.raises(KeyError):
            del c[b"x"]


def test_evict_key_and_lru(cache_path: str) -> None:
    evicted: list[bytes] = []
    with Cache(cache_path, size=MiB, on_evict=evicted.append) as c:
        for key in (b"a", b"b", b"c"):
            c.put(key, b"v")
        assert c.evict(b"b") is True
        assert c.evict(b"b") is False
        assert c.evict() is True  # least recently used: a
        assert evicted == [b"b", b"a"]
        assert c.keys() == [b"c"]
        assert c.evict() is True and c.evict() is False
        assert c.statistics().evictions == 3


def test_policy_none(cache_path: str) -> None:
    with Cache(cache_path, size=MiB, policy="none") as c:
        n = 0
        with pytest.raises(CacheFullError, match='policy is "none"'):
            while True:
                c.put(f"k{n}", bytes(1000))
                n += 1
        assert len(c) == n > 500
        assert c.evict() is False
        assert c.evict(b"k0") is True  # an explicit key may still be evicted
        c.put(b"k0", bytes(1000))
        assert c.statistics().evictions == 1


# ---- LRU order ----


def test_exact_lru_order(cache_path: str) -> None:
    evicted: list[bytes] = []
    with Cache(cache_path, size=MiB, on_evict=evicted.append) as c:
        keys = [f"k{i:04d}".encode() for i in range(400)]
        for key in keys:
            c.put(key, bytes(1000))
        # Touch a random half: order becomes untouched (put order), then touched (get order).
        rng = random.Random(7)
        touched = rng.sample(keys, 200)
        for key in touched:
            assert c.get(key) is not None
        untouched = [k for k in keys if k not in set(touched)]
        expected = untouched + touched
        fresh = 0
        while len(evicted) < len(keys):
            c.put(f"new{fresh}", bytes(1000))
            fresh += 1
        assert evicted[: len(keys)] == expected


def test_contains_does_not_touch_lru_or_count(cache_path: str) -> None:
    evicted: list[bytes] = []
    with Cache(cache_path, size=MiB, on_evict=evicted.append) as c:
        c.put(b"a", b"1")
        c.put(b"b", b"2")
        assert b"a" in c and b"zz" not in c
        assert c.statistics().gets == 0
        c.evict()
        assert evicted == [b"a"]


def test_put_then_get_hits_even_when_evicting(cache_path: str) -> None:
    with Cache(cache_path, size=MiB) as c:
        for i in range(5000):
            c.put(f"k{i}", bytes(700))
            assert c.get(f"k{i}") == bytes(700)


# ---- statistics ----


def test_exact_statistics(cache_path: str) -> None:
    with Cache(cache_path, size=MiB) as c:
        assert c.statistics() == aiovmc.CacheStatistics(
            puts=0,
            gets=0,
            hits=0,
            misses=0,
            evictions=0,
            expirations=0,
            entries=0,
            used_bytes=0,
            capacity=c.capacity,
            loader_calls=0,
            coalesced_gets=0,
            load_takeovers=0,
        )
        c.put(b"a", b"1")
        c.put(b"b", b"2")
        c.add(b"a", b"x")
        c.get(b"a")
        c.get(b"zz")
        c.get_into(b"b", bytearray(1))
        c.get_many([b"a", b"q", b"b"])
        c.delete(b"b")
        stats = c.statistics()
        assert (stats.puts, stats.gets, stats.hits, stats.misses) == (2, 6, 4, 2)
        assert (stats.entries, stats.evictions, stats.expirations) == (1, 0, 0)
        assert stats.used_bytes == 256  # one entry of one 256-byte extent
        with pytest.raises(AttributeError):
            stats.puts = 5  # type: ignore[misc]


def test_statistics_empty_after_evicting_everything(cache: Cache) -> None:
    for i in range(300):
        cache.put(f"k{i}", os.urandom(random.randrange(0, 20000)))
    while cache.evict():
        pass
    stats = cache.statistics()
    assert stats.entries == 0 and stats.used_bytes == 0 and len(cache) == 0


def test_utilisation_random_sizes(cache_path: str) -> None:
    """After the first eviction the pool stays >= 90% full of entries."""
    rng = random.Random(1)
    with Cache(cache_path, size=8 * MiB) as c:
        live: dict[bytes, int] = {}
        c._on_evict = lambda key: live.pop(key)
        i = 0
        while c.statistics().evictions == 0 or i < 3000:
            key = f"k{i}".encode()
            size = rng.randrange(256, 17_920)
            c.put(key, bytes(size))
            live[key] = size
            i += 1
            if c.statistics().evictions:
                stats = c.statistics()
                assert stats.used_bytes / stats.capacity >= 0.90
                assert sum(live.values()) / stats.capacity >= 0.90
        assert sorted(live) == sorted(c.keys())


# ---- TTL ----


def test_ttl(cache_path: str, clock: Clock) -> None:
    # TTLs far above any scheduling delay: only the injected clock makes them expire.
    with Cache(cache_path, size=MiB, ttl=20) as c:
        c.put(b"default", b"v")
        c.put(b"short", b"v", ttl=5)
        c.put(b"long", b"v", ttl=6000)
        assert c.get(b"short") == b"v"
        clock.advance(8)
        assert c.get(b"short") is None and b"short" not in c
        assert c.get(b"default") == b"v"
        clock.advance(15)
        assert c.get(b"default") is None
        assert c.keys() == [b"long"]
        assert c.statistics().expirations == 2


def test_purge_expired(cache: Cache, clock: Clock) -> None:
    for i in range(50):
        cache.put(f"t{i}", b"v", ttl=5)
    cache.put(b"keep", b"v")
    clock.advance(10)
    assert len(cache) == 51  # expired entries still hold room until purged or looked up
    assert cache.purge_expired() == 50
    assert len(cache) == 1 and cache.statistics().expirations == 50
    assert cache.purge_expired() == 0


def test_add_over_expired_entry(cache: Cache, clock: Clock) -> None:
    cache.put(b"k", b"old", ttl=5)
    assert cache.add(b"k", b"new") is False
    clock.advance(10)
    assert cache.add(b"k", b"new") is True
    assert cache.get(b"k") == b"new"


@pytest.mark.parametrize(
    "ttl, text",
    [
        (0, "positive"),
        (-1, "positive"),
        (float("nan"), "positive"),
        (float("inf"), "positive"),
        (1e10, "century"),
    ],
)
def test_invalid_ttl(cache: Cache, ttl: float, text: str) -> None:
    with pytest.raises(CacheConfigError, match=text):
        cache.put(b"k", b"v", ttl=ttl)


# ---- callbacks ----


def test_on_evict_can_reenter(cache_path: str) -> None:
    seen: list[bytes] = []
    holder: dict[str, Cache] = {}

    def on_evict(key: bytes) -> None:
        cache = holder["c"]
        seen.append(key)
        assert cache.get(key) is None  # already gone, and no lock is held
        cache.put(b"log:" + key, b"evicted")

    with Cache(cache_path, size=MiB, on_evict=on_evict) as c:
        holder["c"] = c
        for i in range(3000):
            c.put(f"k{i}", bytes(1000))
        assert seen and all(c.get(b"log:" + k) in (b"evicted", None) for k in seen)


def test_on_miss_can_reenter(cache_path: str) -> None:
    holder: dict[str, Cache] = {}

    def on_miss(key: bytes) -> bytes:
        holder["c"].put(b"side:" + key, b"x")
        return b"loaded"

    with Cache(cache_path, size=MiB, on_miss=on_miss) as c:
        holder["c"] = c
        assert c.get(b"k") == b"loaded"
        assert c.get(b"side:k") == b"x"


def test_on_evict_error_propagates_after_the_put(cache_path: str) -> None:
    def on_evict(key: bytes) -> None:
        raise RuntimeError(f"boom {key!r}")

    with Cache(cache_path, size=MiB, on_evict=on_evict) as c:
        with pytest.raises(RuntimeError, match="boom"):
            for i in range(3000):
                c.put(f"k{i}", bytes(1000))
        assert c.get(f"k{i}") == bytes(1000)  # the put that evicted did store its value


def test_loader_errors_propagate(cache_path: str) -> None:
    def on_miss(key: bytes) -> bytes:
        raise LookupError("no such thing")

    with Cache(cache_path, size=MiB, on_miss=on_miss) as c:
        with pytest.raises(LookupError):
            c.get(b"k")
        assert b"k" not in c


# ---- mapping protocol, bulk operations ----


def test_mapping_protocol_and_bulk(cache: Cache) -> None:
    cache[b"a"] = b"1"
    cache["b"] = bytearray(b"2")
    assert cache[b"a"] == b"1" and cache["b"] == b"2"
    with pytest.raises(KeyError):
        cache[b"c"]
    ts = cache.put_many([(b"c", b"3"), (b"d", b"4")])
    assert ts == cache.put_many({b"e": b"5"}) - 1
    assert cache.put_many([]) == 0
    assert cache.get_many([b"a", "b", b"zz", b"e"]) == {b"a": b"1", b"b": b"2", b"e": b"5"}
    assert sorted(cache.keys()) == [b"a", b"b", b"c", b"d", b"e"]
    assert len(cache) == 5
    cache.clear()
    assert len(cache) == 0 and cache.keys() == [] and cache.statistics().used_bytes == 0


def test_keys_snapshot_with_many_keys(cache_path: str) -> None:
    with Cache(cache_path, size=16 * MiB) as c:
        keys = {os.urandom(30) for _ in range(20000)}
        for key in keys:
            c.put(key, b"")
        assert set(c.keys()) == keys


# ---- life cycle ----


def test_closed_handle(cache_path: str) -> None:
    c = Cache(cache_path, size=MiB)
    c.put(b"k", b"v")
    c.close()
    c.close()
    assert c.closed
    for call in (
        lambda: c.get(b"k"),
        lambda: c.put(b"k", b"v"),
        lambda: b"k" in c,
        lambda: len(c),
        lambda: c.statistics(),
        lambda: c.delete(b"k"),
        lambda: c.keys(),
        lambda: c.clear(),
        lambda: c.reserve(b"k", 10),
        lambda: c.persist(),
        lambda: c.evict(),
        lambda: c.get_into(b"k", bytearray(1)),
        lambda: c.purge_expired(),
    ):
        with pytest.raises(CacheClosedError):
            call()
    assert "closed" in repr(c)


def test_threads_hammering_one_handle(cache_path: str) -> None:
    """Many threads, one handle: every value read is intact and is its key's."""
    errors: list[BaseException] = []
    stop = time.monotonic() + 1.5

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                key = f"k{rng.randrange(300)}".encode()
                op = rng.random()
                if op < 0.5:
                    value = c.get(key)
                    if value is not None:
                        assert value == key * (len(value) // len(key)), key
                elif op < 0.9:
                    c.put(key, key * rng.randrange(0, 3000))
                elif op < 0.95:
                    c.delete(key)
                else:
                    c.evict()
        except BaseException as exc:
            errors.append(exc)

    with Cache(cache_path, size=2 * MiB) as c:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        run_threads(threads)
        assert not errors, errors
        stats = c.statistics()
        assert stats.entries == len(c.keys()) and stats.gets > 0


# ---- reservations, timestamps, persistence ----


def test_reservation_life_cycle(cache: Cache) -> None:
    r = cache.reserve(b"k", 1000, ttl=60)
    assert r.size == 1000 and len(r.buffer) == 1000 and r.timestamp is None
    assert cache.get(b"k") is None  # invisible until published
    r.buffer[:] = b"x" * 1000
    ts = r.publish()
    assert ts == r.timestamp and r.state == "published"
    assert cache.get(b"k") == b"x" * 1000
    with pytest.raises(AiovmcError, match="already published"):
        r.publish()
    with pytest.raises(ValueError):
        r.buffer[0] = 1  # released at publication


def test_reservation_cancel_and_context(cache: Cache) -> None:
    used = cache.statistics().used_bytes
    r = cache.reserve(b"k", 5000)
    assert cache.statistics().used_bytes > used
    r.cancel()
    r.cancel()
    assert cache.statistics().used_bytes == used and b"k" not in cache
    with pytest.raises(AiovmcError, match="cancelled"):
        r.publish()
    with cache.reserve(b"k", 3) as r:
        r.buffer[:] = b"abc"
    assert cache.get(b"k") == b"abc" and r.state == "published"
    with pytest.raises(ZeroDivisionError), cache.reserve(b"k", 3) as r2:
        r2.buffer[:] = b"xyz"
        1 / 0  # noqa: B018
    assert cache.get(b"k") == b"abc" and r2.state == "cancelled"
    assert cache.statistics().used_bytes == used + 256


def test_a_handle_keeps_a_spare_while_it_holds_a_spare_slot(cache_path: str) -> None:
    """Each handle that keeps a spare holds one of the header's spare slots,
    where the file names its spare; a handle that finds every slot held by a
    live handle keeps no spare (what it replaces is freed), and a closed
    handle's slot serves the next handle."""
    with Cache(cache_path, size=MiB) as c:
        c.put(b"k", b"0" * 100)
        one = c.statistics().used_bytes
        handles = [Cache(cache_path) for _ in range(SPARE_SLOTS)]
        try:
            for i, h in enumerate(handles):
                h.put(b"k", bytes([65 + i % 26]) * 100)  # the old entry is h's spare
            assert c.statistics().used_bytes == (1 + SPARE_SLOTS) * one
            with Cache(cache_path) as slotless:
                slotless.put(b"k", b"s" * 100)
                slotless.put(b"k", b"t" * 100)
                assert c.statistics().used_bytes == (1 + SPARE_SLOTS) * one
            handles.pop().close()  # frees its spare and its slot
            assert c.statistics().used_bytes == SPARE_SLOTS * one
            with Cache(cache_path) as late:
                late.put(b"k", b"u" * 100)  # takes the slot given back
                assert c.statistics().used_bytes == (1 + SPARE_SLOTS) * one
            assert c.get(b"k") == b"u" * 100
        finally:
            for h in handles:
                h.close()
        assert c.statistics().used_bytes == one


def test_threads_replacing_on_one_handle_keep_at_most_one_spare(cache_path: str) -> None:
    """Threads of one handle replacing same-sized values at once (on the pure
    cffi path they run in parallel: every call releases the GIL): one refills
    the spare under its shard lock while another publishes under the pool
    lock. The handle still keeps one spare at most, the one its slot names, so
    that closing it leaves exactly the entries' room in use."""
    keys = [[b"t%d-%d" % (t, i) for i in range(50)] for t in range(4)]
    with Cache(cache_path, size=4 * MiB) as other:
        with Cache(cache_path) as c:
            for mine in keys:
                for key in mine:
                    c.put(key, bytes(100))  # new keys: nothing replaced, no spare yet
            used = other.statistics().used_bytes

            def replace(mine: list[bytes]) -> None:
                for n in range(3000):
                    c.put(mine[n % len(mine)], bytes([n % 251]) * 100)

            threads = [threading.Thread(target=replace, args=(mine,)) for mine in keys]
            run_threads(threads)
        stats = other.statistics()
        assert (stats.entries, stats.used_bytes) == (200, used)
        for mine in keys:
            for i, key in enumerate(mine):  # last replaced at n = 2950 + i
                assert other.get(key) == bytes([(2950 + i) % 251]) * 100


def test_threads_reading_while_another_writes_verify_and_count_exactly(cache_path: str) -> None:
    """Threads of one handle get a few keys without the shard lock (optimistic
    reads, counted in the handle's slot by every thread) while a thread of the
    same handle replaces them with values of other sizes and deletes them:
    every value read is its key's, and the hits and misses counted are exactly
    those the readers saw."""
    keys = [b"r%d" % i for i in range(8)]
    seen = [[0, 0] for _ in range(3)]
    errors: list[BaseException] = []
    with Cache(cache_path, size=MiB) as c:
        before = c.statistics()
        start = threading.Barrier(4)

        def read(me: int) -> None:
            rng = random.Random(me)
            try:
                start.wait()
                for _ in range(20_000):
                    key = rng.choice(keys)
                    value = c.get(key)
                    if value is None:
                        seen[me][1] += 1
                    else:
                        seen[me][0] += 1
                        assert value == key * (len(value) // len(key)), key
            except BaseException as exc:
                errors.append(exc)

        def write() -> None:
            rng = random.Random(99)
            start.wait()
            for n in range(6000):
                key = rng.choice(keys)
                if n % 10 == 0:
                    c.delete(key)
                else:
                    c.put(key, key * rng.choice((10, 100, 1000, 5000)))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(3)]
        threads.append(threading.Thread(target=write))
        run_threads(threads)
        assert not errors, errors
        after = c.statistics()
        assert after.hits - before.hits == sum(h for h, _ in seen)
        assert after.misses - before.misses == sum(m for _, m in seen)


def test_a_handles_hits_outlive_it_in_its_slot(cache_path: str) -> None:
    """An optimistic hit is counted in its handle's spare slot, not in the
    shard: closing the handle keeps the count, and the slot's next owner counts
    on from it. The file-wide statistics stay exact throughout."""
    with Cache(cache_path, size=MiB) as c:
        c.put(b"k", b"v")
        base = c.statistics().hits
        with Cache(cache_path) as reader:
            for _ in range(10):
                assert reader.get(b"k") == b"v"
            counted = slot_hits(cache_path)
        assert sum(counted) >= 10  # counted in a slot, the reader's or c's
        assert c.statistics().hits == base + 10  # closed: still counted
        with Cache(cache_path) as next_reader:  # takes the freed slot
            for _ in range(5):
                assert next_reader.get(b"k") == b"v"
        assert c.statistics().hits == base + 15
        assert sum(slot_hits(cache_path)) == sum(counted) + 5


def test_handles_beyond_the_slots_count_hits_under_the_lock(cache_path: str) -> None:
    """48 spare slots: a handle that finds every one held by a live handle
    reads under the shard lock and counts its hits there; the statistics are
    exact either way."""
    with Cache(cache_path, size=MiB) as c:
        c.put(b"k", b"v")
        handles = [Cache(cache_path) for _ in range(SPARE_SLOTS)]
        try:
            for h in handles:
                assert h.get(b"k") == b"v"  # each takes a slot (c holds none yet)
            assert all(slot_hits(cache_path))
            held, base = slot_hits(cache_path), c.statistics().hits
            for _ in range(7):
                assert c.get(b"k") == b"v"
            assert slot_hits(cache_path) == held  # no slot of c's
            assert c.statistics().hits == base + 7
        finally:
            for h in handles:
                h.close()


def test_a_forked_child_keeps_its_own_spare_and_leaves_its_parents(cache_path: str) -> None:
    """A fork()ed child forgets its parent's spare and spare slot: its
    replacements keep a spare of its own in a slot of its own, which its
    close gives back, while the parent's spare stays the parent's."""
    with Cache(cache_path, size=MiB) as c, Cache(cache_path) as other:
        c.put(b"k", b"0" * 100)
        c.put(b"j", b"0" * 100)
        c.put(b"k", b"1" * 100)  # the old k is c's spare
        with_spare = other.statistics().used_bytes
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read)
            c.put(b"j", b"2" * 100)  # the child's own spare: the old j
            ok = other.statistics().used_bytes == with_spare + (with_spare // 3)
            c.close()  # frees the child's spare and slot, not the parent's
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
        os.close(write)
        assert os.read(read, 1) == b"1"
        os.close(read)
        assert os.waitpid(pid, 0)[1] == 0
        assert other.statistics().used_bytes == with_spare
        c.put(b"k", b"3" * 100)  # refills the parent's spare
        assert other.statistics().used_bytes == with_spare
        assert (c.get(b"k"), c.get(b"j")) == (b"3" * 100, b"2" * 100)


def test_a_replaced_small_entry_is_the_spare_of_the_next_put(cache_path: str) -> None:
    """A replacement keeps the old entry's extent as its handle's spare (room
    in use), which the handle's next put of an entry of the same size fills;
    a put of another size frees it, and so do a delete, a clear and closing
    the handle: an emptied cache holds no room."""
    with Cache(cache_path, size=MiB) as c, Cache(cache_path) as other:
        c.put(b"k", b"1" * 100)
        one = other.statistics().used_bytes
        c.put(b"k", b"2" * 100)
        assert other.statistics().used_bytes == 2 * one  # the entry and the spare
        c.put(b"j", b"3" * 100)
        assert other.statistics().used_bytes == 2 * one  # the spare was filled
        c.put(b"k", b"4" * 3000)
        big = other.statistics().used_bytes - 2 * one  # the old 100 B entry is the spare
        c.put(b"j", b"5" * 100)  # and is filled
        assert other.statistics().used_bytes == 2 * one + big
        c.put(b"k", b"6" * 3000)  # the old 3000 B entry is the spare...
        c.put(b"new", b"7" * 100)  # ...which does not fit: freed
        assert other.statistics().used_bytes == 2 * one + big
        c.put(b"j", b"8" * 100)
        assert other.statistics().used_bytes == 3 * one + big
        c.close()
        assert other.statistics().used_bytes == 2 * one + big
        assert [other.get(k) for k in (b"k", b"j", b"new")] == [b"6" * 3000, b"8" * 100, b"7" * 100]
        other.put(b"j", b"9" * 100)
        other.delete(b"new")
        assert other.statistics().used_bytes == one + big
        other.put(b"j", b"0" * 100)
        other.clear()
        assert other.statistics().used_bytes == 0


def test_open_handles_spares_count_as_open_reservations(cache_path: str) -> None:
    """A spare is a reservation of its live handle, out of eviction's reach:
    a few idle handles' spares, scattered over a full pool, can leave no run
    long enough for a reservation of half the cache. The error says so, and
    the reservation fits once those handles close."""
    with Cache(cache_path, size=4 * MiB) as c:
        n = c.capacity // 256
        for i in range(n):  # one-extent entries fill the pool
            c.put(b"k%d" % i, bytes(150))
        idle = [Cache(cache_path) for _ in range(8)]
        for j, h in enumerate(idle):  # each keeps a spare, an eighth of the pool apart
            h.put(b"k%d" % ((2 * j + 1) * n // 16), b"x" * 150)
        with pytest.raises(aiovmc.CacheFullError, match="each open handle's spare"):
            c.reserve(b"big", c.capacity // 2)
        for h in idle:
            h.close()
        c.reserve(b"big", c.capacity // 2).cancel()


def test_reservation_replaces_and_close_cancels(cache_path: str) -> None:
    c = Cache(cache_path, size=MiB)
    c.put(b"k", b"old")
    with c.reserve(b"k", 3) as r:
        r.buffer[:] = b"new"
    assert c.get(b"k") == b"new"
    c.reserve(b"open", 10_000)
    c.close()
    with Cache(cache_path) as c2:
        assert c2.keys() == [b"k"]
        assert c2.statistics().used_bytes == 256


def test_reservation_that_cannot_fit(cache_path: str) -> None:
    with Cache(cache_path, size=MiB, policy="none") as c:
        held = []
        with pytest.raises(CacheFullError, match="policy"):
            for i in range(20):
                held.append(c.reserve(f"r{i}", 100_000))
        assert 5 <= len(held) < 10
        for r in held:
            r.cancel()
        assert c.statistics().used_bytes == 0
    with Cache(cache_path, size=MiB, reset=True) as c:
        r = c.reserve(b"a", c.capacity // 2)
        with pytest.raises(CacheFullError, match="reservation"):
            c.reserve(b"b", c.capacity // 2 + 4096)
        r.cancel()


def test_reservation_evicts_to_make_contiguous_room(cache: Cache) -> None:
    for i in range(3000):
        cache.put(f"k{i}", bytes(1000))
    with cache.reserve(b"big", 2 * MiB) as r:
        r.buffer[:] = b"z" * (2 * MiB)
    assert cache.get(b"big") == b"z" * (2 * MiB)


def test_persist_and_timestamps(cache: Cache) -> None:
    assert cache.persisted_timestamp == 0
    ts = cache.put(b"k", b"v")
    assert cache.committed_timestamp >= ts
    assert cache.persist() >= ts
    assert cache.persisted_timestamp >= ts
    before = cache.persisted_timestamp
    cache.persist()
    assert cache.persisted_timestamp >= before


def test_persisted_entries_survive_reopen_on_disk(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "disk.cache")
    with Cache(path, size=MiB) as c:
        stamps = [c.put(f"k{i}", f"v{i}".encode()) for i in range(100)]
        assert c.persist() >= stamps[-1]
    with Cache(path) as c:
        assert c.persisted_timestamp >= stamps[-1]
        assert all(c.get(f"k{i}") == f"v{i}".encode() for i in range(100))
        assert c.put(b"next", b"v") > stamps[-1]


def test_value_bytes_cannot_pass_for_allocator_metadata(cache_path: str) -> None:
    """A value forging a free-extent footer and tag inside its own extent must
    not make the allocator merge over it when its neighbour is freed."""
    free_tag = (2 | (0x45455246 << 32)).to_bytes(8, "little")  # FREE, 2 units
    foot_tag = (2 | (0x544F4F46 << 32)).to_bytes(8, "little")  # FOOT, 2 units
    value = bytearray(os.urandom(1024 - 56 - 1))  # exactly 4 extents of 256 with key b"a"
    value[512 - 57 : 512 - 57 + 8] = free_tag  # at the start of the extent's third unit
    value[-8:] = foot_tag  # where a free extent's footer would be
    with Cache(cache_path, size=MiB) as c:
        c.put(b"a", value)
        c.put(b"b", bytes(100))  # the right neighbour
        c.delete(b"b")  # freeing it must not believe the forged footer
        for i in range(50):
            c.put(f"filler{i}", os.urandom(300))
        assert c.get(b"a") == bytes(value)
    with Cache(cache_path) as c:
        assert c.get(b"a") == bytes(value)


def test_timestamps_after_close_raise(cache_path: str) -> None:
    c = Cache(cache_path, size=MiB)
    c.close()
    for name in ("committed_timestamp", "persisted_timestamp"):
        with pytest.raises(CacheClosedError):
            getattr(c, name)


def test_large_copies_race_replacements_and_deletes(cache_path: str) -> None:
    """Large values are copied without the shard lock (pinned): every read is
    one whole value, and no pinned entry outlives its last reader."""
    size = 1 << 20
    values = [bytes([i]) * size for i in range(4)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                value = c.get(b"big")
                assert value is None or value in values
                buf = bytearray(300_000)
                if c.get_into(b"big", buf, offset=500_000) is not None:
                    assert buf[:1] * len(buf) == buf
        except BaseException as exc:
            errors.append(exc)

    with Cache(cache_path, size=16 * MiB) as c:
        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(300):
            if i % 7 == 6:
                c.delete(b"big")
            else:
                c.put(b"big", values[i % 4])
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors
        c.delete(b"big")
        assert c.statistics().used_bytes == 0


def test_on_evict_error_during_reserve_leaks_nothing(cache_path: str) -> None:
    def on_evict(key: bytes) -> None:
        raise RuntimeError("callback failed")

    with Cache(cache_path, size=MiB, on_evict=on_evict) as c:
        for i in range(10):
            c._on_evict = None
            c.put(f"k{i}", bytes(90_000))
        c._on_evict = on_evict
        with pytest.raises(RuntimeError, match="callback failed"):
            c.reserve(b"r", 500_000)
        assert b"r" not in c
        stats = c.statistics()
        assert stats.used_bytes == stats.entries * 90_112  # 352 extents each, nothing else


def test_failed_publish_cancels(cache_path: str) -> None:
    c = Cache(cache_path, size=MiB)
    r = c.reserve(b"k", 10)
    other = Cache(cache_path)
    c._close_native()  # the core refuses the publication
    with pytest.raises(CacheClosedError):
        r.publish()
    assert r.state == "cancelled"
    other.close()


def test_signal_handler_using_the_cache_never_swaps_values(cache_path: str) -> None:
    """A signal handler (or finalizer) may run between a core call and the
    slicing of its result on the same thread: it must not clobber it."""
    import signal

    with Cache(cache_path, size=4 * MiB) as c:
        c.put(b"mine", b"M" * 100)
        c.put(b"other", b"O" * 80)
        seen: list[bytes | None] = []
        signal.signal(signal.SIGALRM, lambda *_: seen.append(c.get(b"other")))
        signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
        try:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                assert c.get(b"mine") == b"M" * 100
                assert c._get_inline(b"mine", 1 << 20) == b"M" * 100
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        assert seen and all(v == b"O" * 80 for v in seen)


def test_concurrent_publish_of_one_reservation(cache_path: str) -> None:
    with Cache(cache_path, size=4 * MiB) as c:
        for round_ in range(50):
            r = c.reserve(b"k", 100)
            r.buffer[:] = bytes([round_ % 256]) * 100
            outcomes: list[object] = []
            barrier = threading.Barrier(2)

            def publish(
                r: aiovmc.Reservation = r,
                barrier: threading.Barrier = barrier,
                outcomes: list[object] = outcomes,
            ) -> None:
                barrier.wait()
                try:
                    outcomes.append(c._publish(r._id, r.key, r.size))
                except AiovmcError as exc:
                    outcomes.append(exc)

            threads = [threading.Thread(target=publish) for _ in range(2)]
            run_threads(threads)
            assert sum(isinstance(o, int) for o in outcomes) == 1, outcomes
            assert c.get(b"k") == bytes([round_ % 256]) * 100
        stats = c.statistics()
        assert stats.entries == len(c.keys()) == 1 and stats.puts == 50


def test_evict_skips_any_number_of_expired_entries(cache_path: str, clock: Clock) -> None:
    evicted: list[bytes] = []
    with Cache(cache_path, size=4 * MiB, on_evict=evicted.append) as c:
        for i in range(1000):
            c.put(f"t{i}", b"v", ttl=5)
        clock.advance(10)
        c.put(b"live", b"v")
        assert c.evict() is True and evicted == [b"live"]
        assert c.statistics().expirations == 1000


def test_policy_none_reuses_the_room_of_expired_entries(cache_path: str, clock: Clock) -> None:
    with Cache(cache_path, size=MiB, policy="none") as c:
        i = 0
        with pytest.raises(CacheFullError):
            while True:
                c.put(f"k{i}", bytes(1000), ttl=5)
                i += 1
        clock.advance(10)
        assert c.keys() == []
        c.put(b"after", bytes(1000))  # the expired entries' room is reused
        assert c.get(b"after") == bytes(1000)


def test_reader_killed_mid_copy_leaves_nothing_behind(cache_path: str) -> None:
    """Large values are copied without the shard lock; a reader killed in the
    middle of such a copy must leave no trace (no pinned, unfreeable space)."""
    import multiprocessing
    import signal

    big = os.urandom(40 * MiB)
    with Cache(cache_path, size=64 * MiB) as c:
        c.put(b"big", big)
        ctx = multiprocessing.get_context("fork")
        for delay in (0.005, 0.02, 0.05):
            reading = ctx.Event()
            reader = ctx.Process(target=_read_forever, args=(cache_path, reading))
            reader.start()
            assert reading.wait(60)
            time.sleep(delay)  # a kill somewhere in a later copy
            os.kill(reader.pid, signal.SIGKILL)  # type: ignore[arg-type]
            reader.join(10)
        assert c.get(b"big") == big
        assert c.delete(b"big")
        assert c.statistics().used_bytes == 0


def _read_forever(path: str, reading: Any) -> None:
    with Cache(path) as c:
        c.get(b"big")
        reading.set()
        while True:
            c.get(b"big")


def test_stale_reservation_id_cannot_touch_a_newer_one(cache_path: str) -> None:
    """Reservation ids carry a nonce: an old id whose extent now holds another
    reservation of this process is refused instead of cancelling that one."""
    with Cache(cache_path, size=MiB) as c:
        r1 = c.reserve(b"a", 100)
        old_id = r1._id
        r1.publish()
        c.delete(b"a")  # frees the extent; the next reservation reuses it
        r2 = c.reserve(b"b", 100)
        assert (r2._id & 0xFFFFFFFF) == (old_id & 0xFFFFFFFF)  # same extent
        with pytest.raises(AiovmcError, match="not open"):
            c._cancel(old_id)
        r2.buffer[:] = b"x" * 100
        r2.publish()
        assert c.get(b"b") == b"x" * 100


def test_cancelling_twice_frees_once(cache_path: str) -> None:
    with Cache(cache_path, size=MiB) as c:
        x = c.reserve(b"x", 1000)
        y = c.reserve(b"y", 1000)
        x_id, y_id = x._id, y._id
        x.cancel()
        y.cancel()
        for rid in (x_id, y_id):
            with pytest.raises(AiovmcError, match="not open"):
                c._cancel(rid)
        assert c.statistics().used_bytes == 0
        c.put(b"k", bytes(5000))
        assert c.get(b"k") == bytes(5000)


def test_reset_cut_short_can_be_reset_again(cache_path: str) -> None:
    """A reset interrupted after dropping the old contents leaves the header
    page: the file is refused as truncated, and reset=True still accepts it."""
    Cache(cache_path, size=MiB).close()
    os.truncate(cache_path, 4096)
    with pytest.raises(aiovmc.CacheFormatError, match="truncated"):
        Cache(cache_path)
    with Cache(cache_path, size=MiB, reset=True) as c:
        c.put(b"k", b"v")
        assert c.get(b"k") == b"v"


def test_an_async_loader_is_refused_with_the_way_out(cache_path: str) -> None:
    async def load(key: bytes) -> bytes:
        return key

    with pytest.raises(TypeError, match="cannot await it; an async loader goes with AsyncCache"):
        Cache(cache_path, size=MiB, on_miss=load)  # type: ignore[arg-type]
    with Cache(cache_path, size=MiB, on_miss=lambda key: load(key)) as c:  # type: ignore[arg-type,return-value]
        with pytest.raises(TypeError, match=r"^on_miss returned coroutine: the synchronous"):
            c.get(b"k")
        assert b"k" not in c


def test_entering_a_closed_handle_fails_at_once(cache_path: str) -> None:
    c = Cache(cache_path, size=MiB)
    c.close()
    with pytest.raises(CacheClosedError, match="closed"), c:
        pass
    with Cache(size=MiB) as private:
        assert repr(private.info).startswith("NativeInfo(capacity=")
