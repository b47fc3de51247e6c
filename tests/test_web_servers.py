"""The response cache under real servers with four workers each, started on
127.0.0.1 with a free port and stopped at the end of each test: uvicorn
--workers, gunicorn with uvicorn's worker and --preload, gunicorn with
aiohttp's worker. The apps are in tests/web_apps.py.

Which worker accepts a new connection is the kernel's choice, and a lopsided
one: on a loaded machine (two CPUs, sanitized workers) one worker may win nine
connections in ten and another one in fifty, so "poll until every worker has
answered" can take about a minute -- longer than the apps' entries once lived,
which made a poll see an entry expire and refill. So each test finds the
workers once, keeping a keep-alive connection to each (`Server.workers`), and
asks every worker through its own connection; the apps' entries outlive any
test (tests/web_apps.py), and the servers keep idle connections and do not
recycle slow workers for as long as a test may run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx
import pytest

from aiovmc.integrations.asgi import invalidate

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 4
DEADLINE = 90.0  # seconds any polled condition may take on a loaded 2-core machine
# A test waits for several such conditions: pytest's default limit (120 s) is too short.
pytestmark = pytest.mark.timeout(600)
# Idle keep-alive connections stay open, and a worker is not declared hung, for
# longer than any test runs (the defaults, 2-5 s and 5-30 s, are not).
PATIENCE = "900"
GUNICORN = ["-w", str(WORKERS), "-b", "127.0.0.1:{port}", "--keep-alive", PATIENCE,
            "--timeout", PATIENCE, "--log-level", "warning"]

SERVERS = {
    "uvicorn": ["-m", "uvicorn", "--workers", str(WORKERS), "--host", "127.0.0.1", "--port",
                "{port}", "--timeout-keep-alive", PATIENCE, "--timeout-worker-healthcheck",
                PATIENCE, "--log-level", "warning", "tests.web_apps:asgi_app"],
    "gunicorn-uvicorn": ["-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker", "--preload",
                         *GUNICORN, "tests.web_apps:asgi_app"],
    "gunicorn-aiohttp": ["-m", "gunicorn", "-k", "aiohttp.GunicornWebWorker", *GUNICORN,
                         "tests.web_apps:aiohttp_app"],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll `condition` until it holds (a bounded wait, not a timed assertion)."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE} s: {what}")
        time.sleep(0.05)


@dataclass
class Server:
    url: str
    cache: str
    calls_log: Path
    process: subprocess.Popen[bytes]
    clients: list[httpx.Client] = field(default_factory=list)  # closed with the server

    def calls(self, path: str) -> list[int]:
        """Pids of the handler calls made for `path` so far, on the whole host."""
        if not self.calls_log.exists():
            return []
        lines = self.calls_log.read_text().splitlines()
        return [int(pid) for pid, p in (line.split() for line in lines) if p == path]

    def get(self, path: str, **headers: str) -> httpx.Response:
        # A connection per request, so that the kernel spreads them over the workers.
        with httpx.Client(base_url=self.url, timeout=DEADLINE) as client:
            return client.get(path, headers=headers)

    def workers(self) -> dict[int, Worker]:
        """Every live worker, each with a keep-alive connection of its own: new
        connections are opened 2 * WORKERS at a time (the kernel spreads a burst
        better than a sequence) until WORKERS distinct workers have answered."""
        found: dict[int, Worker] = {}

        def connect(_: int) -> Worker:
            # One connection, kept however long it is idle (httpx drops one after 5 s).
            limits = httpx.Limits(max_connections=1, keepalive_expiry=float(PATIENCE))
            client = httpx.Client(base_url=self.url, timeout=DEADLINE, limits=limits)
            self.clients.append(client)
            return Worker(int(client.get("/health").headers["x-served-by"]), client)

        with ThreadPoolExecutor(2 * WORKERS) as pool:

            def all_found() -> bool:
                for worker in pool.map(connect, range(2 * WORKERS)):
                    if worker.pid in found:
                        worker.client.close()
                    else:
                        found[worker.pid] = worker
                return len(found) >= WORKERS

            _until(all_found, f"{WORKERS} workers answering")
        return found


@dataclass
class Worker:
    """One worker process and a client whose one connection it accepted."""

    pid: int
    client: httpx.Client

    def get(self, path: str, **headers: str) -> httpx.Response:
        r = self.client.get(path, headers=headers)
        # The connection was kept: the same worker answered.
        assert int(r.headers["x-served-by"]) == self.pid, "the keep-alive connection was lost"
        return r


@contextlib.contextmanager
def _serve(kind: str, cache_path: str, tmp_path: Path) -> Iterator[Server]:
    port = _free_port()
    calls = tmp_path / "calls.log"
    env = {**os.environ, "AIOVMC_WEB_CACHE": cache_path, "AIOVMC_WEB_CALLS": str(calls),
           "PYTHONPATH": str(ROOT)}
    args = [a.format(port=port) for a in SERVERS[kind]]
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env,
                               start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", cache_path, calls, process)
    try:

        def up() -> bool:
            assert process.poll() is None, f"{kind} exited with {process.returncode}"
            try:
                return srv.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        _until(up, f"{kind} listening")
        yield srv
    finally:
        for client in srv.clients:
            client.close()
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest, cache_path: str, tmp_path: Path) -> Iterator[Server]:
    with _serve(request.param, cache_path, tmp_path) as srv:
        yield srv


async def _burst(url: str, path: str, n: int, workers: list[Worker]) -> list[httpx.Response]:
    """`n` concurrent requests for `path` on new connections, and one through
    each of `workers` at the same time (so that every worker takes part)."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    results: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=DEADLINE) as client:

        async def one() -> None:
            results.append(await client.get(path))

        async def through(worker: Worker) -> None:
            results.append(await anyio.to_thread.run_sync(worker.get, path))

        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(through, worker)
            for _ in range(n):
                tg.start_soon(one)
    return results


