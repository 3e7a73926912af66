"""``p2ptrain run`` end to end, as a user runs it: real processes, real Redis, real HTTP.

Covers the summary a script reads, convergence of the digits job (every aggregation rule, one and two
functions per peer), and that nothing is left behind when the run is interrupted or a function dies.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.yaml"


def _write_job(tmp_path: Path, name: str = "digits", **overrides: object) -> Path:
    manifest = yaml.safe_load(DIGITS.read_text())
    manifest["metadata"]["name"] = name
    for key, value in overrides.items():
        manifest["spec"][key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2ptrain", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _processes_of(workdir: Path) -> list[int]:
    """Pids of peers and function instances started for ``workdir`` (they carry its config path in their
    environment), so other jobs' processes on the machine never count."""
    marker = f"P2PTRAIN_CONFIG={workdir}/job.json".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _redis_servers_of(workdir: Path) -> list[int]:
    """Pids of the Redis servers of the job in ``workdir``: redis-server rewrites its environment (its
    process title), so they are found by the addresses the job's config gives them, which no other
    server can hold while they live."""
    addresses = {
        f"{r['host']}:{r['port']}".encode() for r in json.loads((workdir / "job.json").read_text())["redis"]
    }
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "redis-server":
                continue
            if any(address in (entry / "cmdline").read_bytes() for address in addresses):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_gone(pids: list[int] | set[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        time.sleep(0.1)
    return alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "X"


def test_digits_job_converges_and_writes_summary_and_model(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    model_path = tmp_path / "model.safetensors"
    result = _run(["run", str(DIGITS), "--summary", str(summary_path), "--output", str(model_path)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["rounds"] == 100
    assert summary["test_accuracy"] >= 0.95, summary
    assert set(summary["phases"]) == {"publish", "fanout", "average", "exchange", "aggregate", "update", "evaluate"}
    assert all(v > 0 for v in summary["phases"].values())
    assert summary["final_loss"] < 0.5 and summary["wall_seconds"] > 0
    assert summary["function"]["cold_starts"] >= 1
    # Time to accuracy: milestones reached in order, each no later (in rounds and seconds) than the next.
    reached = summary["time_to_accuracy"]
    assert "0.95" in reached, reached
    ordered = [reached[m] for m in sorted(reached, key=float)]
    assert all(a["round"] <= b["round"] and a["seconds"] <= b["seconds"] for a, b in itertools.pairwise(ordered))
    assert 0 < reached["0.95"]["round"] <= 100 and 0 < reached["0.95"]["seconds"] < summary["wall_seconds"]
    assert model_path.stat().st_size > 1000
    assert "test accuracy" in result.stdout + result.stderr and "fanout" in result.stderr


@pytest.mark.parametrize(
    "overrides",
    [
        {"functionsPerPeer": 1},
        {"aggregation": {"rule": "median", "byzantine": 1}},
        {"aggregation": {"rule": "trimmed-mean", "byzantine": 1}},
        {"peers": 5, "aggregation": {"rule": "krum", "byzantine": 1}, "rounds": 80},
        {"peers": 5, "aggregation": {"rule": "multi-krum", "byzantine": 1}},
    ],
    ids=["one-function-per-peer", "median", "trimmed-mean", "krum", "multi-krum"],
)
def test_variants_converge(tmp_path: Path, overrides: dict) -> None:
    job = _write_job(tmp_path, **overrides)
    summary_path = tmp_path / "summary.json"
    result = _run(["run", str(job), "--quiet", "--summary", str(summary_path), "-o", str(tmp_path / "m.st")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["test_accuracy"] >= 0.93, summary


def test_bad_manifest_exits_2_naming_the_field(tmp_path: Path) -> None:
    job = _write_job(tmp_path, peers=3, aggregation={"rule": "krum", "byzantine": 1})
    result = _run(["run", str(job)], tmp_path, timeout=60)
    assert result.returncode == 2
    assert "peers=3 is too few for krum" in result.stderr


def test_interrupt_mid_round_stops_every_process(tmp_path: Path) -> None:
    job = _write_job(tmp_path, name="interrupt", rounds=100000)
    workdir = tmp_path / "work"
    process = subprocess.Popen(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--workdir", str(workdir)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _wait_training(workdir), "training did not start"
        children = _processes_of(workdir)
        redis_during = _redis_servers_of(workdir)
        assert len(children) >= 5 and len(redis_during) == 4  # 4 peers + at least one function instance
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130
    assert "interrupted" in stderr and "left running: 0" in stderr
    assert _wait_gone(children) == []
    assert _wait_gone(redis_during) == []


def _wait_training(workdir: Path, rounds: int = 2, timeout: float = 120) -> bool:
    """True once peer 0 reports ``rounds`` finished rounds on its /status endpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            url = json.loads((workdir / "job.json").read_text())["peerUrls"][0]
            if httpx.get(url + "/status", timeout=1).json()["round"] >= rounds:
                return True
        except (OSError, ValueError, KeyError, httpx.HTTPError):
            pass
        time.sleep(0.2)
    return False


def _peer_pid(workdir: Path, index: int) -> int:
    for pid in _processes_of(workdir):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"peer" in args and args[args.index(b"--index") + 1] == str(index).encode():
            return pid
    raise AssertionError(f"no process for peer {index}")


def _function_pids(workdir: Path) -> set[int]:
    return {
        pid for pid in _processes_of(workdir)
        if b"function" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    }


def _served_ok(pid: int) -> float:
    """Successful invocations a function instance reports on its own /metrics (0 if it cannot say)."""
    try:
        environ = dict(
            item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item
        )
        address = environ[b"LISTEN_ADDRESS"].decode()
        text = httpx.get(f"http://{address}/metrics", timeout=2).text
    except (OSError, KeyError, httpx.HTTPError):
        return 0.0
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
        if line.startswith("p2ptrain_function_invocations_total{") and 'outcome="ok"' in line
    )


def test_killed_functions_are_replaced_by_instances_that_serve(tmp_path: Path) -> None:
    job = _write_job(tmp_path, name="killfn", rounds=60, function={"maxScale": 2, "containerConcurrency": 4, "idleSeconds": 30})
    workdir = tmp_path / "work"
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--workdir", str(workdir), "--summary", str(summary_path),
         "-o", str(tmp_path / "m.st")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _wait_training(workdir), "training did not start"
        victims = _function_pids(workdir)
        assert victims, "no function instance is running"
        # An instance is a cold start once the runner saw it ready; one killed while starting never
        # was. One that served a request certainly was (the runner routes only to ready instances).
        counted = {pid for pid in victims if _served_ok(pid) > 0}
        for victim in victims:  # every instance: from now on only replacements can compute gradients
            os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        replacements: set[int] = set()
        while time.monotonic() < deadline and process.poll() is None:
            replacements = _function_pids(workdir) - victims
            if any(_served_ok(pid) > 0 for pid in replacements):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"no replacement instance served a request (replacements: {sorted(replacements)})")
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["rounds"] == 60
    assert summary["function"]["crashed_instances"] >= 1
    assert summary["function"]["cold_starts"] >= len(counted) + 1  # ... and at least one replacement
    assert _wait_gone(_processes_of(workdir)) == []
    assert _wait_gone(_redis_servers_of(workdir)) == []


@pytest.mark.parametrize("every", [1, 4], ids=["checkpoint-every-round", "checkpoint-every-4-rounds"])
def test_a_killed_peer_is_restarted_catches_up_and_the_job_succeeds(tmp_path: Path, every: int) -> None:
    """With ``checkpointEveryRounds: 4`` the restarted peer also re-runs the rounds since its checkpoint,
    with the other peers' gradients of those rounds from their outboxes, and still ends in step."""
    job = _write_job(tmp_path, name="killpeer", rounds=60, exchange={"roundDeadlineSeconds": 20},
                     training={"checkpointEveryRounds": every})
    workdir = tmp_path / "work"
    summary_path = tmp_path / "summary.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--workdir", str(workdir), "--summary", str(summary_path),
         "-o", str(tmp_path / "m.st")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert _wait_training(workdir, rounds=5), "training did not start"
        os.kill(_peer_pid(workdir, 1), signal.SIGKILL)
        _, stderr = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]
    assert "peer 1 was killed (SIGKILL); restarting it (1 of backoffLimit=3 restarts)" in stderr
    summary = json.loads(summary_path.read_text())
    assert summary["peer_restarts"] == 1
    assert summary["rounds"] == 60 and summary["test_accuracy"] >= 0.93, summary
    # The restarted peer went on from where the job was (its checkpoint or the others' state), not from
    # round 0: its log holds each round once, and twice at most the rounds since its last checkpoint.
    assert summary["per_peer"][1]["rounds"] == 60
    log_text = (workdir / "peer-1.log").read_text()
    assert "resumed from checkpoint" in log_text or "caught up" in log_text
    assert log_text.count("round done") <= 60 + every, log_text.count("round done")
    # With every gradient in every round (nothing excluded) the replicas are identical; otherwise close.
    accuracies = [p["accuracy"] for p in summary["per_peer"]]
    if not summary["excluded_peers"]:
        assert len(set(accuracies)) == 1, summary["per_peer"]
    else:
        assert max(accuracies) - min(accuracies) <= 0.03, summary["per_peer"]
    assert _wait_gone(_processes_of(workdir)) == []


def test_a_failing_peer_fails_the_run_with_its_log_and_leaves_nothing(tmp_path: Path) -> None:
    # `run` checks model and data before it starts anything, so the failure must come from the peers
    # alone: a model factory that breaks only where the job's secrets are set (peers and functions).
    (tmp_path / "peer_only_failure.py").write_text(
        "import os\n"
        "from p2ptrain.models import mlp\n"
        "def build(input_shape, num_classes):\n"
        "    if 'P2PTRAIN_REDIS_PASSWORD' in os.environ:\n"
        "        raise RuntimeError('broken on purpose inside the peer')\n"
        "    return mlp(input_shape, num_classes)\n"
    )
    job = _write_job(tmp_path, name="broken", model={"name": "peer_only_failure:build"})
    workdir = tmp_path / "work"
    result = _run(["run", str(job), "--workdir", str(workdir)], tmp_path, timeout=120)
    assert result.returncode == 1
    assert "exited with code" in result.stderr and "broken on purpose inside the peer" in result.stderr
    assert _wait_gone(_processes_of(workdir)) == []
    assert _wait_gone(_redis_servers_of(workdir)) == []
