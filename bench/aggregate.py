"""Aggregate + update time per round for every rule, on the model the issue measured.

The model is an MLP 2x1024 on digits (1.13M float32 parameters) with SGD; n peers' gradients (default
4, the issue's job) are aggregated with each registered rule and applied with one optimizer step,
exactly as a peer does it (``aggregate_gradients`` into the preallocated stack, then
``Replica.apply``-style zero-copy step). Each rule runs with the largest f <= --f that n allows.
Rules are interleaved so that load on a shared machine hits all alike; the median of several
repetitions is reported as wall and CPU time (on a busy machine the CPU time is the steadier figure).
Writes docs/bench-aggregate.md.
Usage: ``python bench/aggregate.py [-n 4] [-f 1] [--repeat 9] [--threads N]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from report import publish

from p2ptrain.aggregate import RULES, CenteredClipping, minimum_gradients
from p2ptrain.peer.replica import aggregate_gradients
from p2ptrain.spec import AggregationSpec

ROOT = Path(__file__).resolve().parent.parent
TARGET_MS = 10.0  # the target for aggregate + update together at 1.13M parameters


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
    )


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, gradient: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad = gradient[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=4, help="gradients per round (peers)")
    parser.add_argument("-f", type=int, default=1, help="most Byzantine gradients a robust rule tolerates")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--report", default=str(ROOT / "docs" / "bench-aggregate.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    d = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    gradients = {i: rng.standard_normal(d, dtype=np.float32) for i in range(args.n)}
    gradients[0] *= 100  # one far row, so that selection and clipping do real work
    stack = torch.empty(args.n, d)
    mean_buffer = torch.empty(d)  # what the peer's replica keeps for the mean (Replica.stack)
    byzantine = {
        rule: max((f for f in range(args.f + 1) if minimum_gradients(rule, f) <= args.n), default=-1) for rule in RULES
    }
    rules = ["mean", *sorted(r for r in RULES if r != "mean" and byzantine[r] >= 0)]
    skipped = sorted(set(RULES) - set(rules))
    clipping = CenteredClipping()

    def one_round(rule: str) -> tuple[float, float]:
        spec = AggregationSpec(rule=rule, byzantine=byzantine[rule])
        t0 = time.perf_counter()
        combined = aggregate_gradients(spec, gradients, stack=mean_buffer if rule == "mean" else stack, clipping=clipping)
        t1 = time.perf_counter()
        _step(model, optimizer, combined)
        return t1 - t0, time.perf_counter() - t1

    for rule in rules:  # warm-up: first-call allocations are not the rule's cost
        one_round(rule)
    wall: dict[str, list[float]] = {rule: [] for rule in rules}
    aggregate_wall: dict[str, list[float]] = {rule: [] for rule in rules}
    update_wall: dict[str, list[float]] = {rule: [] for rule in rules}
    cpu: dict[str, list[float]] = {rule: [] for rule in rules}
    for _ in range(args.repeat):
        for rule in rules:
            c0 = time.process_time()
            aggregate_seconds, update_seconds = one_round(rule)
            cpu[rule].append(time.process_time() - c0)
            aggregate_wall[rule].append(aggregate_seconds)
            update_wall[rule].append(update_seconds)
            wall[rule].append(aggregate_seconds + update_seconds)

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    lines = [
        "# Aggregate + update per round, every rule",
        "",
        f"`python bench/aggregate.py -n {args.n} -f {args.f} --repeat {args.repeat} --threads {args.threads}`: MLP 2x1024 on digits "
        f"(d = {d:,} float32 parameters), n = {args.n} gradients, SGD step; median of {args.repeat} interleaved "
        f"runs, one process, torch {torch.__version__} with {torch.get_num_threads()} threads on "
        f"{platform.machine()} ({platform.processor() or 'cpu'}). Aggregate includes stacking the received "
        f"gradients and checking them (shape, finite values). Target: aggregate + update <= {TARGET_MS:.0f} ms.",
        "",
        "| rule | f | aggregate ms | update ms | total wall ms | total CPU ms | CPU within target |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for rule in rules:
        lines.append(
            f"| {rule} | {byzantine[rule]} | {ms(aggregate_wall[rule]):.1f} | {ms(update_wall[rule]):.1f} "
            f"| {ms(wall[rule]):.1f} | {ms(cpu[rule]):.1f} | {'yes' if ms(cpu[rule]) <= TARGET_MS else 'no'} |"
        )
    if skipped:
        lines += ["", f"Not run (need more than n = {args.n} gradients for f = 0): {', '.join(skipped)}."]
    publish(lines, args.report)


if __name__ == "__main__":
    main()
