"""``p2ptrain run examples/digits-inline.yaml`` end to end, as a user runs it: real peer processes,
real Redis, real HTTP between the peers, real torch; no gradient function anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_digits_inline_trains_to_093_and_starts_no_function(tmp_path: Path) -> None:
    summary_path, workdir = tmp_path / "summary.json", tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "-m", "p2ptrain", "run", str(ROOT / "examples" / "digits-inline.yaml"),
         "--summary", str(summary_path), "-o", str(tmp_path / "model.safetensors"), "--workdir", str(workdir)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["mode"] == "inline" and summary["rounds"] == 100
    assert summary["test_accuracy"] >= 0.93, summary
    assert summary["replicas"]["identical"], summary["replicas"]
    # No function instance, no activator: nothing was started, nothing was asked of one.
    assert summary["function"]["cold_starts"] == 0 and summary["function"]["requests"] == 0
    assert sorted(p.name for p in workdir.glob("function-*.log")) == []
    assert sorted(p.name for p in workdir.glob("peer-*.log")) == [f"peer-{i}.log" for i in range(4)]
    assert summary["function_retries"] == 0 and summary["function_failures"] == {}
    assert "function.mode=inline" in result.stderr  # the start line and the summary say the mode
    assert "functions     none: function.mode=inline" in result.stdout + result.stderr
