"""In-database averaging and model update: the p2ptrain module vs SPIRT-style Lua vs the client, vs memcpy.

1. Averaging k gradients of d float32 ("add all k into the accumulator, then read the mean") with
   (a) the module (P2P.ACCUM / P2P.MEAN), (b) the same commands as a Redis Lua function, (c) the
   client-side alternative (SET k keys, MGET them, numpy mean). Two measures each: end to end at the
   client (includes moving k*d*4 bytes over loopback TCP), and the server's own time in the commands
   (INFO commandstats). Both are compared with the memory-speed reference measured in the same
   repetition: numpy copying the same k*d*4 bytes. The server-side ratio is the module's arithmetic
   against memcpy; the end-to-end one is bounded by loopback TCP, shown as its own row.
2. PING latency, from a separate process, while a 10^7-element operation runs, next to the PING
   latency of the same idle server over the same span (this machine's scheduling noise).
3. One SGD-with-momentum step for 10^5, 10^6, 10^7 parameters: in the database (P2P.SGD writes the
   next version beside the current one) vs in the peer with torch (the peer holds the model: step and
   publish the new version; or read params, step, write back).
Real redis-server processes on loopback, median of --repeat runs, ratios from one run. Writes
docs/bench-accumulate.md. Usage: ``python bench/accumulate.py [-k 8] [-d 1000000] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import redis
import torch
from report import publish

from p2ptrain import wire
from p2ptrain.accumulator import Accumulator, detect
from p2ptrain.dbupdate import ModelUpdater, SgdSettings
from p2ptrain.native import module_path
from p2ptrain.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent
PINGER = Path(__file__).resolve().parent / "pinger.py"
SGD = SgdSettings(lr=0.01, momentum=0.9, weight_decay=1e-4)


def server_seconds(client: redis.Redis, commands: tuple[str, ...]) -> float:
    """Time the server spent inside ``commands`` since the last CONFIG RESETSTAT."""
    stats = cast(dict[str, dict[str, float]], client.info("commandstats"))
    return sum(stats.get(f"cmdstat_{name}", {}).get("usec", 0.0) for name in commands) / 1e6


def copy_seconds(arrays: list[np.ndarray]) -> float:
    out = np.empty_like(arrays[0])
    t0 = time.perf_counter()
    for array in arrays:
        np.copyto(out, array)
    return time.perf_counter() - t0


class Row:
    """Medians of one method's samples: end to end, server side, and the memcpy of the same repetition."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.end_to_end: list[float] = []
        self.server: list[float] = []
        self.reference: list[float] = []
        self.error = 0.0

    def median(self, samples: list[float]) -> float:
        return statistics.median(samples) if samples else float("nan")


def averaging(
    client: redis.Redis, accumulator: Accumulator, grads: list[bytes], arrays: list[np.ndarray], repeat: int, row: Row
) -> None:
    expected = np.mean(arrays, axis=0)
    for i in range(repeat):
        acc, meta = f"acc:{i}", f"meta:{i}"
        client.config_resetstat()
        t0 = time.perf_counter()
        for n, blob in enumerate(grads):
            accumulator.add(client, acc, meta, f"part{n}", 1.0, blob)
        result = accumulator.mean(client, acc, meta)
        row.end_to_end.append(time.perf_counter() - t0)
        commands = ("p2p.accum", "p2p.mean") if accumulator.kind == "module" else ("fcall",)
        row.server.append(server_seconds(client, commands))
        row.reference.append(copy_seconds(arrays))
        assert result is not None
        row.error = float(np.abs(result[0] - expected).max())
        client.delete(acc, meta)


def client_side(client: redis.Redis, grads: list[bytes], arrays: list[np.ndarray], repeat: int, row: Row) -> list[float]:
    """Returns the SET-only times: moving the k gradients over loopback, the floor of any method."""
    expected = np.mean(arrays, axis=0)
    transfer = []
    for i in range(repeat):
        keys = [f"g:{i}:{n}" for n in range(len(grads))]
        t0 = time.perf_counter()
        for key, blob in zip(keys, grads, strict=True):
            client.set(key, blob)
        t1 = time.perf_counter()
        blobs = client.mget(keys)
        t2 = time.perf_counter()
        mean = np.stack([np.frombuffer(cast(bytes, b), dtype="<f4") for b in blobs]).mean(axis=0)
        t3 = time.perf_counter()
        transfer.append(t1 - t0)
        row.end_to_end.append(t3 - t0)
        row.server.append(t3 - t2)  # the client's own arithmetic (numpy), its "compute" share
        row.reference.append(copy_seconds(arrays))
        row.error = float(np.abs(mean - expected).max())
        client.delete(*keys)
    return transfer


