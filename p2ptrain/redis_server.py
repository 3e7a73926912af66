"""Start and stop local ``redis-server`` processes (the local runner's Redis, and the tests').

Each server listens on a free loopback port with AUTH on, keeps nothing on disk unless asked, and
loads the p2ptrain module when one is given. A server is always stopped, even if its owner dies:
children get SIGKILL when their parent exits (Linux ``PR_SET_PDEATHSIG``). The password never
touches the disk: redis-server reads it from its stdin. A server's directory records its pid, so the
directories of servers that died with a killed owner are removed by the next ``start``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import redis

from p2ptrain import memory, retry


class RedisServerError(RuntimeError):
    """redis-server is missing or did not come up."""


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct free ports. Each socket stays bound until all are chosen: ports taken one at a
    time (bind to 0, close, again) can repeat, and two servers of one job then share a port."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


_PREFIX = "p2ptrain-redis-"
_PID_FILE = "redis-server.pid"


def remove_stale_dirs(root: Path | None = None) -> list[Path]:
    """Remove the directories of earlier servers that are no longer running; the ones removed."""
    removed = []
    for directory in Path(root or tempfile.gettempdir()).glob(_PREFIX + "*"):
        try:
            pid = int((directory / _PID_FILE).read_text(encoding="ascii"))
        except (OSError, ValueError):
            continue  # not ours, or a server still starting
        if _is_running_redis(pid):
            continue
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def _is_running_redis(pid: int) -> bool:
    # A killed owner's servers may linger as zombies (nobody reaps them in some containers), and a
    # pid may have been reused by another program since: neither is a live server.
    try:
        comm = Path(f"/proc/{pid}/comm").read_text(encoding="utf-8").strip()
        state = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return comm == "redis-server" and state not in ("Z", "X")


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
        remove_stale_dirs()
        if self.workdir is None or not self.workdir.is_dir():  # after ``crash``: the same data directory
            self.workdir = Path(tempfile.mkdtemp(prefix=_PREFIX))
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
        ]
        if self.module is not None:
            args += ["--loadmodule", str(self.module)]
        # "-": the config (the password) comes on stdin — not in `ps` output, not in any file.
        args.insert(1, "-")
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, **memory.redis_allocator_env(os.environ)},
            preexec_fn=die_with_parent,
            start_new_session=True,  # Ctrl-C reaches the owner, which stops its servers last
        )
        assert self.process.stdin is not None
        with self.process.stdin, contextlib.suppress(BrokenPipeError):  # BrokenPipe: it exited; reported below
            self.process.stdin.write(f'requirepass "{self.password}"\n'.encode())
        (self.workdir / _PID_FILE).write_text(str(self.process.pid), encoding="ascii")
        client = self.client()

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.ConnectionError:
                return False

        try:
            retry.wait_until_ready(answers, self.process, f"redis-server on port {self.port}", timeout=timeout,
                                   interval=0.02)
        except retry.NotReady as exc:
            if exc.exited:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"redis-server on port {self.port} exited at start: {err.strip()}") from None
            self.stop()
            raise RedisServerError(f"redis-server on port {self.port} did not answer within {timeout}s") from None
        finally:
            client.close()
        return self

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, password=self.password, **kwargs)  # type: ignore[arg-type]

    def crash(self) -> None:
        """Kill the server (SIGKILL) but keep its data directory, as a pod whose volume outlives it:
        ``start`` again serves on the same port from what it had persisted (``persistence``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        if self.workdir is not None:
            # no pid file: ``remove_stale_dirs`` leaves a directory without one alone
            (self.workdir / _PID_FILE).unlink(missing_ok=True)

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
