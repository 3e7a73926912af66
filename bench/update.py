"""Optimizer step on the peer vs in the database (``spec.update``), for 10^5, 10^6, 10^7 parameters.

``peer``: what a peer with ``update: peer`` does per round after aggregating: the torch optimizer
step on its replica, then publishing the new version to its Redis (a SET of the parameters' wire
tensor as it is: the replica keeps them in one, ``Replica.wire_model``) for the functions.
``database``: what ``update: database`` does: send the aggregated gradient to Redis, where
``P2P.SGD`` (the p2ptrain module, or its Lua fallback) writes version v + 1 beside v, into the value of
v - 1, which no function reads any more (``REUSE``). Both against the same real redis-server on loopback, SGD with momentum 0.9 (state-bearing),
interleaved, median of --repeat; prints peer/database (above 1: the database is faster).
Writes docs/bench-update.md.
Usage: ``python bench/update.py [--sizes 100000,1000000,10000000] [--repeat 7] [--kind module|lua]``.
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from report import publish

from p2ptrain import native, wire
from p2ptrain.accumulator import detect
from p2ptrain.dbupdate import ModelUpdater, SgdSettings
from p2ptrain.redis_server import RedisServer
from p2ptrain.store import Keys, PeerStore

ROOT = Path(__file__).resolve().parent.parent


def measure(store: PeerStore, updater: ModelUpdater, d: int, repeat: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    gradient = rng.standard_normal(d, dtype=np.float32)
    buffer, flat = wire.float32_buffer(d)  # the replica's parameters live in a wire tensor
    flat.copy_(torch.from_numpy(rng.standard_normal(d, dtype=np.float32)))
    param = torch.nn.Parameter(flat)  # the same memory
    optimizer = torch.optim.SGD([param], lr=1e-3, momentum=0.9)
    settings = SgdSettings(lr=1e-3, momentum=0.9)
    keys, client = store.keys, store.client
    state_key = f"{keys.prefix}:optstate"
    store.publish_model(0, param.detach().numpy())
    peer: list[float] = []
    database: list[float] = []
    for version in range(repeat + 1):  # the first of each is a warm-up
        t0 = time.perf_counter()
        param.grad = torch.from_numpy(gradient)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        store.publish_model(1000 + version, flat.numpy(), memoryview(buffer))
        t1 = time.perf_counter()
        updater.step(client, settings, keys.model(version), keys.model(version + 1), state_key, gradient,
                     ttl_seconds=600, reuse=keys.model(version - 1) if version >= 1 else None)  # as RoundUpdate does
        t2 = time.perf_counter()
        if version:
            peer.append(t1 - t0)
            database.append(t2 - t1)
    client.flushall()
    return statistics.median(peer), statistics.median(database)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000,10000000")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--kind", choices=["module", "lua"], default="module")
    parser.add_argument("--report", default=str(ROOT / "docs" / "bench-update.md"))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    module = native.module_path() if args.kind == "module" else None
    if args.kind == "module" and module is None:
        raise SystemExit("the p2ptrain Redis module could not be built: run with --kind lua")
    server = RedisServer(password=secrets.token_hex(16), module=module).start()
    try:
        client = server.client()
        store = PeerStore(client, Keys("bench", 0), key_ttl_seconds=600)
        updater = ModelUpdater.like(detect(client))
        rows = [(d, *measure(store, updater, d, args.repeat)) for d in sizes]
    finally:
        server.stop()

    lines = [
        "# Optimizer step: on the peer vs in the database",
        "",
        f"`python bench/update.py --sizes {args.sizes} --repeat {args.repeat} --kind {args.kind}`: SGD with "
        f"momentum 0.9; peer = torch step + publishing the new version to Redis, database = "
        f"`{updater.kind}` P2P.SGD in the peer's redis-server on loopback; median of {args.repeat} "
        f"interleaved rounds, torch {torch.__version__} with {torch.get_num_threads()} threads on "
        f"{platform.machine()}. Wall time (Redis is another process: its CPU time is not ours to count).",
        "",
        "| parameters | peer ms | database ms | peer / database |",
        "|---:|---:|---:|---:|",
    ]
    for d, peer, database in rows:
        lines.append(f"| {d:,} | {peer * 1e3:.2f} | {database * 1e3:.2f} | {peer / database:.2f}x |")
    publish(lines, args.report)


if __name__ == "__main__":
    main()
