"""Clean runs converge with the newer aggregation rules: ``p2ptrain run`` on the digits job, real peers,
real Redis, real gradient functions, each peer aggregating with the rule the manifest names.

The older rules are covered by test_local_run.py::test_variants_converge; the bar (0.93 test
accuracy) is the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits.yaml"


@pytest.mark.parametrize(
    "aggregation,peers,functions_per_peer",
    [
        # n >= 4f + 3: the smallest Bulyan job; one function per peer keeps 7 peers light.
        ({"rule": "bulyan", "byzantine": 1}, 7, 1),
        ({"rule": "geometric-median", "byzantine": 1}, 4, 2),
        ({"rule": "centered-clipping", "byzantine": 1}, 4, 2),
    ],
    ids=["bulyan", "geometric-median", "centered-clipping"],
)
def test_new_rules_converge_on_a_clean_run(
    tmp_path: Path, aggregation: dict, peers: int, functions_per_peer: int
) -> None:
    manifest = yaml.safe_load(DIGITS.read_text())
    manifest["metadata"]["name"] = aggregation["rule"]
    manifest["spec"].update(peers=peers, functionsPerPeer=functions_per_peer, aggregation=aggregation)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(manifest))
    summary_path = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--quiet", "--summary", str(summary_path),
         "-o", str(tmp_path / "model.safetensors")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["aggregation"] == aggregation["rule"]
    assert summary["rounds"] == 100
    assert summary["test_accuracy"] >= 0.93, summary
