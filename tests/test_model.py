"""Hypothesis drives the real cache and the reference model with the same
operations, including closing and reopening the file (recovery), and compares
every observable result."""

from __future__ import annotations

import os
import uuid

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from aiovmc import Cache

from .model import ModelCache

KEYS = st.sampled_from([b"k%d" % i for i in range(40)] + [b"", b"x" * 300])
SMALL = st.binary(max_size=80)
LARGE = st.integers(10_000, 120_000).map(lambda n: bytes([n % 251]) * n)
VALUES = st.one_of(SMALL, LARGE)
EXTENT, ENTRY_HEADER = 256, 56  # the file's extent size; an entry's fixed header


class CacheVersusModel(RuleBasedStateMachine):
    # None: the default entry budget, which 40 keys never reach (byte evictions only)
    MAX_ENTRIES: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.path = f"/dev/shm/aiovmc-model-{uuid.uuid4().hex}.cache"
        self.evicted: list[bytes] = []
        self.cache = Cache(
            self.path, size=1 << 20, max_entries=self.MAX_ENTRIES, on_evict=self.evicted.append
        )
        self.model = ModelCache()

    def teardown(self) -> None:
        self.cache.close()
        os.unlink(self.path)

    def absorb_evictions(self, key: bytes | None = None) -> None:
        """Each key the real cache evicted must be the model's LRU key, in order.

        Except where the core needs contiguous room (a reservation, a key that does
        not fit one extent with the entry header): there it may evict the cheapest
        stretch of the pool instead (docs/api.md), so each victim must only be a key
        the model holds."""
        lru_order = key is not None and len(key) <= EXTENT - ENTRY_HEADER
        for victim in self.evicted:
            assert self.model.evict(None if lru_order else victim) == victim
        self.evicted.clear()

    @rule(key=KEYS, value=VALUES)
    def put(self, key: bytes, value: bytes) -> None:
        self.cache.put(key, value)
        self.absorb_evictions(key)
        self.model.put(key, value)

    @rule(key=KEYS, value=VALUES)
    def add(self, key: bytes, value: bytes) -> None:
        stored = self.cache.add(key, value)
        self.absorb_evictions(key)
        assert stored == self.model.add(key, value)

    @rule(key=KEYS)
    def get(self, key: bytes) -> None:
        assert self.cache.get(key) == self.model.get(key)

    @rule(key=KEYS, offset=st.integers(0, 130_000), length=st.integers(0, 5000))
    def get_into(self, key: bytes, offset: int, length: int) -> None:
        buffer = bytearray(length)
        total = self.cache.get_into(key, buffer, offset=offset)
        expected = self.model.get(key)
        if expected is None:
            assert total is None
        else:
            assert total == len(expected)
            piece = expected[offset : offset + length]
            assert buffer[: len(piece)] == piece

    @rule(key=KEYS)
    def delete(self, key: bytes) -> None:
        assert self.cache.delete(key) == self.model.delete(key)

    @rule(key=st.one_of(st.none(), KEYS))
    def evict(self, key: bytes | None) -> None:
        evicted = self.cache.evict(key)
        assert self.evicted == ([] if not evicted else [self.model.evict(key)])
        self.evicted.clear()

    @rule(key=KEYS)
    def contains(self, key: bytes) -> None:
        assert (key in self.cache) == (key in self.model)

    @rule(key=KEYS, value=LARGE, publish=st.booleans())
    def reserve(self, key: bytes, value: bytes, publish: bool) -> None:
        reservation = self.cache.reserve(key, len(value))
        self.absorb_evictions()
        reservation.buffer[:] = value
        if publish:
            reservation.publish()
            self.model.put(key, value)
        else:
            reservation.cancel()

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def clear(self) -> None:
        self.cache.clear()
        self.model.clear()

    @rule()
    def reopen(self) -> None:
        """Close and reopen: the first opener rebuilds everything from the pool."""
        self.cache.close()
        self.cache = Cache(self.path, on_evict=self.evicted.append)
        assert self.cache.info.recovered

    @invariant()
    def same_contents_and_counters(self) -> None:
        stats = self.cache.statistics()
        assert stats.entries == len(self.model) == len(self.cache)
        assert set(self.cache.keys()) == set(self.model.data)
        assert (stats.gets, stats.hits, stats.misses) == (
            self.model.gets, self.model.hits, self.model.misses
        )
        assert stats.puts == self.model.puts
        assert stats.evictions == self.model.evictions
        assert 0 <= stats.used_bytes <= stats.capacity
        assert (stats.used_bytes == 0) == (stats.entries == 0)
        assert stats.entries <= self.cache.info.max_entries


CacheVersusModel.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_versus_model = CacheVersusModel.TestCase


class CacheAtEntryBudgetVersusModel(CacheVersusModel):
    """The same with a budget of 6 entries: puts evict because the budget is
    reached as well as because the pool is full, and either way every victim
    is the model's least recently used key."""

    MAX_ENTRIES = 6


CacheAtEntryBudgetVersusModel.TestCase.settings = CacheVersusModel.TestCase.settings
test_cache_at_entry_budget_versus_model = CacheAtEntryBudgetVersusModel.TestCase
