"""The whole round against real parts: redis-server processes, HTTP CloudEvents, torch.

The correctness test runs a 2-peer job and checks that the gradient each peer applies equals the
full-batch gradient plain PyTorch computes on the same samples.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from prometheus_client import REGISTRY

from p2ptrain import metrics, wire
from p2ptrain.data import batch_indices, load_dataset
from p2ptrain.models import build_model
from p2ptrain.peer import Peer
from p2ptrain.peer.receiver import ROUND_WINDOW
from p2ptrain.store import Keys

from .harness import make_spec, running_job


def _full_batch_gradient(spec, indices: np.ndarray) -> np.ndarray:
    data = load_dataset(spec.dataset)
    torch.manual_seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_classes)
    x = torch.from_numpy(data.x_train[indices])
    y = torch.from_numpy(data.y_train[indices])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()


async def test_two_peer_round_applies_the_full_batch_gradient() -> None:
    """25 samples over 3 functions are micro-batches of 9, 8 and 8: only a mean weighted by sample
    count equals the full-batch gradient (an unweighted mean of the three means does not)."""
    spec = make_spec(peers=2, functionsPerPeer=3, batchSize=25, rounds=1, optimizer={"learningRate": 1.0})
    async with running_job(spec) as job:
        before = [torch.nn.utils.parameters_to_vector(p.replica.model.parameters()).detach().clone() for p in job.peers]
        await job.train()
        union = np.concatenate(
            [batch_indices(p.shard, 0, spec.batch_size, spec.seed + p.index) for p in job.peers]
        )
        expected = _full_batch_gradient(spec, union)
        for peer, start in zip(job.peers, before, strict=True):
            after = torch.nn.utils.parameters_to_vector(peer.replica.model.parameters()).detach()
            applied = (start - after).numpy()  # plain SGD with learning rate 1: the step is the gradient
            np.testing.assert_allclose(applied, expected, rtol=1e-4, atol=1e-6)


async def test_replicas_stay_identical_and_loss_falls() -> None:
    spec = make_spec(peers=3, functionsPerPeer=2, batchSize=32, rounds=12, optimizer={"learningRate": 0.2})
    async with running_job(spec) as job:
        reports = await job.train()
        states = [p.final_state() for p in job.peers]
        # Same gradients, same order, same float32 arithmetic on every peer: bit-identical replicas.
        for state in states[1:]:
            for name, tensor in state.items():
                assert torch.equal(tensor, states[0][name]), name
        first = np.mean([r[0].loss for r in reports])
        last = np.mean([r[-1].loss for r in reports])
        assert last < first
        assert all(r[-1].peers_used == 3 for r in reports)

        # The trained model, as a user fetches it from a peer (kubectl port-forward + curl /model).
        async with httpx.AsyncClient() as client:
            response = await client.get(job.config.peer_urls[1] + "/model")
        assert response.status_code == 200
        served = safetensors.torch.load(response.content)
        assert served.keys() == states[0].keys()
        for name, tensor in served.items():
            torch.testing.assert_close(tensor, states[0][name])
        model = build_model(spec.model, (64,), 10)
        model.load_state_dict(served)  # loads into the job's model as is


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _rejected(job, peer: int, reason: str) -> float:
    labels = metrics.peer_labels(job.spec.name, job.spec.namespace, peer)
    return _sample("p2ptrain_events_rejected_total", **labels, reason=reason)


async def test_bad_events_are_rejected_with_a_reason_and_training_continues() -> None:
    """Every reject reason the peer declares (``metrics.REJECT_REASONS``), each from a real HTTP post:
    the reply names it, the counter counts it, and the job still trains with both peers."""
    spec = make_spec(name="rejects", peers=2, functionsPerPeer=1, batchSize=16, rounds=3)
    async with running_job(spec) as job:
        url = job.config.peer_urls[0] + "/"
        key = job.secrets.signing_key
        numel = job.peers[0].numel

        def gradient_event(
            data: bytes, *, round_index: int = 0, signing_key: bytes | None = key, peer: int = 1, **extensions: str
        ):
            event = wire.build_event(
                wire.GRADIENT_AVERAGED, wire.peer_source(spec.namespace, spec.name, peer), data=data,
                extensions={"round": round_index, "peer": peer, **extensions}, key=signing_key,
            )
            return wire.to_http(event)

        zeros = wire.encode_tensor(np.zeros(numel, dtype=np.float32))
        nan = np.zeros(numel, dtype=np.float32)
        nan[3] = np.nan
        # Forge a NaN inside a well-formed tensor (encode_tensor itself refuses nothing; decode must).
        bad_nan_blob = zeros[:16] + nan.astype("<f4").tobytes()
        future_format = zeros[:4] + bytes([99]) + zeros[5:]  # a tensor format version we do not speak
        foreign_dataref = f"redis://10.0.0.1:6379/{Keys(spec.name, 1).outbox(0)}"
        cases = {
            "malformed": ({k: v for k, v in gradient_event(zeros)[0].items() if k != "ce-id"}, zeros),
            "content-type": ({"content-type": "text/plain"}, b"not an event"),
            "signature": gradient_event(zeros, signing_key=None),
            "shape": gradient_event(wire.encode_tensor(np.zeros(numel + 1))),
            "nonfinite": gradient_event(bad_nan_blob),
            "version": gradient_event(future_format),
            "oversize": gradient_event(b"x" * (job.peers[0].receiver.max_body_bytes + 1)),
            "stale": gradient_event(zeros, round_index=ROUND_WINDOW + 1),
            "unknown-peer": gradient_event(zeros, peer=0),  # "from" the receiving peer itself
            "dataref": gradient_event(b"", dataref=foreign_dataref),
        }
        wrong_key_headers, wrong_key_body = gradient_event(zeros, signing_key=b"x" * 32)
        async with httpx.AsyncClient() as http:
            for reason, (headers, body) in cases.items():
                before = _rejected(job, 0, reason)
                response = await http.post(url, headers=headers, content=body)
                assert 400 <= response.status_code < 500, reason
                assert response.headers["x-p2ptrain-reason"] == reason
                assert reason in response.text
                assert _rejected(job, 0, reason) == before + 1, reason
            # The claim check is refused for where it points, before anything is fetched from there.
            assert "does not point at peer 1's Redis" in response.text
            # A duplicate: the same peer's gradient for the same round, twice (the first is taken; a later
            # round would tell peer 0 that peer 1 has moved past round 0, and round 0 would close without it).
            headers, body = gradient_event(zeros, round_index=0)
            assert (await http.post(url, headers=headers, content=body)).status_code == 202
            response = await http.post(url, headers=headers, content=body)
            assert response.status_code == 409 and response.headers["x-p2ptrain-reason"] == "duplicate"
            assert _rejected(job, 0, "duplicate") == 1
            before = _rejected(job, 0, "signature")
            response = await http.post(url, headers=wrong_key_headers, content=wrong_key_body)
            assert response.status_code == 401 and "wrong signature" in response.text
            assert _rejected(job, 0, "signature") == before + 1
        assert set(cases) | {"duplicate"} == set(metrics.REJECT_REASONS)

        reports = await job.train()
        assert [len(r) for r in reports] == [3, 3]
        assert all(report.peers_used == 2 for r in reports for report in r)


async def test_function_refuses_unsigned_and_foreign_requests() -> None:
    spec = make_spec(name="fnrefuse", peers=1, functionsPerPeer=1, batchSize=8, rounds=1)
    async with running_job(spec) as job:
        request = {
            "peer": 0, "round": 0, "version": 0, "part": "0:0", "redis": "10.0.0.1:6379",
            "model": "p2p:fnrefuse:0:model:0", "accumulator": "p2p:fnrefuse:0:acc:0",
            "accumulatorMeta": "p2p:fnrefuse:0:accmeta:0", "indices": [1, 2, 3],
        }
        async with httpx.AsyncClient() as http:
            unsigned = wire.to_http(wire.build_event(wire.GRADIENT_REQUESTED, "/x", data=request))
            response = await http.post(job.config.function_url, headers=unsigned[0], content=unsigned[1])
            assert response.status_code == 401
            foreign = wire.to_http(
                wire.build_event(wire.GRADIENT_REQUESTED, "/x", data=request, key=job.secrets.signing_key)
            )
            response = await http.post(job.config.function_url, headers=foreign[0], content=foreign[1])
            assert response.status_code == 400
            assert response.headers["x-p2ptrain-reason"] == "unknown-peer"
            assert "10.0.0.1:6379" in response.text


async def test_retried_micro_batch_is_counted_once() -> None:
    spec = make_spec(name="retry", peers=1, functionsPerPeer=1, batchSize=8, rounds=1)
    async with running_job(spec) as job:
        peer = job.peers[0]
        params = torch.nn.utils.parameters_to_vector(peer.replica.model.parameters()).detach().numpy()
        model_key = await asyncio.to_thread(peer.store.publish_model, 0, params)
        keys = peer.store.keys
        request = {
            "peer": 0, "round": 0, "version": 0, "part": "0:0", "redis": str(job.config.redis[0]),
            "model": model_key, "accumulator": keys.accumulator(0), "accumulatorMeta": keys.accumulator_meta(0),
            "indices": [0, 1, 2, 3],
        }
        async with httpx.AsyncClient() as http:
            replies = []
            for _ in range(2):
                headers, body = wire.to_http(
                    wire.build_event(wire.GRADIENT_REQUESTED, wire.peer_source(spec.namespace, spec.name, 0), data=request, key=job.secrets.signing_key)
                )
                response = await http.post(job.config.function_url, headers=headers, content=body)
                assert response.status_code == 200
                replies.append(wire.event_json(wire.from_http(dict(response.headers), response.content)))
        assert [r["added"] for r in replies] == [True, False]
        average = await asyncio.to_thread(peer.store.read_average, 0)
        assert average is not None
        mean, weight, parts = average
        assert (weight, parts) == (4.0, 1)
        np.testing.assert_allclose(mean, _full_batch_gradient(spec, np.array([0, 1, 2, 3])), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype,compression", [("float16", "zstd"), ("float32", "none")])
async def test_large_gradients_travel_by_reference(dtype: str, compression: str) -> None:
    spec = make_spec(
        name="dataref",
        peers=2,
        functionsPerPeer=1,
        batchSize=8,
        rounds=2,
        model={"name": "mlp", "args": {"hidden": 256}},
        exchange={"inlineLimitBytes": 1024, "dtype": dtype, "compression": compression},
    )
    async with running_job(spec) as job:
        fetched: list[tuple[int, int, str]] = []
        for peer in job.peers:  # a spy on the claim-check fetch: it still reads the sender's real Redis
            def spy(sender: int, dataref: str, fetch=peer.others.fetch_dataref, receiver=peer.index) -> bytes:
                fetched.append((receiver, sender, dataref))
                return fetch(sender, dataref)

            peer.others.fetch_dataref = spy  # type: ignore[method-assign]
        reports = await job.train()
        assert all(report.peers_used == 2 for r in reports for report in r)
        # Every gradient (2 peers x 2 rounds) came by reference, from the sender's own outbox in its Redis.
        expected = {
            (1 - sender, sender, f"redis://{job.config.redis[sender].host}:{job.config.redis[sender].port}/"
             f"{Keys(spec.name, sender).outbox(round_index)}")
            for sender in (0, 1) for round_index in (0, 1)
        }
        assert sorted(fetched) == sorted(expected)
        labels = metrics.peer_labels(spec.name, spec.namespace, 0)
        assert _sample("p2ptrain_exchange_received_bytes_total", **labels) > 1024 * 2


async def test_a_silent_peer_is_excluded_at_the_deadline_and_counted() -> None:
    spec = make_spec(
        name="deadline", peers=3, functionsPerPeer=1, batchSize=8, rounds=2,
        # Long enough that the live peers' gradients always make it on a loaded machine (the counts
        # below are exact); the silent peer costs this much per round.
        exchange={"roundDeadlineSeconds": 5},
    )
    async with running_job(spec) as job:
        live = job.peers[:2]  # peer 2 never starts: its endpoint answers, but it sends nothing
        reports = await asyncio.wait_for(asyncio.gather(*(p.run() for p in live)), 60)
        assert all(report.peers_used == 2 for r in reports for report in r)
        labels = metrics.peer_labels(spec.name, spec.namespace, 0)
        assert _sample("p2ptrain_peers_excluded_total", **labels, reason="deadline") == 2
        assert live[0].status.excluded == {"deadline": 2}
        assert _sample("p2ptrain_peers_active", **labels) == 2


async def test_a_restarted_peer_resumes_from_its_checkpoint_in_redis() -> None:
    spec = make_spec(name="resume", peers=1, functionsPerPeer=2, batchSize=16, rounds=3, optimizer={"momentum": 0.9})
    async with running_job(spec) as job:
        (first,) = await job.train()
        assert [r.round for r in first] == [0, 1, 2]
        trained = job.peers[0].final_state()
        longer = dataclasses.replace(job.config, spec=dataclasses.replace(spec, rounds=5))
        restarted = Peer(longer, 0, job.secrets)  # a fresh process would build exactly this
        resumed = await restarted.resume()
        assert resumed == 3
        for name, tensor in restarted.final_state().items():
            torch.testing.assert_close(tensor, trained[name])
        assert restarted.replica.optimizer.state_dict()["state"], "optimizer momentum was not restored"
        reports = await restarted.run()
        assert [r.round for r in reports] == [3, 4]
