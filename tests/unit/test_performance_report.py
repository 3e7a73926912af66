"""The performance report (bench/perfreport.py) and its helpers, on a small synthetic result set.

Nothing is timed here: the figures are made up so that each issue-10 target has a known verdict, and
the test checks that the page states them, links PNGs that exist and are images, and says where the
time goes for a missed target. The CPU sampler (bench/proccpu.py) is checked on a real child process.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import perfreport  # noqa: E402  (bench/ is a folder of scripts, not a package)
import proccpu  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(peers: int, mode: str, round_ms: float, ddp_ms: float, **extra: Any) -> dict[str, Any]:
    # Phases in the proportions of a real digits round: fan-out first, exchange second.
    shares = {"publish": 0.04, "fanout": 0.5, "average": 0.04, "exchange": 0.28, "aggregate": 0.02, "update": 0.1, "evaluate": 0.02}
    phases = {p: round_ms / 1000 * s for p, s in shares.items()}
    return {
        "name": f"synthetic-{peers}-{mode}", "mode": mode, "peers": peers, "functions_per_peer": 2,
        "model": 'mlp {"hidden": 64}', "params": 4810, "batch_size": 64, "rounds": 20, "phases": phases,
        "round_seconds": round_ms / 1000, "first_round_seconds": 3.0, "accuracy": 0.95, "ddp_accuracy": 0.95,
        "ddp_step_seconds": ddp_ms / 1000, "aggregate_update_seconds": phases["aggregate"] + phases["update"],
        "gradient_seconds": phases["fanout"] + phases["average"], "function_cpu_seconds_per_round": 0.05,
        "peer_cpu_seconds_per_round": 0.02, "max_instances": 4, **extra,
    }


def _functions_run(mode: str, functions: int, gradient_ms: float) -> dict[str, Any]:
    run = _run(1, mode, gradient_ms * 1.2, 1.0, functions_per_peer=functions)
    run["gradient_seconds"] = gradient_ms / 1000
    return run


@pytest.fixture
def results() -> dict[str, Any]:
    return {
        "meta": {"date": "2026-01-01 00:00 UTC", "commit": "abc1234", "machine": "2 cores (synthetic)",
                 "quick": True, "minutes": 1.5, "load_end": 2.0},
        "scaling": [_run(2, "serverless", 20, 10), _run(4, "serverless", 25, 10),  # 2.5x: met
                    _run(8, "serverless", 80, 10), _run(4, "inline", 30, 10)],  # inline 3.0x: missed
        "sizes": [_run(2, "serverless", 30, 10, params=10_030),
                  # 1.13M: aggregate + update = 12% of 100 ms = 12 ms (missed); round 5x DDP (missed)
                  _run(2, "serverless", 100, 20, params=1_126_410, target=True)],
        "functions": {"runs": [_functions_run("inline", 1, 200), _functions_run("serverless", 1, 220),
                               _functions_run("serverless", 2, 100)],  # 0.5x inline: met
                      "description": "Synthetic CNN.", "inline_skipped": None},
        "accumulate": {"k": 8, "d": 1000, "memcpy_seconds": 0.01, "module_vs_memcpy": 0.7,  # met
                       "methods": {"module": {"server_seconds": 0.014, "end_to_end_seconds": 0.2},
                                   "lua": {"server_seconds": 10.0, "end_to_end_seconds": 10.5},
                                   "memcpy": {"server_seconds": 0.01, "end_to_end_seconds": None}}},
    }


def _target_rows(page: str) -> dict[str, str]:
    section = page.split("## Issue 10 targets", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): cells[3].strip() for cells in rows[1:]}


def test_report_states_each_target_verdict_from_the_figures(results: dict[str, Any], tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "performance.md"
    perfreport.render(results, doc, tmp_path / "docs" / "img" / "performance")
    verdicts = _target_rows(doc.read_text(encoding="utf-8"))
    assert verdicts == {
        "digits 4x2: round / DDP step": "met",
        "digits 4x2 inline: round / DDP step": "**missed**",
        "MLP 1.13M: aggregate + update": "**missed**",
        "MLP 1.13M: round / DDP step": "**missed**",
        "in-database average: module speed / memcpy speed": "met",
        "CNN: gradient time, 2 functions / inline": "met",
    }


def test_report_links_png_plots_that_exist(results: dict[str, Any], tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "performance.md"
    written = perfreport.render(results, doc, tmp_path / "docs" / "img" / "performance")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc.read_text(encoding="utf-8"))
    assert len(links) == 4  # peers, model size, functions, accumulate
    for link in links:
        image = doc.parent / link
        assert image in written
        assert image.read_bytes()[:8] == PNG_MAGIC, f"{link} is not a PNG"


def test_missed_targets_name_the_phase_where_the_time_goes(results: dict[str, Any], tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    page = doc.read_text(encoding="utf-8")
    assert "- digits 4x2 inline: round / DDP step: the round is mostly fanout (15.0 ms, 50%) and exchange (8.4 ms, 28%)." in page
    assert "- MLP 1.13M: aggregate + update: aggregate 2.0 ms + update 10.0 ms per round." in page
    assert "- MLP 1.13M: round / DDP step: the round is mostly fanout (50.0 ms, 50%)" in page
    assert "- digits 4x2: round / DDP step:" not in page  # met: no explanation owed


def test_missed_average_and_cnn_targets_give_their_figures(results: dict[str, Any], tmp_path: Path) -> None:
    results["accumulate"] |= {"module_vs_memcpy": 0.4, "module_vs_memcpy_median": 0.45}
    results["functions"]["runs"][2]["gradient_seconds"] = 0.15  # 0.75x inline: missed
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    page = doc.read_text(encoding="utf-8")
    assert "- in-database average: module speed / memcpy speed: best of the repetitions 0.40, median of the per-repetition ratios 0.45;" in page
    assert "- CNN: gradient time, 2 functions / inline: gradient 150 ms with 2 functions" in page
    assert "vs 200 ms inline" in page


def test_report_without_inline_says_why_instead_of_a_verdict(results: dict[str, Any], tmp_path: Path) -> None:
    note = "the installed spec has no `function.mode` field"
    results["scaling"] = [r for r in results["scaling"] if r["mode"] != "inline"]
    results["functions"]["runs"] = [r for r in results["functions"]["runs"] if r["mode"] != "inline"]
    results["functions"]["inline_skipped"] = note
    results["inline_skipped"] = note
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    page = doc.read_text(encoding="utf-8")
    verdicts = _target_rows(page)
    assert verdicts["digits 4x2 inline: round / DDP step"] == "not measured"
    assert verdicts["CNN: gradient time, 2 functions / inline"] == "not measured"
    assert f"Inline not measured: {note}" in page


def test_function_table_reports_the_seeds_percent_less_than_inline(results: dict[str, Any], tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    page = doc.read_text(encoding="utf-8")
    assert "| 2 functions/peer | 100.0 | 50% less |" in page
    assert "| 1 function/peer | 220.0 | 10% more |" in page


def test_child_cpu_counts_a_child_that_has_exited() -> None:
    # The child burns CPU, says so, and waits on stdin: the sample taken then holds its CPU time, and
    # the totals keep it after the child is gone (as with a function instance scaled to zero).
    burn = ("import sys, time\n"
            "while time.process_time() < 0.3: pass\n"
            "print(time.process_time(), flush=True)\n"
            "sys.stdin.read()\n")
    with proccpu.ChildCpu(interval=60) as cpu:  # one sample, taken by hand below
        child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdin is not None
        burnt = float(child.stdout.readline())
        cpu.sample()
        child.stdin.close()
        child.wait(timeout=30)
    assert cpu.cpu_at().get("other", 0.0) >= burnt - 2 / proccpu.TICKS  # /proc counts in clock ticks
    assert cpu.cpu_at(when=0.0) == {"other": 0.0, "runner": 0.0}  # nothing was sampled before the epoch
    # The sampling process itself counts as the runner, with the CPU it has used (at least this test's).
    assert 0.0 < cpu.cpu_at()["runner"] <= time.process_time() + 2 / proccpu.TICKS


@pytest.mark.parametrize(
    ("argv", "kind"),
    [
        (["/usr/bin/python3", "-m", "p2ptrain", "function"], "function"),
        (["/v/bin/python", "-m", "p2ptrain", "--log-level", "INFO", "peer", "--config", "j.json"], "peer"),
        (["/usr/bin/redis-server", "127.0.0.1:6379"], "redis"),
        (["/usr/bin/python3", "bench/performance.py"], "other"),
    ],
)
def test_child_processes_are_told_apart_by_command_line(argv: list[str], kind: str) -> None:
    assert proccpu.classify(argv) == kind


def test_cpu_per_round_is_tabled_and_named_where_a_target_is_missed(results: dict[str, Any], tmp_path: Path) -> None:
    """With the processes' CPU measured, each phase table gets its CPU table, and a missed round target
    says how much CPU the round used against a DDP step's."""
    for run in results["scaling"] + results["sizes"]:
        run["cpu_seconds_per_round"] = {"peer": 0.030, "function": 0.020, "runner": 0.005, "redis": 0.003}
        run["ddp_cpu_seconds_per_step"] = 0.016
    results["meta"]["cores"] = 2
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    page = doc.read_text(encoding="utf-8")
    assert page.count("| config | peers | functions | front door + runner | Redis | total CPU ms |") == 2
    # 4 peers inline: 58 ms of CPU a round, 2 cores x 30 ms = 60 ms, DDP 16 ms: 3.6x
    assert "| 4 peers x 2 inline | 30.0 | 20.0 | 5.0 | 3.0 | 58.0 | 60.0 | 16.0 | 3.6x |" in page
    assert ("- digits 4x2 inline: round / DDP step: the round is mostly fanout (15.0 ms, 50%) and exchange "
            "(8.4 ms, 28%); it used 58.0 ms of CPU a round (peers 30.0, functions 20.0, front door + runner 5.0, "
            "Redis 3.0) against 16.0 ms a DDP step.") in page


