"""The operator's desired objects: exactly right for a spec, and valid Kubernetes objects offline.

Built-in kinds are checked with kubernetes-validate in strict mode for Kubernetes 1.30 and 1.33; the
Knative Service (a CRD kind it does not know) is checked field by field.
"""

from __future__ import annotations

import base64
import json

import kubernetes_validate
import pytest

from p2ptrain.config import RuntimeConfig
from p2ptrain.spec import parse_manifest
from p2ptrain_operator.builders import build_children, build_export_job, labels
from p2ptrain_operator.settings import Settings

OWNER = {"metadata": {"name": "digits", "namespace": "ml", "uid": "0b7e0d4e-1111-4a4a-9c9c-123456789abc"}}
SETTINGS = Settings(image="registry.example/p2ptrain:1.2.3")


def _spec(**extra: object):
    return parse_manifest({
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": "digits", "namespace": "ml"},
        "spec": {"peers": 3, "model": {"name": "mlp"}, "dataset": {"name": "digits"},
                 "function": {"maxScale": 6, "containerConcurrency": 2, "timeoutSeconds": 90, "idleSeconds": 45},
                 **extra},
    })


def _children(**extra: object) -> dict[str, dict]:
    objects = build_children(_spec(**extra), OWNER, SETTINGS, redis_password="pw", signing_key="key")
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in objects}


def test_every_child_is_named_labelled_and_owned() -> None:
    children = _children()
    assert sorted(children) == [
        "ConfigMap/digits-config", "Secret/digits-secrets", "Service/digits-gradient", "Service/digits-peers",
        "Service/digits-redis", "StatefulSet/digits-peer", "StatefulSet/digits-redis",
    ]
    for obj in children.values():
        meta = obj["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [{
            "apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "name": "digits",
            "uid": OWNER["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
        }]
        assert meta["labels"]["app.kubernetes.io/instance"] == "digits"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "p2ptrain-operator"


def test_secret_and_config_carry_the_runtime_config() -> None:
    children = _children()
    secret = children["Secret/digits-secrets"]["data"]
    assert base64.b64decode(secret["redis-password"]) == b"pw" and base64.b64decode(secret["signing-key"]) == b"key"
    config = RuntimeConfig.from_json(children["ConfigMap/digits-config"]["data"]["job.json"])
    assert config.peer_urls[2] == "http://digits-peer-2.digits-peers.ml.svc.cluster.local:8080"
    assert str(config.redis[0]) == "digits-redis-0.digits-redis.ml.svc.cluster.local:6379"
    assert config.function_url == "http://digits-gradient.ml.svc.cluster.local"
    assert "pw" not in json.dumps(children["ConfigMap/digits-config"])


def test_one_independent_redis_per_peer_with_auth_from_the_secret() -> None:
    redis = _children()["StatefulSet/digits-redis"]
    assert redis["spec"]["replicas"] == 3 and redis["spec"]["serviceName"] == "digits-redis"
    container = redis["spec"]["template"]["spec"]["containers"][0]
    script = container["command"][-1]
    assert "requirepass" in script and "$P2PTRAIN_REDIS_PASSWORD" in script and "pw" not in script
    assert '--loadmodule "$P2PTRAIN_REDIS_MODULE"' in script and "replicaof" not in script
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "digits-secrets", "key": "redis-password"}
    assert container["image"] == "registry.example/p2ptrain:1.2.3"


def test_persistent_redis_gets_volume_claims() -> None:
    redis = _children(redis={"persistence": "aof", "storage": "2Gi"})["StatefulSet/digits-redis"]
    claim = redis["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "--appendonly yes" in redis["spec"]["template"]["spec"]["containers"][0]["command"][-1]


def test_peers_pair_with_their_redis_and_expose_events_and_metrics() -> None:
    children = _children(metrics={"port": 9102})
    peers = children["StatefulSet/digits-peer"]
    pod = peers["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert peers["spec"]["serviceName"] == "digits-peers" and peers["spec"]["replicas"] == 3
    assert container["args"] == ["peer", "--config", "/etc/p2ptrain/job.json", "--metrics-port", "9102"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8080, "metrics": 9102}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert children["Service/digits-peers"]["spec"]["clusterIP"] == "None"
    assert children["Service/digits-peers"]["spec"]["selector"] == {
        k: v for k, v in labels("digits", "peer").items() if k != "app.kubernetes.io/managed-by"
    }


def test_knative_service_scales_to_zero_with_the_spec_settings() -> None:
    service = _children()["Service/digits-gradient"]
    assert service["apiVersion"] == "serving.knative.dev/v1"
    template = service["spec"]["template"]
    assert template["metadata"]["annotations"] == {
        "autoscaling.knative.dev/min-scale": "0",
        "autoscaling.knative.dev/max-scale": "6",
        "autoscaling.knative.dev/target": "2",
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "45s",
    }
    assert template["spec"]["containerConcurrency"] == 2 and template["spec"]["timeoutSeconds"] == 90
    container = template["spec"]["containers"][0]
    assert container["args"] == ["function"] and container["ports"] == [{"containerPort": 8080}]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/readiness"
    assert service["metadata"]["labels"]["networking.knative.dev/visibility"] == "cluster-local"


def test_dataset_claim_is_mounted_read_only_in_peers_and_functions() -> None:
    children = _children(dataset={"name": "path", "path": "/data/cifar", "claimName": "cifar-pvc"})
    for key in ("StatefulSet/digits-peer", "Service/digits-gradient"):
        pod = children[key]["spec"]["template"]["spec"]
        assert {"name": "data", "persistentVolumeClaim": {"claimName": "cifar-pvc", "readOnly": True}} in pod["volumes"]
        assert {"name": "data", "mountPath": "/data", "readOnly": True} in pod["containers"][0]["volumeMounts"]


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0"])
@pytest.mark.parametrize("extra", [{}, {"redis": {"persistence": "rdb", "storage": "1Gi"}}], ids=["default", "persistent"])
def test_builtin_children_pass_strict_schema_validation(version: str, extra: dict) -> None:
    for obj in _children(**extra).values():
        if obj["apiVersion"].startswith("serving.knative.dev"):
            continue
        kubernetes_validate.validate(obj, version, strict=True)


def test_export_job_writes_peer_0s_model_to_the_output_claim() -> None:
    spec = _spec(output={"claimName": "models", "path": "digits/v1.safetensors"})
    job = build_export_job(spec, OWNER, SETTINGS)
    assert (job["kind"], job["metadata"]["name"], job["metadata"]["namespace"]) == ("Job", "digits-export", "ml")
    assert job["metadata"]["labels"] == labels("digits", "export")
    assert job["metadata"]["ownerReferences"][0]["uid"] == OWNER["metadata"]["uid"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == SETTINGS.image
    assert container["args"] == ["export", "--config", "/etc/p2ptrain/job.json", "--peer", "0",
                                 "--output", "/output/digits/v1.safetensors"]
    assert {"name": "output", "persistentVolumeClaim": {"claimName": "models"}} in pod["volumes"]
    assert {"name": "output", "mountPath": "/output"} in container["volumeMounts"]
    assert {e["name"] for e in container["env"]} == {"P2PTRAIN_REDIS_PASSWORD", "P2PTRAIN_SIGNING_KEY"}
    assert pod["restartPolicy"] == "OnFailure" and container["securityContext"]["readOnlyRootFilesystem"] is True
    for version in ("1.30.0", "1.33.0"):
        kubernetes_validate.validate(job, version, strict=True)
    with pytest.raises(ValueError, match="no spec.output"):
        build_export_job(_spec(), OWNER, SETTINGS)
