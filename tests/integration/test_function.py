"""The gradient function as Knative runs it: func-python's middleware, health, metrics, and its
Knative Functions layout in ``functions/gradient``."""

from __future__ import annotations

import concurrent.futures
import importlib
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from prometheus_client import REGISTRY

from p2ptrain import wire
from p2ptrain.config import RedisAddress, RuntimeConfig, Secrets
from p2ptrain.function_server import FunctionFront
from p2ptrain.gradient import GradientFunction, GradientRequest, RequestError
from p2ptrain.models import GradientModel
from p2ptrain.store import Keys, PeerStore

from .harness import make_spec

ROOT = Path(__file__).resolve().parents[2]


def test_knative_layout_constructs_the_gradient_function(monkeypatch: pytest.MonkeyPatch) -> None:
    descriptor = yaml.safe_load((ROOT / "functions/gradient/func.yaml").read_text())
    assert descriptor["runtime"] == "python" and descriptor["invoke"] == "cloudevent"
    monkeypatch.syspath_prepend(str(ROOT / "functions" / "gradient"))
    sys.modules.pop("function", None)
    module = importlib.import_module("function")
    instance = module.new()
    assert isinstance(instance, GradientFunction)
    assert instance.ready() == (False, "loading data and model")


async def test_health_and_readiness_follow_start(redis_server) -> None:
    spec = make_spec(name="fnhealth", peers=1, functionsPerPeer=1, batchSize=8, rounds=1)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (RedisAddress(redis_server.host, redis_server.port),), "http://x")
    function = GradientFunction(config, Secrets(redis_server.password, secrets.token_bytes(16)))
    app = FunctionFront(function)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fn") as client:
        assert (await client.get("/health/readiness")).status_code == 500
        await app.on_start()
        assert (await client.get("/health/liveness")).status_code == 200
        assert (await client.get("/health/readiness")).status_code == 200
        # A plain request is not a CloudEvent: refused with its reason, and the function keeps serving.
        response = await client.post("/", content=b"hello", headers={"content-type": "text/plain"})
        assert response.status_code == 415 and response.headers["x-p2ptrain-reason"] == "content-type"
        event = wire.build_event(wire.GRADIENT_REQUESTED, "/x", data={"peer": 0}, key=b"wrong-key")
        headers, body = wire.to_http(event)
        response = await client.post("/", headers=headers, content=body)
        assert response.status_code == 401 and response.headers["x-p2ptrain-reason"] == "signature"
        assert (await client.get("/health/liveness")).status_code == 200


def test_concurrent_requests_get_the_gradient_of_their_own_model_version(redis_server) -> None:
    """containerConcurrency > 1 runs requests in parallel threads of one instance: each must see only
    its own parameters (a GradientModel holds one request's parameters at a time)."""
    spec = make_spec(name="fnthreads", peers=1, functionsPerPeer=1, batchSize=16, rounds=1)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (RedisAddress(redis_server.host, redis_server.port),), "http://x")
    function = GradientFunction(config, Secrets(redis_server.password, secrets.token_bytes(16)))
    function.start({})
    assert function.model is not None
    numel = sum(p.numel() for p in function.model.parameters())
    generator = torch.Generator().manual_seed(0)
    versions = [torch.randn(numel, generator=generator) * 0.1 for _ in range(4)]
    indices = np.arange(16)
    reference = GradientModel(function.model)
    expected = [reference.gradient(flat, function.dataset.x_train[indices], function.dataset.y_train[indices])[2] for flat in versions]  # type: ignore[union-attr]

    def check(version: int) -> int:
        wrong = 0
        for _ in range(100):
            wrong += not torch.equal(function.gradient(versions[version], indices)[2], expected[version])
        return wrong

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        wrong = sum(pool.map(check, range(4)))
    assert wrong == 0, f"{wrong} of 400 gradients were computed at another request's parameters"


def test_requests_for_a_version_being_read_wait_for_that_read(redis_server, monkeypatch) -> None:
    """The micro-batches of one round arrive together: an instance serving two of them at once reads
    the version from Redis once; a read that fails (the version is not there) fails every request that
    waited for it, and is not remembered: once the version exists, the next request reads it."""
    spec = make_spec(name="fnflight", peers=1, functionsPerPeer=2, batchSize=16, rounds=1)
    address = RedisAddress(redis_server.host, redis_server.port)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (address,), "http://x")
    job_secrets = Secrets(redis_server.password, secrets.token_bytes(16))
    function = GradientFunction(config, job_secrets)
    function.start({})
    assert function.model is not None
    keys = Keys(spec.name, 0)
    store = PeerStore(redis_server.client(), keys, key_ttl_seconds=60)
    params = torch.nn.utils.parameters_to_vector(function.model.parameters()).detach().numpy()

    def request(version: int, part: int) -> GradientRequest:
        data = {"peer": 0, "round": version, "version": version, "part": f"{version}:{part}", "redis": str(address),
                "model": keys.model(version), "accumulator": keys.accumulator(version),
                "accumulatorMeta": keys.accumulator_meta(version), "indices": list(range(part * 8, part * 8 + 8))}
        return function.validate(wire.build_event(wire.GRADIENT_REQUESTED, "/p", data=data, key=job_secrets.signing_key))

    reading, release = threading.Event(), threading.Event()
    real_read = function._read_params

    def held_read(*args: Any) -> Any:  # the first read stays in flight until the second request is waiting
        reading.set()
        assert release.wait(10)
        return real_read(*args)

    monkeypatch.setattr(function, "_read_params", held_read)

    def loads() -> float:
        return REGISTRY.get_sample_value(
            "p2ptrain_function_model_loads_total", {"job": "fnflight", "namespace": "default"}
        ) or 0.0

    def both(version: int) -> list[concurrent.futures.Future[dict[str, Any]]]:
        reading.clear()
        release.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(function.process, request(version, 0))
            assert reading.wait(10)
            second = pool.submit(function.process, request(version, 1))
            time.sleep(0.2)  # the second request is now waiting for the first one's read
            assert not second.done()
            release.set()
            return [first, second]

    # A version that is not in Redis yet: both requests get the read's 409, neither caches anything.
    failed = both(1)
    for future in failed:
        with pytest.raises(RequestError) as refused:
            future.result()
        assert refused.value.reason == "version" and refused.value.status == 409

    assert store.publish_model(1, params) == keys.model(1)
    before = loads()
    receipts = [future.result() for future in both(1)]
    assert loads() - before == 1, "the version was read from Redis once for both requests"
    assert sorted(r["cost"]["modelReadBytes"] for r in receipts) == [0, params.nbytes + wire.TENSOR_HEADER_BYTES]
    assert all(r["added"] for r in receipts) and sum(r["samples"] for r in receipts) == 16


