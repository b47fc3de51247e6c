"""A pure-Python reference model of the cache's observable behaviour.

It knows nothing of bytes and extents: it cannot predict *when* the real cache
must evict, so the real cache reports its evictions (on_evict) and the model
checks that each victim is exactly its own least recently used key. Everything
else -- values, presence, recency, counters -- the model predicts.
"""

from __future__ import annotations

from collections import OrderedDict


class ModelCache:
    def __init__(self) -> None:
        self.data: OrderedDict[bytes, bytes] = OrderedDict()  # least recent first
        self.gets = self.hits = self.misses = self.puts = self.evictions = 0

    def get(self, key: bytes) -> bytes | None:
        self.gets += 1
        if key not in self.data:
            self.misses += 1
            return None
        self.hits += 1
        self.data.move_to_end(key)
        return self.data[key]

    def put(self, key: bytes, value: bytes) -> None:
        self.data[key] = value
        self.data.move_to_end(key)
        self.puts += 1

    def add(self, key: bytes, value: bytes) -> bool:
        if key in self.data:
            return False
        self.put(key, value)
        return True

    def delete(self, key: bytes) -> bool:
        return self.data.pop(key, None) is not None

    def evict(self, key: bytes | None = None) -> bytes | None:
        """Evict `key`, or the least recently used key; the key evicted, or None."""
        if key is None:
            if not self.data:
                return None
            key = next(iter(self.data))
        elif key not in self.data:
            return None
        del self.data[key]
        self.evictions += 1
        return key

    def clear(self) -> None:
        self.data.clear()

    def __contains__(self, key: bytes) -> bool:
        return key in self.data

    def __len__(self) -> int:
        return len(self.data)
