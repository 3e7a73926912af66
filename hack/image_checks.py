"""Checks run inside the built image by ``hack/build-image.sh`` (``buildah run``, as the image's user).

Each check starts the real program from the image (its redis-server with the p2ptrain module, its
``p2ptrain function``), waits on a condition with a deadline, stops what it started and prints one
``PASS``/``FAIL`` line naming what it checked. Standard library plus what the image ships (redis-py,
p2ptrain): nothing here may need the source tree, which is not in the image.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from p2ptrain import retry
from p2ptrain.autoscale import terminate

DEADLINE_SECONDS = 120.0


class CheckFailed(Exception):
    """What a check found wrong, in words."""


def _wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    try:
        retry.wait_until_ready(condition, process, what, timeout=DEADLINE_SECONDS)
    except retry.NotReady as exc:
        raise CheckFailed(str(exc)) from None


def _stop(process: subprocess.Popen[bytes]) -> None:
    terminate(process, timeout=15)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def check_redis_module(workdir: Path) -> str:
    """The image's redis-server loads $P2PTRAIN_REDIS_MODULE and P2P.ACCUM/P2P.MEAN average two parts."""
    import redis

    module = os.environ.get("P2PTRAIN_REDIS_MODULE", "")
    if not module or not Path(module).is_file():
        raise CheckFailed(f"P2PTRAIN_REDIS_MODULE={module!r} does not name a file in the image")
    # A Unix socket, no TCP port: buildah's chroot isolation shares the host's network.
    sock = workdir / "redis.sock"
    log = workdir / "redis.log"
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
         "--logfile", str(log), "--loadmodule", module],
    )
    try:
        client = redis.Redis(unix_socket_path=str(sock))

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            _wait_for(answers, "redis-server answering PING", server)
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}; redis log: {_tail(log)}") from exc
        modules = [m[b"name"] if isinstance(m.get(b"name"), bytes) else m.get("name") for m in client.module_list()]
        if b"p2ptrain" not in modules and "p2ptrain" not in modules:
            raise CheckFailed(f"MODULE LIST shows {modules!r}, not p2ptrain")
        first = struct.pack("<3f", 1.0, 2.0, 3.0)
        second = struct.pack("<3f", 3.0, 6.0, 9.0)
        added = [
            client.execute_command("P2P.ACCUM", "acc", "meta", "part-a", "1", first),
            client.execute_command("P2P.ACCUM", "acc", "meta", "part-b", "1", second),
            client.execute_command("P2P.ACCUM", "acc", "meta", "part-b", "1", second),  # a retry: not added again
        ]
        if added != [1, 1, 0]:
            raise CheckFailed(f"P2P.ACCUM returned {added}, expected [1, 1, 0]")
        mean_blob, weight, parts = client.execute_command("P2P.MEAN", "acc", "meta")
        mean = struct.unpack("<3f", mean_blob)
        if mean != (2.0, 4.0, 6.0) or float(weight) != 2.0 or int(parts) != 2:
            raise CheckFailed(f"P2P.MEAN returned mean={mean} weight={weight!r} parts={parts!r}, "
                              "expected (2.0, 4.0, 6.0), 2, 2")
        client.close()
    finally:
        _stop(server)
    return f"redis-server loaded {module} (MODULE LIST: p2ptrain); P2P.ACCUM x3 -> [1, 1, 0], P2P.MEAN -> {mean}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def check_function(workdir: Path) -> str:
    """``p2ptrain function`` started with a small job's runtime config answers /health/readiness with 200."""
    from p2ptrain.config import cluster_config
    from p2ptrain.spec import parse_manifest

    manifest = {
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": "image-check", "namespace": "default"},
        "spec": {"peers": 2, "functionsPerPeer": 1, "rounds": 1, "model": {"name": "mlp"},
                 "dataset": {"name": "digits"}},
    }
    config = workdir / "job.json"
    config.write_text(cluster_config(parse_manifest(manifest)).to_json(), encoding="utf-8")
    port = _free_port()
    url = f"http://127.0.0.1:{port}/health/readiness"
    env = {
        **os.environ,
        "P2PTRAIN_CONFIG": str(config),
        "LISTEN_ADDRESS": f"127.0.0.1:{port}",
        # Placeholders: readiness needs the variables set; nothing here talks to a Redis.
        "P2PTRAIN_REDIS_PASSWORD": "image-check",
        "P2PTRAIN_SIGNING_KEY": "image-check",
    }
    log = workdir / "function.log"
    with log.open("wb") as out:
        function = subprocess.Popen(["p2ptrain", "function"], env=env, stdout=out, stderr=subprocess.STDOUT)
    statuses: list[int] = []

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                statuses.append(response.status)
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
            return False
        except OSError:
            return False

    started = time.monotonic()
    try:
        _wait_for(ready, f"GET {url} -> 200", function)
    except CheckFailed as exc:
        raise CheckFailed(f"{exc} (statuses seen: {sorted(set(statuses))}); function log: {_tail(log)}") from exc
    finally:
        _stop(function)
    return (f"p2ptrain function (job image-check, digits, mlp) answered GET /health/readiness 200 "
            f"after {time.monotonic() - started:.1f} s")


CHECKS: dict[str, Callable[[Path], str]] = {"redis-module": check_redis_module, "function": check_function}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in CHECKS:
        print(f"usage: image_checks.py {{{'|'.join(CHECKS)}}}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="p2ptrain-check-") as workdir:
        try:
            detail = CHECKS[argv[0]](Path(workdir))
        except CheckFailed as exc:
            print(f"FAIL {argv[0]} (uid {os.getuid()}): {exc}")
            return 1
    print(f"PASS {argv[0]} (uid {os.getuid()}): {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
