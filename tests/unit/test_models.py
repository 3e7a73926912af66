"""Built-in models for each input shape, determinism under a seed, and the user's own factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from p2ptrain.models import GradientModel, ModelError, build_model
from p2ptrain.spec import ModelSpec

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32), "tabular": (20,)}


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_builtin_models_map_inputs_to_class_scores(name: str, shape: str) -> None:
    if name == "cnn" and shape == "tabular":
        with pytest.raises(ModelError, match="image inputs"):
            build_model(ModelSpec(name), SHAPES[shape], 10)
        return
    model = build_model(ModelSpec(name), SHAPES[shape], 10)
    assert model(torch.rand(3, *SHAPES[shape])).shape == (3, 10)


def test_initialisation_is_identical_under_the_same_seed() -> None:
    def params(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model = build_model(ModelSpec("cnn", {"channels": 4}), (1, 8, 8), 10)
        return torch.nn.utils.parameters_to_vector(model.parameters())

    assert torch.equal(params(1), params(1))
    assert not torch.equal(params(1), params(2))


def test_mlp_takes_a_list_of_widths() -> None:
    model = build_model(ModelSpec("mlp", {"hidden": [16, 8]}), (4,), 3)
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [16, 8, 3]


def test_user_factory_is_imported_and_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mymodels.py").write_text(
        "import torch\n"
        "def tiny(input_shape, num_classes, width=5):\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[-1], width),"
        " torch.nn.Linear(width, num_classes))\n"
        "def not_a_model(input_shape, num_classes):\n    return 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model(ModelSpec("mymodels:tiny", {"width": 7}), (6,), 2)
    assert model(torch.rand(4, 6)).shape == (4, 2)
    with pytest.raises(ModelError, match="returned int, not a torch.nn.Module"):
        build_model(ModelSpec("mymodels:not_a_model"), (6,), 2)
    with pytest.raises(ModelError, match="has no callable 'missing'"):
        build_model(ModelSpec("mymodels:missing"), (6,), 2)
    with pytest.raises(ModelError, match="cannot import model module 'nosuchmodule'"):
        build_model(ModelSpec("nosuchmodule:f"), (6,), 2)


@pytest.mark.parametrize(
    "spec,message",
    [
        (ModelSpec("resnet"), "unknown model 'resnet'; built-in: cnn, logreg, mlp"),
        (ModelSpec("mlp", {"depth": 3}), "does not take arguments"),
        (ModelSpec("mlp", {"hidden": -1}), "positive int"),
    ],
)
def test_bad_model_specs_are_clear_errors(spec: ModelSpec, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        build_model(spec, (1, 8, 8), 10)


def _plain_gradient(model: torch.nn.Module, flat: torch.Tensor, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
    """The textbook way: parameters written into the module, ``zero_grad``, ``loss.backward()``."""
    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # type: ignore[union-attr]


@pytest.mark.parametrize("spec", [ModelSpec("mlp", {"hidden": [32, 16]}), ModelSpec("cnn", {"channels": 4, "hidden": 16})])
def test_gradient_model_equals_plain_backward_call_after_call(spec: ModelSpec) -> None:
    """Flat parameter and gradient views give the plain backward's gradient to the bit, every call:
    the gradient of one call neither leaks into the next nor changes when the next one runs."""
    torch.manual_seed(0)
    model = build_model(spec, (1, 8, 8), 10)
    computer = GradientModel(model)
    rng = np.random.default_rng(0)
    numel = sum(p.numel() for p in model.parameters())
    results = []
    for _ in range(3):
        flat = torch.from_numpy(rng.normal(0, 0.1, numel).astype(np.float32))
        x = rng.normal(size=(6, 1, 8, 8)).astype(np.float32)
        y = rng.integers(0, 10, 6)
        loss, correct, gradient = computer.gradient(flat, x, y)
        expected = _plain_gradient(model, flat, x, y)
        assert torch.equal(gradient, expected)
        with torch.no_grad():
            logits = model(torch.from_numpy(x))
        assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y))))
        assert correct == int((logits.argmax(1) == torch.from_numpy(y)).sum())
        results.append((gradient, expected.clone()))
    assert all(torch.equal(kept, expected) for kept, expected in results), "a later call changed an earlier result"


def test_gradient_model_refuses_a_parameter_vector_of_another_size() -> None:
    model = build_model(ModelSpec("mlp", {"hidden": 8}), (1, 8, 8), 10)
    computer = GradientModel(model)
    numel = sum(p.numel() for p in model.parameters())
    x, y = np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match=f"expected {numel} parameters"):
        computer.gradient(torch.zeros(numel + 1), x, y)


def test_gradient_model_reads_the_vector_given_and_copy_false_lends_its_buffer() -> None:
    """The parameters are views of the vector given (a float64 one is converted): it is never written;
    ``copy=False`` returns the instance's gradient buffer, equal to the copy, which the next call reuses."""
    spec = ModelSpec("mlp", {"hidden": [16]})
    torch.manual_seed(1)
    model = build_model(spec, (1, 8, 8), 10)
    computer = GradientModel(model)
    rng = np.random.default_rng(1)
    numel = sum(p.numel() for p in model.parameters())
    x, y = rng.normal(size=(4, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 4)
    first = torch.from_numpy(rng.normal(0, 0.1, numel).astype(np.float32))
    kept = first.clone()
    _, _, lent = computer.gradient(first, x, y, copy=False)
    assert torch.equal(first, kept)
    assert torch.equal(lent, _plain_gradient(model, first, x, y))
    copied = lent.clone()
    second = torch.from_numpy(rng.normal(0, 0.1, numel))  # float64: copied into the model's own vector
    _, _, again = computer.gradient(second, x, y, copy=False)
    assert again.data_ptr() == lent.data_ptr() and not torch.equal(again, copied)
    assert torch.equal(again, _plain_gradient(model, second.float(), x, y))
