"""The desired Kubernetes objects for a job: pure functions of the spec, tested without a server.

``build_children`` returns every child of a ``P2PTrainingJob``: the Secret (Redis password,
event-signing key), the ConfigMap (the job's runtime config), one independent Redis per peer
(StatefulSet + headless Service), the peers (StatefulSet + headless Service) and the Knative Service of
the gradient function (none with ``function.mode: inline``: the peers compute their own gradients). Each carries the standard labels and an owner reference, so deleting the job
deletes them all.
"""

from __future__ import annotations

import base64
import math
import re
from decimal import Decimal
from typing import Any

from p2ptrain import memory
from p2ptrain.config import (
    CONFIG_ENV,
    PEER_PORT,
    REDIS_PASSWORD_ENV,
    REDIS_PORT,
    SIGNING_KEY_ENV,
    ChildNames,
    cluster_config,
)
from p2ptrain.spec import API_GROUP, API_VERSION, KIND, JobSpec, SpecError
from p2ptrain_operator.settings import Settings

Object = dict[str, Any]

CONFIG_DIR = "/etc/p2ptrain"
DATA_DIR = "/data"
RUN_AS = 10001
COMPONENTS = ("config", "redis", "peer", "gradient-function", "export", "aggregator", "aggregator-redis")


def labels(job: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "p2ptrain",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "p2ptrain-operator",
        "p2ptrain.dev/job": job,
    }


def selector(job: str, component: str) -> dict[str, str]:
    return {k: v for k, v in labels(job, component).items() if k != "app.kubernetes.io/managed-by"}


def owner_reference(owner: Object) -> Object:
    meta = owner["metadata"]
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def replicas(spec: JobSpec, running: int) -> int:
    """A StatefulSet's replicas: ``running``, or 0 for a suspended job, so no pod starts before the
    operator would scale it down (a job created suspended never runs a pod)."""
    return 0 if spec.run_policy.suspend else running


def _metadata(spec: JobSpec, name: str, component: str, owner: Object) -> Object:
    return {
        "name": name,
        "namespace": spec.namespace,
        "labels": labels(spec.name, component),
        "ownerReferences": [owner_reference(owner)],
    }


def _pod_security() -> Object:
    """Pod-level security for the StatefulSets and the export Job (never for the Knative Service)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        # Volume claims (Redis data, the export output) must be writable by RUN_AS.
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> Object:
    """Pod Security "restricted" on the container alone.

    Knative refuses a pod-level securityContext unless the cluster enables
    ``kubernetes.podspec-securitycontext``, but accepts every one of these container fields with its
    default flags; repeating them on the other pods too keeps one definition for all.
    """
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pull_secrets(settings: Settings) -> Object:
    """``imagePullSecrets`` for a pod spec (none when the chart sets none)."""
    if not settings.image_pull_secrets:
        return {}
    return {"imagePullSecrets": [{"name": name} for name in settings.image_pull_secrets]}


def _secret_env(names: ChildNames) -> list[Object]:
    return [
        {"name": env, "valueFrom": {"secretKeyRef": {"name": names.secret, "key": key}}}
        for env, key in ((REDIS_PASSWORD_ENV, "redis-password"), (SIGNING_KEY_ENV, "signing-key"))
    ]


def _data_volume(spec: JobSpec) -> tuple[list[Object], list[Object]]:
    """(volumes, mounts) for the data set's PersistentVolumeClaim, when the spec names one."""
    if not spec.dataset.claim_name:
        return [], []
    return (
        [{"name": "data", "persistentVolumeClaim": {"claimName": spec.dataset.claim_name, "readOnly": True}}],
        [{"name": "data", "mountPath": DATA_DIR, "readOnly": True}],
    )


# --- Secret and ConfigMap ------------------------------------------------------------------------------

def build_secret(spec: JobSpec, owner: Object, *, redis_password: str, signing_key: str) -> Object:
    names = ChildNames(spec.name)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(spec, names.secret, "config", owner),
        "type": "Opaque",
        "data": {
            "redis-password": base64.b64encode(redis_password.encode()).decode(),
            "signing-key": base64.b64encode(signing_key.encode()).decode(),
        },
    }