async def test_an_unexpected_failure_is_answered_counted_and_the_function_keeps_serving(redis_server, monkeypatch) -> None:
    spec = make_spec(name="fnbug", peers=1, functionsPerPeer=1, batchSize=8, rounds=1)
    address = RedisAddress(redis_server.host, redis_server.port)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (address,), "http://x")
    job_secrets = Secrets(redis_server.password, secrets.token_bytes(16))
    function = GradientFunction(config, job_secrets)
    app = FunctionFront(function)
    await app.on_start()
    assert function.model is not None
    keys = Keys(spec.name, 0)
    store = PeerStore(redis_server.client(), keys, key_ttl_seconds=60)
    params = torch.nn.utils.parameters_to_vector(function.model.parameters()).detach().numpy()
    model_key = store.publish_model(0, params)
    request = {"peer": 0, "round": 0, "version": 0, "part": "0:0", "redis": str(address), "model": model_key,
               "accumulator": keys.accumulator(0), "accumulatorMeta": keys.accumulator_meta(0), "indices": list(range(8))}

    def post(client: httpx.AsyncClient) -> Any:
        event = wire.build_event(wire.GRADIENT_REQUESTED, "/jobs/default/fnbug/peers/0", data=request, key=job_secrets.signing_key)
        headers, body = wire.to_http(event)
        return client.post("/", headers=headers, content=body)

    def failures() -> float:
        return REGISTRY.get_sample_value(
            "p2ptrain_function_invocations_total", {"job": "fnbug", "namespace": "default", "outcome": "error"}
        ) or 0.0

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fn") as client:
        assert (await post(client)).status_code == 200  # the real request works ...
        before = failures()
        # ... then a bug inside the computation (fault injected: no real input reaches this path).
        monkeypatch.setattr(function, "_compute", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected bug")))
        response = await post(client)
        assert response.status_code == 500 and response.headers["x-p2ptrain-reason"] == "error"
        assert "RuntimeError: injected bug" in response.text
        assert failures() == before + 1
        monkeypatch.undo()
        assert (await post(client)).status_code == 200  # and the instance keeps serving


def _outcome(job: str, outcome: str) -> float:
    labels = {"job": job, "namespace": "default", "outcome": outcome}
    return REGISTRY.get_sample_value("p2ptrain_function_invocations_total", labels) or 0.0


_GOOD = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/x", "ce-type": wire.GRADIENT_REQUESTED,
         "content-type": wire.JSON}


@pytest.mark.parametrize(
    "headers,body,status,reason,names",
    [
        ({}, b"hello", 415, "content-type", "neither a binary-mode event"),
        ({k: v for k, v in _GOOD.items() if k != "ce-id"}, b"{}", 400, "malformed", "ce-id"),
        ({**_GOOD, "content-type": wire.OCTET_STREAM}, b"\0", 415, "content-type", "application/octet-stream"),
        ({"content-type": wire.STRUCTURED}, b'{"specversion": "1.0"', 400, "malformed", "not valid JSON"),
        ({**_GOOD, "content-length": str(64 << 20)}, b"", 413, "oversize", "limit"),
        (_GOOD, b"{}", 401, "signature", "not signed"),
    ],
    ids=["not-an-event", "missing-id", "octet-stream", "truncated-envelope", "declared-oversize", "unsigned"],
)
async def test_bad_requests_get_their_reason_and_a_counter_and_the_function_keeps_serving(
    redis_server, headers: dict[str, str], body: bytes, status: int, reason: str, names: str
) -> None:
    spec = make_spec(name="fnbad", peers=1, functionsPerPeer=1, batchSize=8, rounds=1)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (RedisAddress(redis_server.host, redis_server.port),), "http://x")
    app = FunctionFront(GradientFunction(config, Secrets(redis_server.password, secrets.token_bytes(16))))
    await app.on_start()
    before = _outcome("fnbad", reason)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fn") as client:
        response = await client.post("/", headers=headers, content=body)
        assert (response.status_code, response.headers["x-p2ptrain-reason"]) == (status, reason)
        assert names in response.text
        assert _outcome("fnbad", reason) == before + 1
        assert (await client.get("/health/readiness")).status_code == 200
