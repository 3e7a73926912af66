"""``topology: ps`` end to end with ``p2ptrain run``: real processes (peers, the aggregator, function
instances), real Redis servers, real HTTP. The digits job trains to the same accuracy as with ``p2p``;
the aggregator killed mid-run is restarted and resumes from its checkpoint (or, past
``runPolicy.backoffLimit``, fails the run naming it); a killed peer adopts the aggregator's model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.integration.test_local_run import _peer_pid, _processes_of, _redis_servers_of, _wait_gone

ROOT = Path(__file__).resolve().parents[2]
DIGITS_PS = ROOT / "examples" / "digits-ps.yaml"


def _write_job(tmp_path: Path, name: str, **overrides: object) -> Path:
    manifest = yaml.safe_load(DIGITS_PS.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"].update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _start(tmp_path: Path, job: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    workdir, summary = tmp_path / "work", tmp_path / "summary.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--workdir", str(workdir), "--summary", str(summary),
         "-o", str(tmp_path / "model.safetensors")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return process, workdir, summary


def _aggregator_round(workdir: Path) -> int:
    """Rounds the aggregator reports finished on its /status (-1 while it does not answer)."""
    try:
        url = json.loads((workdir / "job.json").read_text())["aggregatorUrl"]
        return int(httpx.get(url + "/status", timeout=1).json()["round"])
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return -1


def _wait_aggregator(workdir: Path, rounds: int, timeout: float = 300) -> bool:
    # Generous: on a loaded 2-core machine starting Redis, peers, the aggregator and cold functions
    # has taken minutes. A bound against a hang, not a timing claim.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _aggregator_round(workdir) >= rounds:
            return True
        time.sleep(0.2)
    return False


def _aggregator_pid(workdir: Path) -> int:
    for pid in _processes_of(workdir):
        if b"aggregator" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
            return pid
    raise AssertionError("no aggregator process")


def _finish(process: subprocess.Popen[str], timeout: float = 600) -> str:
    try:
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return stderr


def test_digits_with_a_parameter_server_trains_to_095(tmp_path: Path) -> None:
    process, workdir, summary_path = _start(tmp_path, DIGITS_PS)
    stderr = _finish(process)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["topology"] == "ps" and summary["rounds"] == 100
    assert summary["test_accuracy"] >= 0.95, summary
    aggregator = summary["aggregator"]
    assert aggregator["rounds"] == 100 and aggregator["restarts"] == 0
    assert aggregator["accuracy"] == summary["test_accuracy"]  # the peers hold the aggregator's model
    # Every peer adopts the aggregator's checkpoint each round: the aggregator's parameter hash is
    # compared with the peers' and they are bitwise identical in every round.
    assert summary["replicas"]["identical"] is True and summary["replicas"]["rounds_compared"] > 0, summary["replicas"]
    assert (tmp_path / "model.safetensors").stat().st_size > 1000
    assert _wait_gone(_processes_of(workdir)) == []
    assert _wait_gone(_redis_servers_of(workdir)) == []


def test_a_killed_aggregator_is_restarted_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    job = _write_job(tmp_path, "killagg", rounds=60)
    process, workdir, summary_path = _start(tmp_path, job)
    try:
        assert _wait_aggregator(workdir, rounds=5), "training did not start"
        os.kill(_aggregator_pid(workdir), signal.SIGKILL)
    finally:
        stderr = _finish(process)
    assert process.returncode == 0, stderr[-3000:]
    assert "the aggregator was killed (SIGKILL); restarting it (1 of backoffLimit=3 restarts)" in stderr
    summary = json.loads(summary_path.read_text())
    assert summary["aggregator"]["restarts"] == 1 and summary["peer_restarts"] == 0
    assert summary["rounds"] == 60 and summary["test_accuracy"] >= 0.93, summary
    # It went on from its checkpoint, not from round 0: each round once, the one it was killed in at
    # most twice; and the peers waited for it instead of failing.
    log_text = (workdir / "aggregator.log").read_text()
    assert "resumed from checkpoint" in log_text
    assert log_text.count("round done") <= 61, log_text.count("round done")
    assert summary["replicas"]["identical"] is True, summary["replicas"]
    assert _wait_gone(_processes_of(workdir)) == []


def test_a_killed_aggregator_past_the_backoff_limit_fails_the_run(tmp_path: Path) -> None:
    job = _write_job(tmp_path, "aggfails", rounds=60, runPolicy={"backoffLimit": 0})
    process, workdir, _ = _start(tmp_path, job)
    try:
        assert _wait_aggregator(workdir, rounds=3), "training did not start"
        os.kill(_aggregator_pid(workdir), signal.SIGKILL)
    finally:
        stderr = _finish(process, timeout=300)
    assert process.returncode == 1, stderr[-3000:]
    assert "the aggregator was killed by SIGKILL before the job finished after 0 restarts (backoffLimit=0)" in stderr
    assert _wait_gone(_processes_of(workdir)) == []
    assert _wait_gone(_redis_servers_of(workdir)) == []


def test_a_killed_peer_adopts_the_aggregators_model_and_the_job_succeeds(tmp_path: Path) -> None:
    job = _write_job(tmp_path, "killpeerps", rounds=60)
    process, workdir, summary_path = _start(tmp_path, job)
    try:
        assert _wait_aggregator(workdir, rounds=5), "training did not start"
        os.kill(_peer_pid(workdir, 1), signal.SIGKILL)
    finally:
        stderr = _finish(process)
    assert process.returncode == 0, stderr[-3000:]
    assert "peer 1 was killed (SIGKILL); restarting it (1 of backoffLimit=3 restarts)" in stderr
    summary = json.loads(summary_path.read_text())
    assert summary["peer_restarts"] == 1 and summary["aggregator"]["restarts"] == 0
    assert summary["rounds"] == 60 and summary["test_accuracy"] >= 0.93, summary
    assert summary["per_peer"][1]["rounds"] == 60
    log_text = (workdir / "peer-1.log").read_text()
    assert "resumed from checkpoint" in log_text or "caught up: adopted the aggregator's model" in log_text
    assert log_text.count("round done") <= 61, log_text.count("round done")
    # Whatever the aggregator aggregated without peer 1, every peer ends on its model.
    assert len({p["accuracy"] for p in summary["per_peer"]}) == 1, summary["per_peer"]
    assert summary["replicas"]["identical"] is True, summary["replicas"]
    assert _wait_gone(_processes_of(workdir)) == []


def test_an_aggregator_restarted_with_its_redis_empty_takes_the_rounds_since_the_peers_checkpoint_from_their_outboxes(
        tmp_path: Path) -> None:
    """The aggregator and its Redis both lost (a node gone): the restarted aggregator adopts the peers'
    checkpoints, which are up to ``checkpointEveryRounds - 1`` rounds behind the peers. The peers sent
    those rounds' gradients to the aggregator that was lost and have moved on, so those rounds close at
    once; their gradients are in the peers' outboxes, and the aggregator takes them from there instead of
    closing the rounds without an update or waiting out a round deadline for each."""
    import redis

    deadline = 300  # waiting one out would end the run past the bound below
    job = _write_job(tmp_path, "aggempty", rounds=40, training={"checkpointEveryRounds": 4},
                     exchange={"roundDeadlineSeconds": deadline})
    process, workdir, summary_path = _start(tmp_path, job)
    try:
        # Kill it in a round after the peers' checkpoint (rounds 4, 8, ...), so they are ahead of it.
        assert _wait_aggregator(workdir, rounds=6), "training did not start"
        while _aggregator_round(workdir) % 4 in (0, 3):
            time.sleep(0.01)
        pid = _aggregator_pid(workdir)
        environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if item)
        address = json.loads((workdir / "job.json").read_text())["aggregatorRedis"]
        os.kill(pid, signal.SIGKILL)
        client = redis.Redis(host=address["host"], port=address["port"],
                             password=environ[b"P2PTRAIN_REDIS_PASSWORD"].decode())
        client.flushall()  # before the restarted process (seconds to import torch) reads it
        client.close()
    finally:
        stderr = _finish(process)
    assert process.returncode == 0, stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["aggregator"]["restarts"] == 1 and summary["rounds"] == 40, summary
    log_text = (workdir / "aggregator.log").read_text()
    assert "caught up: adopted the state after round" in log_text and "resumed from checkpoint" not in log_text
    assert "from its outbox" in log_text  # the rounds since the peers' checkpoint
    assert "skipping this round's update" not in log_text
    assert summary["wall_seconds"] < deadline, summary["wall_seconds"]
    assert summary["replicas"]["identical"] is True, summary["replicas"]
