"""Reservation owners are decided by the kernel (DESIGN.md §9), not by pids.

A reservation records the owner id of the handle that made it; the handle holds
an open-file-description lock on a byte of the file named by that id, which the
kernel releases when the handle closes or its process dies. So a dead owner
whose pid still answers `kill(pid, 0)` (a zombie, or a pid reused by another
process) is dead, and a live owner in another pid namespace (whose pid means
nothing here) is alive.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aiovmc import Cache

from .helpers import WAIT

ROOT = Path(__file__).resolve().parents[1]

# Reserve 64 KiB, say so, then obey stdin: "publish" or "exit" (without
# cancelling: the reservation is left behind as by a crash).
_RESERVER = """
import os, sys
from aiovmc import Cache
cache = Cache(sys.argv[1])
r = cache.reserve(b"owned", 65536)
r.buffer[:5] = b"hello"
print("reserved", os.getpid(), flush=True)
if sys.stdin.readline().strip() == "publish":
    r.publish()
    print("published", flush=True)
    cache.close()
else:
    os._exit(0)
"""


def _used(path: str) -> int:
    """used_bytes after a fresh attach (which reclaims dead owners' reservations)."""
    with Cache(path) as cache:
        return cache.statistics().used_bytes


def test_reservation_of_a_zombie_is_reclaimed(cache_path: str) -> None:
    """The owner has exited but is not reaped: its pid answers kill(pid, 0),
    yet its reservation is reclaimed (the kernel dropped its owner lock)."""
    with Cache(cache_path, size="4MiB") as keeper:  # keeps the file from being recovered
        empty = keeper.statistics().used_bytes
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read)
            child = Cache(cache_path)
            kept = child.reserve(b"owned", 65536)  # referenced: not cancelled by __del__
            os.write(write, b"R")
            os._exit(0 if kept else 1)  # no cleanup: the reservation stays behind
        os.close(write)
        assert os.read(read, 1) == b"R"
        os.close(read)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        os.kill(pid, 0)  # a zombie still answers: the old pid test called it alive
        assert keeper.statistics().used_bytes > empty
        assert _used(cache_path) == empty
        os.waitpid(pid, 0)


def _in_new_pid_namespace() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to make a pid namespace")
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid failed here: {probe.stderr.decode().strip()}")
    return [unshare, "--pid", "--fork", "--mount-proc"]


