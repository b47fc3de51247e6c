"""One cache per process, opened at first use: what every integration needs to
work unchanged under `uvicorn --workers N` (spawned workers), gunicorn with or
without --preload (forked workers) and a single process."""

from __future__ import annotations

import os

from .._async_cache import AsyncCache

__all__ = ["LazyCache"]


class LazyCache:
    """An `AsyncCache` given (`cache`), or opened from `path` (created with
    `size` if it does not exist) in each process at its first use."""

    __slots__ = ("_cache", "path", "size")

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        size: int | str | None,
        cache: AsyncCache | None,
    ) -> None:
        if (cache is None) == (path is None):
            raise TypeError("give either path= (and size= to create the file) or cache=")
        if cache is not None and not isinstance(cache, AsyncCache):
            raise TypeError(f"cache must be an aiovmc.AsyncCache, not {type(cache).__name__}")
        self.path = None if path is None else os.fspath(path)
        self.size = size
        self._cache = cache

    def get(self) -> AsyncCache:
        """This process's cache, opened now if need be. (A handle opened before
        fork() keeps working in the child, so one opened in gunicorn's master
        with --preload serves the workers too.)"""
        cache = self._cache
        if cache is None:
            cache = self._cache = AsyncCache(self.path, size=self.size)
        return cache

    async def aclose(self) -> None:
        """Close the cache if this object opened it."""
        if self.path is not None and self._cache is not None:
            cache, self._cache = self._cache, None
            await cache.aclose()
