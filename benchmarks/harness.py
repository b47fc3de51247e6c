"""The one harness of every benchmark family (see benchmarks/README.md).

* ``Settings``: how many rounds, how long; ``full``, ``quick`` or ``smoke``.
* ``Figure``: the one record of every measured figure (a cell of a table), and
  ``Family``, what a family hands back: its tables (``Table``, with an optional
  ``Plot``), figures and notes.
* Rounds: ``interleaved`` / ``ainterleaved`` time loops over keys, the rounds of every
  case interleaved; ``WorkerGroup`` runs rounds of spawned processes that meet the
  parent at a barrier; ``timed`` is the one stopwatch.
* Machine: ``idle_fraction`` (the idle check before a family), ``machine``,
  ``versions``.
* Peers: ``RedisServer`` (a private redis-server) and ``free_port``; scratch
  directories on the medium every library shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.metadata
import multiprocessing as mp
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

SEED = 20240601
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Where the files of every library live: the same medium (tmpfs) for all of them.
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
SPAWN = mp.get_context("spawn")

# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """How much a run measures. ``smoke`` runs every family's smallest configuration
    once (it checks the harness and the families, its figures mean nothing)."""

    mode: str  # "full", "quick" or "smoke"
    rounds: int
    warmup: int
    round_seconds: float  # target wall time of one timed round of a per-op loop
    duration: float  # one round of a fixed-duration (throughput) measurement

    @classmethod
    def make(cls, mode: str) -> Settings:
        return {
            "full": cls("full", rounds=7, warmup=1, round_seconds=0.15, duration=1.0),
            "quick": cls("quick", rounds=5, warmup=1, round_seconds=0.04, duration=0.25),
            "smoke": cls("smoke", rounds=1, warmup=0, round_seconds=0.002, duration=0.02),
        }[mode]

    def pick(self, full: Any, quick: Any, smoke: Any) -> Any:
        """A family's knob (a size, a count) for this mode."""
        return {"full": full, "quick": quick, "smoke": smoke}[self.mode]


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Plot:
    """How the report draws a table: ``bars`` (a panel per column, a bar per row) or
    ``lines`` (a series per row, x from each figure's ``x``, a panel per ``panels``
    group of columns: by default one panel)."""

    kind: str
    file: str
    title: str
    xlabel: str = ""
    ylabel: str = ""
    logx: bool = False
    logy: bool = False
    hline: float | None = None  # a reference value (bars: a vertical line)
    hline_label: str = ""


@dataclasses.dataclass(frozen=True)
class Table:
    """A table of a family's figures: rows × columns. ``listed=False``: plotted only."""

    name: str
    caption: str = ""
    plot: Plot | None = None
    listed: bool = True


@dataclasses.dataclass(frozen=True)
class Figure:
    """One measured figure: the cell ``row`` × ``col`` of ``table``.

    ``value`` is what the report shows and the targets compare: the median of
    ``rounds`` when there are rounds. ``x`` places the figure on a line plot.
    """

    table: str
    row: str
    col: str
    value: float
    unit: str  # ns, ms, s, ops/s, GiB/s, B, x, % or "" (a count or a fraction)
    rounds: tuple[float, ...] = ()
    x: float | None = None

    @property
    def key(self) -> str:
        return f"{self.table} | {self.row} | {self.col}"


class Family:
    """What one family hands back: its tables, figures and notes."""

    def __init__(self, tables: Sequence[Table]) -> None:
        self.tables = {t.name: t for t in tables}
        self.figures: dict[str, Figure] = {}
        self.notes: list[str] = []

    def add(
        self,
        table: str,
        row: str,
        col: str,
        measured: float | Sequence[float],
        unit: str,
        *,
        x: float | None = None,
    ) -> Figure:
        """Record a figure: one value, or the rounds whose median it is."""
        if table not in self.tables:
            raise KeyError(f"table {table!r} is not declared by the family")
        rounds = (measured,) if isinstance(measured, int | float) else tuple(measured)
        fig = Figure(table, row, col, median(rounds), unit, rounds if len(rounds) > 1 else (), x)
        if fig.key in self.figures:
            raise KeyError(f"figure {fig.key!r} recorded twice")
        self.figures[fig.key] = fig
        return fig

    def note(self, msg: str) -> None:
        say(f"  note: {msg}")
        self.notes.append(msg)

    def value(self, table: str, row: str, col: str) -> float:
        return self.figures[f"{table} | {row} | {col}"].value


