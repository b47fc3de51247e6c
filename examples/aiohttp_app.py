"""An aiohttp app whose GET responses are cached in one file shared by every worker.

    gunicorn examples.aiohttp_app:make_app -k aiohttp.GunicornWebWorker -w 4

or run this file to see it answer a few requests (it serves on a free port).
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import ClientSession, web

from aiovmc.integrations.aiohttp import invalidate, setup_cache

CACHE = "/dev/shm/aiovmc-aiohttp-example.cache"
handler_calls = 0


async def user(request: web.Request) -> web.Response:
    global handler_calls
    handler_calls += 1
    await asyncio.sleep(0.1)  # a slow database
    return web.json_response({"user": request.match_info["name"]},
                             headers={"cache-control": "max-age=300"})


async def make_app() -> web.Application:
    app = web.Application()
    setup_cache(app, path=CACHE, size="64MiB", ttl=60)
    app.router.add_get("/users/{name}", user)
    return app


async def main() -> None:
    runner = web.AppRunner(await make_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://127.0.0.1:{port}/users/ada"
    async with ClientSession() as session:

        async def get() -> str:
            async with session.get(url) as response:
                return response.headers["X-Cache"]

        labels = await asyncio.gather(*(get() for _ in range(20)))
        print(f"20 concurrent requests, {handler_calls} handler call: {sorted(set(labels))}")
        async with session.get(url) as response:
            print(f"then: {response.headers['X-Cache']}, {response.headers['Cache-Control']}, "
                  f"{await response.json()}")
        print(f"invalidated: {await invalidate(CACHE, url)}")
        async with session.get(url) as response:
            print(f"after: {response.headers['X-Cache']}")
    await runner.cleanup()
    os.unlink(CACHE)


if __name__ == "__main__":
    asyncio.run(main())