def build_configmap(spec: JobSpec, owner: Object, settings: Settings) -> Object:
    names = ChildNames(spec.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(spec, names.configmap, "config", owner),
        "data": {"job.json": cluster_config(spec, settings.cluster_domain).to_json()},
    }


# --- Redis -----------------------------------------------------------------------------------------------

def redis_command(spec: JobSpec) -> list[str]:
    """redis-server with AUTH from the Secret (written to a private file, never on the command line)."""
    persistence = {"none": '--save "" --appendonly no', "rdb": '--save "60 1" --appendonly no',
                   "aof": '--save "" --appendonly yes'}[spec.redis.persistence]
    module = "" if spec.redis.image else ' --loadmodule "$P2PTRAIN_REDIS_MODULE"'
    script = (
        "umask 077 && printf 'requirepass %s\\n' \"$P2PTRAIN_REDIS_PASSWORD\" > /tmp/redis.conf && "
        f"exec redis-server /tmp/redis.conf --port {REDIS_PORT} --dir /data/redis --protected-mode no "
        f"{persistence}{module}"
    )
    return ["sh", "-c", script]


def build_redis_statefulset(spec: JobSpec, owner: Object, settings: Settings) -> Object:
    names = ChildNames(spec.name)
    persistent = spec.redis.persistence != "none" and spec.redis.storage
    volumes: list[Object] = [{"name": "tmp", "emptyDir": {}}]
    if not persistent:
        volumes.append({"name": "redis-data", "emptyDir": {}})
    statefulset: Object = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(spec, names.redis, "redis", owner),
        "spec": {
            "serviceName": names.redis,
            "replicas": replicas(spec, spec.peers),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(spec.name, "redis")},
            "template": {
                "metadata": {"labels": labels(spec.name, "redis")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    **_pull_secrets(settings),
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "redis",
                            "image": spec.redis.image or settings.image,
                            "imagePullPolicy": settings.image_pull_policy,
                            "command": redis_command(spec),
                            "env": [*_secret_env(names)[:1], *({"name": k, "value": v} for k, v in
                                                               memory.redis_allocator_env({}).items())],
                            "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
                            "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
                            "livenessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 10,
                                              "failureThreshold": 6},
                            "securityContext": _container_security(),
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "redis-data", "mountPath": "/data/redis"},
                            ],
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }
    if persistent:
        # Deleting the job (or its TTL) deletes the StatefulSet and so its claims; scaling Redis
        # down (cleanPodPolicy, suspend) keeps them, so a resumed job finds its data again.
        statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] = {"whenDeleted": "Delete", "whenScaled": "Retain"}
        statefulset["spec"]["volumeClaimTemplates"] = [
            {
                "metadata": {"name": "redis-data", "labels": labels(spec.name, "redis")},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": spec.redis.storage}}},
            }
        ]
    return statefulset


def build_headless_service(spec: JobSpec, owner: Object, *, name: str, component: str, ports: list[Object]) -> Object:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, name, component, owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector(spec.name, component),
            "ports": ports,
        },
    }


# --- peers -------------------------------------------------------------------------------------------------

# function.mode=inline: the peers compute what the functions would have, so they get the functions'
# CPU and memory. One peer's round keeps ceil(functionsPerPeer / containerConcurrency) instances busy
# (one when containerConcurrency is 0, unlimited), at most maxScale: the peer container gets
# function.resources (requests and limits alike) times that many. Without function.resources the
# functions had no requests or limits, and neither do the peers.
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]*)$")


def inline_instances_per_peer(spec: JobSpec) -> int:
    """The function instances one peer's round keeps busy: what an inline peer's resources stand in for."""
    fn = spec.function
    busy = math.ceil(spec.functions_per_peer / fn.container_concurrency) if fn.container_concurrency else 1
    return min(busy, fn.max_scale)


def scale_quantity(value: object, factor: int, where: str) -> str:
    """A Kubernetes quantity (``500m``, ``1Gi``, ``2``) times ``factor``, in the same unit."""
    match = _QUANTITY.match(str(value))
    if match is None:
        raise SpecError(f"{where}: expected a Kubernetes quantity such as 500m, 2 or 512Mi, got {value!r}")
    number = Decimal(match[1]) * factor
    return f"{number.normalize():f}{match[2]}"


