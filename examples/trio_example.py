"""aiovmc with trio: a coalesced read-through loader, then a reserved write.

Needs trio (`pip install "aiovmc[trio]"`).
"""

import trio

from aiovmc import AsyncCache

calls = 0


async def load_page(key: bytes) -> bytes:
    global calls
    calls += 1
    await trio.sleep(0.05)  # a slow backend
    return b"<html>" + key + b"</html>"


async def main() -> None:
    path = "/dev/shm/aiovmc-example-pages.cache"  # shared by every process that opens it
    async with AsyncCache(path, size="16MiB", on_miss=load_page) as cache:
        await cache.clear()  # start cold, even if an earlier run left entries
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(cache.get, "/index")
        print(f"50 gets, {calls} load: {cache.get_nowait('/index')!r}")

        async with cache.reserve("report", 5) as r:  # filled in place, then published
            r.buffer[:] = b"ready"
        persisted = await cache.wait_persisted(r.timestamp)
        print(f"report={await cache.get('report')!r} persisted at timestamp {persisted}")


trio.run(main)
