"""The HTTP response cache under load: wrk against two gunicorn workers
(uvicorn's worker class), four variants of one FastAPI app (web_apps.py):

* aiovmc      -- CacheMiddleware, every request after the first a hit
* plain       -- the same endpoint answering its constant, no cache at all
* fc-memory   -- fastapi-cache2's @cache with its InMemoryBackend (per worker)
* fc-redis    -- fastapi-cache2's @cache with RedisBackend on a local redis (unix socket)

Reported: req/s, p50 and p99 latency (medians over rounds, variants interleaved),
and the handler calls that 200 concurrent requests for one cold URL cause.

    apt-get install -y wrk redis-server
    python benchmarks/bench_web.py [--rounds 3] [--seconds 5] [--json OUT]

Nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RedisServer  # noqa: E402

VARIANTS = ["aiovmc", "plain", "fc-memory", "fc-redis"]
WORKERS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, mode: str, workdir: str, redis_sock: str | None) -> None:
        self.mode = mode
        self.port = free_port()
        self.calls = os.path.join(workdir, f"{mode}.calls")
        env = {**os.environ, "BENCH_WEB_MODE": mode, "BENCH_CALLS": self.calls,
               "BENCH_WEB_CACHE": os.path.join("/dev/shm", f"aiovmc-bench-web-{os.getpid()}"),
               "PYTHONPATH": str(HERE)}
        if redis_sock:
            env["BENCH_REDIS_SOCK"] = redis_sock
        self.cache = env["BENCH_WEB_CACHE"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w",
             str(WORKERS), "-b", f"127.0.0.1:{self.port}", "--log-level", "warning",
             "web_apps:app"],
            cwd=HERE, env=env, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/item", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"{mode} server did not come up")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def handler_calls(self) -> int:
        try:
            return len(Path(self.calls).read_text().splitlines())
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        try:
            os.unlink(self.cache)
        except FileNotFoundError:
            pass


def wrk(url: str, seconds: int, connections: int) -> dict[str, float]:
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        assert m, out
        scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
        return float(m.group(1)) * scale

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"),
            "non_2xx": float(errors.group(1)) if errors else 0.0}


async def cold_burst(url: str, n: int) -> None:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client, \
            anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(client.get, url)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", default=str(HERE / "results" / "web.json"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk redis-server")
        return 1
    workdir = tempfile.mkdtemp(prefix="aiovmc-bench-web-")
    redis = RedisServer() if RedisServer.available() else None
    variants = VARIANTS if redis else [v for v in VARIANTS if v != "fc-redis"]
    if redis:
        redis.start()
    servers: dict[str, Server] = {}
    results: dict[str, Any] = {"rounds": args.rounds, "seconds": args.seconds,
                               "connections": args.connections, "workers": WORKERS,
                               "loadavg_before": os.getloadavg(), "variants": {}}
    try:
        for mode in variants:
            servers[mode] = Server(mode, workdir, redis.sock if redis else None)
        samples: dict[str, list[dict[str, float]]] = {m: [] for m in variants}
        for mode in variants:  # warm-up: fill the caches, warm the workers
            wrk(f"{servers[mode].url}/item", 1, args.connections)
        for r in range(args.rounds):
            for mode in variants:
                s = wrk(f"{servers[mode].url}/item", args.seconds, args.connections)
                samples[mode].append(s)
                print(f"round {r + 1} {mode:10} {s['rps']:9.0f} req/s  p50 {s['p50_ms']:.2f} ms"
                      f"  p99 {s['p99_ms']:.2f} ms", flush=True)
        for mode in variants:
            before = servers[mode].handler_calls()
            anyio.run(cold_burst, f"{servers[mode].url}/cold/1", 200)
            cold_calls = servers[mode].handler_calls() - before
            med = {k: statistics.median(s[k] for s in samples[mode])
                   for k in ("rps", "p50_ms", "p99_ms", "non_2xx")}
            results["variants"][mode] = {**med, "cold_handler_calls": cold_calls,
                                         "samples": samples[mode]}
    finally:
        for server in servers.values():
            server.stop()
        if redis:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["loadavg_after"] = os.getloadavg()
    print(f"\n{'variant':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cold calls':>10}")
    for mode, v in results["variants"].items():
        print(f"{mode:10} {v['rps']:9.0f} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} "
              f"{v['cold_handler_calls']:10d}")
    base = results["variants"]
    if "plain" in base:
        print(f"aiovmc / plain req/s: {base['aiovmc']['rps'] / base['plain']['rps']:.2f} "
              "(target >= 0.8)")
    if "fc-redis" in base:
        print(f"aiovmc / fastapi-cache2+redis req/s: "
              f"{base['aiovmc']['rps'] / base['fc-redis']['rps']:.2f} (target >= 2)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
