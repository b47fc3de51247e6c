"""A worker process of a "host" for the TieredCache tests: opens a TieredCache on the
host's file and runs the commands the test sends over a pipe.

Commands are tuples ``(id, name, *args)``; each gets one reply ``(id, result)`` or
``(id, "error", repr)``. Long commands (a storm of gets) run in the background, so the
test can act (e.g. SIGKILL another process) while they wait.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from typing import Any

import anyio
import anyio.to_thread

import aiovmc

SPAWN = multiprocessing.get_context("spawn")


def make_loader(spec: tuple[Any, ...]) -> Any:
    """("count", path, ...) loaders append one byte to ``path`` per call (the calls
    of every process add up there), then: "value" returns a value after a small
    delay; "block" never returns; "none" returns None."""
    kind, path = spec[0], spec[1]

    async def load(key: bytes) -> bytes | None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, b"x")
        os.close(fd)
        if kind == "block":
            await anyio.sleep_forever()
        await anyio.sleep(0.2)  # a slow source, so that the storms overlap
        if kind == "none":
            return None
        return b"loaded:" + key

    return load


async def _serve(conn: Connection, path: str, url: str, options: dict[str, Any]) -> None:
    cache = aiovmc.TieredCache(path, size="4MiB", redis=url, **options)

    def reply(*message: Any) -> None:
        conn.send(message)

    async def storm(cid: int, key: bytes, tasks: int, spec: tuple[Any, ...]) -> None:
        loader = make_loader(spec)
        results: list[Any] = []

        async def one() -> None:
            results.append(await cache.get(key, b"default", on_miss=loader))

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(tasks):
                    tg.start_soon(one)
        except Exception as exc:
            reply(cid, "error", repr(exc))
        else:
            reply(cid, results)

    async with anyio.create_task_group() as tg:
        while True:
            cid, name, *args = await anyio.to_thread.run_sync(conn.recv)
            try:
                if name == "stop":
                    await cache.aclose()
                    reply(cid, None)
                    tg.cancel_scope.cancel()
                    return
                if name == "storm":
                    tg.start_soon(storm, cid, *args)
                    continue
                if name == "listening":
                    result: Any = await anyio.to_thread.run_sync(
                        cache._listener.subscribed.wait, args[0])
                elif name == "is_listener":
                    result = cache._listener.elected.is_set()
                elif name == "get_nowait":
                    result = cache.get_nowait(args[0])
                elif name == "get":
                    result = await cache.get(args[0])
                elif name == "put":
                    result = await cache.put(args[0], args[1])
                elif name == "delete":
                    result = await cache.delete(args[0])
                elif name == "clear":
                    await cache.clear()
                    result = None
                elif name == "statistics":
                    result = dataclasses.asdict(cache.statistics())
                elif name == "fork":
                    # A child that inherits the handle and outlives this process.
                    result = os.fork()
                    if result == 0:
                        signal.pause()
                        os._exit(0)
                else:
                    raise ValueError(name)
            except Exception as exc:
                reply(cid, "error", repr(exc))
            else:
                reply(cid, result)


def main(conn: Connection, path: str, url: str, backend: str, options: dict[str, Any]) -> None:
    anyio.run(_serve, conn, path, url, options, backend=backend)


class Worker:
    """The test's side of one worker process."""

    def __init__(self, path: str, url: str, backend: str, **options: Any) -> None:
        self.conn, child = SPAWN.Pipe()
        self.process = SPAWN.Process(target=main, args=(child, path, url, backend, options),
                                     daemon=True)
        self.process.start()
        child.close()
        self._next = 0
        self._early: dict[int, Any] = {}

    def send(self, name: str, *args: Any) -> int:
        self._next += 1
        self.conn.send((self._next, name, *args))
        return self._next

    def result(self, cid: int, timeout: float = 30) -> Any:
        while cid not in self._early:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"no reply to command {cid} within {timeout} s")
            got, *rest = self.conn.recv()
            self._early[got] = rest
        rest = self._early.pop(cid)
        if len(rest) == 2 and rest[0] == "error":
            raise AssertionError(f"worker failed: {rest[1]}")
        return rest[0]

    def call(self, name: str, *args: Any, timeout: float = 30) -> Any:
        return self.result(self.send(name, *args), timeout)

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("stop", timeout=10)
            except (OSError, EOFError, TimeoutError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