def test_without_cpu_figures_no_cpu_table_is_written(results: dict[str, Any], tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    assert "total CPU ms" not in doc.read_text(encoding="utf-8")


def test_the_target_is_read_from_the_default_run_and_the_checkpoint_every_round_run_is_labelled(
        results: dict[str, Any], tmp_path: Path) -> None:
    # The 1.13M job again with training.checkpointEveryRounds: 1, shown beside, never the verdict.
    results["sizes"].append(_run(2, "serverless", 60, 20, params=1_126_410, target=False, checkpoint_every_rounds=1))
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    page = doc.read_text(encoding="utf-8")
    assert _target_rows(page)["MLP 1.13M: round / DDP step"] == "**missed**"  # 5x from the default run, not 3x
    assert "| 1.13e+06 params, 2 peers, checkpoint every round | " in page
    assert "| 1.13e+06 params, 2 peers | " in page


def test_the_per_round_spread_of_aggregate_and_update_is_read_from_the_peers_logs(tmp_path: Path) -> None:
    import performance  # imports torch and the benches: only this test needs it

    def line(peer: int, round_number: int, aggregate: float, update: float) -> str:
        return (f"2026-11-28 12:57:26,060 INFO p2ptrain.peer.report round done job=j peer={peer} "
                f"round={round_number} of=40 loss=2.3 seconds=0.3 publish=0.02 aggregate={aggregate} "
                f"update={update} evaluate=0")

    # Round 1 (cold starts) is left out; a peer whose log is missing or has a torn line adds nothing.
    (tmp_path / "peer-0.log").write_text("\n".join([
        line(0, 1, 0.5, 0.5), line(0, 2, 0.003, 0.002), line(0, 3, 0.004, 0.003), "peer 0 started",
        line(0, 4, 0.030, 0.020)]) + "\n", encoding="utf-8")
    (tmp_path / "peer-1.log").write_text(line(1, 2, 0.002, 0.002) + "\n" + line(1, 3, 0.003, 0.003).replace(
        "update=0.003", "update=x") + "\n", encoding="utf-8")
    samples = performance.rounds_of(tmp_path, 3, ("aggregate", "update"))
    assert samples == pytest.approx([0.005, 0.007, 0.050, 0.004])
    spread = performance.distribution(samples)
    assert spread["median"] == pytest.approx(0.007)
    assert spread["p90"] == pytest.approx(0.050)
    assert spread["over_target"] == pytest.approx(0.25)
    assert spread["count"] == 4
    assert performance.distribution([]) == {}


def test_a_missed_aggregate_target_shows_its_per_round_median_and_p90(results: dict[str, Any], tmp_path: Path) -> None:
    big = results["sizes"][1]
    big["aggregate_update_rounds"] = {"median": 0.0071, "p90": 0.0254, "over_target": 0.18, "count": 156}
    doc = tmp_path / "performance.md"
    perfreport.render(results, doc, tmp_path / "img")
    page = doc.read_text(encoding="utf-8")
    assert "mean of 156 peer-rounds; median 7.1 ms, p90 25.4 ms, 18% over 10 ms" in page
    assert "aggregate 2.0 ms + update 10.0 ms per round; per round, median 7.1 ms and p90 25.4 ms" in page
