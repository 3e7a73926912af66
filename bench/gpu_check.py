"""CUDA against CPU for the gradient function's computation: the same micro-batch's gradient on both
devices (max abs difference, allclose) and the speed-up, for the mlp and cnn models on digits.

``p2ptrain.models.GradientModel`` is what a function instance runs; here it runs at the same
parameters and samples on the CPU and, when torch sees one, on a CUDA GPU. Without CUDA only the CPU
path runs, checked against plain ``loss.backward()`` on the module, and the report says so. Exit code 1
when the gradients disagree. Usage: ``python bench/gpu_check.py [--batch N] [--repeats N] [--cpu-only]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from p2ptrain.data import load_dataset
from p2ptrain.models import GradientModel, build_model
from p2ptrain.spec import DatasetSpec, ModelSpec

MODELS = (ModelSpec("mlp", {"hidden": 64}), ModelSpec("cnn", {"channels": 16, "hidden": 64}))
# float32 on two devices sums in different orders: equal within float tolerance, not bit for bit.
RTOL, ATOL = 1e-4, 1e-5


def reference_gradient(model: torch.nn.Module, flat: torch.Tensor, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """The gradient the plain way: parameters written into the module, ``loss.backward()``."""
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def median_seconds(run: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    run()  # warm-up: kernels, allocator
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(spec: ModelSpec, batch: int, repeats: int, use_cuda: bool) -> tuple[list[str], bool]:
    data = load_dataset(DatasetSpec("digits"))
    torch.manual_seed(0)
    model = build_model(spec, data.input_shape, data.num_classes)
    model.train()
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    indices = np.random.default_rng(0).choice(len(data.y_train), size=batch, replace=False)
    x, y = data.x_train[indices], data.y_train[indices]

    on_cpu = GradientModel(model)
    loss_cpu, correct_cpu, grad_cpu = on_cpu.gradient(flat, x, y)
    cpu_seconds = median_seconds(lambda: on_cpu.gradient(flat, x, y)[2].cpu(), repeats, lambda: None)
    if not use_cuda:
        other, what = reference_gradient(model, flat, x, y), "plain backward (CPU)"
        other_seconds = None
    else:
        on_gpu, gpu_flat = GradientModel(model.to("cuda")), flat.to("cuda")
        loss_gpu, correct_gpu, grad_gpu = on_gpu.gradient(gpu_flat, x, y)
        other, what = grad_gpu.cpu(), "CUDA"
        # timed as the function runs it: samples to the GPU, gradient back to the CPU for Redis
        other_seconds = median_seconds(lambda: on_gpu.gradient(gpu_flat, x, y)[2].cpu(), repeats,
                                       torch.cuda.synchronize)
        if correct_gpu != correct_cpu or abs(loss_gpu - loss_cpu) > ATOL + RTOL * abs(loss_cpu):
            return [f"| {spec.name} | loss/correct differ: CPU {loss_cpu}/{correct_cpu}, CUDA {loss_gpu}/{correct_gpu} |"], False
    diff = float((grad_cpu - other).abs().max())
    close = bool(torch.allclose(grad_cpu, other, rtol=RTOL, atol=ATOL)) and bool(torch.isfinite(grad_cpu).all())
    speed = f"{cpu_seconds / other_seconds:.2f}x" if other_seconds else "n/a"
    gpu_ms = f"{other_seconds * 1000:.3f}" if other_seconds else "n/a"
    row = (f"| {spec.name} | {grad_cpu.numel()} | CPU vs {what} | {diff:.3g} | {close} | "
           f"{cpu_seconds * 1000:.3f} | {gpu_ms} | {speed} |")
    return [row], close


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="samples in the micro-batch (digits: 32 = 64/2)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--cpu-only", action="store_true", help="the CPU path only, even where CUDA is available")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a function instance runs (P2PTRAIN_TORCH_THREADS=1)
    use_cuda = torch.cuda.is_available() and not args.cpu_only
    if use_cuda:
        print(f"CUDA: {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    else:
        why = "--cpu-only" if args.cpu_only else f"torch sees no CUDA device (torch {torch.__version__})"
        print(f"CUDA not used ({why}): CPU path only, checked against plain backward; no speed-up measured.")
    print(f"micro-batch of {args.batch} digits samples, median of {args.repeats} gradients, rtol={RTOL} atol={ATOL}")
    print("| model | parameters | compared | max abs diff | allclose | CPU ms | CUDA ms | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for spec in MODELS:
        rows, close = check(spec, args.batch, args.repeats, use_cuda)
        print("\n".join(rows))
        ok = ok and close
    print("gradients agree" if ok else "GRADIENTS DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
