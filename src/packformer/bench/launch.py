"""Start and stop a server in a subprocess on a free localhost port (for bench-serve and the server tests)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(args) as srv:` runs `args + --host 127.0.0.1 --port P` (default: python -m
    packformer serve ...), waits until GET /health is 200, and on exit sends SIGTERM and waits.

    Its output goes to a temporary log file (no pipe to fill up); `log()` reads it."""

    def __init__(self, args: Sequence[str], command: Sequence[str] | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 180.0, env: dict | None = None, health_path: str = "/health"):
        self.args, self.host = list(args), host
        self.command = list(command) if command is not None else [sys.executable, "-m", "packformer", "serve"]
        self.startup_timeout, self.health_path = startup_timeout, health_path
        self.env = {**os.environ, **(env or {})}
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "ServerProcess":
        import httpx

        self.port = free_port(self.host)
        self._log = tempfile.NamedTemporaryFile("w+", prefix="packformer-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([*self.command, *self.args, "--host", self.host, "--port", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with status {self.proc.returncode} while starting:\n{self.log()}")
                try:
                    if client.get(self.url + self.health_path).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"server not healthy within {self.startup_timeout:g} s:\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the exit status (SIGKILL after `timeout`)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.terminate()
        finally:
            self.kill()
            if self._log is not None:
                self._log.close()
                os.unlink(self._log.name)
