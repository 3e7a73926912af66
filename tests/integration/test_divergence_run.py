"""``p2ptrain run`` on jobs that diverge: they stop within a few rounds with exit code 3 and a message
naming the cause and the round (``training.onDivergence: fail``), or train on past the diverging
micro-batches (``skipRound``). Real processes, real Redis, real HTTP, real torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[2]


def _job(tmp_path: Path, name: str, **spec: object) -> Path:
    manifest = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"].update({"peers": 2, "functionsPerPeer": 2, "rounds": 40, **spec})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _digits_with_nan(tmp_path: Path, every: int) -> Path:
    """The digits data set with every ``every``-th sample's features at 3e38: finite, so the file
    passes the pre-flight check (NaN or Inf in a data file is refused before anything starts, exit 2),
    but the first layer overflows to Inf and the gradient of those samples is NaN, as with a corrupt
    or badly scaled data set."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x[::every] = np.float32(3e38)
    path = tmp_path / "digits-nan.npz"
    np.savez(path, x=x, y=digits.target.astype(np.int64))
    return path


def _run(job: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--quiet", "-o", str(tmp_path / "m.safetensors"), *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def _diverged_round(stderr: str) -> int:
    match = re.search(r"training diverged in round (\d+)", stderr)
    assert match, stderr[-3000:]
    return int(match.group(1))


def test_a_huge_learning_rate_stops_the_run_in_a_few_rounds_with_exit_3(tmp_path: Path) -> None:
    job = _job(tmp_path, "explodes", optimizer={"name": "sgd", "learningRate": 100, "momentum": 0.9})
    result = _run(job, tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert _diverged_round(result.stderr) <= 5
    assert re.search(r"\((exploding-loss|non-finite-loss|non-finite-gradient|non-finite-aggregate)\)", result.stderr)
    assert "is the gradient function" not in result.stderr  # not mistaken for an outage


def test_nan_in_the_data_stops_the_run_naming_the_non_finite_gradient(tmp_path: Path) -> None:
    data = _digits_with_nan(tmp_path, every=7)  # every minibatch holds some
    job = _job(tmp_path, "nan-data", dataset={"name": "path", "path": str(data)},
               exchange={"roundDeadlineSeconds": 60})
    result = _run(job, tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert _diverged_round(result.stderr) == 1
    assert "(non-finite-gradient)" in result.stderr and "non-finite values" in result.stderr


def test_skip_round_leaves_diverging_micro_batches_out_and_trains_on(tmp_path: Path) -> None:
    data = _digits_with_nan(tmp_path, every=100)  # 1 %: some micro-batches hold one
    job = _job(tmp_path, "nan-skip", rounds=12, dataset={"name": "path", "path": str(data)},
               training={"onDivergence": "skipRound"}, exchange={"roundDeadlineSeconds": 5})
    summary_path = tmp_path / "summary.json"
    result = _run(job, tmp_path, "--summary", str(summary_path))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["rounds"] == 12
    assert summary["skipped_updates"].get("divergence", 0) >= 1, summary
    assert summary["final_loss"] is not None and np.isfinite(summary["final_loss"])
    assert summary["replicas"]["identical"], summary["replicas"]
