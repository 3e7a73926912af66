"""Aggregation time of every rule on one round's gradients, as ratios to the plain mean.

For n gradients of d float32 each (default n = 7 peers, d = 1.13M, f = 1: the smallest Bulyan job),
times ``aggregate(rule, grads, f)`` for every registered rule in one process, interleaved so that
load on a shared machine hits all rules alike, and reports the median of several repetitions (wall
and CPU time: on a busy machine the CPU time is the steadier figure) and its ratio to the mean.
Writes docs/bench-aggregate.md.
Usage: ``python bench/aggregate.py [-n 7] [-d 1130000] [-f 1] [--repeat 7]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from report import publish

from p2ptrain.aggregate import RULES, aggregate, minimum_gradients

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=7, help="gradients per round (peers)")
    parser.add_argument("-d", type=int, default=1_130_000, help="float32 elements per gradient")
    parser.add_argument("-f", type=int, default=1, help="Byzantine gradients each robust rule tolerates")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--report", default=str(ROOT / "docs" / "bench-aggregate.md"))
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(args.n, args.d, generator=generator)
    grads[: args.f] *= 100  # f Byzantine rows, so that selection and clipping do real work
    rules = ["mean", *sorted(r for r in RULES if r != "mean" and minimum_gradients(r, args.f) <= args.n)]
    skipped = sorted(set(RULES) - set(rules))
    for rule in rules:  # warm-up: first-call allocations and kernel selection are not the rule's cost
        aggregate(rule, grads, 0 if rule == "mean" else args.f)
    wall: dict[str, list[float]] = {rule: [] for rule in rules}
    cpu: dict[str, list[float]] = {rule: [] for rule in rules}
    for _ in range(args.repeat):
        for rule in rules:
            t0, c0 = time.perf_counter(), time.process_time()
            aggregate(rule, grads, 0 if rule == "mean" else args.f)
            wall[rule].append(time.perf_counter() - t0)
            cpu[rule].append(time.process_time() - c0)

    seconds = {rule: statistics.median(values) for rule, values in wall.items()}
    cpu_seconds = {rule: statistics.median(values) for rule, values in cpu.items()}
    lines = [
        "# Aggregation rules: time per round",
        "",
        f"`python bench/aggregate.py -n {args.n} -d {args.d} -f {args.f} --repeat {args.repeat}`: n = {args.n} "
        f"gradients of d = {args.d:,} float32 ({args.n * args.d * 4 / 2**20:.0f} MiB), f = {args.f}; "
        f"median of {args.repeat} interleaved runs, one process, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads on {platform.machine()} ({platform.processor() or 'cpu'}). "
        "The check of the input (shape, finite values) is included for every rule.",
        "",
        "| rule | wall seconds | vs mean | CPU seconds | vs mean |",
        "|---|---:|---:|---:|---:|",
    ]
    for rule in rules:
        lines.append(
            f"| {rule} | {seconds[rule]:.4f} | {seconds[rule] / seconds['mean']:.1f}x "
            f"| {cpu_seconds[rule]:.4f} | {cpu_seconds[rule] / cpu_seconds['mean']:.1f}x |"
        )
    if skipped:
        lines += ["", f"Not run (need more than n = {args.n} gradients for f = {args.f}): {', '.join(skipped)}."]
    publish(lines, args.report)


if __name__ == "__main__":
    main()
