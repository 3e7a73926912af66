"""Failures on the round's path are counted, logged outcomes the round survives: a bad reply from the
function, a peer that never takes our gradient, an update the rule cannot make. Only a lasting outage
(``MAX_ROUNDS_WITHOUT_GRADIENT`` rounds without a gradient) fails the peer.

Real parts: redis-server processes, the real gradient function over HTTP, torch. The misbehaving
function is a real HTTP server in front of the real one; unreachable peers are closed loopback ports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from p2ptrain import asgi, wire
from p2ptrain.peer import Peer, PeerError
from p2ptrain.peer.divergence import Diverged
from p2ptrain.peer.functions import MAX_ROUNDS_WITHOUT_GRADIENT
from p2ptrain.redis_server import free_port
from p2ptrain.store import Keys, PeerStore

from .harness import make_spec, running_job


def _sample(name: str, labels: dict[str, str], **extra: str) -> float:
    return REGISTRY.get_sample_value(name, {**labels, **extra}) or 0.0


class BadRepliesFirst:
    """A front for the real function that answers its first ``bad`` requests with a 200 whose body is
    not a signed event (a confused proxy, a compromised instance), then forwards the rest."""

    def __init__(self, upstream: str, bad: int) -> None:
        self.upstream = upstream
        self.bad = bad
        self.seen = 0

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        body = await asgi.read_body(receive, 1 << 24)
        assert body is not None
        self.seen += 1
        if self.seen <= self.bad:
            forged = wire.to_http(wire.build_event(wire.GRADIENT_COMPUTED, "/functions/gradient", data={"samples": 8}))
            await asgi.respond(send, 200, forged[1], headers=[(k.encode(), v.encode()) for k, v in forged[0].items()])
            return
        headers = {k: v for k, v in asgi.headers_of(scope).items() if k.lower() not in ("host", "content-length")}
        async with httpx.AsyncClient() as http:
            response = await http.post(self.upstream, headers=headers, content=body)
        await asgi.respond(
            send, response.status_code, response.content,
            headers=[(k.encode(), v.encode()) for k, v in response.headers.items() if k.lower() != "content-length"],
        )


async def test_a_bad_200_from_the_function_is_a_failed_micro_batch_that_is_retried() -> None:
    spec = make_spec(name="badreply", peers=1, functionsPerPeer=2, batchSize=16, rounds=2)
    async with running_job(spec) as job:
        front = BadRepliesFirst(job.config.function_url, bad=2)
        port = free_port()
        stop = asyncio.Event()
        server = asyncio.create_task(asgi.serve(front, [f"127.0.0.1:{port}"], stop, graceful_timeout=0.5))
        try:
            config = dataclasses.replace(job.config, function_url=f"http://127.0.0.1:{port}/")
            peer = Peer(config, 0, job.secrets)
            reports = await asyncio.wait_for(peer.run(), 120)
        finally:
            stop.set()
            await server
    assert [r.samples for r in reports] == [16, 16], "a micro-batch was lost instead of retried"
    assert peer.status.function_failures == {"reply": 2}
    assert peer.status.function_retries == 2
    assert _sample("p2ptrain_function_call_failures_total", peer.labels, reason="reply") == 2


async def test_unreachable_peers_are_counted_and_a_skipped_update_is_counted_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Peers 1 and 2 never come up: peer 0 sends into the void until the deadline, and median (f=1)
    cannot aggregate its own gradient alone, so it skips the step — every outcome counted and logged."""
    spec = make_spec(name="alone", peers=3, functionsPerPeer=1, batchSize=8, rounds=2,
                     aggregation={"rule": "median", "byzantine": 1}, exchange={"roundDeadlineSeconds": 1})
    async with running_job(spec) as job:
        closed = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        config = dataclasses.replace(job.config, peer_urls=(job.config.peer_urls[0], *closed))
        peer = Peer(config, 0, job.secrets)
        initial = peer.final_state()
        with caplog.at_level(logging.WARNING, logger="p2ptrain.peer"):
            reports = await asyncio.wait_for(peer.run(), 60)
    assert [r.round for r in reports] == [0, 1] and all(r.peers_used == 1 for r in reports)
    assert peer.status.send_failures == 4  # two rounds, two peers
    assert _sample("p2ptrain_exchange_send_failures_total", peer.labels, reason="unreachable") == 4
    assert peer.status.skipped_updates == {"too-few-gradients": 2}
    assert _sample("p2ptrain_updates_skipped_total", peer.labels, reason="too-few-gradients") == 2
    assert all(np.array_equal(initial[k].numpy(), v.numpy()) for k, v in peer.final_state().items())
    messages = [r.getMessage() for r in caplog.records]
    assert sum("did not take our round" in m for m in messages) == 4
    assert sum("skipping this round's update" in m for m in messages) == 2


