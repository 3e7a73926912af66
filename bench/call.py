"""The fixed cost of one gradient function call and of one peer-to-peer post, on this machine.

Starts a real Redis and a real function instance (``p2ptrain function`` behind the local activator of
``p2ptrain.autoscale``), publishes the digits model, then times warm requests for one micro-batch:
sent straight to the instance, and through the activator; then runs a short real local job and reads
the warm request times the runner's activator recorded inside its rounds; and times a signed
``gradient.averaged`` post to a real peer endpoint (alone, and inside the job's rounds as the peers
recorded them). Prints median/p10/p90 and writes ``docs/bench-call.md``. Usage:
``python bench/call.py [--requests N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import numpy as np
from report import publish

from p2ptrain import asgi, native, wire
from p2ptrain.accumulator import ROUND_KEY_TTL_SECONDS, detect
from p2ptrain.autoscale import LocalFunctionService, child_env
from p2ptrain.config import CONFIG_ENV, REDIS_PASSWORD_ENV, SIGNING_KEY_ENV, RedisAddress, RuntimeConfig
from p2ptrain.local import LocalRun, RunOptions
from p2ptrain.poster import Poster
from p2ptrain.redis_server import RedisServer, free_port
from p2ptrain.spec import JobSpec, load_manifest
from p2ptrain.store import Keys, PeerStore

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench-call"
KEY = b"bench-call-signing-key"


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    deciles = statistics.quantiles(ms, n=10) if len(ms) > 1 else [ms[0]] * 9
    return {"median": statistics.median(ms), "p10": deciles[0], "p90": deciles[-1], "n": len(ms)}


def row(name: str, s: dict[str, float]) -> str:
    return f"| {name} | {s['median']:.2f} | {s['p10']:.2f} | {s['p90']:.2f} | {int(s['n'])} |"


async def timed(call: Callable[[], Awaitable[Any]], n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        check(await call())
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = await call()
        out.append(time.perf_counter() - t0)
        check(response)
    return out


def check(response: Any) -> None:
    status = getattr(response, "status", None) or response.status_code
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {response.content[:300]!r}")


def gradient_request(spec: JobSpec, address: RedisAddress, model_key: str, n: int) -> dict[str, Any]:
    keys = Keys(spec.name, 0)
    size = max(1, spec.batch_size // spec.functions_per_peer)
    return {
        "peer": 0, "round": 0, "version": 0, "part": f"0:{n}", "redis": str(address), "model": model_key,
        "accumulator": keys.accumulator(0), "accumulatorMeta": keys.accumulator_meta(0),
        "indices": list(range(n % 100, n % 100 + size)),
    }


def signed(event_type: str, data: Any, **extensions: Any) -> tuple[dict[str, str], bytes]:
    event = wire.build_event(event_type, wire.peer_source("default", "digits", 0), data=data,
                             subject="round/0", extensions={"round": 0, "peer": 0, **extensions}, key=KEY)
    return wire.to_http(event)


async def function_alone(spec: JobSpec, requests: int, workdir: Path) -> dict[str, Any]:
    """Direct to one warm instance, and through the activator, with nothing else running."""
    import torch

    from p2ptrain.data import load_dataset
    from p2ptrain.models import build_model

    module = native.module_path() if spec.redis.accumulator != "lua" else None
    spec = dataclasses.replace(spec, peers=1)
    stop = asyncio.Event()
    with RedisServer(password=PASSWORD, module=module) as server:
        address = RedisAddress(server.host, server.port)
        front_port = free_port()
        config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (address,), f"http://127.0.0.1:{front_port}/")
        (workdir / "job.json").write_text(config.to_json())
        store = PeerStore(server.client(), Keys(spec.name, 0), accumulator_mode=spec.redis.accumulator,
                          key_ttl_seconds=600)
        data = load_dataset(spec.dataset)
        model = build_model(spec.model, data.input_shape, data.num_classes)
        params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().numpy()
        model_key = store.publish_model(0, params)
        env = child_env({REDIS_PASSWORD_ENV: PASSWORD, SIGNING_KEY_ENV: KEY.decode(), CONFIG_ENV: str(workdir / "job.json")})
        scale = dataclasses.replace(spec.function, min_scale=1, max_scale=1)
        command = [sys.executable, "-m", "p2ptrain", "function"]
        if os.environ.get("BENCH_CALL_PROFILE"):  # where an instance spends its time: cProfile, written on exit
            command[1:1] = ["-m", "cProfile", "-o", os.environ["BENCH_CALL_PROFILE"]]
        service = LocalFunctionService(scale, command, env, workdir, {})
        await service.start()
        front = asyncio.create_task(asgi.serve(service.app, [f"127.0.0.1:{front_port}"], stop))
        try:
            instance = service.instances[0]
            async with httpx.AsyncClient(timeout=30) as probe, Poster() as http:
                await wait_for_port(probe, f"http://127.0.0.1:{front_port}/health/readiness")
                counter = iter(range(10**9))

                def call(url: str) -> Callable[[], Awaitable[Any]]:
                    def one() -> Awaitable[Any]:
                        headers, body = signed(wire.GRADIENT_REQUESTED,
                                               gradient_request(spec, address, model_key, next(counter)))
                        return http.post(url, headers=headers, content=body)
                    return one

                direct = await timed(call(instance.url + "/"), requests)
                server_side = await timed_server_side(call(instance.url + "/"), requests)
                activator = await timed(call(f"http://127.0.0.1:{front_port}/"), requests)
            suspects = await measure_suspects(spec, server, address, model_key, requests)
        finally:
            stop.set()
            await front
            await service.stop()
    return {"direct": summary(direct), "activator": summary(activator), "server": server_side, "suspects": suspects}


async def timed_server_side(call: Callable[[], Awaitable[Any]], n: int) -> dict[str, dict[str, float]]:
    """The function's own timings (load, compute, accumulate, total) from its signed replies."""
    phases: dict[str, list[float]] = {}
    for _ in range(n):
        response = await call()
        check(response)
        reply = wire.event_json(wire.from_http(dict(response.headers), response.content))
        for name, seconds in reply["timings"].items():
            phases.setdefault(name, []).append(seconds)
    return {name: summary(values) for name, values in phases.items()}


