"""aiovmc with asyncio: 100 concurrent calls, one backend call, then hits."""

import asyncio

from aiovmc import AsyncCache
from aiovmc.functools import cached

# A private cache; pass a path (e.g. "/dev/shm/app.cache") to share it between processes.
cache = AsyncCache(size="16MiB")


@cached(cache, ttl=60)
async def fetch_user(user_id: int) -> dict[str, object]:
    await asyncio.sleep(0.05)  # a slow backend
    return {"id": user_id, "name": f"user{user_id}"}


async def main() -> None:
    async with cache:
        users = await asyncio.gather(*(fetch_user(7) for _ in range(100)))
        await fetch_user(7)  # a hit
        stats = cache.statistics()
        print(f"{len(users) + 1} calls, {stats.loader_calls} backend call: {users[0]}")
        print(f"hits={stats.hits} misses={stats.misses} coalesced={stats.coalesced_gets}")


asyncio.run(main())
