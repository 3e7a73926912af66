"""Measures p2ptrain against its baselines and writes docs/performance.md with plots (docs/img/performance/).

1. A round split by phase vs a PyTorch DDP (gloo) step, the digits MLP with 2, 4 and 8 peers, and MLPs of
   10^4 .. 10^7 parameters (``bench/round.py`` runs both sides).
2. Gradient time vs functionsPerPeer (1, 2, 4) for a compute-heavy CNN against the peer computing its
   own gradients (``function.mode: inline``, skipped with a note where the installed spec has no such
   field), with the CPU-seconds of functions and peers as the cost.
3. The in-database average: module vs Lua vs client vs memcpy (``bench/accumulate.py``'s code).

Every configuration is measured in one run, p2ptrain and its baseline side by side: the report reads
ratios. ``--quick``: fewer rounds and models up to 10^6 parameters (under 10 minutes on 2 cores).
Usage: ``python bench/performance.py [--quick] [--modes serverless,inline] [--save results.json]``,
``python bench/performance.py --render results.json`` (rewrite the report, measure nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import accumulate as accumulate_bench
import round as round_bench
import torch
import yaml
from perfreport import render
from proccpu import ChildCpu

from p2ptrain import schema
from p2ptrain.data import load_dataset
from p2ptrain.models import build_model
from p2ptrain.native import module_path
from p2ptrain.redis_server import RedisServer
from p2ptrain.spec import JobSpec, parse_manifest

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits.yaml"
# digits: 64 inputs, 10 classes; two hidden layers of width w hold w^2 + 76w + 10 parameters.
# [1024, 1024] is the 1.13M-parameter MLP of issue 10's targets, measured as the 10^6 point.
TARGET_WIDTH = 1024
# Compute-heavy on 8x8 digits: ~0.1-0.5 s of one core per 512-sample gradient, far above a request's cost.
CNN_ARGS = {"channels": 128, "hidden": 128}
CNN_BATCH = 512


@dataclass(frozen=True)
class Plan:
    peers: tuple[int, ...]  # digits MLP, 2 functions per peer (the example job)
    rounds: int
    sizes: tuple[int, ...]  # parameter counts of the MLP sweep
    size_peers: int
    size_rounds: int
    cnn_peers: int
    cnn_functions: tuple[int, ...]
    cnn_rounds: int
    accumulate_d: int
    accumulate_repeat: int
    lua_repeat: int


QUICK = Plan(peers=(2, 4, 8), rounds=12, sizes=(10_000, 100_000, 1_000_000), size_peers=4, size_rounds=6,
             cnn_peers=1, cnn_functions=(1, 2, 4), cnn_rounds=5, accumulate_d=1_000_000, accumulate_repeat=2,
             lua_repeat=1)
FULL = Plan(peers=(2, 4, 8), rounds=100, sizes=(10_000, 100_000, 1_000_000, 10_000_000), size_peers=4,
            size_rounds=40, cnn_peers=1, cnn_functions=(1, 2, 4), cnn_rounds=30, accumulate_d=1_000_000,
            accumulate_repeat=5, lua_repeat=3)


def inline_unavailable() -> str | None:
    """Why inline gradients cannot be measured with the installed spec, or None when they can."""
    function = schema.openapi_schema()["properties"]["spec"]["properties"]["function"]
    mode = function.get("properties", {}).get("mode")
    if mode is None:
        return "the installed spec has no `function.mode` field (p2ptrain.schema), so no inline mode to compare."
    if "inline" not in mode.get("enum", ["inline"]):
        return f"`function.mode` accepts {mode['enum']}, not inline."
    return None


def mlp_width(params: int) -> int:
    """The width w of two hidden layers whose MLP on digits has about ``params`` parameters."""
    if params == 1_000_000:
        return TARGET_WIDTH
    return max(1, round((-76 + math.sqrt(76 * 76 - 4 * (10 - params))) / 2))


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def job(name: str, changes: Mapping[str, Any]) -> JobSpec:
    """The digits example job with ``changes`` merged into its spec, parsed like any manifest."""
    manifest = yaml.safe_load(DIGITS.read_text(encoding="utf-8"))
    manifest["metadata"]["name"] = name
    _merge(manifest["spec"], changes)
    return parse_manifest(manifest)


def parameter_count(spec: JobSpec) -> int:
    data = load_dataset(spec.dataset)
    return sum(p.numel() for p in build_model(spec.model, data.input_shape, data.num_classes).parameters())


def first_round_done(logs: Path, peers: int, round_number: int = 1) -> float | None:
    """When the last peer logged the end of round ``round_number`` (wall clock), from the peers' logs."""
    done = []
    for index in range(peers):
        path = logs / f"peer-{index}.log"
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
        stamp = next((line[:23] for line in lines if " round done " in line and f" round={round_number} " in line), None)
        if stamp is None:
            return None
        # logging's default asctime: local time, milliseconds after a comma
        done.append(datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return max(done)


def rounds_of(logs: Path, peers: int, phases: tuple[str, ...]) -> list[float]:
    """Every peer's seconds in ``phases`` (summed) for each round after the first, from its logs' round lines."""
    samples = []
    for index in range(peers):
        path = logs / f"peer-{index}.log"
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []:
            if " round done " not in line or " round=1 " in line:
                continue
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            with contextlib.suppress(KeyError, ValueError):
                samples.append(sum(float(fields[name]) for name in phases))
    return samples


def distribution(samples: list[float]) -> dict[str, float]:
    """Median and 90th percentile of per-round samples, and the share of them over the 10 ms target."""
    if not samples:
        return {}
    ordered = sorted(samples)
    return {"median": ordered[len(ordered) // 2], "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "over_target": sum(1 for s in ordered if s > 0.010) / len(ordered), "count": len(ordered)}


def measure(spec: JobSpec, mode: str, ddp: bool = True) -> dict[str, Any]:
    """One p2ptrain run and, with ``ddp``, the DDP baseline right after it, as a results row, with the
    CPU-seconds of every process of the run (sampled from /proc ten times a second) and of DDP's steps."""
    print(f"-- {spec.name}: {spec.peers} peers x {spec.functions_per_peer}, {mode}, {spec.rounds} rounds", flush=True)
    cpu = ChildCpu(interval=0.1)
    with tempfile.TemporaryDirectory(prefix="perf-") as logs, cpu:
        started = time.perf_counter()
        p2p = round_bench.run_p2ptrain(spec, workdir=Path(logs))
        wall = time.perf_counter() - started
        steady_from = first_round_done(Path(logs), spec.peers)
        steady_to = first_round_done(Path(logs), spec.peers, p2p["rounds"])
        # The phases' means above include rounds where a peer waited for a core (on 2 cores every process
        # of the run shares them): the per-round distribution tells the operation's cost from those waits.
        aggregate_update_rounds = distribution(rounds_of(Path(logs), spec.peers, ("aggregate", "update")))
    phases = p2p["phases"]
    row: dict[str, Any] = {
        "name": spec.name, "mode": mode, "peers": spec.peers, "functions_per_peer": spec.functions_per_peer,
        "model": f"{spec.model.name} {json.dumps(dict(spec.model.args))}", "params": parameter_count(spec),
        "batch_size": spec.batch_size, "rounds": p2p["rounds"], "phases": phases,
        "checkpoint_every_rounds": spec.training.checkpoint_every_rounds,
        "round_seconds": p2p["round_seconds"], "first_round_seconds": p2p["first_round_seconds"],
        "accuracy": p2p["test_accuracy"], "wall_seconds": wall,
        "aggregate_update_seconds": phases["aggregate"] + phases["update"],
        "aggregate_update_rounds": aggregate_update_rounds,
        "gradient_seconds": phases["fanout"] + phases["average"],
        "max_instances": p2p["function"]["max_instances"],
        "cold_start_seconds_mean": p2p["function"]["cold_start_seconds_mean"],
    }
    # From the end of the first round (its cold starts) to the end of the last (not the shutdown) where
    # the logs say when they ended, else the whole run.
    steady = steady_from is not None and steady_to is not None and steady_to > steady_from
    end, start = (cpu.cpu_at(steady_to), cpu.cpu_at(steady_from)) if steady else (cpu.cpu_at(), {})
    timed_rounds = max(1, p2p["rounds"] - 1) if steady else max(1, p2p["rounds"])
    per_round = {kind: (end.get(kind, 0.0) - start.get(kind, 0.0)) / timed_rounds
                 for kind in ("peer", "function", "runner", "redis")}
    row |= {
        "cpu_steady_state": steady,
        "cpu_seconds_per_round": per_round,
        "function_cpu_seconds_per_round": per_round["function"],
        "peer_cpu_seconds_per_round": per_round["peer"],
        "function_cpu_seconds_total": end.get("function", 0.0),
    }
    if not ddp:
        print(f"   round {row['round_seconds'] * 1000:.1f} ms, gradient {row['gradient_seconds'] * 1000:.1f} ms, "
              f"function CPU {row['function_cpu_seconds_per_round']:.3f} s/round", flush=True)
    if ddp:
        baseline = round_bench.run_ddp(spec)
        row |= {"ddp_step_seconds": baseline["step_seconds_mean"], "ddp_accuracy": baseline["accuracy"],
                "ddp_cpu_seconds_per_step": baseline["cpu_seconds_per_step"],
                "ddp_train_step_seconds": baseline["train_step_seconds_mean"]}
        print(f"   round {row['round_seconds'] * 1000:.1f} ms vs DDP step {row['ddp_step_seconds'] * 1000:.2f} ms: "
              f"{row['round_seconds'] / row['ddp_step_seconds']:.1f}x (DDP step without its evaluation "
              f"{row['ddp_train_step_seconds'] * 1000:.2f} ms)", flush=True)
    return row


def measure_scaling(plan: Plan, modes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for peers in plan.peers:
        rows.append(measure(job(f"perf-peers-{peers}", {"peers": peers, "rounds": plan.rounds}), "serverless"))
    if "inline" in modes:
        spec = job("perf-peers-4-inline", {"peers": 4, "rounds": plan.rounds, "function": {"mode": "inline"}})
        rows.append(measure(spec, "inline"))
    return rows


def measure_sizes(plan: Plan) -> list[dict[str, Any]]:
    rows = []
    for params in plan.sizes:
        width = mlp_width(params)
        changes = {"peers": plan.size_peers, "rounds": plan.size_rounds, "model": {"args": {"hidden": [width, width]}}}
        rows.append(measure(job(f"perf-mlp-{width}", changes), "serverless") | {"target": width == TARGET_WIDTH})
        if width == TARGET_WIDTH:  # the same job writing its state after every round, not every 4 (the default)
            spec = job(f"perf-mlp-{width}-ckpt1", changes | {"training": {"checkpointEveryRounds": 1}})
            rows.append(measure(spec, "serverless") | {"target": False})
    return rows


def measure_functions(plan: Plan, modes: list[str], inline_note: str | None) -> dict[str, Any]:
    """``inline_note``: why inline was asked for and not measured (printed in the report)."""
    common = {"peers": plan.cnn_peers, "rounds": plan.cnn_rounds, "batchSize": CNN_BATCH,
              "model": {"name": "cnn", "args": CNN_ARGS},
              # one micro-batch per instance, as many instances as micro-batches: the fan-out is the point
              "function": {"containerConcurrency": 1}}
    runs = []
    if "inline" in modes:
        spec = job("perf-cnn-inline", common | {"functionsPerPeer": 1, "function": {"mode": "inline"}})
        runs.append(measure(spec, "inline", ddp=False))
    if "serverless" in modes:
        for n in plan.cnn_functions:
            spec = job(f"perf-cnn-{n}", common | {"functionsPerPeer": n,
                                                 "function": {"containerConcurrency": 1, "maxScale": n * plan.cnn_peers}})
            runs.append(measure(spec, "serverless", ddp=False))
    description = (
        f"CNN {json.dumps(CNN_ARGS)} on digits, batch {CNN_BATCH}, {plan.cnn_peers} peer(s), {plan.cnn_rounds} rounds; "
        "inline = the peer computes its whole minibatch itself (`function.mode: inline`, the seed's traditional P2P); "
        "n functions = the minibatch split into n micro-batches computed by n function instances at once. One peer, "
        "so that on this one machine the functions get its cores, as functions on a cluster get their own nodes."
    )
    return {"runs": runs, "description": description, "inline_skipped": inline_note}


def measure_accumulate(plan: Plan, k: int = 8) -> dict[str, Any]:
    print(f"-- in-database average of {k} x {plan.accumulate_d:,} float32", flush=True)
    module = module_path()
    if module is None:
        raise SystemExit("the p2ptrain Redis module could not be built (needs gcc)")
    password = secrets.token_hex(16)
    with RedisServer(password=password, module=module) as with_module, RedisServer(password=password) as plain:
        rows, _ = accumulate_bench.compare_averaging(
            with_module, plain, k, plan.accumulate_d, plan.accumulate_repeat, plan.lua_repeat)
    best, median = accumulate_bench.module_vs_memcpy(rows[0])
    names = ("module (P2P.ACCUM + P2P.MEAN)", "Lua (SPIRT-style)", "client (MGET + numpy)")
    methods: dict[str, dict[str, float | None]] = {name: {"server_seconds": row.median(row.server), "end_to_end_seconds": row.median(row.end_to_end)}
               for name, row in zip(names, rows, strict=True)}
    memcpy = rows[0].median(rows[0].reference)
    methods["memcpy (numpy copy)"] = {"server_seconds": memcpy, "end_to_end_seconds": None}
    print(f"   module vs memcpy {best:.2f} (median {median:.2f})", flush=True)
    return {"k": k, "d": plan.accumulate_d, "methods": methods, "memcpy_seconds": memcpy,
            "module_vs_memcpy": best, "module_vs_memcpy_median": median}


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    load = os.getloadavg()[0]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, load average {load:.1f} at the start")


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, models up to 10^6 parameters")
    parser.add_argument("--modes", default="serverless,inline", help="gradient modes to measure (comma-separated)")
    parser.add_argument("--parts", default="scaling,sizes,functions,accumulate", help="sections to measure")
    parser.add_argument("--sizes", help="parameter counts of the MLP sweep, comma-separated (default: the plan's)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--images", default=str(ROOT / "docs" / "img" / "performance"))
    parser.add_argument("--save", help="also write the raw results to this JSON file")
    parser.add_argument("--render", metavar="RESULTS_JSON", help="write the report from saved results; measure nothing")
    args = parser.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text(encoding="utf-8"))
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = set(modes) - {"serverless", "inline"}
        if unknown:
            parser.error(f"--modes: unknown {sorted(unknown)}; expected serverless and/or inline")
        parts = {p.strip() for p in args.parts.split(",") if p.strip()}
        inline_note = inline_unavailable() if "inline" in modes else None
        if inline_note:
            print(f"note: skipping inline: {inline_note}", flush=True)
            modes.remove("inline")
        plan = QUICK if args.quick else FULL
        if args.sizes:
            plan = dataclasses.replace(plan, sizes=tuple(int(n) for n in args.sizes.split(",") if n.strip()))
        started = time.monotonic()
        results = {"meta": {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                            "commit": commit(), "machine": machine(), "quick": args.quick,
                            "cores": os.cpu_count() or 1}}
        if inline_note:
            results["inline_skipped"] = inline_note
        # Each section is saved and rendered as soon as it is measured: an interrupted run keeps its figures.
        sections = {"accumulate": lambda: measure_accumulate(plan), "scaling": lambda: measure_scaling(plan, modes),
                    "functions": lambda: measure_functions(plan, modes, inline_note), "sizes": lambda: measure_sizes(plan)}
        for name, section in sections.items():
            if name not in parts:
                continue
            results[name] = section()
            results["meta"]["minutes"] = (time.monotonic() - started) / 60
            results["meta"]["load_end"] = os.getloadavg()[0]
            if args.save:
                Path(args.save).parent.mkdir(parents=True, exist_ok=True)
                Path(args.save).write_text(json.dumps(results, indent=2), encoding="utf-8")
            render(results, Path(args.doc), Path(args.images))
    for path in render(results, Path(args.doc), Path(args.images)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
