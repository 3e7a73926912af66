"""Fuzzing both HTTP endpoints over real HTTP (hypothesis, bounded examples): random headers,
attributes and bodies never crash a server, never change state (the peer's inbox, the Redis the
function writes into) and always move a refusal counter; both keep serving afterwards."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from p2ptrain import wire

from .harness import make_spec, running_job

REFUSALS = {400, 401, 409, 413, 415}

header_names = st.sampled_from(
    ["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-signature", "ce-peer", "ce-round", "ce-dataref",
     "ce-subject", "content-type"]
)
# Header values as HTTP can carry them (the client refuses surrounding whitespace).
printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=24).map(str.strip)
header_values = st.one_of(
    st.sampled_from(["1.0", "0.3", "1", "0", "-1", "99999999999999999999", wire.GRADIENT_AVERAGED,
                     wire.GRADIENT_REQUESTED, wire.OCTET_STREAM, wire.JSON, wire.STRUCTURED, "/jobs/default/fuzz/peers/1",
                     "redis://127.0.0.1:1/x"]),
    printable,
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["binary", "tensor", "json", "envelope"]))
    if kind == "binary":
        return draw(st.binary(max_size=400))
    if kind == "tensor":
        return wire.encode_tensor([draw(st.floats(width=32)) for _ in range(draw(st.integers(0, 8)))])
    if kind == "json":
        return json.dumps(draw(st.dictionaries(printable, st.one_of(st.integers(), printable), max_size=6))).encode()
    attributes = draw(st.dictionaries(st.sampled_from(["specversion", "id", "source", "type", "signature",
                                                       "datacontenttype", "data", "data_base64", "peer", "round"]),
                                      st.one_of(printable, st.integers(), st.none()), max_size=9))
    return json.dumps(attributes).encode()


def counter_total(name: str, labels: dict[str, str]) -> float:
    """The sum of a counter over all its label values matching ``labels``."""
    total = 0.0
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_random_requests_are_refused_counted_and_change_nothing() -> None:
    spec = make_spec(name="fuzz", peers=2, functionsPerPeer=1, batchSize=8, rounds=1)
    async with running_job(spec) as job:
        peer0 = job.peers[0]
        redis = job.redis[0].client()
        keys_before = sorted(redis.keys("*"))
        peer_rejected = lambda: counter_total("p2ptrain_events_rejected_total", {"job": "fuzz", "peer": "0"})  # noqa: E731
        function_invoked = lambda: counter_total("p2ptrain_function_invocations_total", {"job": "fuzz"})  # noqa: E731
        targets: dict[str, tuple[str, Callable[[], float]]] = {
            "peer": (job.config.peer_urls[0] + "/", peer_rejected),
            "function": (job.config.function_url, function_invoked),
        }

        @settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(st.sampled_from(sorted(targets)), st.dictionaries(header_names, header_values, max_size=9), bodies())
        def fuzz(target: str, headers: dict[str, str], body: bytes) -> None:
            url, counter = targets[target]
            before = counter()
            with httpx.Client(timeout=30) as client:
                response = client.post(url, headers=headers, content=body)
            assert response.status_code in REFUSALS, (target, headers, body, response.status_code, response.text)
            assert response.headers.get("x-p2ptrain-reason"), response.text
            assert counter() == before + 1
            assert not any(peer0.inbox.holds(r, 1) for r in range(5))

        # hypothesis drives a synchronous client from a thread; the servers run on this event loop.
        await asyncio.to_thread(fuzz)
        assert sorted(redis.keys("*")) == keys_before
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.get(job.config.peer_urls[0] + "/healthz")).status_code == 200
            assert (await client.get(job.config.function_url + "health/readiness")).status_code == 200
