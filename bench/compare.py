"""P2P vs parameter server vs inline vs DDP on the same jobs: writes docs/p2p-vs-ps.md and its plots.

For each job (the digits MLP and a compute-heavy CNN on digits, at 2, 4 and 8 peers) four systems run
one after the other on this machine, in one run of this script:

- ``p2p``: ``topology: p2p``, ``function.mode: serverless`` (peers fan out to gradient functions and swap
  averages with every other peer);
- ``ps``: ``topology: ps``, serverless (one aggregator takes every peer's average, steps, checkpoints);
- ``inline``: ``topology: p2p``, ``function.mode: inline`` (peers compute their own gradients);
- ``ddp``: PyTorch DDP over gloo with as many workers as peers (``bench/round.py``'s baseline).

Same model, data shards, batch size, optimizer, rule (mean) and rounds. Reported per job: time per round
and to a target accuracy (the summary's milestones), bytes moved per round (the summary's cost block),
cost per job under the example price lists (examples/prices/), each also as a ratio to DDP in the same
run. Then the fault drills on the 4-peer digits job: one peer SIGKILLed mid-run (p2p, ps, inline) and the
aggregator SIGKILLed mid-run (ps), with the time lost against the clean run of the same system and the
accuracy reached; the kill and restart logic is the chaos drills' (tests/integration/chaos.py).

``--quick``: digits at 2 and 4 peers and the CNN at 2 peers, fewer rounds (about 20 minutes on 2 cores).
Usage: ``python bench/compare.py [--quick] [--save results.json]``; ``--render results.json`` rewrites the
report from saved results and measures nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a CI machine

import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
PRICE_LISTS = {"serverless": ROOT / "examples/prices/serverless-example.yaml",
               "vm": ROOT / "examples/prices/vm-example.yaml"}
SYSTEMS = ("p2p", "ps", "inline", "ddp")
LABELS = {"p2p": "P2P serverless", "ps": "PS serverless", "inline": "P2P inline", "ddp": "DDP gloo"}
COLOURS = {"p2p": "#4c72b0", "ps": "#dd8452", "inline": "#55a868", "ddp": "#444444"}
FAULT_LABELS = {"peer": "one peer SIGKILLed", "aggregator": "the aggregator SIGKILLed"}
RUN_TIMEOUT_SECONDS = 900


@dataclass(frozen=True)
class Plan:
    digits_peers: tuple[int, ...]
    digits_rounds: int
    cnn_peers: tuple[int, ...]
    cnn_rounds: int
    fault_peers: int  # the digits job the drills run on
    kill_at: float  # the fraction of the rounds after which the process is killed


QUICK = Plan(digits_peers=(2, 4), digits_rounds=60, cnn_peers=(2,), cnn_rounds=8, fault_peers=4, kill_at=1 / 3)
FULL = Plan(digits_peers=(2, 4, 8), digits_rounds=100, cnn_peers=(2, 4, 8), cnn_rounds=30, fault_peers=4,
            kill_at=1 / 3)


# --- measuring --------------------------------------------------------------------------------------
def _spec(model: str, peers: int, rounds: int, system: str) -> Any:
    """The digits example job (``performance.job``) for ``system``; the CNN as bench/performance.py runs it."""
    from performance import CNN_ARGS, CNN_BATCH, job

    changes: dict[str, Any] = {"peers": peers, "rounds": rounds, "aggregation": {"rule": "mean"}}
    if model == "cnn":
        changes |= {"batchSize": CNN_BATCH, "model": {"name": "cnn", "args": CNN_ARGS}}
    if system == "ps":
        changes["topology"] = "ps"
    if system == "inline":
        changes["function"] = {"mode": "inline"}
    return job(f"cmp-{model}-{peers}-{system}", changes)


def _bytes(cost: Mapping[str, Any]) -> int:
    return int(sum(cost["peerBytes"].values()) + sum(cost["redisBytes"].values()))


def _money(cost: Mapping[str, Any]) -> dict[str, float]:
    from p2ptrain.cost import load_prices

    return {name: float(load_prices(path).price(cost)["total"]) for name, path in PRICE_LISTS.items()}


def run_p2ptrain(spec: Any, workdir: Path, chaos: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """One local run (real Redis, peer, aggregator and function processes) through the chaos drills'
    driver, ``chaos`` acting on it meanwhile; its summary and the drill's checks, or its error."""
    import asyncio

    from tests.integration.chaos import drill

    started = time.monotonic()
    try:
        result = asyncio.run(drill(spec, workdir, chaos=chaos, timeout=RUN_TIMEOUT_SECONDS))
    except Exception as exc:  # a run that breaks is a result too: report it, measure the others
        return {"error": f"{type(exc).__name__}: {exc}"[:300], "wall_seconds": time.monotonic() - started}
    return result


