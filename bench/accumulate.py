"""In-database averaging of k gradients: the p2ptrain module vs SPIRT-style Lua vs client-side numpy.

For k gradients of d float32 each, times "add all k into the accumulator, then read the mean" with
(a) the p2ptrain Redis module (P2P.ACCUM / P2P.MEAN), (b) the same commands as a Redis Lua function,
(c) the client-side alternative: SET k keys, MGET them, average with numpy; and (d) the memory-speed
reference: numpy copying the same k*d*4 bytes. Real redis-server processes on loopback, median of
several repetitions, ratios from one run. Writes docs/bench-accumulate.md.
Usage: ``python bench/accumulate.py [-k 8] [-d 1000000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
from report import publish

from p2ptrain.accumulator import detect
from p2ptrain.native import module_path
from p2ptrain.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def timed(run: Callable[[int], None], repeat: int) -> float:
    samples = []
    for i in range(repeat):
        t0 = time.perf_counter()
        run(i)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def in_database(server: RedisServer, mode: str, grads: list[bytes], repeat: int) -> tuple[float, np.ndarray]:
    client = server.client()
    accumulator = detect(client, mode)
    result: list[np.ndarray] = []

    def run(i: int) -> None:
        acc, meta = f"acc:{i}", f"meta:{i}"
        for n, blob in enumerate(grads):
            accumulator.add(client, acc, meta, f"part{n}", 1.0, blob)
        mean = accumulator.mean(client, acc, meta)
        assert mean is not None
        result[:] = [mean[0]]
        client.delete(acc, meta)

    return timed(run, repeat), result[0]


def client_side(server: RedisServer, grads: list[bytes], repeat: int) -> tuple[float, np.ndarray]:
    client = server.client()
    result: list[np.ndarray] = []

    def run(i: int) -> None:
        keys = [f"g:{i}:{n}" for n in range(len(grads))]
        for key, blob in zip(keys, grads, strict=True):
            client.set(key, blob)
        blobs = client.mget(keys)
        stacked = np.stack([np.frombuffer(cast(bytes, b), dtype="<f4") for b in blobs])
        result[:] = [stacked.mean(axis=0)]
        client.delete(*keys)

    return timed(run, repeat), result[0]


def memory_reference(grads: list[bytes], repeat: int) -> float:
    arrays = [np.frombuffer(b, dtype="<f4") for b in grads]
    out = np.empty_like(arrays[0])

    def run(_: int) -> None:
        for array in arrays:
            np.copyto(out, array)

    return timed(run, repeat)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", type=int, default=8, help="gradients to average")
    parser.add_argument("-d", type=int, default=1_000_000, help="float32 elements per gradient")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--report", default=str(ROOT / "docs" / "bench-accumulate.md"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(args.d).astype("<f4") for _ in range(args.k)]
    grads = [v.tobytes() for v in vectors]
    expected = np.mean(vectors, axis=0)
    module = module_path()
    if module is None:
        print("the p2ptrain Redis module could not be built (needs gcc)", file=sys.stderr)
        return 1
    password = secrets.token_hex(16)
    with RedisServer(password=password, module=module) as with_module, RedisServer(password=password) as plain:
        rows = []
        seconds, mean = in_database(with_module, "module", grads, args.repeat)
        rows.append(("module: P2P.ACCUM x k + P2P.MEAN", seconds, float(np.abs(mean - expected).max())))
        seconds, mean = in_database(plain, "lua", grads, max(1, min(args.repeat, 3)))
        rows.append(("Lua function (SPIRT-style)", seconds, float(np.abs(mean - expected).max())))
        seconds, mean = client_side(plain, grads, args.repeat)
        rows.append(("client: SET x k + MGET + numpy mean", seconds, float(np.abs(mean - expected).max())))
    reference = memory_reference(grads, args.repeat)

    megabytes = args.k * args.d * 4 / 1e6
    module_seconds = rows[0][1]
    lines = [
        f"# In-database averaging: {args.k} gradients x {args.d:,} float32 ({megabytes:.0f} MB)",
        "",
        f"Real redis-server 7 on loopback, one machine ({os.cpu_count()} cores), median of {args.repeat} runs "
        "(Lua: up to 3). Measured in one run; compare ratios, not absolute times.",
        "",
        "| method | seconds | vs module | vs memory copy | max abs error |",
        "|---|---|---|---|---|",
        *[
            f"| {name} | {s:.4f} | {s / module_seconds:.1f}x | {s / reference:.1f}x | {err:.1e} |"
            for name, s, err in rows
        ],
        f"| memory reference: numpy copy of the same bytes | {reference:.4f} | {reference / module_seconds:.2f}x | 1.0x | - |",
        "",
        "Every method moves the k gradients over loopback TCP once; the module then adds in place at "
        "memory speed, Lua unpacks and repacks every float, and the client-side method moves the bytes a "
        "second time (MGET) before numpy averages them.",
    ]
    publish(lines, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
