"""A cache of rendered pages read from disk, shared by worker processes (asyncio + aiofiles).

Each worker renders a page only if no process on the host has it in the cache yet:
the loader reads the source file with aiofiles (asyncio only; the library itself uses
anyio's file API, which works under trio too) and renders it. Needs aiofiles.
"""

import asyncio
import html
import multiprocessing
import os
import tempfile
from pathlib import Path

import aiofiles

from aiovmc import AsyncCache, Cache

CACHE = "/dev/shm/aiovmc-example-rendered.cache"


async def render(site: Path, key: bytes) -> bytes | None:
    """The loader: read pages/<name>.txt and render it to HTML; None if there is no such page."""
    source = site / (key.decode().removeprefix("/") + ".txt")
    try:
        async with aiofiles.open(source) as f:
            text = await f.read()
    except FileNotFoundError:
        return None  # nothing is cached: a page created later will be found
    title, _, body = text.partition("\n")
    return f"<h1>{html.escape(title)}</h1><p>{html.escape(body.strip())}</p>".encode()


async def serve(site: Path, renders: "multiprocessing.Queue[int]") -> None:
    count = 0

    async def load(key: bytes) -> bytes | None:
        nonlocal count
        page = await render(site, key)
        count += page is not None
        return page

    async with AsyncCache(CACHE, on_miss=load) as cache:  # attach to the parent's file
        pages = await asyncio.gather(*(cache.get(f"/{name}") for name in ["home", "about"] * 50))
        assert pages[0] is not None and pages[0].startswith(b"<h1>Home</h1>"), pages[0]
        assert await cache.get("/missing", b"404") == b"404"
    renders.put(count)


def worker(site: str, renders: "multiprocessing.Queue[int]") -> None:
    asyncio.run(serve(Path(site), renders))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp)
        (site / "home.txt").write_text("Home\nWelcome to the site.")
        (site / "about.txt").write_text("About\nWe cache <rendered> pages.")
        with Cache(CACHE, size="16MiB", reset=True) as cache:  # create it, empty
            ctx = multiprocessing.get_context("spawn")
            renders: multiprocessing.Queue[int] = ctx.Queue()
            procs = [ctx.Process(target=worker, args=(tmp, renders)) for _ in range(3)]
            for p in procs:
                p.start()
            counts = [renders.get(timeout=60) for _ in procs]
            for p in procs:
                p.join()
            print(f"3 workers x 100 gets of 2 pages: {cache.statistics().entries} pages cached, "
                  f"rendered {sum(counts)} times in all, "
                  f"{cache.get(b'/about').decode()}")
    os.unlink(CACHE)


if __name__ == "__main__":
    main()
