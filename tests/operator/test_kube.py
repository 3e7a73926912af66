"""The operator's Kubernetes client (the official ``kubernetes`` package) against kmock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2ptrain.spec import parse_spec
from p2ptrain_operator.builders import build_children, build_export_job
from p2ptrain_operator.kube import ApiException, Connection, Kube, to_model
from p2ptrain_operator.settings import Settings
from tests.operator.harness import Cluster

OWNER = {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob",
         "metadata": {"name": "digits", "namespace": "default", "uid": "uid-digits"}}


def _children() -> list[dict[str, Any]]:
    spec = {"peers": 2, "model": {"name": "mlp"}, "dataset": {"name": "digits", "claimName": "data"},
            "output": {"claimName": "models", "path": "m.safetensors"}, "runPolicy": {"suspend": True}}
    job = parse_spec(spec, name="digits", namespace="default")
    settings = Settings(image="p2ptrain:test")
    return [*build_children(job, OWNER, settings, redis_password="pw", signing_key="key"),
            build_export_job(job, OWNER, settings)]


def _secret(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": "default"},
            "stringData": {"k": "v"}}


async def test_a_rotated_token_file_is_used_from_the_next_request(cluster: Cluster, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("token-one\n")  # as the kubelet projects it: a file the client must re-read
    kube = Kube(Connection(server=cluster.url, token_file=str(token)))
    try:
        assert await kube.create(_secret("a"))
        token.write_text("token-two\n")  # rotated in place, same length
        assert await kube.create(_secret("b"))
    finally:
        kube.close()
    sent = [r.headers.get("Authorization") for r in cluster.k8s if r.headers.get("User-Agent") == "p2ptrain-operator"]
    assert sent == ["Bearer token-one", "Bearer token-two"]


async def test_create_reports_an_existing_child_and_raises_the_api_error_otherwise(cluster: Cluster) -> None:
    kube = Kube(cluster.connection)
    try:
        assert await kube.create(_secret("a")) is True
        assert await kube.create(_secret("a")) is False  # 409: already there, creation is replayed
        assert await kube.read_job("default", "missing") is None  # 404: gone
        assert await kube.delete_training_job("default", "missing") is False
        cluster.k8s["post", "/api/v1/namespaces/default/configmaps"] << 403
        with pytest.raises(ApiException) as error:
            await kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}})
        assert error.value.status == 403
    finally:
        kube.close()


def test_every_child_survives_its_typed_model_unchanged() -> None:
    """create() sends the typed model of a built-in child: a field the model lacks would be dropped."""
    from kubernetes import client

    api = client.ApiClient()
    children = _children()
    assert {c["kind"] for c in children} >= {"Secret", "ConfigMap", "Service", "StatefulSet", "Job"}
    for child in children:
        assert api.sanitize_for_serialization(to_model(child)) == child, f"{child['kind']} {child['metadata']['name']}"


def test_peers_and_functions_do_not_export_operator_metrics() -> None:
    program = ("import p2ptrain.metrics, p2ptrain.peer\nfrom prometheus_client import REGISTRY\n"
               "print(sorted(f.name for f in REGISTRY.collect() if f.name.startswith('p2ptrain')))")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    names = result.stdout
    assert "p2ptrain_rounds" in names and "p2ptrain_operator" not in names
