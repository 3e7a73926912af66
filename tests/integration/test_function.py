"""The gradient function as Knative runs it: func-python's middleware, health, metrics, and its
Knative Functions layout in ``functions/gradient``."""

from __future__ import annotations

import concurrent.futures
import importlib
import secrets
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from func_python.cloudevent import ASGIApplication

from p2ptrain import wire
from p2ptrain.config import RedisAddress, RuntimeConfig, Secrets
from p2ptrain.gradient import GradientFunction, compute_gradient

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
    assert function._model is not None
    numel = sum(p.numel() for p in function._model.parameters())
    generator = torch.Generator().manual_seed(0)
    versions = [torch.randn(numel, generator=generator) * 0.1 for _ in range(4)]
    indices = np.arange(16)
    expected = [compute_gradient(function._model, flat, function._dataset.x_train[indices], function._dataset.y_train[indices])[2] for flat in versions]  # type: ignore[union-attr]

    def check(version: int) -> int:
        wrong = 0
        for _ in range(100):
            wrong += not torch.equal(function.gradient(versions[version], indices)[2], expected[version])
        return wrong

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        wrong = sum(pool.map(check, range(4)))
    assert wrong == 0, f"{wrong} of 400 gradients were computed at another request's parameters"