def p2ptrain_row(spec: Any, result: Mapping[str, Any]) -> dict[str, Any]:
    if "error" in result:
        return {"error": result["error"], "wall_seconds": result["wall_seconds"]}
    summary = result["summary"]
    rounds = max(1, int(summary["rounds"]))
    return {
        "round_seconds": summary["round_seconds"], "first_round_seconds": summary["first_round_seconds"],
        "rounds": summary["rounds"], "accuracy": summary["test_accuracy"], "wall_seconds": result["wall_seconds"],
        "reached": summary["time_to_accuracy"], "bytes_per_round": _bytes(summary["cost"]) / rounds,
        "bytes_between_peers_per_round": sum(summary["cost"]["peerBytes"].values()) / rounds,
        "invocations": summary["cost"]["functionInvocations"], "money": _money(summary["cost"]),
        "finished": result["finished"],
        # Runs before the ps cost fix summed the peers' ledgers only (no aggregator, no checkpoint reads).
        "cost_complete": "checkpointRead" in summary["cost"]["redisBytes"],
    }


def ddp_row(spec: Any, params: int) -> dict[str, Any]:
    """DDP over gloo on the same job. Bytes: what a ring allreduce of float32 gradients moves per step
    over all workers, 2(n-1)/n of the gradient per worker (computed, not measured). Cost: one pod per
    worker for the run's wall time, priced like a peer pod."""
    import round as round_bench

    from p2ptrain.cost import empty_cost

    result = round_bench.run_ddp(spec)
    cost = empty_cost() | {"peerPodSeconds": spec.peers * result["wall_seconds"]}
    return {
        "round_seconds": result["step_seconds_mean"], "rounds": result["steps"], "accuracy": result["accuracy"],
        "wall_seconds": result["wall_seconds"], "reached": result["reached"],
        "bytes_per_round": 2.0 * (spec.peers - 1) * 4 * params, "bytes_between_peers_per_round":
        2.0 * (spec.peers - 1) * 4 * params, "invocations": 0, "money": _money(cost), "finished": True,
    }


def measure_job(model: str, peers: int, rounds: int, plan: Plan) -> dict[str, Any]:
    from performance import parameter_count

    params = parameter_count(_spec(model, peers, rounds, "p2p"))
    after = at_round(rounds, plan)
    entry: dict[str, Any] = {"name": f"{model} {peers} peers", "model": model, "peers": peers, "rounds": rounds,
                             "params": params, "after_round": after, "systems": {}}
    for system in SYSTEMS:
        spec = _spec(model, peers, rounds, system)
        print(f"-- {entry['name']}: {LABELS[system]}, {rounds} rounds", flush=True)
        if system == "ddp":
            row = ddp_row(spec, params)
        else:
            clock: dict[str, float] = {}
            with tempfile.TemporaryDirectory(prefix="cmp-") as logs:
                row = p2ptrain_row(spec, run_p2ptrain(spec, Path(logs), watch(None, after, clock)))
            if "to" in clock:
                row["tail_seconds"] = clock["to"] - clock["from"]  # from round ``after`` to the end
        entry["systems"][system] = row
        print(f"   {json.dumps({k: v for k, v in row.items() if k != 'reached'})}", flush=True)
    return entry


