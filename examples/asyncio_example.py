"""aiovmc with asyncio: 100 concurrent calls, one backend call, then hits.

Every process that opens /dev/shm/aiovmc-example-users.cache shares these results.
"""

import asyncio

from aiovmc import AsyncCache
from aiovmc.functools import cached

# A named file: every worker process of the app opens the same path and shares it.
cache = AsyncCache("/dev/shm/aiovmc-example-users.cache", size="16MiB")
backend_calls = 0


@cached(cache, ttl=60, version=1)  # bump version when fetch_user's result changes shape
async def fetch_user(user_id: int) -> dict[str, object]:
    global backend_calls
    backend_calls += 1
    await asyncio.sleep(0.05)  # a slow backend
    return {"id": user_id, "name": f"user{user_id}"}


async def main() -> None:
    async with cache:
        await fetch_user.invalidate(7)  # start cold, even if an earlier run left it
        users = await asyncio.gather(*(fetch_user(7) for _ in range(100)))
        await fetch_user(7)  # a hit
        print(f"{len(users) + 1} calls, {backend_calls} backend call: {users[0]}")


asyncio.run(main())
