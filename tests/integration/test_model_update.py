"""In-database model update (P2P.SGD / P2P.ADAM) against real redis-server, module and Lua alike.

Each step must give torch.optim's parameters (float tolerance) over several steps, write the new
version beside the old one, refuse bad input naming the problem with nothing written, and treat a
retried step as a no-op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from p2ptrain import wire
from p2ptrain.accumulator import detect
from p2ptrain.dbupdate import (
    AdamSettings,
    ModelUpdateError,
    ModelUpdater,
    SgdSettings,
    read_model,
    read_state,
    settings_for,
    write_state,
)
from p2ptrain.redis_server import RedisServer

D = 1_000


def _updater(server: RedisServer) -> tuple[Any, ModelUpdater]:
    client = server.client()
    return client, ModelUpdater.like(detect(client))


def _torch_optimizer(settings: SgdSettings | AdamSettings, param: torch.nn.Parameter) -> torch.optim.Optimizer:
    if isinstance(settings, SgdSettings):
        return torch.optim.SGD(
            [param], lr=settings.lr, momentum=settings.momentum, dampening=settings.dampening,
            weight_decay=settings.weight_decay, nesterov=settings.nesterov,
        )
    optimizer = torch.optim.AdamW if settings.decoupled else torch.optim.Adam
    return optimizer(
        [param], lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
        weight_decay=settings.weight_decay,
    )


SETTINGS = [
    SgdSettings(lr=0.1),
    SgdSettings(lr=0.05, momentum=0.9, weight_decay=1e-2),
    SgdSettings(lr=0.05, momentum=0.9, dampening=0.3),
    SgdSettings(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
    AdamSettings(lr=1e-2),
    AdamSettings(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-2),
    AdamSettings(lr=1e-2, weight_decay=0.1, decoupled=True),
]
IDS = ["sgd", "sgd-momentum-decay", "sgd-dampening", "sgd-nesterov", "adam", "adam-decay", "adamw"]


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_steps_match_torch_over_several_versions(accumulating_redis, settings: SgdSettings | AdamSettings) -> None:
    _, server = accumulating_redis
    client, updater = _updater(server)
    rng = np.random.default_rng(7)
    start = rng.standard_normal(D).astype(np.float32)
    client.set("model:0", wire.encode_tensor(start))
    param = torch.nn.Parameter(torch.tensor(start))
    optimizer = _torch_optimizer(settings, param)
    for version in range(5):
        grad = rng.standard_normal(D).astype(np.float32)
        param.grad = torch.tensor(grad)
        optimizer.step()
        assert updater.step(client, settings, f"model:{version}", f"model:{version + 1}", "state", grad)
        np.testing.assert_allclose(
            read_model(client, f"model:{version + 1}"), param.detach().numpy(), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_array_equal(read_model(client, "model:0"), start)  # versions are written beside


@pytest.mark.parametrize("settings", [SETTINGS[1], SETTINGS[5]], ids=["sgd-momentum-decay", "adam-decay"])
def test_a_step_reusing_the_version_before_gives_the_same_model_and_removes_it(
    accumulating_redis, settings: SgdSettings | AdamSettings
) -> None:
    """REUSE old: the step writes into a version no one reads (the module renames it; Lua deletes it),
    with the same result as a fresh version; src stays, a retry changes nothing, and ``old`` may never
    name another key of the step."""
    _, server = accumulating_redis
    client, updater = _updater(server)
    rng = np.random.default_rng(11)
    start = rng.standard_normal(D).astype(np.float32)
    grads = [rng.standard_normal(D).astype(np.float32) for _ in range(4)]
    for prefix, reuse in (("fresh", False), ("reused", True)):
        client.set(f"{prefix}:0", wire.encode_tensor(start))
        for v, grad in enumerate(grads):
            old = f"{prefix}:{v - 1}" if reuse and v >= 1 else None
            assert updater.step(client, settings, f"{prefix}:{v}", f"{prefix}:{v + 1}", f"{prefix}:state", grad,
                                ttl_seconds=60, reuse=old)
    np.testing.assert_array_equal(read_model(client, "reused:4"), read_model(client, "fresh:4"))
    assert sorted(client.keys("reused:*")) == [b"reused:3", b"reused:4", b"reused:state"]
    assert 0 < client.ttl("reused:4") <= 60
    before = client.get("reused:4")
    assert not updater.step(client, settings, "reused:3", "reused:4", "reused:state", grads[0], reuse="reused:2")
    assert client.get("reused:4") == before
    client.set("other", b"not a model")  # not reusable: deleted, and the version written fresh
    assert updater.step(client, settings, "reused:4", "reused:5", "reused:state", grads[1], reuse="other")
    assert client.exists("other") == 0 and client.exists("reused:4", "reused:5") == 2
    for key in ("reused:5", "reused:6", "reused:state"):
        with pytest.raises(ModelUpdateError, match="REUSE's key must differ"):
            updater.step(client, settings, "reused:5", "reused:6", "reused:state", grads[2], reuse=key)
    assert client.exists("reused:5", "reused:state") == 2


def test_in_place_step_updates_the_model_key(accumulating_redis) -> None:
    _, server = accumulating_redis
    client, updater = _updater(server)
    start = np.linspace(-1, 1, D, dtype=np.float32)
    client.set("model", wire.encode_tensor(start))
    settings = SgdSettings(lr=0.5, momentum=0.9)
    grad = np.full(D, 2.0, dtype=np.float32)
    assert updater.step(client, settings, "model", "model", "buf", grad)
    assert updater.step(client, settings, "model", "model", "buf", grad)
    # torch: buf = 2, p -= 0.5*2; then buf = 0.9*2 + 2 = 3.8, p -= 0.5*3.8
    np.testing.assert_allclose(read_model(client, "model"), start - 1.0 - 1.9, rtol=1e-6, atol=1e-6)


def test_a_retried_step_changes_nothing(accumulating_redis) -> None:
    _, server = accumulating_redis
    client, updater = _updater(server)
    client.set("model:0", wire.encode_tensor(np.ones(D, dtype=np.float32)))
    settings = SgdSettings(lr=0.1, momentum=0.9)
    grad = np.ones(D, dtype=np.float32)
    assert updater.step(client, settings, "model:0", "model:1", "buf", grad)
    before = (client.get("model:1"), client.get("buf"))
    assert not updater.step(client, settings, "model:0", "model:1", "buf", grad * 5)
    assert (client.get("model:1"), client.get("buf")) == before


def test_ttl_expires_the_new_version_and_the_state(accumulating_redis) -> None:
    _, server = accumulating_redis
    client, updater = _updater(server)
    client.set("model:0", wire.encode_tensor(np.ones(D, dtype=np.float32)))
    assert updater.step(client, AdamSettings(lr=0.1), "model:0", "model:1", "adam", np.ones(D, np.float32), ttl_seconds=60)
    assert 0 < client.ttl("model:1") <= 60 and 0 < client.ttl("adam") <= 60
    assert client.ttl("model:0") == -1


GOOD_SGD = SgdSettings(lr=0.1, momentum=0.9)


@pytest.mark.parametrize(
    "settings,grad,setup,message",
    [
        (SgdSettings(lr=-0.1), np.ones(D), None, "lr must be a finite number >= 0"),
        (SgdSettings(lr=float("nan")), np.ones(D), None, "lr must be"),
        (SgdSettings(lr=0.1, momentum=-1), np.ones(D), None, "momentum must be"),
        (SgdSettings(lr=0.1, momentum=0.9, dampening=2), np.ones(D), None, "dampening must be a number in"),
        (SgdSettings(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), np.ones(D), None, "nesterov must be 0 unless"),
        (AdamSettings(lr=0.1, beta1=1.0), np.ones(D), None, "beta1 must be in"),
        (AdamSettings(lr=0.1, eps=0.0), np.ones(D), None, "eps must be"),
        (GOOD_SGD, np.r_[np.ones(D - 1), np.inf], None, "non-finite"),
        (GOOD_SGD, np.ones(D - 1), None, f"of {D - 1} elements"),
        (GOOD_SGD, np.ones(D), lambda c: c.delete("model:0"), "model model:0 does not exist"),
        (GOOD_SGD, np.ones(D), lambda c: c.set("model:0", b"P2PX" + bytes(12 + 4 * D)), "not an uncompressed float32"),
        (GOOD_SGD, np.ones(D), lambda c: c.set("buf", b"\0" * 8), "optimizer state buf has 8 bytes, expected"),
        (AdamSettings(lr=0.1), np.ones(D), lambda c: c.set("buf", b"XXXX" + bytes(12 + 8 * D)), "not a P2P.ADAM state"),
    ],
    ids=["negative-lr", "nan-lr", "negative-momentum", "dampening", "nesterov-dampening", "beta1", "eps",
         "inf-gradient", "wrong-length", "no-model", "bad-header", "bad-buffer", "bad-adam-state"],
)
def test_bad_input_is_refused_and_writes_nothing(accumulating_redis, settings, grad, setup, message: str) -> None:
    _, server = accumulating_redis
    client, updater = _updater(server)
    client.set("model:0", wire.encode_tensor(np.ones(D, dtype=np.float32)))
    if setup is not None:
        setup(client)
    before = {key: client.get(key) for key in ("model:0", "model:1", "buf")}
    with pytest.raises(ModelUpdateError, match=message):
        updater.step(client, settings, "model:0", "model:1", "buf", np.asarray(grad, dtype=np.float32))
    assert {key: client.get(key) for key in ("model:0", "model:1", "buf")} == before


def test_ttl_argument_is_checked(accumulating_redis) -> None:
    _, server = accumulating_redis
    client, updater = _updater(server)
    client.set("model:0", wire.encode_tensor(np.ones(D, dtype=np.float32)))
    with pytest.raises(ModelUpdateError, match="EX seconds"):
        updater.step(client, GOOD_SGD, "model:0", "model:1", "buf", np.ones(D, np.float32), ttl_seconds=0)
    assert client.get("model:1") is None


def test_settings_for_the_job_optimizer() -> None:
    assert settings_for("sgd", lr=0.1, momentum=0.9) == SgdSettings(lr=0.1, momentum=0.9)
    assert settings_for("adamw", lr=0.1, weight_decay=0.01) == AdamSettings(lr=0.1, weight_decay=0.01, decoupled=True)
    with pytest.raises(ModelUpdateError, match="optimizer.name='lbfgs'"):
        settings_for("lbfgs", lr=0.1)


@pytest.mark.parametrize("settings", [SgdSettings(lr=0.05, momentum=0.9), AdamSettings(lr=1e-2)], ids=["sgd", "adam"])
def test_state_reads_as_torch_names_it_and_restores(accumulating_redis, settings: SgdSettings | AdamSettings) -> None:
    _, server = accumulating_redis
    client, updater = _updater(server)
    rng = np.random.default_rng(3)
    start = rng.standard_normal(D).astype(np.float32)
    client.set("model:0", wire.encode_tensor(start))
    param = torch.nn.Parameter(torch.tensor(start))
    optimizer = _torch_optimizer(settings, param)
    assert read_state(client, settings, "state", D) is None
    grads = [rng.standard_normal(D).astype(np.float32) for _ in range(4)]
    for version, grad in enumerate(grads[:2]):
        param.grad = torch.tensor(grad)
        optimizer.step()
        updater.step(client, settings, f"model:{version}", f"model:{version + 1}", "state", grad)
    state = read_state(client, settings, "state", D)
    assert state is not None
    for name, value in optimizer.state[param].items():
        np.testing.assert_allclose(np.asarray(state[name]), np.asarray(value), rtol=1e-5, atol=1e-7)
    # A checkpoint restored into an empty Redis continues exactly where it stopped.
    client.delete("state")
    write_state(client, settings, "state", state)
    param.grad = torch.tensor(grads[2])
    optimizer.step()
    assert updater.step(client, settings, "model:2", "model:3", "state", grads[2])
    np.testing.assert_allclose(read_model(client, "model:3"), param.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_large_gradient_is_sent_as_it_is_and_any_layout_is_accepted(accumulating_redis) -> None:
    # Over redis-py's 6000-byte buffer cutoff a float32 gradient goes out as a view of its own memory
    # (no copy); float64 and strided gradients are converted first. Every one steps as torch does.
    _, server = accumulating_redis
    client, updater = _updater(server)
    settings = SgdSettings(lr=0.05, momentum=0.9, weight_decay=1e-3)
    size = 100_003
    rng = np.random.default_rng(11)
    start = rng.standard_normal(size).astype(np.float32)
    client.set("model:0", wire.encode_tensor(start))
    param = torch.nn.Parameter(torch.tensor(start))
    optimizer = _torch_optimizer(settings, param)
    wide = rng.standard_normal((size, 2)).astype(np.float32)
    for version, grad in enumerate([rng.standard_normal(size).astype(np.float32),
                                    rng.standard_normal(size),  # float64
                                    wide[:, 1]]):  # a strided view
        param.grad = torch.tensor(np.asarray(grad, dtype=np.float32))
        optimizer.step()
        assert updater.step(client, settings, f"model:{version}", f"model:{version + 1}", "state", grad)
        np.testing.assert_allclose(read_model(client, f"model:{version + 1}"), param.detach().numpy(), rtol=1e-5, atol=1e-6)
