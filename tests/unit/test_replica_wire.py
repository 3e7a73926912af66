"""``Replica``'s parameters live in one float32 wire tensor, which is published as it is: it must stay
the model's parameters through optimizer steps and state loads, exactly as torch computes them."""

from __future__ import annotations

import numpy as np
import torch

from p2ptrain import wire
from p2ptrain.models import build_model
from p2ptrain.peer.replica import Replica
from p2ptrain.spec import JobSpec, parse_manifest


def _spec(optimizer: dict[str, object]) -> JobSpec:
    return parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "wire"},
        "spec": {"model": {"name": "mlp", "args": {"hidden": 16}}, "dataset": {"name": "digits"}, "optimizer": optimizer},
    })


def _published(replica: Replica) -> np.ndarray:
    as_they_are = replica.wire_model()
    assert as_they_are is not None
    params, blob = as_they_are
    decoded = wire.decode_tensor(bytes(blob), expected_numel=replica.numel)
    np.testing.assert_array_equal(decoded, params)
    return decoded


def test_the_published_buffer_follows_torchs_steps_to_the_bit() -> None:
    spec = _spec({"name": "sgd", "learningRate": 0.1, "momentum": 0.9, "weightDecay": 0.01})
    replica = Replica(spec)
    torch.manual_seed(spec.seed)
    reference = build_model(spec.model, replica.dataset.input_shape, replica.dataset.num_classes)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    flat = lambda: torch.nn.utils.parameters_to_vector(reference.parameters()).detach().numpy()  # noqa: E731
    np.testing.assert_array_equal(_published(replica), flat())
    rng = np.random.default_rng(0)
    for _ in range(3):
        gradient = torch.from_numpy(rng.standard_normal(replica.numel).astype(np.float32))
        replica.apply(gradient)
        offset = 0
        for p in reference.parameters():
            p.grad = gradient[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        optimizer.step()
        np.testing.assert_array_equal(_published(replica), flat())
    np.testing.assert_array_equal(replica.parameters(), flat())


def test_a_loaded_state_is_what_is_published() -> None:
    spec = _spec({"name": "adam", "learningRate": 0.01})
    trained, fresh = Replica(spec), Replica(spec)
    trained.apply(torch.ones(trained.numel))
    fresh.load(trained.pack({"round": 0}))
    np.testing.assert_array_equal(_published(fresh), _published(trained))
    assert not np.array_equal(_published(fresh), Replica(spec).parameters())