async def wait_for_port(http: httpx.AsyncClient, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await http.get(url)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout}s")
        await asyncio.sleep(0.05)


async def measure_suspects(
    spec: JobSpec, server: RedisServer, address: RedisAddress, model_key: str, n: int
) -> list[tuple[str, str, str]]:
    """Each suspect on its own, the old way against the way the code does it now, in this run."""
    import json
    import socket

    import redis as redis_py

    rows: list[tuple[str, str, str]] = []

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.3f} ms"

    def each(run: Callable[[], object], count: int = n) -> list[float]:
        return paired(run, lambda: None, count)[0]

    def paired(old: Callable[[], object], new: Callable[[], object], count: int = n) -> tuple[list[float], list[float]]:
        """Old and new alternately, so a change in the machine's load hits both alike."""
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(count):
            for run, out in ((old, times[0]), (new, times[1])):
                t0 = time.perf_counter()
                run()
                out.append(time.perf_counter() - t0)
        return times

    # TCP_NODELAY on every hop: asyncio sets it on each TCP transport it makes (the servers' accepted
    # sockets, aiohttp's and httpx's connections); redis-py sets it on its sockets; redis-server too.
    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        found["server"] = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()

    found: dict[str, int] = {}
    # The server side as p2ptrain.asgi.serve listens: on a socket from asgi.listener, handed to the loop.
    listener = await asyncio.start_server(accepted, sock=asgi.listener("127.0.0.1:0"))
    port = listener.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    found["client"] = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await reader.read()
    writer.close()
    listener.close()
    client = redis_py.Redis(host=address.host, port=address.port, password=PASSWORD)
    client.ping()
    sock = client.connection_pool.get_connection()._sock
    assert sock is not None
    found["redis-py"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    rows.append(("TCP_NODELAY (Nagle + delayed ACK: a ~40 ms floor)",
                 "asyncio server/client sockets {server}/{client}, redis-py {redis-py}".format(**found),
                 "unchanged: already set on every hop, so no 40 ms stall (ruled out)"))

    # The server (hypercorn before, uvicorn + httptools now) and the client (httpx, then aiohttp, now
    # p2ptrain.poster: asyncio connections whose replies httptools parses),
    # against an empty app in its own process, as every p2ptrain server runs: in the client's process
    # the two would share one event loop and one core and the figures would not be those of a hop.
    empty_port, old_port = free_port(), free_port()
    servers = [subprocess.Popen([sys.executable, __file__, "--serve-empty", kind, str(port)])
               for kind, port in (("uvicorn", empty_port), ("hypercorn", old_port))]
    url, old_url = f"http://127.0.0.1:{empty_port}/", f"http://127.0.0.1:{old_port}/"
    headers, body = signed(wire.GRADIENT_REQUESTED, gradient_request(spec, address, model_key, 0))
    try:
        async with httpx.AsyncClient() as old, Poster() as new, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        ) as aio:

            async def aio_post() -> Any:
                async with aio.post(url, headers=headers, data=body) as response:
                    await response.read()
                    return response

            await wait_for_port(old, url)
            await wait_for_port(old, old_url)
            closing = {**headers, "connection": "close"}
            before: list[float] = []
            middle: list[float] = []
            after: list[float] = []
            fresh: list[float] = []
            hyper: list[float] = []
            # In turns of 25 consecutive requests per way, as a caller sends them: strictly alternating
            # single requests between the two server processes makes each wait for an idle process to
            # be scheduled again, and that (not the server) dominates (measured: uvicorn 0.25 ms in
            # turns, 0.6 ms strictly alternating).
            for _ in range(max(1, n // 25)):
                for post, out in ((lambda: old.post(url, headers=headers, content=body), before),
                                  (aio_post, middle),
                                  (lambda: new.post(url, headers=headers, content=body), after),
                                  (lambda: new.post(url, headers=closing, content=body), fresh),
                                  (lambda: new.post(old_url, headers=headers, content=body), hyper)):
                    out.extend(await timed(post, 25, warmup=1))
            rows.append(("HTTP server per request (empty app in its own process, p2ptrain.poster client)",
                         ms(hyper) + " hypercorn (h11)", ms(after) + " uvicorn + httptools (p2ptrain.asgi.serve)"))
            rows.append(("HTTP client per request (same server, empty app)",
                         ms(before) + " httpx, " + ms(middle) + " aiohttp",
                         ms(after) + " p2ptrain.poster (asyncio + httptools)"))
            rows.append(("connection reuse", ms(fresh) + " new connection per request",
                         ms(after) + " keep-alive pool (peer, activator: one pool each)"))
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)

    hops = []
    for _ in range(n):
        t0 = time.perf_counter()
        await asyncio.to_thread(lambda: None)
        hops.append(time.perf_counter() - t0)
    rows.append(("thread-pool hop (asyncio.to_thread per call)", ms(hops) + " per hop",
                 "kept: computing off the loop keeps health probes answering; costs " + ms(hops)))

    rows.append(await exchange_hops(spec))

    request = gradient_request(spec, address, model_key, 0)
    rows.append(("JSON of the sample indices", ms(each(lambda: json.loads(json.dumps(request)))) + " encode + decode",
                 "unchanged (negligible)"))

    def event_round_trip() -> None:
        h, b = signed(wire.GRADIENT_REQUESTED, request)
        wire.verify(wire.from_http(h, b), KEY)
    rows.append(("HMAC + CloudEvent (build, sign, parse, verify) per event", ms(each(event_round_trip)),
                 "unchanged (small); the reply is now encoded once, without func-python's event sender"))

    keys = Keys(spec.name, 0)
    accumulator = detect(client, spec.redis.accumulator)
    blob = np.zeros(int(client.strlen(model_key)) // 4, dtype="<f4").tobytes()  # about the model's size

    def old_add() -> None:  # the add, then its TTLs: two round trips
        client.execute_command("P2P.ACCUM", keys.accumulator(9), keys.accumulator_meta(9), "p", "1.0", blob) \
            if accumulator.kind == "module" else client.fcall("p2p_accum", 2, keys.accumulator(9),
                                                              keys.accumulator_meta(9), "p", "1.0", blob)
        pipe = client.pipeline(transaction=False)
        pipe.expire(keys.accumulator(9), ROUND_KEY_TTL_SECONDS)
        pipe.expire(keys.accumulator_meta(9), ROUND_KEY_TTL_SECONDS)
        pipe.execute()

    def new_add() -> None:
        accumulator.add(client, keys.accumulator(9), keys.accumulator_meta(9), "p", 1.0, blob)
    two, one = paired(old_add, new_add)
    rows.append((f"Redis round trips per call ({accumulator.kind} accumulator)", ms(two) + " (2 trips)",
                 ms(one) + " (1 pipelined trip)"))

    def load() -> None:
        wire.decode_tensor(cast_bytes(client.get(model_key)))
    rows.append(("model version (re)load per call (GET + decode)", ms(each(load)) + " if loaded every call",
                 "cached per version in the instance: the reply's 'load' timing below"))
    client.close()
    return rows


async def empty_app(scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
    """Reads the body, answers 400 bytes: what is left of a request when the work is taken away."""
    if scope["type"] == "lifespan":
        await asgi.lifespan(receive, send)
        return
    await asgi.read_body(receive, 1 << 20)
    await asgi.respond(send, 200, b"x" * 400)


def serve_empty(kind: str, port: int) -> None:
    """``--serve-empty uvicorn|hypercorn PORT``: serve ``empty_app`` until SIGTERM."""
    import signal

    import hypercorn.asyncio
    import hypercorn.config

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        if kind == "uvicorn":
            await asgi.serve(empty_app, [f"127.0.0.1:{port}"], stop, graceful_timeout=1)
            return
        config = hypercorn.config.Config()
        config.bind, config.accesslog, config.errorlog = [f"127.0.0.1:{port}"], None, None
        await hypercorn.asyncio.serve(empty_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    asgi.run(main())


async def exchange_hops(spec: JobSpec, n: int = 500) -> tuple[str, str, str]:
    """A peer's check and decode of one digits gradient event, through two worker-thread hops (before)
    and on the event loop as ``asgi.off_loop_if_large`` now does for a small event, alternately."""
    from p2ptrain.data import load_dataset
    from p2ptrain.models import build_model

    data = load_dataset(spec.dataset)
    numel = sum(p.numel() for p in build_model(spec.model, data.input_shape, data.num_classes).parameters())
    blob = wire.encode_tensor(np.zeros(numel, dtype=np.float32), spec.exchange.dtype, spec.exchange.compression)
    event = wire.build_event(wire.GRADIENT_AVERAGED, wire.peer_source(spec.namespace, spec.name, 0), data=blob,
                             subject="round/0", extensions={"round": 0, "peer": 0}, key=KEY)
    headers, body = wire.to_http(event)

    def check(h: dict[str, str], b: bytes) -> wire.Incoming:
        incoming = wire.from_http(h, b, data_content_types=(wire.OCTET_STREAM,))
        wire.verify(incoming, KEY)
        return incoming

    def decode(payload: bytes) -> np.ndarray:
        return wire.decode_tensor(payload, expected_numel=numel)

    hops: list[float] = []
    inline: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        decoded = await asyncio.to_thread(check, headers, body)
        await asyncio.to_thread(decode, wire.event_bytes(decoded))
        t1 = time.perf_counter()
        decoded = await asgi.off_loop_if_large(len(body), check, headers, body)
        await asgi.off_loop_if_large(len(blob), decode, wire.event_bytes(decoded))
        inline.append(time.perf_counter() - t1)
        hops.append(t1 - t0)
    ms = f"{statistics.median(hops) * 1000:.3f} ms", f"{statistics.median(inline) * 1000:.3f} ms"
    return (f"exchange: check + decode a received gradient event ({len(body)} bytes)",
            ms[0] + " in worker threads (2 hops)", ms[1] + f" on the loop (events up to {asgi.ON_LOOP_MAX_BYTES} bytes)")


def cast_bytes(value: Any) -> bytes:
    assert isinstance(value, bytes)
    return value


async def exchange_alone(spec: JobSpec, requests: int) -> tuple[dict[str, float], dict[int, int]]:
    """A signed gradient.averaged post (digits gradient, the job's encoding) to a real peer endpoint."""
    from p2ptrain.config import Secrets
    from p2ptrain.peer import Peer

    spec = dataclasses.replace(spec, peers=2)
    stop = asyncio.Event()
    # After the first, every post is a duplicate the endpoint refuses (409) and logs: expected here.
    logging.getLogger("p2ptrain").setLevel(logging.ERROR)
    with RedisServer(password=PASSWORD) as r0, RedisServer(password=PASSWORD) as r1:
        ports = [free_port(), free_port()]
        config = RuntimeConfig(spec, tuple(f"http://127.0.0.1:{p}" for p in ports),
                               (RedisAddress(r0.host, r0.port), RedisAddress(r1.host, r1.port)), "http://127.0.0.1:1/")
        peer = Peer(config, 1, Secrets(PASSWORD, KEY))
        numel = sum(p.numel() for p in peer.replica.model.parameters())
        blob = wire.encode_tensor(np.zeros(numel, dtype=np.float32), spec.exchange.dtype, spec.exchange.compression)
        event = wire.build_event(wire.GRADIENT_AVERAGED, wire.peer_source(spec.namespace, spec.name, 0), data=blob,
                                 subject="round/0", extensions={"round": 0, "peer": 0}, key=KEY)
        headers, body = wire.to_http(event)
        serving = asyncio.create_task(asgi.serve(peer.app, [f"127.0.0.1:{ports[1]}"], stop))
        statuses: dict[int, int] = {}
        try:
            async with httpx.AsyncClient() as probe, Poster() as http:
                await wait_for_port(probe, f"http://127.0.0.1:{ports[1]}/healthz")
                seconds = []
                for _ in range(requests + 20):
                    t0 = time.perf_counter()
                    reply = await http.post(f"http://127.0.0.1:{ports[1]}/", headers=headers, content=body)
                    seconds.append(time.perf_counter() - t0)
                    statuses[reply.status] = statuses.get(reply.status, 0) + 1
        finally:
            stop.set()
            await serving
            await asyncio.to_thread(peer._close_clients)
    return summary(seconds[20:]), statuses


def in_round(spec: JobSpec, rounds: int) -> dict[str, Any]:
    """A short real local job: warm request times as the runner's activator recorded them, and each
    peer's exchange post times from its log."""
    import re

    spec = dataclasses.replace(spec, rounds=rounds, epochs=None)
    with tempfile.TemporaryDirectory() as tmp:
        options = RunOptions(output=Path(tmp) / "model.safetensors", quiet=True, workdir=Path(tmp) / "logs")
        result = asgi.run(LocalRun(spec, options, out=io.StringIO()).run())  # as `p2ptrain run` does
        posts = []
        for log in sorted((Path(tmp) / "logs").glob("peer-*.log")):
            found = re.search(r"exchange posts: (\d+) answered, median ([\d.]+) ms, p10 ([\d.]+) ms, p90 ([\d.]+) ms",
                              log.read_text(errors="replace"))
            if found:
                posts.append({"n": int(found[1]), "median": float(found[2]), "p10": float(found[3]), "p90": float(found[4])})
    fn = result["function"]
    warm = {k: (fn[f"warm_request_seconds_{k}"] or 0) * 1000 for k in ("median", "p10", "p90")}
    return {"function": {**warm, "n": fn["requests"] - fn["cold_starts"]}, "posts": posts,
            "round_ms": result["round_seconds"] * 1000, "phases": result["phases"], "cold_starts": fn["cold_starts"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", nargs="?", default=str(ROOT / "examples" / "digits.yaml"))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--report", default=str(ROOT / "docs" / "bench-call.md"))
    parser.add_argument("--serve-empty", nargs=2, metavar=("SERVER", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_empty:
        serve_empty(args.serve_empty[0], int(args.serve_empty[1]))
        return 0
    spec = load_manifest(args.manifest)
    with tempfile.TemporaryDirectory() as tmp:
        alone = asgi.run(function_alone(spec, args.requests, Path(tmp)))
    exchange, statuses = asgi.run(exchange_alone(spec, args.requests))
    job = in_round(spec, args.rounds)
    posts = job["posts"]
    post_row = {k: statistics.fmean(p[k] for p in posts) for k in ("median", "p10", "p90")} if posts else None
    size = max(1, spec.batch_size // spec.functions_per_peer)
    lines = [
        f"# The fixed cost of a call: gradient function and peer-to-peer post ({spec.name})",
        "",
        f"Written by `bench/call.py`. One machine ({os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} at the end, shared with other work): compare rows of one run, not runs.",
        f"Micro-batch: {size} samples of {spec.dataset.name}, model {spec.model.name} {dict(spec.model.args)}; "
        f"{args.requests} sequential warm requests per row alone; the job: {spec.peers} peers x "
        f"{spec.functions_per_peer} functions, {args.rounds} rounds.",
        "",
        "| call | median ms | p10 ms | p90 ms | n |",
        "|---|---|---|---|---|",
        row("function, direct to one instance, alone", alone["direct"]),
        row("function, through the local activator, alone", alone["activator"]),
        row("function, inside a round, as the runner's activator records it (warm)", job["function"]),
        row("exchange post to a peer endpoint, alone (replies: " +
            ", ".join(f"{k}x{v}" for k, v in sorted(statuses.items())) + ")", exchange),
        (row("exchange post inside a round, as the peers record it (mean over peers)", {**post_row, "n": sum(p["n"] for p in posts)})
         if post_row else "| exchange post inside a round | no peer logged its post times | | | |"),
        "",
        "Inside the function (its own timings, alone, from its signed replies):",
        "",
        "| step | median ms | p10 ms | p90 ms | n |",
        "|---|---|---|---|---|",
        *[row(name, s) for name, s in alone["server"].items()],
        "",
        f"Round: {job['round_ms']:.2f} ms mean after the first; phases (ms): "
        + ", ".join(f"{k} {v * 1000:.2f}" for k, v in job["phases"].items()) + ".",
        "",
        "## Suspects, each measured alone in this run",
        "",
        "| suspect | before | now |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in alone["suspects"]],
        "",
        PROFILE_NOTES,
    ]
    publish(lines, args.report)
    return 0


PROFILE_NOTES = """## What was found

Profiled with cProfile inside a function instance (``BENCH_CALL_PROFILE=path``) and by timing each
suspect alone (the table above, old and new alternately in this run).

- **Where a direct call's time goes** (quiet moment, 2 cores): about 0.4 ms computing the gradient,
  0.25 ms adding it into Redis (one pipelined trip), under 0.01 ms for the model (cached per version),
  about 0.2 ms validating and hopping to the compute thread and back: the function's own 'total'
  above. The rest of the request, about 0.6 ms, is HTTP: the client, the server's parsing and
  writing, and the CloudEvent decode and HMAC check (under 0.1 ms).
- **The HTTP server was the largest fixed cost left per hop.** hypercorn runs h11, a pure-Python
  state machine (its transitions were the top request-path entries of the profile); uvicorn with the
  httptools C parser serves the same empty app for about half the time (the first rows of the suspects
  table). Every p2ptrain server (`p2ptrain.asgi.serve`: the function, the peer endpoint, the local
  activator) now runs uvicorn + httptools; measured back to back by hand (load about 2): direct call
  1.73 -> 1.46 ms median, through the activator 2.59 -> 1.85 ms.
- **No Nagle/delayed-ACK floor, and a test keeps it so.** asyncio sets TCP_NODELAY on an accepted
  socket only when the listener's proto says TCP; a listener made as `socket(AF_INET, SOCK_STREAM)`
  left Nagle on and the activator hop cost 44 ms a request (the activator writes headers and body
  separately, the second write waits for the delayed ACK). `asgi.listener` makes its sockets with
  IPPROTO_TCP; `tests/integration/test_call_cost.py` checks an accepted socket for both bind forms.
- **The exchange**: checking (HMAC, CloudEvent) and decoding a received digits gradient event costs
  less on the event loop than two hops through worker threads (the 'exchange' suspect row); events up
  to 128 KiB are now handled on the loop, larger ones still in a thread; the same for the sender's
  encoding. An event that carries its gradient is now posted while the outbox write (a Redis round trip
  in a thread) is under way instead of after it: the outbox is read only when a round's quorum or
  deadline is missed (`tests/integration/test_exchange_cost.py`). A py-spy profile of one peer of an
  inline round (bench/round.py --mode inline, 6 s at 500 Hz) puts half the samples in the event loop:
  12% in socket writes (the gradient posts 7%, the endpoint's replies 5%: on loopback the kernel
  delivers to the receiver inside the sender's write, and with 4 peers on 2 cores the writer is often
  descheduled there), 8% in Redis calls from worker threads (the accumulate, the checkpoint written in
  the background 4%, and `cost.tick_redis`'s INFO every round 3%), 7% computing micro-batches. The
  exchange phase itself is mostly waiting for the slowest peer to finish its round's work.
- **The round** (bench/round.py, 60 rounds, 4 peers x 2 functions, load 3-4; runs in turn: after,
  before, after, with the server and exchange changes reverted for 'before'): serverless 40.8 / 47.8 /
  32.9 ms per round, inline 20.3 / 26.3 / 21.5 ms, the inline exchange phase 10.9 / 15.9 / 10.9 ms.
  As ratios to the DDP step of each run (itself 7.8-8.6 ms and load-sensitive): serverless 4.8x / 6.1x
  / 4.0x, inline 2.4x / 3.4x / 2.6x; in a quieter moment (load 3.2) 3.5x and 2.2x.
- **The client** (2026-11-28): `p2ptrain.poster` dropped aiohttp for asyncio connections whose replies
  httptools parses (the 'HTTP client' suspect row: aiohttp's request machinery, its cookies, redirects,
  proxies, URL objects and timers, cost 0.3-0.45 ms of CPU a request, this 0.1-0.14 ms; prototype
  against uvicorn with a 19 kB body). In whole rounds (bench/round.py through performance.py's
  measure, 100 rounds, runs alternated with the aiohttp tree in one sitting): inline 4 peers 37.7 /
  35.2 ms -> 24.7 / 21.8 ms a round (3.3x / 3.1x -> 2.3x / 1.9x the DDP step), the peers' CPU 64 ->
  42-47 ms a round; serverless 4 x 2 71.6 / 68.9 -> 53.5 / 58.7 ms (6.1x / 6.2x -> 4.4x / 5.3x), all
  processes' CPU 128-137 -> 104-115 ms a round.
- **Earlier, still in place**: a keep-alive client instead of httpx (aiohttp, now p2ptrain.poster's
  own connections); one Redis round trip per micro-batch; the reply encoded once by `wire.to_http`.
- **Kept**: the function's thread hop (compute off the event loop, so liveness/readiness answer during
  long batches), HMAC signatures on every event, JSON sample indices (microseconds), retries and limits.
- **Left**: on 2 cores shared by 4 peers, 4 Redis servers, up to 4 function instances and the activator
  (and by other work: see the load average), a round's 8 concurrent calls queue for the CPU, which is
  what the in-round figures mostly measure; compare rows of one run.

"""


if __name__ == "__main__":
    sys.exit(main())
