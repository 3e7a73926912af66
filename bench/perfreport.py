"""docs/performance.md and its plots, from the results ``bench/performance.py`` measured.

Pure rendering: a results dict (JSON-able, as ``performance.py --save`` writes it) in, Markdown and PNG
files out; no timing happens here, so the unit test runs it on a tiny synthetic result set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine

import matplotlib.pyplot as plt

from p2ptrain.metrics import ROUND_PHASES
from p2ptrain.spec import crd_default

CHECKPOINT_EVERY_DEFAULT: int = crd_default("training.checkpointEveryRounds")

# One colour per phase, the same in every plot, so a reader compares like with like across figures.
PHASE_COLOURS = dict(zip(ROUND_PHASES, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"), strict=True))
DDP_COLOUR = "#444444"


@dataclass(frozen=True)
class Target:
    """One done-when target of issue 10: what was measured against what was promised."""

    name: str
    measured: float | None  # None: not measured in this run (the reason is in ``note``)
    limit: float
    at_most: bool  # True: measured <= limit meets it; False: measured >= limit meets it
    unit: str
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.measured is None or math.isnan(self.measured):
            return "not measured"
        ok = self.measured <= self.limit if self.at_most else self.measured >= self.limit
        return "met" if ok else "**missed**"

    def row(self) -> str:
        measured = "-" if self.measured is None or math.isnan(self.measured) else f"{self.measured:.2f}{self.unit}"
        sign = "≤" if self.at_most else "≥"
        return f"| {self.name} | {measured} | {sign} {self.limit:g}{self.unit} | {self.verdict} | {self.note} |"


def _find(runs: Sequence[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in runs if all(r.get(k) == v for k, v in match.items())), None)


def _ratio(run: dict[str, Any] | None, key: str = "round_seconds") -> float | None:
    if run is None or not run.get("ddp_step_seconds"):
        return None
    return float(run[key]) / float(run["ddp_step_seconds"])


def targets(results: dict[str, Any]) -> list[Target]:
    """Issue 10's done-when targets, each read from the part of the results that measures it."""
    scaling, sizes = results.get("scaling", []), results.get("sizes", [])
    digits = _find(scaling, peers=4, mode="serverless")
    inline = _find(scaling, peers=4, mode="inline")
    big = _find(sizes, target=True)
    accumulate = results.get("accumulate") or {}
    functions = results.get("functions") or {}
    cnn_inline = _find(functions.get("runs", []), mode="inline")
    cnn_two = _find(functions.get("runs", []), mode="serverless", functions_per_peer=2)
    inline_note = "" if inline else (results.get("inline_skipped") or "inline not in this run")
    digits_note = "" if digits else "not in this run"
    cnn_ratio = (cnn_two["gradient_seconds"] / cnn_inline["gradient_seconds"]) if cnn_two and cnn_inline else None
    big_name = f"MLP {big['params'] / 1e6:.2f}M" if big else "MLP 1.13M"
    return [
        Target(f"digits {digits['peers'] if digits else 4}x{digits['functions_per_peer'] if digits else 2}: "
               "round / DDP step", _ratio(digits), 3.0, True, "x", digits_note),
        Target("digits 4x2 inline: round / DDP step", _ratio(inline), 2.0, True, "x", inline_note),
        Target(f"{big_name}: aggregate + update", big["aggregate_update_seconds"] * 1000 if big else None,
               10.0, True, " ms", _rounds_note(big) if big else "model size not in this run"),
        Target(f"{big_name}: round / DDP step", _ratio(big), 4.0, True, "x", "" if big else "model size not in this run"),
        Target("in-database average: module speed / memcpy speed", accumulate.get("module_vs_memcpy"), 0.5, False, "",
               "server time, best of repetitions" if accumulate else "not in this run"),
        Target("CNN: gradient time, 2 functions / inline", cnn_ratio, 0.6, True, "x",
               "" if cnn_ratio is not None else (functions.get("inline_skipped") or "not in this run")),
    ]