# --------------------------------------------------------------------------- output


def say(msg: str = "") -> None:
    print(msg, flush=True)


def fmt(value: float, unit: str) -> str:
    """A figure as the report and the console print it."""
    if value != value:
        return "n/a"
    if value == float("inf"):
        return "∞"  # e.g. a reader that never saw the new value
    if unit == "ns":
        for div, u in ((1e9, "s"), (1e6, "ms"), (1e3, "µs")):
            if value >= div:
                return f"{value / div:.2f} {u}"
        return f"{value:.0f} ns"
    if unit == "B":
        for u, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
            if value >= size:
                v = value / size
                return f"{v:.0f} {u}" if abs(v - round(v)) < 0.05 else f"{v:.1f} {u}"
        return f"{value:.0f} B" if value == int(value) else f"{value:.1f} B"
    if unit == "ops/s":
        return f"{value / 1e6:.2f} M ops/s"
    if unit == "x":
        return f"{value:.2f}×"
    if abs(value) >= 100 or value == int(value):
        s = f"{value:,.0f}"
    elif abs(value) >= 1:
        s = f"{value:.2f}"
    else:
        s = f"{value:.3f}"
    return f"{s} {unit}".strip()


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))]


def size_label(n: int) -> str:
    return fmt(n, "B")


# --------------------------------------------------------------------------- timing


@contextlib.contextmanager
def gc_off() -> Iterator[None]:
    """The garbage collector disabled for a timed loop (no collection inside it)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Collect once, then freeze every live object for a series of rounds, so the
    collections between rounds stay cheap with millions of live objects (a peer
    holding 100k entries)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def timed(fn: Callable[[], Any]) -> int:
    """Run ``fn`` once with the GC off; its wall time in ns."""
    with gc_off():
        t0 = time.perf_counter_ns()
        fn()
        return time.perf_counter_ns() - t0


async def atimed(fn: Callable[[], Awaitable[Any]]) -> int:
    with gc_off():
        t0 = time.perf_counter_ns()
        await fn()
        return time.perf_counter_ns() - t0


@dataclasses.dataclass
class Case:
    """One thing to time: ``make(keys)`` returns a zero-argument loop over ``keys``
    (a coroutine function with ``ainterleaved``). ``ops``: ops per round, or None to
    calibrate (a slow peer does fewer ops per round, ≥ 1,000)."""

    name: str
    make: Callable[[list[Any]], Callable[[], Any]]
    ops: int | None = None


def _plan(
    cases: Sequence[Case], order: list[Any], settings: Settings, ns_per_op: dict[str, float]
) -> list[tuple[Case, int, list[Callable[[], Any]]]]:
    """Each case's ops per round and one loop per round, round ``r`` walking the random
    ``order`` from ``r * ops`` (wrapping), so a slow peer's rounds differ in keys."""
    n = len(order)
    plan = []
    for case in cases:
        if case.ops is not None:
            ops = min(case.ops, n)
        else:
            want = int(settings.round_seconds * 1e9 / max(ns_per_op[case.name], 1.0))
            ops = max(min(1_000, n), min(n, want))
        loops = []
        for r in range(settings.warmup + settings.rounds):
            start = (r * ops) % n
            loops.append(case.make((order[start:] + order[:start])[:ops] if ops < n else order))
        plan.append((case, ops, loops))
    return plan