def inline_peer_resources(spec: JobSpec) -> Object | None:
    """The peer container's resources for ``function.mode: inline`` (None when serverless or unset)."""
    if not spec.function.inline or not spec.function.resources:
        return None
    factor = inline_instances_per_peer(spec)
    scaled: Object = {}
    for kind, amounts in spec.function.resources.items():
        if not isinstance(amounts, dict):
            raise SpecError(f"spec.function.resources.{kind}: expected a mapping of resource names to quantities")
        scaled[kind] = {name: scale_quantity(amount, factor, f"spec.function.resources.{kind}.{name}")
                        for name, amount in amounts.items()}
    return scaled


def build_peer_statefulset(spec: JobSpec, owner: Object, settings: Settings) -> Object:
    names = ChildNames(spec.name)
    data_volumes, data_mounts = _data_volume(spec)
    resources = inline_peer_resources(spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(spec, names.peer, "peer", owner),
        "spec": {
            "serviceName": names.peers_service,
            "replicas": replicas(spec, spec.peers),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(spec.name, "peer")},
            "template": {
                "metadata": {
                    "labels": labels(spec.name, "peer"),
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.metrics.port)},
                },
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    **_pull_secrets(settings),
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "peer",
                            "image": spec.image or settings.image,
                            "imagePullPolicy": settings.image_pull_policy,
                            "args": ["peer", "--config", f"{CONFIG_DIR}/job.json",
                                     "--metrics-port", str(spec.metrics.port)],
                            "env": [*_secret_env(names), {"name": "P2PTRAIN_LOG_LEVEL", "value": "INFO"}],
                            "ports": [
                                {"name": "http", "containerPort": PEER_PORT, "protocol": "TCP"},
                                {"name": "metrics", "containerPort": spec.metrics.port, "protocol": "TCP"},
                            ],
                            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                                              "failureThreshold": 6, "initialDelaySeconds": 10},
                            "securityContext": _container_security(),
                            "volumeMounts": [
                                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                {"name": "tmp", "mountPath": "/tmp"},
                                *data_mounts,
                            ],
                            **({"resources": resources} if resources else {}),
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": names.configmap}},
                        {"name": "tmp", "emptyDir": {}},
                        *data_volumes,
                    ],
                },
            },
        },
    }


# --- the gradient function ---------------------------------------------------------------------------------

# How each spec.function field reaches Knative (annotation keys: pkg/apis/autoscaling/register.go).
#
#   spec.function          Knative Service (spec.template)                        meaning
#   minScale             metadata.annotations autoscaling.knative.dev/min-scale  instances kept even when idle
#   maxScale             metadata.annotations autoscaling.knative.dev/max-scale  upper bound on instances
#   containerConcurrency spec.containerConcurrency (0 = unlimited)              hard limit of requests per instance
#                        + autoscaling.knative.dev/target-utilization-percentage  scale out only when instances
#                          "100" (when containerConcurrency > 0)                  are full, as the local runner does
#   timeoutSeconds       spec.timeoutSeconds (Knative's default cap: 600)        request timeout
#   idleSeconds          metadata.annotations autoscaling.knative.dev/window     idle time before scale-down:
#                          (whole seconds, clamped to Knative's 6s..1h)           the stable window is how long
#                                                                                 traffic must be gone before the
#                                                                                 average reaches zero
#   image, resources     the container's image and resources
#   retries              (none: the peers retry)
#
# Not set, on purpose:
# - scale-to-zero-pod-retention-period: it keeps the last pod *after* the window has elapsed, so it
#   adds to the idle time instead of setting it.
# - target: Knative already derives the target from containerConcurrency (ResolveMetricTarget).
# - initial-scale: "0" needs the cluster flag allow-zero-initial-scale. With the default
#   (initial-scale 1) a minScale 0 function starts one instance when the job is created, which must
#   become ready for the revision to be Ready (proving image and config), then idles away after
#   idleSeconds; minScale > 0 starts at least minScale instances.
KNATIVE_WINDOW_MIN_SECONDS = 6  # autoscaling.WindowMin
KNATIVE_WINDOW_MAX_SECONDS = 3600  # autoscaling.WindowMax


def knative_window_seconds(idle_seconds: float) -> int:
    """``function.idleSeconds`` as Knative's stable window: whole seconds within 6s..1h."""
    return min(KNATIVE_WINDOW_MAX_SECONDS, max(KNATIVE_WINDOW_MIN_SECONDS, math.ceil(idle_seconds)))