async def test_an_invalid_outbox_gradient_is_counted_and_never_used(caplog: pytest.LogCaptureFixture) -> None:
    spec = make_spec(name="badoutbox", peers=2, rounds=10, exchange={"roundDeadlineSeconds": 60})
    async with running_job(spec) as job:
        peer = job.peers[0]
        await peer.inbox.file(3, 0, np.zeros(peer.numel, dtype=np.float32))
        await peer.inbox.file(4, 1, np.zeros(peer.numel, dtype=np.float32))  # peer 1 has moved past round 3
        other = PeerStore(job.peers[1].redis, Keys(spec.name, 1), key_ttl_seconds=60)
        other.put_outbox(3, wire.encode_tensor(np.ones(peer.numel + 1, dtype=np.float32)))  # wrong shape
        with caplog.at_level(logging.WARNING, logger="p2ptrain.peer"):
            gradients = await asyncio.wait_for(peer.collect(3, time.monotonic() + 60), 10)
    assert sorted(gradients) == [0]
    assert peer.status.recovered == 0
    assert _sample("p2ptrain_outbox_gradients_invalid_total", peer.labels, reason="shape") == 1
    assert any("outbox is invalid" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_rounds_without_any_gradient_fail_the_peer_after_the_limit() -> None:
    spec = make_spec(name="nofunction", peers=1, functionsPerPeer=2, batchSize=8, rounds=10,
                     exchange={"roundDeadlineSeconds": 1}, function={"retries": 0})
    async with running_job(spec) as job:
        config = dataclasses.replace(job.config, function_url=f"http://127.0.0.1:{free_port()}/")
        peer = Peer(config, 0, job.secrets)
        with pytest.raises(PeerError, match=f"no gradient function call succeeded in {MAX_ROUNDS_WITHOUT_GRADIENT} rounds"):
            await asyncio.wait_for(peer.run(), 60)
    # The rounds before the limit ran (without an update) and counted every failed call.
    assert peer.status.round == MAX_ROUNDS_WITHOUT_GRADIENT - 1
    assert peer.status.function_failures == {"http": 2 * MAX_ROUNDS_WITHOUT_GRADIENT}


async def test_redis_parks_the_average_it_sends_and_a_diverged_round_parks_nothing() -> None:
    """A peer sending its average as the functions' Redis computed it has Redis park it in the outbox
    (P2P.MEANSTORE / p2p_meanstore): the outbox holds what the peer filed as its own gradient. A round
    whose loss diverges (skipRound) sends nothing, and what Redis parked is removed."""
    spec = make_spec(name="parked", peers=1, functionsPerPeer=2, batchSize=16, rounds=3,
                     training={"onDivergence": "skipRound"})
    async with running_job(spec) as job:
        peer = job.peers[0]
        assert peer.parks_average
        check_loss = peer.guard.check_loss
        own: dict[int, np.ndarray] = {}

        def diverge_in_round_1(round_index: int, loss: float | None) -> None:
            if round_index == 1:
                raise Diverged("non-finite-loss", round_index, "injected")
            check_loss(round_index, loss)

        file = peer.inbox.file

        async def keep(round_index: int, sender: int, gradient: np.ndarray) -> bool:
            own[round_index] = gradient.copy()
            return await file(round_index, sender, gradient)

        peer.guard.check_loss = diverge_in_round_1  # type: ignore[method-assign]
        peer.inbox.file = keep  # type: ignore[method-assign]
        await job.train(timeout=60)
        client = peer.store.client
        assert sorted(own) == [0, 2]
        for round_index in (0, 2):
            parked = client.get(peer.store.keys.outbox(round_index))
            assert parked is not None
            np.testing.assert_array_equal(wire.decode_tensor(bytes(parked), expected_numel=peer.numel), own[round_index])
        assert client.exists(peer.store.keys.outbox(1)) == 0