def _rounds_note(run: dict[str, Any]) -> str:
    """The per-round median and 90th percentile behind a mean of phases (absent from older results)."""
    rounds = run.get("aggregate_update_rounds") or {}
    if not rounds:
        return ""
    return (f"mean of {rounds['count']} peer-rounds; median {rounds['median'] * 1000:.1f} ms, p90 "
            f"{rounds['p90'] * 1000:.1f} ms, {rounds['over_target']:.0%} over 10 ms")


# --- plots -----------------------------------------------------------------------------------------

def plot_phases(runs: Sequence[dict[str, Any]], labels: Sequence[str], title: str, path: Path) -> None:
    """Stacked bars of p2ptrain's round by phase, in DDP steps (1.0 = one DDP step of the same config)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(runs) + 2), 4.2))
    positions = list(range(len(runs)))
    bottoms = [0.0] * len(runs)
    for phase in ROUND_PHASES:
        heights = [r["phases"].get(phase, 0.0) / r["ddp_step_seconds"] for r in runs]
        ax.bar(positions, heights, 0.6, bottom=bottoms, label=phase, color=PHASE_COLOURS[phase])
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    for x, run, top in zip(positions, runs, bottoms, strict=True):
        ax.annotate(f"{top:.1f}x\n{run['round_seconds'] * 1000:.0f} ms", (x, top), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color=DDP_COLOUR, linestyle="--", linewidth=1, label="DDP gloo step = 1")
    ax.set_xticks(positions, labels)
    ax.set_ylabel("round time / DDP step (same config)")
    ax.set_ylim(0, max([*bottoms, 1.0]) * 1.25)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over a label
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_functions(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Gradient time per round and CPU-seconds per round, one bar pair per configuration."""
    labels = [_function_label(r) for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 4.0))
    positions = list(range(len(runs)))
    left.bar(positions, [r["gradient_seconds"] * 1000 for r in runs], 0.6, color=PHASE_COLOURS["fanout"])
    inline = _find(runs, mode="inline")
    for x, run in zip(positions, runs, strict=True):
        text = f"{run['gradient_seconds'] * 1000:.0f} ms"
        if inline and run is not inline:
            text += f"\n{_versus(run, inline)} than inline"
        left.annotate(text, (x, run["gradient_seconds"] * 1000), ha="center", va="bottom", fontsize=8)
    left.set_xticks(positions, labels, fontsize=8)
    left.set_ylabel("gradient time per round, ms (fanout + average)")
    left.set_ylim(0, max(r["gradient_seconds"] for r in runs) * 1000 * 1.3)
    function_cpu = [r["function_cpu_seconds_per_round"] for r in runs]
    peer_cpu = [r["peer_cpu_seconds_per_round"] for r in runs]
    right.bar(positions, peer_cpu, 0.6, label="peers", color=PHASE_COLOURS["update"])
    right.bar(positions, function_cpu, 0.6, bottom=peer_cpu, label="functions", color=PHASE_COLOURS["fanout"])
    right.set_xticks(positions, labels, fontsize=8)
    right.set_ylabel("CPU-seconds per round (steady state)")
    right.legend(fontsize=8)
    fig.suptitle("Compute-heavy CNN: serverless fan-out vs inline gradients", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accumulate(accumulate: dict[str, Any], path: Path) -> None:
    """Speed relative to memcpy of the same bytes (1 = memory speed), log scale: Lua is ~1000x slower."""
    methods = accumulate["methods"]
    names = list(methods)
    memcpy = accumulate["memcpy_seconds"]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    positions = list(range(len(names)))
    width = 0.38
    server = [memcpy / methods[n]["server_seconds"] for n in names]
    end_to_end = [memcpy / methods[n]["end_to_end_seconds"] if methods[n].get("end_to_end_seconds") else 0.0 for n in names]
    ax.bar([p - width / 2 for p in positions], server, width, label="arithmetic only (server time / numpy)",
           color=PHASE_COLOURS["average"])
    ax.bar([p + width / 2 for p in positions], end_to_end, width, label="end to end at the client (incl. loopback TCP)",
           color=PHASE_COLOURS["exchange"])
    for p, value in zip(positions, server, strict=True):
        ax.annotate(f"{value:.3g}", (p - width / 2, value), ha="center", va="bottom", fontsize=8)
    ax.axhline(1.0, color=DDP_COLOUR, linestyle="--", linewidth=1, label="memcpy of the same bytes = 1")
    ax.set_yscale("log")
    ax.set_xticks(positions, names, fontsize=8)
    ax.set_ylabel("memcpy time / method time (higher is faster)")
    ax.set_title(f"In-database average of {accumulate['k']} gradients x {accumulate['d']:,} float32", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _function_label(run: dict[str, Any]) -> str:
    if run["mode"] == "inline":
        return "inline (peer computes)"
    n = run["functions_per_peer"]
    return f"{n} function{'s' if n > 1 else ''}/peer"


def _change_percent(run: dict[str, Any], inline: dict[str, Any]) -> float:
    """Gradient time relative to inline, in percent: -40 means 40% less (the seed's measure)."""
    return 100.0 * (run["gradient_seconds"] / inline["gradient_seconds"] - 1.0)


def _versus(run: dict[str, Any], inline: dict[str, Any] | None) -> str:
    if inline is None or run is inline:
        return "-"
    change = _change_percent(run, inline)
    return f"{-change:.0f}% less" if change <= 0 else f"{change:.0f}% more"


# --- the document ----------------------------------------------------------------------------------

def _phase_table(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[str]:
    head = ("| config | " + " | ".join(ROUND_PHASES) + " | round ms | DDP step ms | DDP step ms without evaluation | "
            "round / DDP | first round s | accuracy p2ptrain / DDP |")
    lines = [head, "|" + "---|" * (len(ROUND_PHASES) + 7)]
    for run, label in zip(runs, labels, strict=True):
        phases = " | ".join(f"{run['phases'].get(p, 0.0) * 1000:.1f}" for p in ROUND_PHASES)
        train = run.get("ddp_train_step_seconds")
        lines.append(
            f"| {label} | {phases} | {run['round_seconds'] * 1000:.1f} | {run['ddp_step_seconds'] * 1000:.2f} | "
            f"{'-' if train is None else f'{train * 1000:.2f}'} | "
            f"{run['round_seconds'] / run['ddp_step_seconds']:.1f}x | {run['first_round_seconds']:.1f} | "
            f"{_accuracy(run.get('accuracy'))} / {_accuracy(run.get('ddp_accuracy'))} |"
        )
    return lines


CPU_KINDS = (("peer", "peers"), ("function", "functions"), ("runner", "front door + runner"), ("redis", "Redis"))
CPU_NOTE = (
    "CPU per round: every process's user + system time (read from /proc ten times a second), per round "
    "from the end of the first to the end of the last; `front door + runner` is the local runner's process, whose function front door stands in for "
    "Knative's activator. DDP: its workers' CPU time inside the timed steps (gloo threads included), per step. "
    "While the total exceeds the cores' time per round (cores x round ms), the round waits for CPU, and the "
    "per-phase times above include that wait (the `exchange` phase above all: a peer that is done waits there "
    "for the others):"
)


def _cpu_table(runs: Sequence[dict[str, Any]], labels: Sequence[str], cores: int) -> list[str]:
    """Milliseconds of CPU per round by process kind, against the DDP step's."""
    if not all(run.get("cpu_seconds_per_round") and run.get("ddp_cpu_seconds_per_step") for run in runs):
        return []
    head = ("| config | " + " | ".join(name for _, name in CPU_KINDS)
            + f" | total CPU ms | {cores} cores x round ms | DDP CPU ms/step | CPU / DDP CPU |")
    lines = ["", CPU_NOTE, "", head, "|" + "---|" * (len(CPU_KINDS) + 5)]
    for run, label in zip(runs, labels, strict=True):
        cpu = run["cpu_seconds_per_round"]
        total = sum(cpu.values())
        kinds = " | ".join(f"{cpu.get(kind, 0.0) * 1000:.1f}" for kind, _ in CPU_KINDS)
        lines.append(f"| {label} | {kinds} | {total * 1000:.1f} | {cores * run['round_seconds'] * 1000:.1f} | "
                     f"{run['ddp_cpu_seconds_per_step'] * 1000:.1f} | {total / run['ddp_cpu_seconds_per_step']:.1f}x |")
    return lines


def _tables(runs: Sequence[dict[str, Any]], labels: Sequence[str], cores: int) -> list[str]:
    """The per-phase table and, below it, the CPU table of the same runs."""
    return [*_phase_table(runs, labels), *_cpu_table(runs, labels, cores)]


def _cpu_summary(run: dict[str, Any]) -> str:
    cpu = run.get("cpu_seconds_per_round")
    if not cpu or not run.get("ddp_cpu_seconds_per_step"):
        return ""
    parts = ", ".join(f"{name} {cpu.get(kind, 0.0) * 1000:.1f}" for kind, name in CPU_KINDS)
    return (f"; it used {sum(cpu.values()) * 1000:.1f} ms of CPU a round ({parts}) against "
            f"{run['ddp_cpu_seconds_per_step'] * 1000:.1f} ms a DDP step")


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _largest_phases(run: dict[str, Any], count: int = 2) -> str:
    ranked = sorted(ROUND_PHASES, key=lambda p: run["phases"].get(p, 0.0), reverse=True)[:count]
    total = run["round_seconds"] or 1.0
    return " and ".join(
        f"{p} ({run['phases'].get(p, 0.0) * 1000:.1f} ms, {run['phases'].get(p, 0.0) / total:.0%})" for p in ranked)


def _scaling_label(run: dict[str, Any]) -> str:
    suffix = " inline" if run["mode"] == "inline" else ""
    return f"{run['peers']} peers x {run['functions_per_peer']}{suffix}"


def _size_label(run: dict[str, Any]) -> str:
    every = run.get("checkpoint_every_rounds", CHECKPOINT_EVERY_DEFAULT)
    written = "" if every == CHECKPOINT_EVERY_DEFAULT else "\ncheckpoint every round" if every == 1 else f"\ncheckpoint every {every}"
    return f"{run['params']:.2e} params\n{run['peers']} peers{written}"


def render(results: dict[str, Any], doc: Path, images: Path) -> list[Path]:
    """Write the Markdown report to ``doc`` and its PNGs under ``images``; returns every file written."""
    images.mkdir(parents=True, exist_ok=True)
    doc.parent.mkdir(parents=True, exist_ok=True)
    relative = Path(images.resolve().relative_to(doc.parent.resolve()))
    written: list[Path] = []
    meta = results["meta"]
    lines = [
        "# Performance",
        "",
        f"Written by `make bench` (`bench/performance.py{' --quick' if meta.get('quick') else ''}`) on "
        f"{meta['date']} at commit `{meta['commit']}`, on {meta['machine']}. Every figure is measured in "
        "**one run** per configuration, with p2ptrain and its baseline side by side on the same machine: read "
        "the **ratios**; the absolute times move with the machine's load (it is shared with other work)."
        + (f" The run took {meta['minutes']:.1f} minutes; load average {meta['load_end']:.1f} at the end."
           if "minutes" in meta and "load_end" in meta else "")
        + (f" {meta['note']}" if meta.get("note") else ""),
        "",
        "## Issue 10 targets",
        "",
        "| target | measured | target | verdict | note |",
        "|---|---|---|---|---|",
        *[t.row() for t in targets(results)],
        "",
    ]
    missed = [t for t in targets(results) if t.verdict == "**missed**"]
    if missed:
        lines += ["Where the time goes for each missed target (the per-phase tables below have every figure):", "",
                  *[f"- {_where(t, results)}." for t in missed], ""]

    scaling = [r for r in results.get("scaling", []) if r.get("ddp_step_seconds")]
    if scaling:
        path = images / "phases-peers.png"
        labels = [_scaling_label(r) for r in scaling]
        plot_phases(scaling, labels, "digits MLP: round by phase vs DDP gloo, by number of peers", path)
        written.append(path)
        lines += [
            "## Round time by phase, by number of peers (digits MLP)",
            "",
            f"![round by phase vs peers]({relative / path.name})",
            "",
            f"Model `{scaling[0]['model']}`, batch {scaling[0]['batch_size']} per peer, {scaling[0]['rounds']} rounds; "
            "the DDP baseline is `DistributedDataParallel` over gloo with as many workers as peers, the same model, "
            "shards, batch, optimizer and steps (`bench/round.py`). It evaluates as often as the job (rank 0, its "
            "replicas being identical), timed with the step as a p2ptrain round's `evaluate` phase is timed with the "
            "round; the step without it is shown too. Phases are the peers' mean over rounds after the "
            "first (the first pays the functions' cold starts); milliseconds per round:",
            "",
            *_tables(scaling, [label.replace("\n", " ") for label in labels], meta.get("cores", 2)),
            "",
        ]
    sizes = [r for r in results.get("sizes", []) if r.get("ddp_step_seconds")]
    if sizes:
        path = images / "phases-model-size.png"
        labels = [_size_label(r) for r in sizes]
        plot_phases(sizes, labels, "MLP on digits: round by phase vs DDP gloo, by model size", path)
        written.append(path)
        lines += [
            "## Round time by phase, by model size (MLP)",
            "",
            f"![round by phase vs model size]({relative / path.name})",
            "",
            "Two hidden layers of equal width chosen to hit each parameter count (1024 wide is the 1.13M-parameter "
            "MLP of issue 10's targets; it runs twice, the second time with `training.checkpointEveryRounds: 1`, "
            f"whose state write after every round instead of every {CHECKPOINT_EVERY_DEFAULT} (the default) is the "
            "difference). Milliseconds per round:",
            "",
            *_tables(sizes, [label.replace("\n", ", ") for label in labels], meta.get("cores", 2)),
            "",
        ]
    functions = results.get("functions") or {}
    runs = functions.get("runs", [])
    if runs:
        path = images / "functions-cnn.png"
        plot_functions(runs, path)
        written.append(path)
        inline = _find(runs, mode="inline")
        lines += [
            "## Gradient computation vs functions per peer (compute-heavy CNN)",
            "",
            f"![gradient time vs functions per peer]({relative / path.name})",
            "",
            f"{functions['description']} Gradient time = the `fanout` + `average` phases (from sending the "
            "micro-batches to holding the peer's averaged gradient). CPU-seconds: the function instances' and the "
            "peers' processes (user + system, read from /proc), per round after the first, the cost the seed "
            "counts as function compute.",
            "",
            "| config | gradient ms/round | vs inline (the seed's measure) | round ms | function CPU-s/round | peer CPU-s/round | function instances (max) |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in runs:
            lines.append(
                f"| {_function_label(run)} | {run['gradient_seconds'] * 1000:.1f} | {_versus(run, inline)} | "
                f"{run['round_seconds'] * 1000:.1f} | {run['function_cpu_seconds_per_round']:.3f} | "
                f"{run['peer_cpu_seconds_per_round']:.3f} | {run.get('max_instances', 0)} |"
            )
        if functions.get("inline_skipped"):
            lines += ["", f"Inline not measured: {functions['inline_skipped']}"]
        lines.append("")
    accumulate = results.get("accumulate")
    if accumulate:
        path = images / "accumulate.png"
        plot_accumulate(accumulate, path)
        written.append(path)
        lines += [
            "## In-database average: module vs Lua vs client vs memcpy",
            "",
            f"![in-database average]({relative / path.name})",
            "",
            f"{accumulate['k']} gradients x {accumulate['d']:,} float32 averaged by each method (`bench/accumulate.py`'s "
            "code, real redis-server on loopback); arithmetic only = the server's own time in the commands (INFO "
            "commandstats; the client method: its numpy mean); end to end includes moving the bytes over loopback "
            f"TCP, which no in-database method avoids. Module arithmetic vs memcpy, best of the repetitions: "
            f"**{accumulate['module_vs_memcpy']:.2f}**.",
            "",
            "Medians of the repetitions:",
            "",
            "| method | arithmetic s | end to end s | memcpy / arithmetic |",
            "|---|---|---|---|",
        ]
        for name, method in accumulate["methods"].items():
            e2e = method.get("end_to_end_seconds")
            lines.append(
                f"| {name} | {method['server_seconds']:.4f} | {'-' if not e2e else f'{e2e:.4f}'} | "
                f"{accumulate['memcpy_seconds'] / method['server_seconds']:.3f} |"
            )
        lines.append("")
    lines += [
        "## How to reproduce",
        "",
        "`make bench` (the full run, about 10 minutes on 2 cores) or `.venv/bin/python bench/performance.py --quick` "
        "(fewer rounds, models up to 10^6 parameters, under 10 minutes on an unloaded machine). `--parts` measures "
        "some sections only, `--modes serverless` leaves inline out, `--save results.json` keeps the raw figures "
        "and `--render results.json` rewrites this page from them without measuring.",
    ]
    doc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(doc)
    return written


def _where(target: Target, results: dict[str, Any]) -> str:
    """Where the time of a missed target goes: the measured configuration's largest phases, in ms."""
    scaling, sizes = results.get("scaling", []), results.get("sizes", [])
    if target.name.startswith("digits"):
        run = _find(scaling, peers=4, mode="inline" if "inline" in target.name else "serverless")
    elif target.name.startswith("MLP"):
        run = _find(sizes, target=True)
    else:
        run = None
    if run is not None and "aggregate + update" in target.name:
        rounds = run.get("aggregate_update_rounds") or {}
        spread = (f"; per round, median {rounds['median'] * 1000:.1f} ms and p90 {rounds['p90'] * 1000:.1f} ms: "
                  "the mean is raised by the rounds in which the peer waited for a core, which every process of "
                  "the run (peers, functions, Redis servers) shares on this machine") if rounds else ""
        return (f"{target.name}: aggregate {run['phases']['aggregate'] * 1000:.1f} ms + update "
                f"{run['phases']['update'] * 1000:.1f} ms per round{spread}")
    if run is not None:
        return f"{target.name}: the round is mostly {_largest_phases(run)}{_cpu_summary(run)}"
    functions = results.get("functions") or {}
    inline = _find(functions.get("runs", []), mode="inline")
    two = _find(functions.get("runs", []), mode="serverless", functions_per_peer=2)
    if target.name.startswith("CNN") and inline and two:
        return (f"{target.name}: gradient {two['gradient_seconds'] * 1000:.0f} ms with 2 functions (CPU "
                f"{two.get('function_cpu_seconds_per_round', 0.0):.2f} s/round in functions) vs "
                f"{inline['gradient_seconds'] * 1000:.0f} ms inline (CPU {inline.get('peer_cpu_seconds_per_round', 0.0):.2f} "
                "s/round in the peer): the functions run in parallel only as far as free cores allow")
    accumulate = results.get("accumulate") or {}
    if target.name.startswith("in-database") and accumulate:
        return (f"{target.name}: best of the repetitions {accumulate['module_vs_memcpy']:.2f}, median of the "
                f"per-repetition ratios {accumulate.get('module_vs_memcpy_median', float('nan')):.2f}; both the "
                "module's add and the numpy copy are memory-bound and share the machine with its other load")
    return f"{target.name}: see its section"