def knative_warnings(spec: JobSpec) -> list[str]:
    """What the cluster will do differently from the spec (for the job's events); empty when nothing."""
    idle = spec.function.idle_seconds
    window = knative_window_seconds(idle)
    if window != idle and not spec.function.inline:  # an inline job has no Knative Service
        return [f"function.idleSeconds={idle:g} is outside what Knative's autoscaling window accepts "
                f"(whole seconds from {KNATIVE_WINDOW_MIN_SECONDS} to {KNATIVE_WINDOW_MAX_SECONDS}): "
                f"idle functions scale down after {window}s"]
    return []


def knative_annotations(spec: JobSpec) -> dict[str, str]:
    fn = spec.function
    annotations = {
        "autoscaling.knative.dev/min-scale": str(fn.min_scale),
        "autoscaling.knative.dev/max-scale": str(fn.max_scale),
        "autoscaling.knative.dev/window": f"{knative_window_seconds(fn.idle_seconds)}s",
    }
    if fn.container_concurrency:
        annotations["autoscaling.knative.dev/target-utilization-percentage"] = "100"
    return annotations


PVC_FLAG = "kubernetes.podspec-persistent-volume-claim"


def knative_flags_needed(spec: JobSpec) -> list[str]:
    """The Knative feature flags (config-features) that are off by default and this job's Service needs.

    Only a data set on a PersistentVolumeClaim needs one: the claim is mounted read-only, so
    ``kubernetes.podspec-persistent-volume-write`` is not needed. Everything else the Service uses
    passes Knative's admission with its default flags.
    """
    return [PVC_FLAG] if spec.dataset.claim_name and not spec.function.inline else []


def build_knative_service(spec: JobSpec, owner: Object, settings: Settings) -> Object:
    names = ChildNames(spec.name)
    fn = spec.function
    data_volumes, data_mounts = _data_volume(spec)
    container: Object = {
        "name": "gradient",
        "image": fn.image or spec.image or settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["function"],
        "env": [
            {"name": CONFIG_ENV, "value": f"{CONFIG_DIR}/job.json"},
            {"name": "LISTEN_ADDRESS", "value": f"0.0.0.0:{PEER_PORT}"},
            {"name": "P2PTRAIN_TORCH_THREADS", "value": "1"},
            *_secret_env(names),
        ],
        "ports": [{"containerPort": PEER_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health/readiness"}},
        "livenessProbe": {"httpGet": {"path": "/health/liveness"}},
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *data_mounts,
        ],
    }
    if fn.resources:
        container["resources"] = dict(fn.resources)
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {
            **_metadata(spec, names.gradient, "gradient-function", owner),
            # Only the peers call the function: keep it off the cluster's ingress.
            "labels": {**labels(spec.name, "gradient-function"), "networking.knative.dev/visibility": "cluster-local"},
        },
        "spec": {
            "template": {
                "metadata": {
                    "labels": labels(spec.name, "gradient-function"),
                    "annotations": knative_annotations(spec),
                },
                "spec": {
                    "containerConcurrency": fn.container_concurrency,
                    "timeoutSeconds": fn.timeout_seconds,
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    **_pull_secrets(settings),
                    # No pod-level securityContext: Knative refuses it unless the cluster enables
                    # kubernetes.podspec-securitycontext; the container carries all of it.
                    "containers": [container],
                    "volumes": [
                        {"name": "config", "configMap": {"name": names.configmap}},
                        {"name": "tmp", "emptyDir": {}},
                        *data_volumes,
                    ],
                },
            }
        },
    }


# --- the model export Job -----------------------------------------------------------------------------------

OUTPUT_DIR = "/output"


