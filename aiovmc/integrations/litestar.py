"""`AiovmcStore`: a litestar `Store` in an aiovmc file, so response caching,
sessions and rate limits share one store across every worker on the host.

    from litestar import Litestar
    from litestar.config.response_cache import ResponseCacheConfig
    from aiovmc.integrations.litestar import AiovmcStore

    store = AiovmcStore("/dev/shm/app.cache", size="256MiB")
    app = Litestar(route_handlers=[...], stores={"response_cache": store},
                   response_cache_config=ResponseCacheConfig(store="response_cache"))

litestar is imported when this module is.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from types import TracebackType

from litestar.stores.base import NamespacedStore

from .._async_cache import AsyncCache
from ._open import LazyCache

__all__ = ["AiovmcStore"]

_PREFIX = b"aiovmc.litestar\x00"


def _segment(namespace: str) -> bytes:
    """A namespace's part of a key, length-prefixed so that no key of one
    namespace can spell a key of another."""
    raw = namespace.encode()
    return b"n" + len(raw).to_bytes(4, "little") + raw


def _seconds(value: int | timedelta | None) -> float | None:
    if isinstance(value, timedelta):
        value = int(value.total_seconds())
    if value is not None and value < 0:
        raise ValueError(f"an expiry is a number of seconds >= 0, not {value!r}")
    return value or None  # as litestar's stores: 0 means no expiry


class AiovmcStore(NamespacedStore):
    """litestar's `NamespacedStore` on an aiovmc cache.

    ``AiovmcStore(path=None, *, size=None, cache=None, namespace="LITESTAR")``:
    give the cache file's `path` (opened in each worker at first use; `size`
    creates it) or an open `AsyncCache` as `cache`. Values keep their expiry in
    the file, so `expires_in` and expiry are exact and shared by every process.
    `delete_all` removes the namespace and its children (a scan of the keys, as
    litestar's redis store does); with ``namespace=None`` it clears the cache.
    ``get(key, renew_for=...)`` re-stores the value with its new expiry: a `set`
    of the same key by another process in between can be overwritten by the
    value read (redis's GETEX is atomic; this is not).
    """

    __slots__ = ("_cache", "_prefix")

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        size: int | str | None = None,
        cache: AsyncCache | None = None,
        namespace: str | None = "LITESTAR",
    ) -> None:
        self._cache = LazyCache(path, size, cache)
        self.namespace = namespace
        self._prefix = _PREFIX + (b"" if namespace is None else _segment(namespace))

    def with_namespace(self, namespace: str) -> AiovmcStore:
        """A store in the child namespace `namespace` of this one, on the same cache."""
        child = AiovmcStore.__new__(AiovmcStore)
        child._cache = self._cache
        child.namespace = namespace if self.namespace is None else f"{self.namespace}_{namespace}"
        child._prefix = self._prefix + _segment(namespace)
        return child

    def _key(self, key: str) -> bytes:
        return self._prefix + b"k" + key.encode()

    async def set(
        self, key: str, value: str | bytes, expires_in: int | timedelta | None = None
    ) -> None:
        if isinstance(value, str):
            value = value.encode()
        await self._cache.get().put(self._key(key), value, ttl=_seconds(expires_in))

    async def get(self, key: str, renew_for: int | timedelta | None = None) -> bytes | None:
        cache = self._cache.get()
        k = self._key(key)
        if renew_for is None:
            return await cache.get(k)
        entry = await cache.get_entry(k)
        if entry is None:
            return None
        if entry.expires_at is not None:  # renewing applies to values stored with an expiry
            await cache.put(k, entry.value, ttl=_seconds(renew_for))
        return entry.value

    async def delete(self, key: str) -> None:
        await self._cache.get().delete(self._key(key))

    async def delete_all(self) -> None:
        cache = self._cache.get()
        if self.namespace is None:
            await cache.clear()
            return
        stored = cache.cache.keys()  # a snapshot list
        for key in stored:
            if key.startswith(self._prefix):
                await cache.delete(key)

    async def exists(self, key: str) -> bool:
        return self._key(key) in self._cache.get().cache

    async def expires_in(self, key: str) -> int | None:
        entry = await self._cache.get().get_entry(self._key(key))
        if entry is None or entry.expires_at is None:
            return None
        return max(0, int(entry.expires_at - time.time()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self._cache.aclose()
