"""The gradient function as Knative runs it: func-python's middleware, health, metrics, and its
Knative Functions layout in ``functions/gradient``."""

from __future__ import annotations

import concurrent.futures
import importlib
import secrets
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from func_python.cloudevent import ASGIApplication
from prometheus_client import REGISTRY

from p2ptrain import wire
from p2ptrain.config import RedisAddress, RuntimeConfig, Secrets
from p2ptrain.gradient import GradientFunction, compute_gradient
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
    app = ASGIApplication(function)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fn") as client:
        assert (await client.get("/health/readiness")).status_code == 500
        await app.on_start()
        assert (await client.get("/health/liveness")).status_code == 200
        assert (await client.get("/health/readiness")).status_code == 200
        # A plain request is not a CloudEvent: func-python answers 400 and the function keeps serving.
        assert (await client.post("/", content=b"hello")).status_code == 400
        event = wire.build_event(wire.GRADIENT_REQUESTED, "/x", data={"peer": 0}, key=b"wrong-key")
        headers, body = wire.to_http(event)
        response = await client.post("/", headers=headers, content=body)
        assert response.status_code == 401 and response.headers["x-p2ptrain-reason"] == "signature"
        assert (await client.get("/health/liveness")).status_code == 200


def test_concurrent_requests_get_the_gradient_of_their_own_model_version(redis_server) -> None:
    """containerConcurrency > 1 runs requests in parallel threads of one instance: each must see only
    its own parameters (functional_call swaps them into the module it is given)."""
    spec = make_spec(name="fnthreads", peers=1, functionsPerPeer=1, batchSize=16, rounds=1)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (RedisAddress(redis_server.host, redis_server.port),), "http://x")
    function = GradientFunction(config, Secrets(redis_server.password, secrets.token_bytes(16)))
    function.start({})
    assert function.model is not None
    numel = sum(p.numel() for p in function.model.parameters())
    generator = torch.Generator().manual_seed(0)
    versions = [torch.randn(numel, generator=generator) * 0.1 for _ in range(4)]
    indices = np.arange(16)
    expected = [compute_gradient(function.model, flat, function.dataset.x_train[indices], function.dataset.y_train[indices])[2] for flat in versions]  # type: ignore[union-attr]

    def check(version: int) -> int:
        wrong = 0
        for _ in range(100):
            wrong += not torch.equal(function.gradient(versions[version], indices)[2], expected[version])
        return wrong

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        wrong = sum(pool.map(check, range(4)))
    assert wrong == 0, f"{wrong} of 400 gradients were computed at another request's parameters"


async def test_an_unexpected_failure_is_answered_counted_and_the_function_keeps_serving(redis_server, monkeypatch) -> None:
    spec = make_spec(name="fnbug", peers=1, functionsPerPeer=1, batchSize=8, rounds=1)
    address = RedisAddress(redis_server.host, redis_server.port)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (address,), "http://x")
    job_secrets = Secrets(redis_server.password, secrets.token_bytes(16))
    function = GradientFunction(config, job_secrets)
    app = ASGIApplication(function)
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
        monkeypatch.setattr(function, "gradient", lambda *a: (_ for _ in ()).throw(RuntimeError("injected bug")))
        response = await post(client)
        assert response.status_code == 500 and response.headers["x-p2ptrain-reason"] == "error"
        assert "RuntimeError: injected bug" in response.text
        assert failures() == before + 1
        monkeypatch.undo()
        assert (await post(client)).status_code == 200  # and the instance keeps serving
