"""The gradient function on a GPU, end to end through ``p2ptrain run``: what bench/gpu_check.py checks
for one micro-batch, here for whole jobs.

1. The digits example (4 peers x 2 functions) trained twice, ``function.device: cpu`` and ``cuda``, from
   the same manifest otherwise: the trained models' largest difference, test accuracy and the round's
   phases. The same seeds and data give the same training up to float rounding.
2. The compute-heavy CNN of bench/performance.py (1 peer, batch 512), ``functionsPerPeer`` 1, 2, 4 on
   ``cpu`` and on ``cuda``, against the peer computing inline on its CPU: the gradient time (fan-out and
   average) and the functions' CPU-seconds a round.

Without a CUDA device the ``cuda`` runs become ``auto`` runs, which fall back to the CPU, and the report
says so (that path is what a CPU-only machine can check). Every function instance of a local run shares
the one GPU. Usage: ``python bench/gpu_job.py [--digits-rounds N] [--cnn-rounds N] [--cnn-functions 1,2,4]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import performance
import round as round_bench
import torch
from safetensors.torch import load_file

GPU_LIMIT = {"limits": {"nvidia.com/gpu": 1}}  # function.device: cuda needs it in the manifest (ignored locally)


def run_digits(device: str, rounds: int) -> dict[str, Any]:
    """The digits example run as ``p2ptrain run`` runs it, with ``function.device`` set: summary, model,
    wall time."""
    spec = performance.job(f"digits-{device}", {"rounds": rounds, "function": {"device": device, "resources": GPU_LIMIT}})
    with tempfile.TemporaryDirectory(prefix="gpu-job-") as tmp:
        model = Path(tmp, "model.safetensors")
        started = time.perf_counter()
        summary = round_bench.run_p2ptrain(spec, output=model)
        return {"summary": summary, "model": load_file(str(model)), "wall": time.perf_counter() - started}


def compare_digits(gpu_device: str, rounds: int) -> dict[str, Any]:
    runs = {device: run_digits(device, rounds) for device in ("cpu", gpu_device)}
    cpu_model, gpu_model = runs["cpu"]["model"], runs[gpu_device]["model"]
    if cpu_model.keys() != gpu_model.keys():
        raise SystemExit(f"the two trained models have different tensors: {sorted(cpu_model)} vs {sorted(gpu_model)}")
    diff = max(float((cpu_model[k].float() - gpu_model[k].float()).abs().max()) for k in cpu_model)
    largest = max(float(t.float().abs().max()) for t in cpu_model.values())
    print(f"digits, 4 peers x 2 functions, {rounds} rounds: trained models differ by at most {diff:.3g} "
          f"(largest |parameter| {largest:.3g})")
    print("| function.device | test accuracy | final loss | wall s | round phases, ms |")
    print("|---|---|---|---|---|")
    for device, run in runs.items():
        summary = run["summary"]
        phases = " ".join(f"{k} {v * 1000:.1f}" for k, v in summary.get("phases", {}).items())
        print(f"| {device} | {summary['test_accuracy']:.4f} | {summary['final_loss']:.5f} | {run['wall']:.1f} | {phases} |")
    return {"max_abs_diff": diff, "largest_param": largest,
            "runs": {device: {"summary": run["summary"], "wall": run["wall"]} for device, run in runs.items()}}


def compare_cnn(gpu_device: str, rounds: int, functions: list[int]) -> dict[str, Any]:
    common = {"peers": 1, "rounds": rounds, "batchSize": performance.CNN_BATCH,
              "model": {"name": "cnn", "args": performance.CNN_ARGS}}
    rows = []
    for device in ("cpu", gpu_device):
        for n in functions:
            spec = performance.job(f"gpu-cnn-{device}-{n}", common | {
                "functionsPerPeer": n,
                "function": {"containerConcurrency": 1, "maxScale": n, "device": device, "resources": GPU_LIMIT}})
            rows.append(performance.measure(spec, "serverless", ddp=False) | {"device": device})
    inline = performance.measure(performance.job("gpu-cnn-inline", common | {
        "functionsPerPeer": 1, "function": {"mode": "inline"}}), "inline", ddp=False)
    print(f"CNN {json.dumps(performance.CNN_ARGS)} on digits, batch {performance.CNN_BATCH}, 1 peer, {rounds} rounds "
          "(means from round 2: the first round's cold starts excluded)")
    print("| function.device | functions | gradient ms | round ms | function CPU s / round | gradient vs inline |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['device']} | {row['functions_per_peer']} | {row['gradient_seconds'] * 1000:.1f} | "
              f"{row['round_seconds'] * 1000:.1f} | {row['function_cpu_seconds_per_round']:.3f} | "
              f"{row['gradient_seconds'] / inline['gradient_seconds']:.2f}x |")
    print(f"| inline (peer's CPU) | - | {inline['gradient_seconds'] * 1000:.1f} | {inline['round_seconds'] * 1000:.1f} "
          "| - | 1.00x |")
    return {"rows": rows, "inline": inline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-rounds", type=int, default=100)
    parser.add_argument("--cnn-rounds", type=int, default=10)
    parser.add_argument("--cnn-functions", default="1,2,4", help="functionsPerPeer values for the CNN, comma-separated")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        gpu_device = "cuda"
        print(f"CUDA: {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    else:
        gpu_device = "auto"
        print(f"torch sees no CUDA device (torch {torch.__version__}): the 'cuda' runs are function.device=auto, "
              "which computes on the CPU here; no GPU figure is measured.")
    results = {"device": gpu_device, "digits": compare_digits(gpu_device, args.digits_rounds),
               "cnn": compare_cnn(gpu_device, args.cnn_rounds, [int(n) for n in args.cnn_functions.split(",")])}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
