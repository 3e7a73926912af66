"""``p2ptrain run --prices``: the summary's cost block checked against counts the test can work out on
its own (real processes, real Redis, real HTTP, real torch).

Invocations are rounds x functionsPerPeer x peers plus the retries the peers counted
(``p2ptrain_function_retries_total``, reported in the summary as ``function_retries``); bytes are tensor
sizes (4 bytes per parameter plus the 16-byte tensor header) times the events, publishes and reads a
round makes. The exchange is run twice: gradients inline in the events, and by reference (``dataref``,
fetched from the sender's Redis) when they exceed ``exchange.inlineLimitBytes``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

from p2ptrain import asgi
from p2ptrain.cost import GB, load_prices
from p2ptrain.data import load_dataset
from p2ptrain.ledger import tensor_blob_bytes
from p2ptrain.models import build_model
from p2ptrain.peer import Peer
from p2ptrain.peer.context import due
from p2ptrain.redis_server import free_port
from p2ptrain.spec import load_manifest

from .harness import make_spec, running_job

ROOT = Path(__file__).resolve().parents[2]
PRICES = ROOT / "examples" / "prices" / "serverless-example.yaml"
PEERS, FUNCTIONS, ROUNDS = 2, 2, 6


def _job(tmp_path: Path, exchange: dict[str, Any]) -> Path:
    manifest = yaml.safe_load((ROOT / "examples" / "digits.yaml").read_text())
    manifest["metadata"]["name"] = "cost"
    manifest["spec"].update(peers=PEERS, functionsPerPeer=FUNCTIONS, rounds=ROUNDS, exchange=exchange)
    manifest["spec"]["evaluation"] = {"everyRounds": 3}
    path = tmp_path / "cost.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def _run(job: Path, tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``p2ptrain run`` on the job as a user would; the finished process and its summary."""
    summary_path = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "-m", "p2ptrain", "run", str(job), "--quiet", "--summary", str(summary_path),
         "-o", str(tmp_path / "m.safetensors"), *options],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(summary_path.read_text())


def _checkpoints(job: Path) -> int:
    """How many states a peer writes in the run (``training.checkpointEveryRounds`` and the last round)."""
    every = load_manifest(job).training.checkpoint_every_rounds
    return sum(due(every, round_index, ROUNDS) for round_index in range(ROUNDS))


def _numel(job: Path) -> int:
    spec = load_manifest(job)
    dataset = load_dataset(spec.dataset)
    model = build_model(spec.model, dataset.input_shape, dataset.num_classes)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("by_reference", [False, True], ids=["inline", "dataref"])
def test_cost_figures_match_what_the_run_did(tmp_path: Path, by_reference: bool) -> None:
    # 1024 bytes (the smallest limit) sends the ~19 KB gradient by reference; 64 KiB keeps it inline.
    job = _job(tmp_path, {"roundDeadlineSeconds": 60, "inlineLimitBytes": 1024 if by_reference else 65536})
    done, summary = _run(job, tmp_path, "--prices", str(PRICES))
    cost = summary["cost"]
    blob = tensor_blob_bytes(_numel(job))
    raw = blob - tensor_blob_bytes(0)
    retries, failures = summary["function_retries"], sum(summary["function_failures"].values())
    succeeded = cost["functionInvocations"] - failures
    events = ROUNDS * PEERS * (PEERS - 1)  # one gradient per round from every peer to every other

    assert summary["rounds"] == ROUNDS
    assert cost["functionInvocations"] == ROUNDS * FUNCTIONS * PEERS + retries
    # Bytes to and from Redis: one model version and one mean per peer and round, one gradient
    # accumulated per successful invocation; the outbox copy of every averaged gradient is made by
    # Redis itself (P2P.MEANSTORE), so no bytes move for it.
    redis_bytes = cost["redisBytes"]
    assert redis_bytes["modelPublished"] == ROUNDS * PEERS * blob
    assert redis_bytes["meanRead"] == ROUNDS * PEERS * raw
    assert redis_bytes["accumulatorWritten"] == succeeded * raw
    assert redis_bytes["outboxWritten"] == 0
    # Each instance reads each version at most once (then it is cached), every version at least once.
    assert redis_bytes["modelRead"] % blob == 0
    assert ROUNDS * PEERS * blob <= redis_bytes["modelRead"] <= succeeded * blob
    # Parameters and momentum (plus a few hundred bytes of names and metadata) per state written.
    assert _checkpoints(job) * PEERS * 2 * raw <= redis_bytes["checkpointWritten"] < (_checkpoints(job) + 1) * PEERS * 2 * raw
    # Bytes between peers: the gradient in the event, or an empty event and a fetch from Redis.
    peer_bytes = cost["peerBytes"]
    assert summary["send_failures"] == 0
    if by_reference:
        assert peer_bytes["datarefFetched"] == events * blob
        assert peer_bytes["exchangeSent"] == peer_bytes["exchangeReceived"] == 0
    else:
        assert peer_bytes["exchangeSent"] == peer_bytes["exchangeReceived"] == events * blob
        assert peer_bytes["datarefFetched"] == 0
    assert peer_bytes["outboxFetched"] == summary["recovered_gradients"] * blob
    # Time: CPU within wall time; memory x time with the measured RSS of a torch process (MiBs to GiBs).
    assert 0 < cost["functionCpuSeconds"] <= cost["functionWallSeconds"]
    assert cost["functionMemorySource"] == "measured"
    assert 50 * 2**20 / GB * cost["functionWallSeconds"] <= cost["functionGbSeconds"]
    assert cost["functionGbSeconds"] <= 8 * cost["functionWallSeconds"]
    assert 1 <= cost["functionColdStarts"] <= summary["function"]["cold_starts"]
    assert 0 < cost["peerPodSeconds"] <= PEERS * summary["wall_seconds"]
    assert 0 <= cost["redisPodSeconds"] <= PEERS * (summary["wall_seconds"] + 1)  # INFO uptime: whole seconds
    # Money: the example prices applied to the same figures.
    prices = load_prices(PRICES)
    money = cost["money"]
    assert money["items"]["functionInvocations"] == pytest.approx(cost["functionInvocations"] / 1e6 * 0.20)
    assert money["total"] == pytest.approx(prices.price(cost)["total"])
    printed = done.stdout + done.stderr  # the closing report goes where the progress display went
    assert "cost          function:" in printed and "USD at 2026-11 prices" in printed


