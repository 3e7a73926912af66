"""The operator's desired objects: exactly right for a spec, and valid Kubernetes objects offline.

Built-in kinds are checked against the strict Kubernetes OpenAPI schemas of kubernetes-validate for
every minor version from charts/p2ptrain/Chart.yaml's kubeVersion floor to the newest it ships; the
Knative Service is checked by Knative's own admission rules in test_knative_admission.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from p2ptrain.config import RuntimeConfig
from p2ptrain.spec import load_manifest, parse_manifest
from p2ptrain_operator.builders import build_children, build_export_job, labels
from p2ptrain_operator.settings import Settings, parse_pull_secrets
from tests.unit import k8s_schema

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
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
    # jemalloc keeps freed pages (p2ptrain.memory): for Debian's system jemalloc and Redis's bundled one
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MALLOC_CONF"] == env["JE_MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"


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
        "autoscaling.knative.dev/window": "45s",
        "autoscaling.knative.dev/target-utilization-percentage": "100",
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


def test_persistent_redis_claims_go_with_the_job_but_survive_scale_down() -> None:
    spec = load_manifest(ROOT / "examples" / "cnn-pvc.yaml")
    objects = build_children(spec, OWNER, SETTINGS, redis_password="pw", signing_key="key")
    (redis,) = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"].endswith("-redis")]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    # Deletion (and TTL, which deletes the job) removes the claims; scaling to zero (cleanPodPolicy,
    # suspend) keeps them for the resumed job.
    assert redis["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Delete", "whenScaled": "Retain"}
    for version in k8s_schema.claimed_versions():
        k8s_schema.validate(redis, version)


def _all_builtin_objects() -> list[dict]:
    settings = Settings(image="registry.example/p2ptrain:1.2.3", image_pull_secrets=("regcred", "mirror"))
    objects: list[dict] = []
    for example in EXAMPLES:
        spec = load_manifest(example)
        objects += build_children(spec, OWNER, settings, redis_password="pw", signing_key="key")
        if spec.output is not None:
            objects.append(build_export_job(spec, OWNER, settings))
    extra = {"redis": {"persistence": "rdb", "storage": "1Gi"}, "output": {"claimName": "models"}}
    objects += build_children(_spec(**extra), OWNER, settings, redis_password="pw", signing_key="key")
    objects.append(build_export_job(_spec(**extra), OWNER, settings))
    return [o for o in objects if not o["apiVersion"].startswith("serving.knative.dev")]


def test_claimed_versions_follow_the_chart_floor_up_to_the_newest_schema() -> None:
    versions = k8s_schema.claimed_versions()
    floor = k8s_schema.chart_floor()
    newest = ".".join(kubernetes_validate.latest_version().split(".")[:2])
    assert versions[0] == f"{floor[0]}.{floor[1]}" and versions[-1] == newest
    assert len(versions) == len(set(versions)) and versions == sorted(versions, key=lambda v: tuple(map(int, v.split("."))))


@pytest.mark.parametrize("version", k8s_schema.claimed_versions())
def test_builtin_children_pass_strict_schema_validation(version: str) -> None:
    objects = _all_builtin_objects()
    assert {o["kind"] for o in objects} == {"Secret", "ConfigMap", "Service", "StatefulSet", "Job"}
    for obj in objects:
        k8s_schema.validate(obj, version)


def test_strict_validation_refuses_an_unknown_field() -> None:
    redis = _children()["StatefulSet/digits-redis"]
    redis["spec"]["template"]["spec"]["containers"][0]["securityContext"]["seccompProfiles"] = {}
    with pytest.raises(jsonschema.ValidationError, match="seccompProfiles"):
        k8s_schema.validate(redis, k8s_schema.claimed_versions()[0])


def test_pull_secrets_reach_every_child_pod() -> None:
    settings = Settings(image="registry.example/p2ptrain:1.2.3", image_pull_secrets=("regcred", "mirror"))
    spec = _spec(output={"claimName": "models"})
    objects = [*build_children(spec, OWNER, settings, redis_password="pw", signing_key="key"),
               build_export_job(spec, OWNER, settings)]
    pods = {f"{o['kind']}/{o['metadata']['name']}": o["spec"]["template"]["spec"] for o in objects if "template" in o.get("spec", {})}
    assert sorted(pods) == ["Job/digits-export", "Service/digits-gradient", "StatefulSet/digits-peer",
                            "StatefulSet/digits-redis"]
    for pod in pods.values():
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
    # None configured: no empty list on the pods.
    assert all("imagePullSecrets" not in o["spec"]["template"]["spec"] for o in _children().values() if "template" in o.get("spec", {}))


def test_settings_read_pull_secrets_from_the_environment() -> None:
    env = {"P2PTRAIN_OPERATOR_IMAGE_PULL_SECRETS": " regcred, mirror.creds ,,"}
    assert Settings.from_env(env).image_pull_secrets == ("regcred", "mirror.creds")
    assert Settings.from_env({}).image_pull_secrets == ()
    assert parse_pull_secrets("") == ()
    with pytest.raises(ValueError, match=r"P2PTRAIN_OPERATOR_IMAGE_PULL_SECRETS: 'Reg_Cred' is not a Secret name"):
        Settings.from_env({"P2PTRAIN_OPERATOR_IMAGE_PULL_SECRETS": "ok,Reg_Cred"})


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
    for version in k8s_schema.claimed_versions():
        k8s_schema.validate(job, version)
    with pytest.raises(ValueError, match="no spec.output"):
        build_export_job(_spec(), OWNER, SETTINGS)