def interleaved(
    cases: Sequence[Case], order: list[Any], settings: Settings
) -> dict[str, list[float]]:
    """Time every case, rounds interleaved (round 1 of each, then round 2, ...);
    ns per op of each timed round, per case."""
    probe: dict[str, float] = {}
    for case in cases:
        if case.ops is None:
            fn = case.make(order[:1_000])
            fn()
            probe[case.name] = timed(fn) / len(order[:1_000])
    out: dict[str, list[float]] = {c.name: [] for c in cases}
    plan = _plan(cases, order, settings, probe)
    with gc_frozen():
        for r in range(settings.warmup + settings.rounds):
            for case, ops, loops in plan:
                ns = timed(loops[r])
                if r >= settings.warmup:
                    out[case.name].append(ns / ops)
    return out


async def ainterleaved(
    cases: Sequence[Case], order: list[Any], settings: Settings
) -> dict[str, list[float]]:
    """``interleaved`` for loops that are coroutine functions, inside a running loop."""
    probe: dict[str, float] = {}
    for case in cases:
        if case.ops is None:
            fn = case.make(order[:1_000])
            await fn()
            probe[case.name] = await atimed(fn) / len(order[:1_000])
    out: dict[str, list[float]] = {c.name: [] for c in cases}
    plan = _plan(cases, order, settings, probe)
    with gc_frozen():
        for r in range(settings.warmup + settings.rounds):
            for case, ops, loops in plan:
                ns = await atimed(loops[r])
                if r >= settings.warmup:
                    out[case.name].append(ns / ops)
    return out


def loop_over(op: Callable[[Any], Any]) -> Callable[[list[Any]], Callable[[], None]]:
    """The loop every library is timed with: a local bound method over a key list."""

    def make(keys: list[Any]) -> Callable[[], None]:
        def loop() -> None:
            for k in keys:
                op(k)

        return loop

    return make


def aloop_over(
    op: Callable[[Any], Awaitable[Any]],
) -> Callable[[list[Any]], Callable[[], Awaitable[None]]]:
    def make(keys: list[Any]) -> Callable[[], Awaitable[None]]:
        async def loop() -> None:
            for k in keys:
                await op(k)

        return loop

    return make


class WorkerGroup:
    """``n`` spawned processes running ``target(index, rounds, barrier, queue, *args)``.

    A worker's round starts when every worker and the parent meet at the barrier
    (``round()``); each worker then puts one report on the queue. Use as a context
    manager: the workers are joined, or killed if they outlive the group.
    """

    TIMEOUT = 300.0

    def __init__(self, n: int, rounds: int, target: Callable[..., None], *args: Any) -> None:
        self.n = n
        self.barrier = SPAWN.Barrier(n + 1)
        self.queue = SPAWN.Queue()
        self.procs = [
            SPAWN.Process(
                target=target, args=(i, rounds, self.barrier, self.queue, *args), daemon=True
            )
            for i in range(n)
        ]

    def __enter__(self) -> WorkerGroup:
        for p in self.procs:
            p.start()
        return self

    def round(self) -> list[Any]:
        """Start one round; every worker's report of it."""
        self.barrier.wait(timeout=self.TIMEOUT)
        return [self.queue.get(timeout=self.TIMEOUT) for _ in range(self.n)]

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.join(30 if exc[0] is None else 0.1)
            if p.is_alive():
                p.kill()
                p.join()


# --------------------------------------------------------------------------- data


def key_order(n: int, count: int | None = None, *, seed: int = SEED) -> list[int]:
    """A fixed pseudo-random order of ``count`` indices into ``range(n)``."""
    rng = random.Random(seed)
    idx = list(range(n))
    rng.shuffle(idx)
    if count is not None and count > n:
        idx.extend(rng.randrange(n) for _ in range(count - n))
    return idx[: count or n]


def make_key(i: int) -> bytes:
    """16-byte keys, the same for every library."""
    return b"key-%012d" % i


def make_value(size: int, *, seed: int = SEED) -> bytes:
    return random.Random(seed + size).randbytes(size)