def at_round(rounds: int, plan: Plan) -> int:
    return max(1, round(rounds * plan.kill_at))


def watch(fault: str | None, after_round: int, clock: dict[str, float]) -> Callable[[Any], Any]:
    """A drill's ``chaos``: once the run is past ``after_round`` it kills peer 1 (``fault="peer"``), the
    aggregator (``"aggregator"``) or nothing (``None``: the clean run), and records in ``clock`` when
    (``from``) and when every process reported success (``to``). Time lost to a fault is its ``to - from``
    minus the clean run's: start-up, which varies most on a shared machine, is in neither."""
    from p2ptrain.status import PeerState
    from tests.integration.chaos import kill_peers, lowest_round, wait_for

    async def chaos(run: Any) -> None:
        def aggregator_round() -> int:
            status = run.aggregator.status if run.aggregator is not None else None
            return int(status["round"]) if status else 0

        past = aggregator_round if fault == "aggregator" else lambda: lowest_round(run)
        await wait_for(lambda: past() >= after_round, RUN_TIMEOUT_SECONDS, f"round {after_round}")
        clock["from"] = time.monotonic()
        # The runner's restart counters, not the process handles, say the kill landed mid-run: a process
        # killed after the job finished is never restarted, and the drill then times out (an error row).
        if fault == "peer":
            await kill_peers(run, [1])
            await wait_for(lambda: run.restarts["peer"] >= 1, 60, "the runner to restart peer 1")
        elif fault == "aggregator":
            run.aggregator.process.kill()  # as the OOM killer would; the runner restarts it like a pod
            await wait_for(lambda: run.restarts["aggregator"] >= 1, 60, "the runner to restart the aggregator")
        await wait_for(lambda: all(p.status is not None and p.status["state"] == PeerState.SUCCEEDED
                                   for p in run.processes), RUN_TIMEOUT_SECONDS, "every process to succeed")
        clock["to"] = time.monotonic()

    return chaos


