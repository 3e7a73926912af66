"""``function.mode: inline`` on a cluster: no Knative Service, and the peers get the CPU and memory the
gradient functions would have had (pure builders, no server)."""

from __future__ import annotations

import pytest

from p2ptrain.spec import SpecError, parse_manifest
from p2ptrain_operator.builders import (
    build_children,
    inline_instances_per_peer,
    knative_flags_needed,
    knative_warnings,
    scale_quantity,
)
from p2ptrain_operator.settings import Settings
from tests.unit import k8s_schema

OWNER = {"metadata": {"name": "digits", "namespace": "ml", "uid": "0b7e0d4e-1111-4a4a-9c9c-123456789abc"}}
SETTINGS = Settings(image="registry.example/p2ptrain:1.2.3")
RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": 1, "memory": "1Gi"}}


def _spec(mode: str, function: dict | None = None, **extra: object):  # type: ignore[no-untyped-def]
    defaults = {"mode": mode, "maxScale": 8, "containerConcurrency": 2, "idleSeconds": 2.5, "resources": RESOURCES}
    return parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": "digits", "namespace": "ml"},
        "spec": {"peers": 3, "functionsPerPeer": 4, "model": {"name": "mlp"}, "dataset": {"name": "digits"},
                 "function": {**defaults, **(function or {})}, **extra},
    })


def _children(mode: str, function: dict | None = None, **extra: object) -> dict[str, dict]:
    objects = build_children(_spec(mode, function, **extra), OWNER, SETTINGS, redis_password="pw", signing_key="key")
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def _peer_container(children: dict[str, dict]) -> dict:
    container: dict = children["StatefulSet/digits-peer"]["spec"]["template"]["spec"]["containers"][0]
    return container


def test_the_default_mode_is_serverless_with_a_knative_service() -> None:
    spec = parse_manifest({"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "d"},
                           "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}}})
    assert spec.function.mode == "serverless" and not spec.function.inline
    children = _children("serverless")
    assert "Service/digits-gradient" in children
    assert "resources" not in _peer_container(children)  # serverless peers compute nothing heavy


def test_an_inline_job_has_every_child_but_the_knative_service() -> None:
    children = _children("inline")
    assert sorted(children) == [
        "ConfigMap/digits-config", "Secret/digits-secrets", "Service/digits-peers", "Service/digits-redis",
        "StatefulSet/digits-peer", "StatefulSet/digits-redis",
    ]
    assert all(not o["apiVersion"].startswith("serving.knative.dev") for o in children.values())


def test_inline_peers_get_the_resources_of_the_function_instances_one_peer_keeps_busy() -> None:
    # 4 micro-batches per peer, 2 per instance: the functions ran 2 instances for each peer's round.
    resources = _peer_container(_children("inline"))["resources"]
    assert resources == {"requests": {"cpu": "1000m", "memory": "1024Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
    one = _peer_container(_children("inline", functionsPerPeer=2))["resources"]
    assert one == RESOURCES | {"limits": {"cpu": "1", "memory": "1Gi"}}
    for version in k8s_schema.claimed_versions():
        k8s_schema.validate(_children("inline")["StatefulSet/digits-peer"], version)


@pytest.mark.parametrize(
    ("functions_per_peer", "concurrency", "max_scale", "instances"),
    [(4, 2, 8, 2), (5, 2, 8, 3), (4, 0, 8, 1), (8, 1, 3, 3), (1, 4, 8, 1)],
)
def test_instances_per_peer_round_up_and_stop_at_max_scale(
    functions_per_peer: int, concurrency: int, max_scale: int, instances: int
) -> None:
    spec = _spec("inline", functionsPerPeer=functions_per_peer,
                 function={"containerConcurrency": concurrency, "maxScale": max_scale})
    assert inline_instances_per_peer(spec) == instances


def test_quantities_scale_in_their_own_unit() -> None:
    assert [scale_quantity(q, 3, "x") for q in ("500m", "0.5", "2", "512Mi", ".25", "1.5Gi")] == [
        "1500m", "1.5", "6", "1536Mi", "0.75", "4.5Gi"]


def test_a_resource_that_is_not_a_quantity_is_refused_naming_the_field() -> None:
    with pytest.raises(SpecError, match=r"spec\.function\.resources\.limits\.cpu: expected a Kubernetes quantity"):
        _children("inline", function={"resources": {"limits": {"cpu": "two cores"}}})


def test_inline_jobs_need_no_knative_flag_and_get_no_knative_warning() -> None:
    claim = {"dataset": {"name": "path", "path": "/data/x.npz", "claimName": "data"}}
    assert knative_flags_needed(_spec("serverless", **claim)) and knative_warnings(_spec("serverless"))
    assert knative_flags_needed(_spec("inline", **claim)) == [] and knative_warnings(_spec("inline")) == []
