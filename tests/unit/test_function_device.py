"""``function.device`` (auto | cpu | cuda): the CRD rule, the device the function picks, the GPU limit in
the Knative Service, readiness without a GPU, and ``bench/gpu_check.py`` on the CPU path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from p2ptrain.config import ConfigError, RedisAddress, RuntimeConfig, Secrets
from p2ptrain.device import pick_device
from p2ptrain.gradient import GradientFunction
from p2ptrain.spec import SpecError, parse_manifest
from p2ptrain_operator.builders import build_children
from p2ptrain_operator.settings import Settings
from tests.unit.knative_admission import admit_service

ROOT = Path(__file__).resolve().parents[2]
OWNER = {"metadata": {"name": "digits", "namespace": "ml", "uid": "0b7e0d4e-1111-4a4a-9c9c-123456789abc"}}
GPU = {"limits": {"nvidia.com/gpu": 1}}


def _spec(**function: Any):
    return parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "digits"},
        "spec": {"peers": 2, "rounds": 1, "model": {"name": "mlp"}, "dataset": {"name": "digits"}, "function": function},
    })


def test_device_defaults_to_auto() -> None:
    assert _spec().function.device == "auto"


@pytest.mark.parametrize("resources", [None, {"limits": {"cpu": "2"}}, {"requests": {"nvidia.com/gpu": 1}}])
def test_cuda_without_a_gpu_limit_is_refused_naming_the_limit(resources: dict[str, Any] | None) -> None:
    function: dict[str, Any] = {"device": "cuda", **({"resources": resources} if resources else {})}
    with pytest.raises(SpecError, match=r'function.device=cuda needs .*function.resources.limits\["nvidia.com/gpu"\]'):
        _spec(**function)


def test_cuda_with_a_gpu_limit_and_auto_or_cpu_without_one_are_accepted() -> None:
    assert _spec(device="cuda", resources=GPU).function.device == "cuda"
    assert _spec(device="cpu").function.device == "cpu"
    with pytest.raises(SpecError, match="function.device"):
        _spec(device="gpu")


def test_the_gpu_limit_reaches_the_knative_containers_limits_and_knative_admits_it() -> None:
    objects = build_children(_spec(device="cuda", resources={"limits": {"nvidia.com/gpu": 1, "memory": "4Gi"}}),
                             OWNER, Settings(image="registry.example/p2ptrain:1.2.3"), redis_password="pw", signing_key="k")
    service = next(o for o in objects if o["kind"] == "Service" and o["apiVersion"].startswith("serving.knative.dev"))
    container = service["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "4Gi"}
    assert admit_service(service) == []


@pytest.mark.parametrize(
    "requested,available,expected",
    [("auto", False, "cpu"), ("auto", True, "cuda"), ("cpu", True, "cpu"), ("cpu", False, "cpu"), ("cuda", True, "cuda")],
)
def test_the_function_computes_on_cuda_only_when_asked_or_allowed_and_present(
    requested: str, available: bool, expected: str
) -> None:
    assert pick_device(requested, cuda_available=available).type == expected


def test_cuda_without_a_device_is_an_error_saying_what_is_missing() -> None:
    with pytest.raises(ConfigError, match="function.device=cuda but torch sees no CUDA device.*nvidia.com/gpu"):
        pick_device("cuda", cuda_available=False)


def test_a_cuda_function_in_a_pod_without_a_gpu_never_becomes_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = _spec(device="cuda", resources=GPU)
    config = RuntimeConfig(spec, ("http://a", "http://b"), (RedisAddress("127.0.0.1", 1),) * 2, "http://x")
    function = GradientFunction(config, Secrets("pw", b"key"))
    with pytest.raises(ConfigError, match="no CUDA device"):
        function.start({})
    ready, reason = function.ready()
    assert not ready and "function.device=cuda but torch sees no CUDA device" in reason


def test_gpu_check_runs_the_cpu_path_and_finds_the_gradients_equal() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-only", "--repeats", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CPU path only" in result.stdout and "gradients agree" in result.stdout
    rows = [line.split("|") for line in result.stdout.splitlines() if line.startswith(("| mlp", "| cnn"))]
    assert [r[1].strip() for r in rows] == ["mlp", "cnn"]
    assert all(r[5].strip() == "True" and float(r[4]) <= 1e-5 for r in rows)