def test_a_parameter_server_job_counts_the_aggregator_and_the_checkpoints_peers_read(tmp_path: Path) -> None:
    """topology ps: the peers send to the aggregator only and read its checkpoint every round; the
    aggregator's own ledger (what it takes in, its checkpoints, its Redis) is part of the job's cost."""
    job = _job(tmp_path, {"roundDeadlineSeconds": 60, "inlineLimitBytes": 65536})
    manifest = yaml.safe_load(job.read_text())
    manifest["spec"]["topology"] = "ps"
    job.write_text(yaml.safe_dump(manifest))
    _, summary = _run(job, tmp_path)
    cost, raw = summary["cost"], tensor_blob_bytes(_numel(job)) - tensor_blob_bytes(0)
    events = ROUNDS * PEERS  # one gradient per round from every peer, to the aggregator only
    assert summary["topology"] == "ps" and summary["send_failures"] == 0
    # Sent by the peers and received by the aggregator: both sides are in the sum only with its ledger.
    assert cost["peerBytes"]["exchangeSent"] == cost["peerBytes"]["exchangeReceived"] == events * tensor_blob_bytes(
        _numel(job))
    # Every peer adopts the aggregator's checkpoint (parameters and momentum) every round it waited for.
    assert cost["redisBytes"]["checkpointRead"] >= ROUNDS * PEERS * 2 * raw
    # The aggregator checkpoints every round (the peers read it), the peers as their own state asks.
    assert cost["redisBytes"]["checkpointWritten"] >= (ROUNDS + _checkpoints(job) * PEERS) * 2 * raw
    assert cost["redisPodSeconds"] > 0


class Stalls:
    """A gradient function that takes every request and never answers before ``stop`` (an instance
    stuck in a cold start): each call times out at the round deadline."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.requests = 0

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        await asgi.read_body(receive, 1 << 20)
        self.requests += 1
        await self.stop.wait()
        await asgi.respond(send, 503, b"stopping")


async def test_invocations_are_the_requests_the_function_got_when_the_deadline_cuts_retries() -> None:
    """Every call times out at the deadline, so the retries planned after it are never made: neither the
    invocations nor the retries count them, and invocations = micro-batches + retries still holds."""
    spec = make_spec(name="stalled", peers=1, functionsPerPeer=2, batchSize=16, rounds=1,
                     exchange={"roundDeadlineSeconds": 1})
    async with running_job(spec) as job:
        stop = asyncio.Event()
        front = Stalls(stop)
        port = free_port()
        server = asyncio.create_task(asgi.serve(front, [f"127.0.0.1:{port}"], stop, graceful_timeout=0.5))
        try:
            config = dataclasses.replace(job.config, function_url=f"http://127.0.0.1:{port}/")
            peer = Peer(config, 0, job.secrets)
            await asyncio.wait_for(peer.run(), 60)
        finally:
            stop.set()
            await server
    cost = peer.status.cost
    retries = REGISTRY.get_sample_value("p2ptrain_function_retries_total", peer.labels) or 0.0  # none made: no series
    invocations = REGISTRY.get_sample_value("p2ptrain_cost_function_invocations_total", peer.labels)
    assert cost["functionInvocations"] == invocations == front.requests >= 2
    assert cost["functionInvocations"] == 1 * 2 * 1 + retries  # rounds x functionsPerPeer x peers + retries
    assert cost["functionCpuSeconds"] == 0 and cost["functionColdStarts"] == 0  # no reply, nothing reported