def test_reservation_owned_from_another_pid_namespace(cache_path: str) -> None:
    """A live owner in another pid namespace (pid 1 there: our init here) keeps
    its reservation, can publish it, and its reservation is reclaimed once it
    is gone."""
    prefix = _in_new_pid_namespace()
    with Cache(cache_path, size="4MiB") as keeper:
        empty = keeper.statistics().used_bytes
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        for ending in ("publish", "exit"):
            with subprocess.Popen(
                [*prefix, sys.executable, "-c", _RESERVER, cache_path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            ) as child:
                assert child.stdin is not None and child.stdout is not None
                said = child.stdout.readline().split()
                assert said[0] == "reserved" and said[1] == "1"  # pid 1 in its namespace
                reserved = keeper.statistics().used_bytes
                assert reserved > empty
                assert _used(cache_path) == reserved  # alive: kept by a fresh attach's reclaim
                child.stdin.write(ending + "\n")
                child.stdin.flush()
                if ending == "publish":
                    assert child.stdout.readline().strip() == "published"
                assert child.wait(WAIT) == 0
            if ending == "publish":
                assert keeper.get(b"owned", b"")[:5] == b"hello"
                assert keeper.delete(b"owned")
            assert _used(cache_path) == empty  # gone: its reservation is reclaimed


def test_reservation_naming_a_live_pid_is_reclaimed(cache_path: str) -> None:
    """A dead owner's record rewritten to hold the pid of a live process (this
    one), as if the owner's pid had been reused: reclaimed all the same, since
    liveness is the owner's lock, not a pid."""
    from .helpers import read_header

    with Cache(cache_path, size="4MiB") as keeper:
        empty = keeper.statistics().used_bytes
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(read)
            child = Cache(cache_path)
            kept = child.reserve(b"owned", 65536)
            os.write(write, (kept._id & 0xFFFFFFFF).to_bytes(4, "little"))
            os._exit(0)
        os.close(write)
        head = int.from_bytes(os.read(read, 4), "little")
        os.close(read)
        os.waitpid(pid, 0)
        mapping = keeper._mmap
        assert mapping is not None
        hdr = read_header(mapping[:4096])
        owner_at = hdr["pool_off"] + ((head - 1) << hdr["unit_shift"]) + 48  # atime_ns
        assert int.from_bytes(mapping[owner_at : owner_at + 8], "little") != 0
        mapping[owner_at : owner_at + 8] = os.getpid().to_bytes(8, "little")
        assert keeper.statistics().used_bytes > empty
        assert _used(cache_path) == empty


NEXT_OWNER = 488  # offset of next_owner in the header (docs/format.md)


def test_a_damaged_owner_counter_starts_again(cache_path: str) -> None:
    """next_owner at the end of its range (a flipped bit): recovery at open
    starts it again; while others are attached, new handles wrap around and skip
    the live owners' ids."""
    Cache(cache_path, size="1MiB").close()
    with open(cache_path, "r+b") as f:
        f.seek(NEXT_OWNER)
        f.write((1 << 58).to_bytes(8, "little"))
    with Cache(cache_path) as first:  # the only user: recovers
        mapping = first._mmap
        assert mapping is not None
        assert int.from_bytes(mapping[NEXT_OWNER : NEXT_OWNER + 8], "little") == 1
        mapping[NEXT_OWNER : NEXT_OWNER + 8] = ((1 << 40) - 1).to_bytes(8, "little")
        with Cache(cache_path) as second:  # wraps: id 1 is first's (held), so 2
            assert int.from_bytes(mapping[NEXT_OWNER : NEXT_OWNER + 8], "little") == 2
            r = second.reserve(b"k", 1000)
            assert _used(cache_path) > 0  # second is alive: its reservation is kept
            r.cancel()


# Fork a helper child (it outlives us, never touching the cache) and wait until
# its after-fork hooks have run (until then it holds what it inherited), then
# hold a reservation and lead a load, and say so; the test SIGKILLs us.
_FORKING_OWNER = """
import os, sys, threading, time
from aiovmc import Cache
cache = Cache(sys.argv[1], on_miss=lambda key: (print("loading", flush=True), time.sleep(600)))
forked, child_ready = os.pipe()
helper = os.fork()
if helper == 0:  # e.g. a pool worker: it only reads stdin, until EOF
    os.write(child_ready, b"!")  # its after-fork hooks (aiovmc's included) have run
    sys.stdin.read()
    os._exit(0)
os.read(forked, 1)
r = cache.reserve(b"owned", 65536)
print("helper", helper, flush=True)
threading.Thread(target=cache.get, args=(b"loading",), daemon=True).start()
time.sleep(600)
"""


def test_a_forked_child_does_not_keep_a_dead_owner_alive(cache_path: str) -> None:
    """Python's mmap keeps a dup of the descriptor it maps; were it the handle's own,
    a forked child would keep the handle's owner lock held after the owner died:
    no takeover of its load (waiters waited for their load_timeout, forever with
    None) and no reclaim of its reservation while the child lives."""
    Cache(cache_path, size="4MiB").close()
    with Cache(cache_path) as keeper:
        owner = subprocess.Popen([sys.executable, "-c", _FORKING_OWNER, cache_path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert owner.stdout is not None and owner.stdin is not None
        try:
            helper = int(owner.stdout.readline().split()[1])
            assert owner.stdout.readline().strip() == "loading"
            assert keeper.statistics().used_bytes > 0
            owner.kill()
            owner.wait(WAIT)
            os.kill(helper, 0)  # the child lives on
            assert _used(cache_path) == 0  # the dead owner's reservation is reclaimed
            with Cache(cache_path, on_miss=lambda key: b"taken over", load_timeout=None) as w:
                assert w.get(b"loading") == b"taken over"  # a hang here is the defect
                assert w.statistics().load_takeovers == 1
        finally:
            owner.kill()
            owner.stdin.close()  # lets the helper go
            owner.stdout.close()
            owner.wait(WAIT)
