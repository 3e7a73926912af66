"""Start and stop local ``redis-server`` processes (the local runner's Redis, and the tests').

Each server listens on a free loopback port with AUTH on, keeps nothing on disk unless asked, and
loads the p2ptrain module when one is given. A server is always stopped, even if its owner dies:
children get SIGKILL when their parent exits (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def die_with_parent() -> None:
    """preexec_fn for child processes: SIGKILL them when the process that started them dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1 with a password."""

    password: str
    module: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    persistence: str = "none"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    workdir: Path | None = field(default=None, repr=False)

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerError(
                "redis-server not found on PATH: install it (Debian/Ubuntu: apt-get install -y redis-server)"
            )
        self.port = self.port or free_port(self.host)
        self.workdir = Path(tempfile.mkdtemp(prefix="p2ptrain-redis-"))
        args = [
            binary,
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--save", "" if self.persistence != "rdb" else "60 1",
            "--appendonly", "yes" if self.persistence == "aof" else "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--proto-max-bulk-len", "1gb",
            # The password travels on stdin-free config: an ACL user line keeps it out of `ps` output.
        ]
        if self.module is not None:
            args += ["--loadmodule", str(self.module)]
        config = self.workdir / "redis.conf"
        config.write_text(f'requirepass "{self.password}"\n', encoding="utf-8")
        os.chmod(config, 0o600)
        args.insert(1, str(config))
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"redis-server on port {self.port} exited at start: {err.strip()}")
            try:
                self.client().ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server on port {self.port} did not answer within {timeout}s")

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> RedisServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