def measure_faults(plan: Plan, clean: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The drills on the ``clean`` job's configuration; time lost = wall time minus the clean run's."""
    rows = []
    after = clean["after_round"]
    for system, fault in (("p2p", "peer"), ("ps", "peer"), ("ps", "aggregator"), ("inline", "peer")):
        spec = _spec(clean["model"], clean["peers"], clean["rounds"], system)
        print(f"-- fault: {clean['name']}, {LABELS[system]}, {FAULT_LABELS[fault]} after round {after}", flush=True)
        clock: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="cmp-fault-") as logs:
            result = run_p2ptrain(spec, Path(logs), chaos=watch(fault, after, clock))
        base = clean["systems"][system]
        row: dict[str, Any] = {"system": system, "fault": fault, "job": clean["name"], "at_round": after,
                               "clean_wall_seconds": base.get("wall_seconds"), "clean_accuracy": base.get("accuracy"),
                               "clean_tail_seconds": base.get("tail_seconds")}
        if "error" in result or "tail_seconds" not in base:
            row |= {"error": result.get("error", f"the clean {LABELS[system]} run has no timing"),
                    "wall_seconds": result["wall_seconds"]}
        else:
            row["tail_seconds"] = clock["to"] - clock["from"]
            summary = result["summary"]
            row |= {
                "wall_seconds": result["wall_seconds"], "accuracy": summary["test_accuracy"],
                "finished": result["finished"], "rounds": summary["rounds"],
                "restarts": summary["peer_restarts"] + summary.get("aggregator", {}).get("restarts", 0),
                "committed_rounds_lost": len(result["committed_rounds_lost"]) + len(result["rounds_redone_wrongly"]),
                "replicas_identical_at_end": result["replicas_identical_at_end"],
            }
        print(f"   {json.dumps(row)}", flush=True)
        rows.append(row)
    return rows


# --- the report -------------------------------------------------------------------------------------
def _ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return float(value) / float(baseline)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _first(row: Mapping[str, Any]) -> str:
    return "-" if row.get("first_round_seconds") is None else f"{row['first_round_seconds']:.2f}"


def target_accuracy(entry: Mapping[str, Any]) -> str | None:
    """The highest milestone every system of the job reached (its key in ``reached``), or None."""
    rows = [r for r in entry["systems"].values() if "error" not in r]
    common = set.intersection(*(set(r.get("reached", {})) for r in rows)) if rows else set()
    return max(common, key=float) if common else None


def time_to(row: Mapping[str, Any], target: str | None) -> float | None:
    if target is None or "error" in row or target not in row.get("reached", {}):
        return None
    return float(row["reached"][target]["seconds"])


def ratios(entry: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Each system's round time, time to target, bytes per round and cost against DDP's in the same run."""
    ddp = entry["systems"].get("ddp", {})
    target = target_accuracy(entry)
    out: dict[str, dict[str, float | None]] = {}
    for system, row in entry["systems"].items():
        if "error" in row or "error" in ddp:
            out[system] = {"round": None, "target": None, "bytes": None, **{f"cost_{p}": None for p in PRICE_LISTS}}
            continue
        out[system] = {
            "round": _ratio(row["round_seconds"], ddp.get("round_seconds")),
            "target": _ratio(time_to(row, target), time_to(ddp, target)),
            "bytes": _ratio(row["bytes_per_round"], ddp.get("bytes_per_round")),
            **{f"cost_{p}": _ratio(row["money"][p], ddp.get("money", {}).get(p)) for p in PRICE_LISTS},
        }
    return out


def job_table(entry: Mapping[str, Any]) -> list[str]:
    target = target_accuracy(entry)
    ratio = ratios(entry)
    lines = [
        f"### {entry['name']} ({entry['params']:,} parameters, {entry['rounds']} rounds)",
        "",
        "| system | s per round | / DDP | s to " + (f"{float(target):.2f}" if target else "target") + " accuracy | / DDP "
        "| first round s | bytes per round | / DDP | cost (serverless prices) | cost (VM prices) "
        "| / DDP (serverless, VM) | final accuracy | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, row in entry["systems"].items():
        if "error" in row:
            lines.append(f"| {LABELS[system]} | failed: {row['error']} | | | | | | | | | | | {row['wall_seconds']:.0f} |")
            continue
        r = ratio[system]
        reach = time_to(row, target)
        lines.append(
            f"| {LABELS[system]} | {row['round_seconds']:.4f} | {_x(r['round'])} | "
            f"{'-' if reach is None else f'{reach:.2f}'} | {_x(r['target'])} | {_first(row)} | {_size(row['bytes_per_round'])} | "
            f"{_x(r['bytes'])} | {row['money']['serverless']:.6f} | {row['money']['vm']:.6f} | "
            f"{_x(r['cost_serverless'])}, {_x(r['cost_vm'])} | {row['accuracy']:.3f} | {row['wall_seconds']:.0f} |"
        )
    return [*lines, ""]


def lost_seconds(fault: Mapping[str, Any]) -> float:
    """Seconds from the kill to the end, minus the clean run's from the same round to its end."""
    return float(fault["tail_seconds"]) - float(fault["clean_tail_seconds"])


def fault_table(faults: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| system | fault | killed after round | finished | time lost | s from that round to the end (clean) "
        "| wall s (clean) | accuracy (clean) | restarts | committed rounds lost | replicas identical at end |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in faults:
        head = f"| {LABELS[f['system']]} | {FAULT_LABELS[f['fault']]} | {f['at_round']} |"
        if "error" in f:
            lines.append(f"{head} no: {f['error']} | | | {f['wall_seconds']:.0f} | | | | |")
            continue
        lines.append(
            f"{head} {'yes' if f['finished'] else 'NO'} | {lost_seconds(f):+.1f} s | {f['tail_seconds']:.1f} "
            f"({f['clean_tail_seconds']:.1f}) | {f['wall_seconds']:.0f} ({f['clean_wall_seconds']:.0f}) "
            f"| {f['accuracy']:.3f} ({f['clean_accuracy']:.3f}) | {f['restarts']} | {f['committed_rounds_lost']} "
            f"| {'yes' if f['replicas_identical_at_end'] else 'NO'} |"
        )
    lines.append("| DDP gloo | a worker killed | - | not measured | - | - | - | - | - | - | - |")
    return lines


def _bars(ax: Any, jobs: Sequence[Mapping[str, Any]], value: Callable[[Mapping[str, Any], str], float | None],
          systems: Sequence[str] = SYSTEMS) -> None:
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        heights = [value(job, system) for job in jobs]
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(jobs))]
        ax.bar(xs, [h if h is not None else 0.0 for h in heights], width, label=LABELS[system], color=COLOURS[system])
    ax.set_xticks(range(len(jobs)), [job["name"] for job in jobs])
    ax.legend(fontsize=8)


def plot_ratios(jobs: Sequence[Mapping[str, Any]], key: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, jobs, lambda job, system: ratios(job)[system][key], SYSTEMS[:3])
    ax.axhline(1.0, color=COLOURS["ddp"], linestyle="--", linewidth=1, label="DDP = 1")
    ax.set_yscale("log")
    ax.set_ylabel("ratio to DDP gloo (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cost(jobs: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(PRICE_LISTS), figsize=(10, 4))
    for ax, prices in zip(axes, PRICE_LISTS, strict=True):
        def money(job: Mapping[str, Any], system: str, p: str = prices) -> float | None:
            value = job["systems"][system].get("money", {}).get(p)
            return None if value is None else float(value)

        _bars(ax, jobs, money)
        ax.set_ylabel("USD per job (example prices)")
        ax.set_title(f"{prices} price list")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_faults(faults: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [f"{LABELS[f['system']]}\n{FAULT_LABELS[f['fault']]}" for f in faults]
    lost = [0.0 if "error" in f else lost_seconds(f) for f in faults]
    ax.barh(range(len(faults)), lost, color=[COLOURS[f["system"]] for f in faults])
    ax.set_yticks(range(len(faults)), names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("seconds lost vs the clean run of the same system (a failed drill: 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _complete(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The jobs every system finished."""
    return [j for j in results.get("jobs", []) if not any("error" in r for r in j["systems"].values())]


def findings(results: Mapping[str, Any]) -> list[str]:
    """What the figures say, computed from them (so the page never claims what the run did not show)."""
    jobs = _complete(results)
    if not jobs:
        return ["No job finished on every system in this run: no comparison to draw."]
    lines = []
    for job in jobs:
        s = job["systems"]
        lines.append(
            f"- **{job['name']}**: PS round / P2P round = {s['ps']['round_seconds'] / s['p2p']['round_seconds']:.2f}, "
            f"inline round / P2P serverless round = {s['inline']['round_seconds'] / s['p2p']['round_seconds']:.2f}, "
            f"PS cost / P2P cost = {s['ps']['money']['serverless'] / s['p2p']['money']['serverless']:.2f} (serverless prices), "
            f"{s['ps']['money']['vm'] / s['p2p']['money']['vm']:.2f} (VM prices)."
        )
    for job in (j for j in jobs if not j["systems"]["ps"].get("cost_complete")):
        s = job["systems"]
        # Under ps the cost block (the peers' ledgers) misses, per peer and round, the aggregator taking in
        # the peer's gradient (4 bytes per parameter, in the event or by dataref) and the peer reading the
        # aggregator's checkpoint (model and momentum, 8 bytes per parameter): added here as an estimate.
        unread = job["peers"] * 12 * job["params"]
        lines.append(
            f"- {job['name']}, every byte: PS with what its cost block leaves out (estimated {_size(unread)} per "
            f"round) moves {_x(_ratio(s['ps']['bytes_per_round'] + unread, s['p2p']['bytes_per_round']))} "
            "of P2P's bytes per round."
        )
    faults = {(f["system"], f["fault"]): f for f in results.get("faults", []) if "error" not in f}
    for key, fault in faults.items():
        lines.append(f"- {LABELS[key[0]]}, {FAULT_LABELS[key[1]]}: {'finished' if fault['finished'] else 'did NOT finish'}, "
                     f"{lost_seconds(fault):+.1f} s against its clean run, accuracy "
                     f"{fault['accuracy']:.3f} (clean {fault['clean_accuracy']:.3f}).")
    return lines


def render(results: Mapping[str, Any], doc: Path, images: Path) -> list[Path]:
    """Write the Markdown report to ``doc`` and its PNGs under ``images``; returns every file written."""
    images.mkdir(parents=True, exist_ok=True)
    doc.parent.mkdir(parents=True, exist_ok=True)
    relative = Path(os.path.relpath(images.resolve(), doc.parent.resolve()))
    meta = results["meta"]
    jobs = results.get("jobs", [])
    faults = results.get("faults", [])
    written: list[Path] = []
    lines = [
        "# P2P vs parameter server vs inline vs DDP",
        "",
        f"Written by `make compare` (`bench/compare.py{' --quick' if meta.get('quick') else ''}`) on {meta['date']} "
        f"at commit `{meta['commit']}`, on {meta['machine']}."
        + (f" The run took {meta['minutes']:.1f} minutes." if "minutes" in meta else "")
        + " **Every figure comes from one run** per configuration, the four systems one after the other on the same "
        "machine, which runs every process of every peer, Redis, function and aggregator: read the **ratios to "
        "DDP** and between systems, not the absolute times, which move with the machine's load. The raw figures: "
        f"[results.json]({relative / 'results.json'}) (`bench/compare.py --render` rewrites this page from them).",
        "",
        "Systems: **P2P serverless** (`topology: p2p`, gradient functions), **PS serverless** (`topology: ps`: one "
        "aggregator, docs/topology.md), **P2P inline** (`function.mode: inline`: peers compute their own gradients) "
        "and **DDP gloo** (PyTorch DistributedDataParallel, one worker per peer, bench/round.py). Same model, data "
        "shards, batch size, optimizer, aggregation rule (`mean`) and rounds. The CNN jobs measure time, bytes and "
        "cost: they run the digits example's optimizer at batch 512 for a few rounds, which the CNN does not "
        "converge with (accuracy passes 0.5 and falls back); the four systems end within float rounding of each other, "
        "as they run the same arithmetic.",
        "",
        "- *s per round*: the mean over rounds after the first (p2ptrain's summary), a DDP step's mean for DDP.",
        "- *s to accuracy*: the summary's milestones (seconds of rounds summed until the first evaluation at or "
        "above it), for the highest milestone every system reached; DDP's steps are summed the same way. "
        "p2ptrain's include its first round (*first round s*: serverless, the functions' cold starts from zero).",
        "- *bytes per round*: the summary's cost block (bytes between peers plus to/from Redis) over the rounds; "
        "for DDP what a ring allreduce of the float32 gradients moves per step, 2(n-1) x 4 x parameters over all "
        "workers (computed, not measured).",
        "- *cost*: the cost block priced with `examples/prices/serverless-example.yaml` and `vm-example.yaml` "
        "(EXAMPLE prices, not quotes); for DDP one pod per worker for its wall time. Under PS the cost block sums "
        "the aggregator's ledger too (its pod, its Redis, the gradients it takes in) and the peers' reads of its "
        "checkpoint every round"
        + ("." if all(j["systems"]["ps"].get("cost_complete") for j in _complete(results)) else
           "; the runs on this page were measured before it did, so their PS bytes and costs are lower bounds "
           "(the findings add the missing bytes as an estimate)."),
        "",
        "## Findings",
        "",
        *findings(results),
        "",
        "## Per job",
        "",
    ]
    for job in jobs:
        lines += job_table(job)
    if jobs:
        plots = [("round", "time per round vs DDP", "round-vs-ddp.png"),
                 ("target", "time to the target accuracy vs DDP", "target-vs-ddp.png"),
                 ("bytes", "bytes moved per round vs DDP", "bytes-vs-ddp.png")]
        for key, title, name in plots:
            plot_ratios(jobs, key, title, images / name)
            written.append(images / name)
            lines += [f"![{title}]({relative / name})", ""]
        plot_cost(jobs, images / "cost.png")
        written.append(images / "cost.png")
        lines += [f"![cost per job]({relative / 'cost.png'})", ""]
    if faults:
        job = faults[0]["job"]
        lines += [
            "## When a process dies mid-run",
            "",
            f"The {job} job again, with a process SIGKILLed after the round shown (the local runner restarts it "
            "like a pod: `runPolicy.backoffLimit`); the kill and restart logic is the chaos drills' "
            "(tests/integration/chaos.py). Time lost: seconds from the kill until every process reported success, "
            "minus the clean run's seconds from the same round to its end (start-up, the noisiest part on a "
            "shared machine, is in neither; the runner's status poll, every 0.5 s, bounds the resolution). "
            "Plain DDP was not drilled: "
            "a dead gloo worker fails the whole job, which then restarts every worker from its last checkpoint "
            "(torchrun elastic) or from scratch.",
            "",
            *fault_table(faults),
            "",
        ]
        plot_faults(faults, images / "faults.png")
        written.append(images / "faults.png")
        lines += [f"![time lost to a fault]({relative / 'faults.png'})", ""]
    doc.write_text("\n".join(lines), encoding="utf-8")
    return [doc, *written]


# --- the command ------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits at 2 and 4 peers, the CNN at 2, fewer rounds")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "p2p-vs-ps.md"))
    parser.add_argument("--images", default=str(ROOT / "docs" / "img" / "compare"))
    parser.add_argument("--save", help="write the raw results to this JSON file (default: results.json in --images)")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="write the report from saved results; measure nothing")
    args = parser.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text(encoding="utf-8"))
    else:
        args.save = args.save or str(Path(args.images) / "results.json")
        sys.path.insert(0, str(ROOT))  # the drills' driver lives with the tests that run the cheap ones
        from performance import commit, machine

        plan = QUICK if args.quick else FULL
        started = time.monotonic()
        results = {"meta": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                            "commit": commit(), "machine": machine(), "quick": args.quick},
                   "jobs": [], "faults": []}
        work = [("digits", n, plan.digits_rounds) for n in plan.digits_peers]
        work += [("cnn", n, plan.cnn_rounds) for n in plan.cnn_peers]
        for model, peers, rounds in work:
            results["jobs"].append(measure_job(model, peers, rounds, plan))
            _checkpoint(results, started, args)
        clean = next(j for j in results["jobs"] if j["model"] == "digits" and j["peers"] == plan.fault_peers)
        results["faults"] = measure_faults(plan, clean)
        _checkpoint(results, started, args)
    for path in render(results, Path(args.doc), Path(args.images)):
        print(f"wrote {path}")
    return 0


def _checkpoint(results: dict[str, Any], started: float, args: argparse.Namespace) -> None:
    """Save and render what is measured so far: an interrupted run keeps its figures."""
    results["meta"]["minutes"] = (time.monotonic() - started) / 60
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        Path(args.save).write_text(json.dumps(results, indent=2), encoding="utf-8")
    render(results, Path(args.doc), Path(args.images))


if __name__ == "__main__":
    sys.exit(main())