@contextlib.contextmanager
def scratch(prefix: str, base: str | None = None) -> Iterator[str]:
    """A fresh directory on tmpfs (or ``base``) for one library's files, removed after."""
    d = tempfile.mkdtemp(prefix=f"aiovmc-bench-{prefix}-", dir=base or SHM)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def disk_dir() -> str:
    """A directory on a block device (not tmpfs), for the persistence figures."""
    for d in ("/var/tmp", "/tmp", os.path.expanduser("~")):
        if os.path.isdir(d) and fs_type(d) not in ("tmpfs", "ramfs"):
            return d
    raise RuntimeError("no directory on a disk (not tmpfs) among /var/tmp, /tmp, ~")


def fs_type(path: str) -> str:
    """The filesystem type of ``path`` from /proc/mounts (longest mount prefix)."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            _dev, mnt, typ, *_ = line.split()
            inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) > len(best):
                best, kind = mnt, typ
    return kind


# --------------------------------------------------------------------------- peers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require(program: str, install: str) -> str:
    """The path of ``program``; a clear error naming how to install it if missing."""
    path = shutil.which(program)
    if path is None:
        raise RuntimeError(f"{program} is not installed: {install}")
    return path


class RedisServer:
    """A private redis-server without persistence, on a unix socket or, with
    ``tcp=True``, on a free 127.0.0.1 port (for clients that take a host and port).
    A context manager; ``url`` says where it listens, ``client()`` connects."""

    def __init__(self, *, tcp: bool = False) -> None:
        self.exe = require("redis-server", "apt-get install redis-server")
        self.port = free_port() if tcp else 0
        self.dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sock(self) -> str:
        return os.path.join(self.dir, "redis.sock")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0" if self.port else f"unix://{self.sock}"

    def client(self) -> Any:
        import redis

        if self.port:
            return redis.Redis(host="127.0.0.1", port=self.port)
        return redis.Redis(unix_socket_path=self.sock)

    def __enter__(self) -> RedisServer:
        import redis

        self.dir = tempfile.mkdtemp(prefix="aiovmc-bench-redis-", dir="/tmp")
        where = (
            ["--port", str(self.port), "--bind", "127.0.0.1"]
            if self.port
            else ["--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700"]
        )
        self.proc = subprocess.Popen(
            [self.exe, *where, "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and time.monotonic() < deadline:
            client = self.client()
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)  # polling a server that is starting: no event to wait on
            finally:
                client.close()
        self.__exit__()
        raise RuntimeError(f"redis-server did not answer within 30 s ({self.url})")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- machine


def idle_fraction(seconds: float = 1.0) -> float:
    """The machine-wide share of CPU time idle over ``seconds`` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
        return sum(vals), vals[3] + vals[4]

    t1, i1 = sample()
    time.sleep(seconds)
    t2, i2 = sample()
    return (i2 - i1) / max(1, t2 - t1)


LIBRARIES = (
    "aiovmc", "cffi", "anyio", "trio", "uvloop", "lmdb", "diskcache", "cachetools",
    "async-lru", "cachebox", "theine", "aiocache", "cashews", "redis", "fastapi",
    "fastapi-cache2", "gunicorn", "uvicorn", "matplotlib",
)  # fmt: skip


def versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    for program in ("redis-server", "wrk"):
        exe = shutil.which(program)
        v = "-"
        if exe:
            run = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
            words = (run.stdout + run.stderr).split()
            v = next((w[2:] for w in words if w.startswith("v=")), words[1] if words else "?")
        out[program] = v
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    wanted = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
              "Hypervisor vendor", "L2 cache", "L3 cache")  # fmt: skip
    for line in lscpu.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in wanted:
            info[k.strip()] = v.strip()
    with open("/proc/meminfo") as f:
        info["MemTotal"] = f.readline().split(":")[1].strip()
    info["shm_fs"] = fs_type(SHM)
    info["disk_dir"] = disk_dir()
    info["disk_fs"] = fs_type(info["disk_dir"])
    return info
