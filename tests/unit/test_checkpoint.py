"""Checkpoints: model and optimizer state survive a round trip without pickle; a misfit is refused;
the median of replicas' checkpoints resists a poisoned one."""

from __future__ import annotations

import copy

import pytest
import torch

from p2ptrain.checkpoint import CheckpointError, median_state, pack_state, unpack_state


def _trained(optimizer_cls, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    optimizer = optimizer_cls(model.parameters(), **kwargs)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize(
    "optimizer_cls,kwargs",
    [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), (torch.optim.Adam, {"lr": 0.01}), (torch.optim.AdamW, {"lr": 0.01})],
)
def test_round_trip_restores_model_and_optimizer(optimizer_cls, kwargs) -> None:
    model, optimizer = _trained(optimizer_cls, **kwargs)
    data = pack_state(model, optimizer, {"round": 7})
    fresh_model, fresh_optimizer = _trained(optimizer_cls, **{**kwargs, "lr": 0.5})
    assert unpack_state(data, fresh_model, fresh_optimizer) == {"round": 7}
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert fresh_optimizer.param_groups[0]["lr"] == kwargs["lr"]
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(torch.as_tensor(fresh_optimizer.state_dict()["state"][index][name]), torch.as_tensor(value))


def test_checkpoint_of_another_model_is_refused() -> None:
    model, optimizer = _trained(torch.optim.SGD, lr=0.1)
    data = pack_state(model, optimizer, {})
    other = torch.nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match="does not fit"):
        unpack_state(data, other, torch.optim.SGD(other.parameters(), lr=0.1))


def test_garbage_is_refused() -> None:
    model, optimizer = _trained(torch.optim.SGD, lr=0.1)
    with pytest.raises(CheckpointError):
        unpack_state(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", model, optimizer)


def _shifted(model: torch.nn.Module, optimizer: torch.optim.Optimizer, by: float) -> bytes:
    """A replica's checkpoint: ``model``'s parameters moved by ``by`` (the original is left alone)."""
    replica = copy.deepcopy(model)
    with torch.no_grad():
        for p in replica.parameters():
            p.add_(by)
    replica_optimizer = type(optimizer)(replica.parameters(), **optimizer.defaults)
    replica_optimizer.load_state_dict(optimizer.state_dict())
    return pack_state(replica, replica_optimizer, {"by": by})


def test_median_of_replicas_ignores_a_poisoned_checkpoint() -> None:
    model, optimizer = _trained(torch.optim.SGD, lr=0.1, momentum=0.9)
    honest = [_shifted(model, optimizer, by) for by in (-0.01, 0.0, 0.02)]
    optimizer.param_groups[0]["lr"] = 1e9  # a lying peer's hyper-parameters travel in the metadata
    poisoned = _shifted(model, optimizer, 1e6)
    optimizer.param_groups[0]["lr"] = 0.1
    nan = _shifted(model, optimizer, float("nan"))

    merged = median_state([honest[0], poisoned, honest[1], nan, honest[2]])
    fresh_model, fresh_optimizer = _trained(torch.optim.SGD, lr=0.5, momentum=0.9)
    meta = unpack_state(merged, fresh_model, fresh_optimizer)
    for name, value in fresh_model.state_dict().items():
        low, high = model.state_dict()[name] - 0.01, model.state_dict()[name] + 0.02
        assert torch.all(value >= low - 1e-6) and torch.all(value <= high + 1e-6), name
    assert fresh_optimizer.param_groups[0]["lr"] == 0.1  # metadata of a checkpoint near the median
    assert meta["by"] in (-0.01, 0.0, 0.02)


def test_median_refuses_checkpoints_of_different_models() -> None:
    model, optimizer = _trained(torch.optim.SGD, lr=0.1)
    other = torch.nn.Linear(4, 2)
    with pytest.raises(CheckpointError, match="not replicas"):
        median_state([pack_state(model, optimizer, {}), pack_state(other, torch.optim.SGD(other.parameters(), lr=0.1), {})])
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        median_state([b"\x08\x00\x00\x00\x00\x00\x00\x00not json"])