def build_export_job(spec: JobSpec, owner: Object, settings: Settings) -> Object:
    """The Job that writes peer 0's trained model to ``spec.output`` (created when the job succeeded).

    Only this pod mounts the output claim (read-write), so a ReadWriteOnce claim works wherever the
    peers ran; it reads the model from Redis 0, which the operator keeps up until the Job is done.
    """
    if spec.output is None:
        raise ValueError(f"job {spec.name} has no spec.output")
    names = ChildNames(spec.name)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(spec, names.export, "export", owner),
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": 900,
            "template": {
                "metadata": {"labels": labels(spec.name, "export")},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    **_pull_secrets(settings),
                    "securityContext": _pod_security(),
                    "containers": [
                        {
                            "name": "export",
                            "image": spec.image or settings.image,
                            "imagePullPolicy": settings.image_pull_policy,
                            "args": ["export", "--config", f"{CONFIG_DIR}/job.json", "--peer", "0",
                                     "--output", f"{OUTPUT_DIR}/{spec.output.path}"],
                            "env": _secret_env(names),
                            "securityContext": _container_security(),
                            "volumeMounts": [
                                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                                {"name": "output", "mountPath": OUTPUT_DIR},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "config", "configMap": {"name": names.configmap}},
                        {"name": "output", "persistentVolumeClaim": {"claimName": spec.output.claim_name}},
                    ],
                },
            },
        },
    }


# --- all of them ------------------------------------------------------------------------------------------

def build_children(spec: JobSpec, owner: Object, settings: Settings, *, redis_password: str, signing_key: str) -> list[Object]:
    """Every child of a job, in the order to create them: configuration before its users, and the
    gradient function before anything that starts pods, so a cluster whose Knative refuses it (a
    feature flag it lacks) gets no pods; with ``function.mode: inline`` no Knative Service (the peers
    compute their own gradients)."""
    names = ChildNames(spec.name)
    function = [] if spec.function.inline else [build_knative_service(spec, owner, settings)]
    return [
        build_secret(spec, owner, redis_password=redis_password, signing_key=signing_key),
        build_configmap(spec, owner, settings),
        *function,
        build_headless_service(spec, owner, name=names.redis, component="redis",
                               ports=[{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}]),
        build_redis_statefulset(spec, owner, settings),
        build_headless_service(spec, owner, name=names.peers_service, component="peer",
                               ports=[{"name": "http", "port": PEER_PORT, "targetPort": "http"},
                                      {"name": "metrics", "port": spec.metrics.port, "targetPort": "metrics"}]),
        build_peer_statefulset(spec, owner, settings),
        *(build_aggregator_children(spec, owner, settings) if spec.topology == "ps" else []),
    ]


# --- topology ps: the aggregator ---------------------------------------------------------------------------

def _as_component(obj: Object, spec: JobSpec, *, name: str, component: str) -> Object:
    """A peer's or Redis' StatefulSet made into the aggregator's (or its Redis'): one replica, its own
    name, labels and selector, the same pod otherwise (image, probes, security, secrets, data)."""
    obj["metadata"]["name"] = name
    obj["metadata"]["labels"] = labels(spec.name, component)
    body = obj["spec"]
    body.update(serviceName=name, replicas=replicas(spec, 1), selector={"matchLabels": selector(spec.name, component)})
    body["template"]["metadata"]["labels"] = labels(spec.name, component)
    for claim in body.get("volumeClaimTemplates", []):
        claim["metadata"]["labels"] = labels(spec.name, component)
    return obj


def build_aggregator_children(spec: JobSpec, owner: Object, settings: Settings) -> list[Object]:
    """The aggregator (StatefulSet of one pod, ``p2ptrain aggregator``) and its own Redis, each with a
    headless Service: the stable names ``cluster_config`` gives the peers."""
    names = ChildNames(spec.name)
    redis = _as_component(build_redis_statefulset(spec, owner, settings), spec, name=names.aggregator_redis,
                          component="aggregator-redis")
    aggregator = _as_component(build_peer_statefulset(spec, owner, settings), spec, name=names.aggregator,
                               component="aggregator")
    container = aggregator["spec"]["template"]["spec"]["containers"][0]
    container["name"] = "aggregator"
    container["args"] = ["aggregator", "--config", f"{CONFIG_DIR}/job.json", "--metrics-port", str(spec.metrics.port)]
    return [
        build_headless_service(spec, owner, name=names.aggregator_redis, component="aggregator-redis",
                               ports=[{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}]),
        redis,
        build_headless_service(spec, owner, name=names.aggregator, component="aggregator",
                               ports=[{"name": "http", "port": PEER_PORT, "targetPort": "http"},
                                      {"name": "metrics", "port": spec.metrics.port, "targetPort": "metrics"}]),
        aggregator,
    ]
