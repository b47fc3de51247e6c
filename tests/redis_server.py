"""A real redis-server for the tests: started on a unix socket in a temporary
directory (no TCP port, nothing saved), stopped or SIGKILLed on request."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis


class RedisServer:
    """One redis-server process; `start` again after `kill` serves the same socket."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.socket = os.path.join(directory, "redis.sock")
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", self.socket, "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--loglevel", "notice"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:  # ends when the server exits
            if "ready to accept connections" in line.lower():
                self.process.stdout.close()
                return
        raise RuntimeError(f"redis-server exited with {self.process.wait()}")

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis(unix_socket_path=self.socket, socket_timeout=5)


def redis_available() -> None:
    """Skip without redis-server, except in CI, where its absence is a failure."""
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("redis")