def compare_averaging(
    with_module: RedisServer, plain: RedisServer, k: int, d: int, repeat: int, lua_repeat: int = 3
) -> tuple[list[Row], list[float]]:
    """Module, Lua and client-side averaging of the same k random gradients of d float32, each beside a
    memcpy of the same bytes: the rows (in that order) and the loopback SET-only times."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(d).astype("<f4") for _ in range(k)]
    grads = [a.tobytes() for a in arrays]
    rows = [Row("module: P2P.ACCUM x k + P2P.MEAN"), Row("Lua function (SPIRT-style)"),
            Row("client: SET x k + MGET + numpy mean")]
    module_client, plain_client = with_module.client(), plain.client()
    averaging(module_client, detect(module_client, "module"), grads, arrays, 3 * repeat, rows[0])
    averaging(plain_client, detect(plain_client, "lua"), grads, arrays, max(1, min(repeat, lua_repeat)), rows[1])
    transfer = client_side(plain_client, grads, arrays, repeat, rows[2])
    return rows, transfer


def module_vs_memcpy(module_row: Row) -> tuple[float, float]:
    """The module's arithmetic speed against memcpy (1.0 = memcpy speed): best of the repetitions, and
    the median of per-repetition ratios. Best for both sides because on a shared machine the minimum is
    the measure least disturbed by other load."""
    best = min(module_row.reference) / min(module_row.server)
    median = statistics.median(r / s for r, s in zip(module_row.reference, module_row.server, strict=True))
    return best, median


def ping_during(server: RedisServer, operation: Callable[[], object]) -> tuple[float, float, int]:
    """(operation seconds, worst PING round trip while it ran, PINGs answered while it ran)."""
    pinger = subprocess.Popen(
        [sys.executable, str(PINGER), server.host, str(server.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert pinger.stdin is not None and pinger.stdout is not None
    try:
        pinger.stdin.write(server.password + "\n")
        pinger.stdin.flush()
        assert pinger.stdout.readline().strip() == "ready"
        start = time.monotonic()
        operation()
        end = time.monotonic()
        pinger.stdin.close()
        samples = json.loads(pinger.stdout.readline())
    finally:
        pinger.kill()
        pinger.wait()
    during = [answered - sent for sent, answered in samples if answered > start and sent < end]
    return end - start, max(during, default=float("nan")), len(during)


def responsiveness(server: RedisServer, size: int) -> list[str]:
    client = server.client()
    rng = np.random.default_rng(1)
    grad = rng.standard_normal(size).astype("<f4")
    client.set("big:model:0", wire.encode_tensor(rng.standard_normal(size).astype(np.float32)))
    updater = ModelUpdater("module")
    operations: list[tuple[str, Callable[[], object]]] = [
        ("P2P.ACCUM (new accumulator)", lambda: client.execute_command("P2P.ACCUM", "big:acc", "big:meta", "a", "1", grad.tobytes())),
        ("P2P.ACCUM (adding)", lambda: client.execute_command("P2P.ACCUM", "big:acc", "big:meta", "b", "1", grad.tobytes())),
        ("P2P.MEAN", lambda: client.execute_command("P2P.MEAN", "big:acc", "big:meta")),
        ("P2P.SGD (first step)", lambda: updater.step(client, SGD, "big:model:0", "big:model:1", "big:buf", grad)),
        ("P2P.SGD (with momentum)", lambda: updater.step(client, SGD, "big:model:1", "big:model:2", "big:buf", grad)),
        ("baseline: plain SET of the same bytes", lambda: client.set("big:plain", grad.tobytes())),
    ]
    lines = [
        f"## PING during a {size:,}-element operation",
        "",
        "PINGs back to back from a separate process, from the client sending the operation to its reply "
        "(so the transfer of the operand is included: the plain SET row shows what that alone costs). "
        "'idle' is the same server with nothing running over the same span: the machine's own "
        "scheduling noise. 'module stretch' is the longest CPU time the module held the event loop "
        "without yielding (P2P.STATS), the part of a PING's wait that is the module's doing.",
        "",
        "| operation | operation ms | PINGs answered during it | worst PING ms | worst PING ms, idle | module stretch ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, operation in operations:
        client.execute_command("P2P.STATS", "RESET")
        seconds, worst, count = ping_during(server, operation)
        longest = float(client.execute_command("P2P.STATS")[0])
        _, idle_worst, _ = ping_during(server, functools.partial(time.sleep, seconds))
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} | {count} | {worst * 1e3:.1f} | {idle_worst * 1e3:.1f} | {longest:.1f} |"
        )
    client.delete("big:acc", "big:meta", "big:model:0", "big:model:1", "big:model:2", "big:buf", "big:plain")
    return [*lines, ""]


def model_update(with_module: RedisServer, plain: RedisServer, sizes: list[int], repeat: int) -> list[str]:
    lines = [
        "## One SGD step (momentum 0.9, weight decay 1e-4): in the database vs in the peer",
        "",
        "database: the peer sends the aggregated gradient, `P2P.SGD` writes version v+1 beside v (the "
        "functions read it from there). peer, publish: torch steps the peer's own model and the peer "
        "SETs the new version (what `spec.update: peer` does). peer, read+write: GET v, torch step, SET "
        "v+1. Medians of end-to-end seconds (steps 2.., the first creates the momentum buffer); server = "
        "the module's own time in the command, sliced work included.",
        "",
        "| parameters | database (module) | server share | Lua | peer: step + publish | peer: read + step + write | peer-publish / database |",
        "|---|---|---|---|---|---|---|",
    ]
    module_client, lua_client = with_module.client(), plain.client()
    lua = ModelUpdater(detect(lua_client, "lua").kind)
    module = ModelUpdater("module")
    for size in sizes:
        rng = np.random.default_rng(size)
        start = rng.standard_normal(size).astype(np.float32)
        grads = [rng.standard_normal(size).astype(np.float32) for _ in range(repeat + 1)]
        database, server, lua_times, publish_times, roundtrip_times = [], [], [], [], []
        for client in (module_client, lua_client):
            client.set("m:0", wire.encode_tensor(start))
        # The peer's replica keeps its parameters in a wire tensor and publishes it as it is (Replica.wire_model).
        buffer, flat = wire.float32_buffer(size)
        flat.copy_(torch.from_numpy(start))
        param = torch.nn.Parameter(flat)
        optimizer = torch.optim.SGD([param], lr=SGD.lr, momentum=SGD.momentum, weight_decay=SGD.weight_decay)
        lua_repeat = 0 if size > 1_000_000 else 1 if size > 100_000 else repeat
        for v in range(repeat + 1):
            module_client.config_resetstat()
            t0 = time.perf_counter()
            module.step(module_client, SGD, f"m:{v}", f"m:{v + 1}", "buf", grads[v])
            database.append(time.perf_counter() - t0)
            server.append(server_seconds(module_client, ("p2p.sgd",)))
            if v < lua_repeat:
                t0 = time.perf_counter()
                lua.step(lua_client, SGD, f"m:{v}", f"m:{v + 1}", "buf", grads[v])
                lua_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            param.grad = torch.from_numpy(grads[v])
            optimizer.step()
            module_client.set(f"p:{v + 1}", memoryview(buffer))
            publish_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            current = wire.decode_tensor(cast(bytes, module_client.get(f"p:{v + 1}")))
            stepped = torch.nn.Parameter(torch.from_numpy(current))
            stepped.grad = torch.from_numpy(grads[v])
            torch.optim.SGD([stepped], lr=SGD.lr).step()  # the momentum buffer would be read too: a lower bound
            module_client.set(f"q:{v + 1}", wire.encode_tensor(stepped.detach()))
            roundtrip_times.append(time.perf_counter() - t0)
            module_client.delete(f"m:{v}", f"p:{v}", f"q:{v}")
            lua_client.delete(f"m:{v}")
        final = wire.decode_tensor(cast(bytes, module_client.get(f"m:{repeat + 1}")))
        error = float(np.abs(final - param.detach().numpy()).max())
        assert error < 1e-3, f"in-database SGD drifted from torch by {error}"
        # The first step creates the momentum buffer; the steady state is the later ones.
        db, pub = statistics.median(database[1:]), statistics.median(publish_times[1:])
        lua_text = f"{statistics.median(lua_times):.4f}" if lua_times else "-"
        lines.append(
            f"| {size:,} | {db:.4f} | {statistics.median(server[1:]):.4f} | {lua_text} | {pub:.4f} | "
            f"{statistics.median(roundtrip_times[1:]):.4f} | {pub / db:.2f}x |"
        )
        module_client.flushdb()
        lua_client.flushdb()
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", type=int, default=8, help="gradients to average")
    parser.add_argument("-d", type=int, default=1_000_000, help="float32 elements per gradient")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--large", type=int, default=10_000_000, help="elements of the PING-latency operation")
    parser.add_argument("--sizes", default="100000,1000000,10000000", help="parameter counts of the SGD comparison")
    parser.add_argument("--report", default=str(ROOT / "docs" / "bench-accumulate.md"))
    args = parser.parse_args()

    module = module_path()
    if module is None:
        print("the p2ptrain Redis module could not be built (needs gcc)", file=sys.stderr)
        return 1
    password = secrets.token_hex(16)
    with RedisServer(password=password, module=module) as with_module, RedisServer(password=password) as plain:
        rows, transfer = compare_averaging(with_module, plain, args.k, args.d, args.repeat)
        ping_lines = responsiveness(with_module, args.large)
        sizes = [int(s) for s in args.sizes.split(",") if s]
        update_lines = model_update(with_module, plain, sizes, args.repeat)

    module_row = rows[0]
    reference = module_row.median(module_row.reference)
    server_ratio, server_ratio_median = module_vs_memcpy(module_row)
    e2e_ratio = min(module_row.reference) / min(module_row.end_to_end)
    megabytes = args.k * args.d * 4 / 1e6
    lines = [
        f"# In-database averaging and model update: {args.k} gradients x {args.d:,} float32 ({megabytes:.0f} MB)",
        "",
        f"Real redis-server 7 on loopback, one machine ({os.cpu_count()} cores, shared with other work: "
        f"absolute times are noisy, ratios come from the same run), median of {args.repeat} runs "
        f"(module averaging: {3 * args.repeat}, Lua: up to 3).",
        "",
        f"**Module arithmetic vs memcpy: {server_ratio:.2f}** (numpy copy of the same {megabytes:.0f} MB / the "
        "server's time in P2P.ACCUM x k + P2P.MEAN, best of the repetitions for each; 1.0 = memcpy speed; "
        f"median of per-repetition ratios {server_ratio_median:.2f}). End to end, including loopback TCP: "
        f"{e2e_ratio:.2f}.",
        "",
        "| method | end to end s | server / arithmetic s | end to end vs module | memcpy / server (1 = memcpy speed) | max abs error |",
        "|---|---|---|---|---|---|",
    ]
    module_e2e = module_row.median(module_row.end_to_end)
    for row in rows:
        e2e, server = row.median(row.end_to_end), row.median(row.server)
        lines.append(
            f"| {row.name} | {e2e:.4f} | {server:.4f} | {e2e / module_e2e:.1f}x | {reference / server:.3f} | {row.error:.1e} |"
        )
    lines += [
        f"| loopback transfer only: SET x k of the same bytes | {statistics.median(transfer):.4f} | - | "
        f"{statistics.median(transfer) / module_e2e:.2f}x | - | - |",
        f"| memory reference: numpy copy of the same bytes | - | {reference:.4f} | - | 1.000 | - |",
        "",
        "Server / arithmetic: for the module and Lua, the server's own time in the commands (INFO "
        "commandstats); for the client method, its numpy mean. End to end, every method first moves the k "
        "gradients over loopback TCP (the transfer row), which no in-database method can avoid; the module "
        "then adds in place through DMA at memory speed, Lua unpacks and repacks every float, and the "
        "client-side method moves the bytes a second time (MGET).",
        "",
        *ping_lines,
        *update_lines,
    ]
    publish(lines, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
