"""The HTTP response cache under load: wrk against two gunicorn workers (uvicorn's
worker class) serving four variants of one FastAPI app (web_apps.py, a ~90-byte JSON
answer):

* aiovmc -- `CacheMiddleware`, every measured request a hit;
* plain -- the same endpoint answering its constant, no cache at all;
* fc-memory -- fastapi-cache2's `@cache` with its `InMemoryBackend` (one per worker);
* fc-redis -- fastapi-cache2's `@cache` with `RedisBackend` on a local redis-server.

All four servers start up front (gunicorn, not `uvicorn --workers`, whose process
manager adds ~43 ms to every keep-alive request after the first) and are measured in
interleaved rounds of `wrk -t2 -c64 --latency` after a 1 s warm-up that also fills
the caches: req/s, p50 and p99 latency. Then 200 concurrent requests (httpx, one
connection each) for one cold URL whose handler takes 200 ms: handler calls on the
host. Needs `wrk` and `redis-server` (apt-get install wrk redis-server).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import anyio
import httpx
from harness import Family, RedisServer, Settings, Table, free_port, require, say, scratch

TITLE = "Web: the response cache under load"
TABLES = [
    Table("wrk", "2 gunicorn workers, `wrk -t2 -c64`, medians of rounds; handler calls for "
                 "200 concurrent requests of one cold URL"),
]  # fmt: skip
HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ("aiovmc", "plain", "fc-memory", "fc-redis")
WORKERS = 2
CONNECTIONS = 64


class Server:
    """One variant under gunicorn on a free port, in a session of its own."""

    def __init__(self, mode: str, workdir: str, redis_sock: str) -> None:
        self.port = free_port()
        self.calls = os.path.join(workdir, f"{mode}.calls")
        env = {**os.environ, "BENCH_WEB_MODE": mode, "BENCH_CALLS": self.calls,
               "BENCH_WEB_CACHE": os.path.join(workdir, f"{mode}.cache"),
               "BENCH_REDIS_SOCK": redis_sock,
               "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w",
             str(WORKERS), "-b", f"127.0.0.1:{self.port}", "--log-level", "warning",
             "web_apps:app"],
            cwd=HERE, env=env, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # polling a server that is starting: there is no event to wait on
            try:
                if httpx.get(f"{self.url}/item", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the {mode} server did not answer within 120 s")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handler_calls(self) -> int:
        with contextlib.suppress(FileNotFoundError), open(self.calls) as f:
            return len(f.read().splitlines())
        return 0

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wrk(url: str, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s", "--latency", url],
        capture_output=True, text=True, check=True).stdout  # fmt: skip

    def number(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out)
        if m is None:
            raise RuntimeError(f"wrk's output has no {pattern!r}:\n{out}")
        return m

    def pct(p: str) -> float:
        m = number(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    if "Non-2xx or 3xx responses" in out:
        raise RuntimeError(f"{url} answered errors under load:\n{out}")
    return {"req/s": float(number(r"Requests/sec:\s+([\d.]+)").group(1)),
            "p50": pct("50"), "p99": pct("99")}  # fmt: skip


async def cold_burst(url: str, n: int) -> None:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client, \
            anyio.create_task_group() as tg:  # fmt: skip
        for _ in range(n):
            tg.start_soon(client.get, url)


def run(settings: Settings, fam: Family) -> None:
    require("wrk", "apt-get install wrk")
    seconds = settings.pick(5, 2, 1)
    with RedisServer() as redis, scratch("web") as d, contextlib.ExitStack() as stack:
        servers = {}
        for mode in VARIANTS:
            servers[mode] = Server(mode, d, redis.sock)
            stack.callback(servers[mode].stop)
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in VARIANTS}
        for server in servers.values():  # warm-up: fill the caches, warm the workers
            wrk(f"{server.url}/item", 1)
        for r in range(settings.rounds):
            for mode, server in servers.items():
                samples[mode].append(wrk(f"{server.url}/item", seconds))
                say(f"  round {r + 1} {mode:10} {samples[mode][-1]['req/s']:9.0f} req/s")
        for mode, server in servers.items():
            before = server.handler_calls()
            anyio.run(cold_burst, f"{server.url}/cold/1", 200)
            for col, unit in (("req/s", ""), ("p50", "ms"), ("p99", "ms")):
                fam.add("wrk", mode, col, [s[col] for s in samples[mode]], unit)
            fam.add("wrk", mode, "handler calls, cold URL × 200", server.handler_calls() - before,
                    "")  # fmt: skip