def test_shared_response_cache(server: Server) -> None:
    workers = server.workers()

    # A cold URL hit at once through every worker: one handler call on the host.
    burst = anyio.run(_burst, server.url, "/slow/cold", 200, list(workers.values()))
    bodies = {r.text for r in burst}
    assert len(bodies) == 1 and all(r.status_code == 200 for r in burst)
    labels = Counter(r.headers["x-cache"] for r in burst)
    assert server.calls("/slow/cold") == [int(bodies.pop().rsplit(" ", 1)[1])]
    assert labels["MISS"] == 1 and labels["MISS"] + labels["COALESCED"] + labels["HIT"] == 204
    assert {int(r.headers["x-served-by"]) for r in burst} >= workers.keys()

    # Hits from every worker: the same body and ETag, an Age, a 304 on If-None-Match.
    first = server.get("/slow/cold")
    for worker in workers.values():
        r = worker.get("/slow/cold")
        assert r.headers["x-cache"] == "HIT" and r.text == first.text
        assert r.headers["etag"] == first.headers["etag"] and int(r.headers["age"]) >= 0
        not_modified = worker.get("/slow/cold", **{"if-none-match": first.headers["etag"]})
        assert not_modified.status_code == 304 and not_modified.content == b""
        assert not_modified.headers["etag"] == first.headers["etag"]
    assert len(server.calls("/slow/cold")) == 1

    # Vary: each language its own entry, never another's.
    for worker, lang in zip(workers.values(), ("en", "fr", "en", "fr"), strict=True):
        r = worker.get("/vary", **{"accept-language": lang})
        assert r.text.startswith(f"lang={lang} ")
    assert len(server.calls("/vary")) == 2

    # Invalidation from this process is seen by every worker at once.
    before = server.get("/slow/page").text
    removed = anyio.run(invalidate, server.cache, f"{server.url}/slow/page")
    assert removed == 1
    after = server.get("/slow/page")
    assert after.headers["x-cache"] == "MISS" and after.text != before
    for worker in workers.values():
        r = worker.get("/slow/page")
        assert r.headers["x-cache"] == "HIT" and r.text == after.text
    assert len(server.calls("/slow/page")) == 2

    # Non-cacheable responses are never stored.
    for worker in workers.values():
        assert "x-cache" not in worker.get("/nostore").headers
    assert len(server.calls("/nostore")) == WORKERS

    # Expiry: max-age=1 is refilled once it has passed.
    assert server.get("/short").headers["x-cache"] == "MISS"
    _until(lambda: server.get("/short").headers["x-cache"] == "MISS", "/short expiring")
    assert len(server.calls("/short")) == 2


def test_worker_killed_under_load(cache_path: str, tmp_path: Path) -> None:
    """A worker SIGKILLed while requests stream in: the server respawns it, no
    request hangs and no response carries a wrong body. (One server kind: the
    respawning is gunicorn's; what is under test is the cache's part.)"""
    with _serve("gunicorn-uvicorn", cache_path, tmp_path) as srv:
        victim = min(srv.workers())

        async def load() -> list[httpx.Response | Exception]:
            out: list[httpx.Response | Exception] = []
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=DEADLINE) as c:

                async def one(i: int) -> None:
                    try:
                        out.append(await c.get(f"/slow/k{i % 5}"))
                    except httpx.TransportError as exc:  # the killed worker's connections
                        out.append(exc)

                async with anyio.create_task_group() as tg:
                    for i in range(150):
                        tg.start_soon(one, i)
                        if i == 40:
                            os.kill(victim, signal.SIGKILL)
                        await anyio.sleep(0.005)  # pacing the load, not synchronising
            return out

        results = anyio.run(load)
        # Only requests sent before the kill can have gone to the victim.
        responses = [r for r in results if isinstance(r, httpx.Response)]
        assert len(responses) >= 150 - 41
        for r in responses:
            path = r.request.url.path
            assert r.status_code == 200 and r.text.startswith(f"{path} v= call ")
            assert int(r.text.rsplit(" ", 1)[1]) in srv.calls(path)  # a handler call for it

        # Four live workers again, the victim replaced; the newcomer serves the stored entries.
        workers = srv.workers()
        assert victim not in workers
        delivered: dict[str, set[str]] = {}
        for r in responses:
            delivered.setdefault(r.request.url.path, set()).add(r.text)
        for worker in workers.values():
            for path, texts in delivered.items():
                r = worker.get(path)
                assert r.headers["x-cache"] == "HIT" and r.text in texts
