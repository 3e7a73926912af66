"""The P2P-vs-PS report (bench/compare.py's rendering) on a tiny synthetic result set.

Nothing is timed here: the figures are made up so that every ratio has a known value, and the test
checks that the page states machine, date, commit and "one run", that its ratios to DDP and its
findings are the ones the figures give, that a failed run and a fault drill are reported as such, and
that the linked PNGs exist and are images.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import compare  # noqa: E402  (bench/ is a folder of scripts, not a package)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(round_s: float, target_s: float | None, bytes_per_round: float, usd: float, **extra: Any) -> dict[str, Any]:
    reached = {"0.5": {"round": 2, "seconds": target_s / 2 if target_s else 0.1}}
    if target_s is not None:
        reached["0.9"] = {"round": 10, "seconds": target_s}
    return {"round_seconds": round_s, "first_round_seconds": 2.0, "rounds": 20, "accuracy": 0.93, "wall_seconds": 30.0,
            "reached": reached, "bytes_per_round": bytes_per_round, "bytes_between_peers_per_round": bytes_per_round / 2,
            "invocations": 80, "money": {"serverless": usd, "vm": usd / 2}, "finished": True, **extra}


def _job(peers: int, ps_target: float | None = 4.0) -> dict[str, Any]:
    return {"name": f"digits {peers} peers", "model": "digits", "peers": peers, "rounds": 20, "params": 4810,
            "systems": {"p2p": _row(0.2, 4.0, 8000, 0.004), "ps": _row(0.3, ps_target, 4000, 0.002),
                        "inline": _row(0.05, 1.0, 2000, 0.001), "ddp": _row(0.01, 0.2, 1000, 0.0005)}}


def _results() -> dict[str, Any]:
    return {
        "meta": {"date": "2026-11-27 04:00 UTC", "commit": "abc1234", "machine": "2 cores (synthetic CPU)",
                 "quick": True, "minutes": 12.5},
        "jobs": [_job(2), _job(4, ps_target=None),
                 {**_job(2), "name": "cnn 2 peers", "model": "cnn",
                  "systems": {**_job(2)["systems"], "ps": {"error": "RunError: the aggregator failed", "wall_seconds": 9.0}}}],
        "faults": [
            {"system": "p2p", "fault": "peer", "job": "digits 4 peers", "at_round": 7, "clean_wall_seconds": 30.0,
             "clean_accuracy": 0.93, "clean_tail_seconds": 10.0, "tail_seconds": 22.5, "wall_seconds": 31.0,
             "accuracy": 0.92, "finished": True, "rounds": 20,
             "restarts": 1, "committed_rounds_lost": 0, "replicas_identical_at_end": True},
            {"system": "ps", "fault": "aggregator", "job": "digits 4 peers", "at_round": 7, "clean_wall_seconds": 30.0,
             "clean_accuracy": 0.93, "error": "TimeoutError: the aggregator's round 7", "wall_seconds": 600.0},
        ],
    }


def test_the_report_states_its_ratios_and_provenance(tmp_path: Path) -> None:
    doc, images = tmp_path / "docs" / "p2p-vs-ps.md", tmp_path / "docs" / "img" / "compare"
    written = compare.render(_results(), doc, images)
    text = doc.read_text(encoding="utf-8")

    assert "2026-11-27 04:00 UTC" in text and "`abc1234`" in text and "2 cores (synthetic CPU)" in text
    assert "one run" in text and "--quick" in text
    # digits 2 peers: P2P 0.2 s per round vs DDP 0.01 s: 20x; to 0.90 accuracy 4.0 s vs 0.2 s: 20x;
    # bytes 8000 vs 1000: 8x; cost 0.004 vs 0.0005: 8x (both price lists).
    p2p = next(line for line in text.splitlines() if line.startswith("| P2P serverless | 0.2000"))
    assert p2p.startswith("| P2P serverless | 0.2000 | 20.0x | 4.00 | 20.0x | 2.00 | 8.0 kB | 8.00x |")
    assert "| 8.00x, 8.00x | 0.930 |" in p2p
    assert "s to 0.90 accuracy" in text
    # digits 4 peers: PS never reached 0.9, so the target falls to 0.5, which all reached.
    assert "s to 0.50 accuracy" in text
    assert "| PS serverless | failed: RunError: the aggregator failed |" in text
    # Findings are computed from the figures: PS round / P2P = 0.3 / 0.2, bytes between peers 2000 / 4000.
    assert "PS round / P2P round = 1.50" in text
    assert "PS cost / P2P cost = 0.50 (serverless prices)" in text
    # What the cost block leaves out under PS: 2 peers x 12 bytes x 4810 parameters, added to PS's 4000.
    assert "estimated 115.4 kB per round) moves 14.9x of P2P's bytes per round" in text
    assert "cnn 2 peers**" not in text  # a job with a failed system draws no finding
    # Fault drills: time lost against the clean run, and a drill that broke is reported, not dropped.
    # Time lost: kill-to-end minus the clean run's same-round-to-end, not the wall times (start-up noise).
    assert "| one peer SIGKILLed | 7 | yes | +12.5 s | 22.5 (10.0) | 31 (30) | 0.920 (0.930) | 1 | 0 | yes |" in text
    assert "+12.5 s against its clean run, accuracy 0.920 (clean 0.930)" in text
    assert "no: TimeoutError: the aggregator's round 7" in text

    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(linked) == 5
    for link in linked:
        png = (doc.parent / link).resolve()
        assert png in {p.resolve() for p in written}
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_ratios_are_against_ddp_in_the_same_job() -> None:
    job = _job(2)
    r = compare.ratios(job)
    assert r["ddp"]["round"] == 1.0
    assert r["inline"] == pytest.approx({"round": 5.0, "target": 5.0, "bytes": 2.0, "cost_serverless": 2.0, "cost_vm": 2.0})
    assert compare.target_accuracy(job) == "0.9"
    assert compare.target_accuracy(_job(2, ps_target=None)) == "0.5"
