"""``bench/gpu_job.py`` end to end on whatever this machine has: real ``p2ptrain run`` jobs (Redis servers,
peers, function processes). Without CUDA (CI) its ``cuda`` side is ``function.device: auto``, which must
compute on the CPU and so train exactly as ``cpu`` does; with CUDA the two trainings agree within float
rounding. Either way the script's report and JSON must hold every run it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_job_trains_the_same_model_on_both_devices_and_reports_every_run(tmp_path: Path) -> None:
    out = tmp_path / "gpu_job.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_job.py"), "--digits-rounds", "2", "--cnn-rounds", "2",
         "--cnn-functions", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=540, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    cuda = torch.cuda.is_available()
    assert report["device"] == ("cuda" if cuda else "auto")
    digits = report["digits"]
    assert set(digits["runs"]) == {"cpu", report["device"]}
    if cuda:
        assert digits["max_abs_diff"] <= 1e-4 * max(1.0, digits["largest_param"])
    else:  # auto without a GPU is the CPU: the same training, bit for bit
        assert digits["max_abs_diff"] == 0.0
        accuracies = {run["summary"]["test_accuracy"] for run in digits["runs"].values()}
        assert len(accuracies) == 1
    assert all(run["summary"]["rounds"] == 2 for run in digits["runs"].values())
    rows = report["cnn"]["rows"]
    assert [(row["device"], row["functions_per_peer"]) for row in rows] == [("cpu", 1), (report["device"], 1)]
    assert all(row["gradient_seconds"] > 0 and row["rounds"] == 2 for row in [*rows, report["cnn"]["inline"]])
    assert report["cnn"]["inline"]["mode"] == "inline"
    assert "| inline (peer's CPU) |" in result.stdout
