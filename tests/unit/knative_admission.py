"""Knative Serving's admission of a ``serving.knative.dev/v1`` Service, ported from its Go source: a
fast pre-check for the unit tier, which runs without Go or a control plane.

The judge is Knative's own webhook: the cluster tier (tests/cluster/test_knative_admission.py) runs
it as an admission webhook of a real kube-apiserver and sends it the operator's Service for every
example, and checks that this pre-check refuses what the webhook refuses. Where the two disagree,
the webhook is right and this module is to be mended.

This module re-implements, rule by rule, what the webhook does when a Service is created: the
defaulting that runs first (only the parts validation depends on) and then validation with the
cluster's feature flags (``config-features``), defaults (``config-defaults``) and autoscaler settings
(``config-autoscaler``) at their default values.
Each rule names the upstream file it comes from (github.com/knative/serving, read at tag
knative-v1.16.0 and at main); where the two differ the rule says so and ``version`` selects.

A rule that a feature flag can lift reports that flag in ``Problem.flag``, so a test can tell
"refused with default flags" from "needs this flag".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Object = Mapping[str, Any]
VERSIONS = ("knative-v1.16.0", "main")

# pkg/apis/config/features.go defaultFeaturesConfig(): the flags whose default is Enabled. Every other
# flag consulted below defaults to Disabled (same list at knative-v1.16.0 and main).
DEFAULT_ENABLED = frozenset({"multi-container", "kubernetes.podspec-volumes-emptydir"})
# Flags that exist only after knative-v1.16.0 (pkg/apis/config/features.go at main).
MAIN_ONLY_FLAGS = frozenset({
    "kubernetes.podspec-volumes-hostpath", "kubernetes.podspec-volumes-csi", "kubernetes.podspec-volumes-ephemeral",
    "kubernetes.podspec-volumes-image", "kubernetes.podspec-volumes-mount-propagation",
})

# pkg/apis/config/defaults.go: DefaultMaxRevisionTimeoutSeconds, DefaultMaxRevisionContainerConcurrency.
MAX_REVISION_TIMEOUT_SECONDS = 600
CONTAINER_CONCURRENCY_MAX = 1000
# pkg/autoscaler/config/config.go defaults: allow-zero-initial-scale false, max-scale-limit 0, class kpa.
ALLOW_ZERO_INITIAL_SCALE = False
KPA, HPA = "kpa.autoscaling.knative.dev", "hpa.autoscaling.knative.dev"

# pkg/apis/serving/k8s_validation.go reservedPaths, reservedContainerNames, reservedEnvVars,
# reservedPorts (networking.BackendHTTPPort 8012, BackendHTTP2Port 8013, QueueAdminPort 8022,
# AutoscalingQueueMetricsPort 9090, UserQueueMetricsPort 9091 from pkg/networking/constants.go, and
# the profiling port 8008: knative.dev/pkg profiling.ProfilingPort at v1.16.0,
# observability/runtime.ProfilingDefaultPort at main), validPortNames.
RESERVED_PATHS = frozenset({"/", "/dev", "/dev/log"})
RESERVED_CONTAINER_NAMES = frozenset({"queue-proxy"})
RESERVED_ENV = frozenset({"PORT", "K_SERVICE", "K_CONFIGURATION", "K_REVISION"})
RESERVED_PORTS = frozenset({8012, 8013, 8022, 9090, 9091, 8008})
VALID_PORT_NAMES = frozenset({"", "h2c", "http1"})


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    flag: str | None = None  # the config-features flag that would allow this, if one does


@dataclass
class _Context:
    version: str
    enabled: frozenset[str]
    problems: list[Problem] = field(default_factory=list)

    def on(self, flag: str) -> bool:
        if self.version != "main" and flag in MAIN_ONLY_FLAGS:
            return False
        return flag in self.enabled or flag in DEFAULT_ENABLED

    def add(self, path: str, message: str, flag: str | None = None) -> None:
        self.problems.append(Problem(path, message, flag))


def _set(value: Any) -> bool:
    """Go's CheckDisallowedFields only reports fields that hold a non-zero value."""
    return value not in (None, "", 0, False, [], {})


def _mask(ctx: _Context, path: str, obj: Object, allowed: Iterable[str], gated: Mapping[str, str] | None = None) -> None:
    """apis.CheckDisallowedFields(obj, *XMask(obj)): fields the mask drops must not be set."""
    allowed = set(allowed)
    for key, value in obj.items():
        if key in allowed or not _set(value):
            continue
        flag = (gated or {}).get(key)
        if flag is not None and ctx.on(flag):
            continue
        ctx.add(f"{path}.{key}", "must not set the field(s)", flag)


# --- durations, as Go's time.ParseDuration ------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float | None:
    """Seconds, or None where time.ParseDuration fails (a bare number other than 0 needs a unit)."""
    sign = -1.0 if text.startswith("-") else 1.0
    body = text[1:] if text[:1] in ("+", "-") else text
    if body == "0":
        return 0.0
    if not body:
        return None
    total, pos = 0.0, 0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None:
            return None
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return sign * total


# --- defaulting that validation depends on (pkg/apis/serving/v1/revision_defaults.go) -----------------

def _defaulted_probe(probe: Object | None, user_container: bool) -> dict[str, Any] | None:
    """applyUserContainerDefaultReadinessProbe + applyReadinessProbeDefaults."""
    if probe is None and not user_container:
        return None
    out = dict(probe or {})
    if not any(out.get(h) for h in ("tcpSocket", "httpGet", "exec", "grpc")) and user_container:
        out["tcpSocket"] = {}
    if not out.get("successThreshold"):
        out["successThreshold"] = 1
    if out.get("periodSeconds"):
        out.setdefault("failureThreshold", 3)
        out.setdefault("timeoutSeconds", 1)
    return out


# --- validation --------------------------------------------------------------------------------------

def admit_service(service: Object, *, version: str = "main", enabled: Iterable[str] = ()) -> list[Problem]:
    """Every reason the webhook would refuse ``service`` on creation (empty: admitted)."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
    ctx = _Context(version, frozenset(enabled))
    if service.get("apiVersion") != "serving.knative.dev/v1" or service.get("kind") != "Service":
        ctx.add("", "not a serving.knative.dev/v1 Service")
        return ctx.problems
    meta = service.get("metadata", {})
    # pkg/apis/serving/metadata_validation.go ValidateHasNoAutoscalingAnnotation (Service metadata).
    for key in meta.get("annotations") or {}:
        if key.startswith("autoscaling.knative.dev"):
            ctx.add(f"metadata.annotations.{key}",
                    'autoscaling annotations must be put under "spec.template.metadata.annotations" to work')
    spec = service.get("spec", {})
    # pkg/apis/serving/v1/service_types.go ServiceSpec = ConfigurationSpec (template) + RouteSpec (traffic).
    _mask(ctx, "spec", spec, {"template", "traffic"})
    template = spec.get("template")
    if not template:
        ctx.add("spec.template", "missing field(s)")
        return ctx.problems
    _mask(ctx, "spec.template", template, {"metadata", "spec"})
    _validate_annotations(ctx, "spec.template.metadata.annotations", (template.get("metadata") or {}).get("annotations") or {})
    _validate_revision_spec(ctx, "spec.template.spec", template.get("spec") or {})
    return ctx.problems


def _validate_revision_spec(ctx: _Context, path: str, spec: Object) -> None:
    """pkg/apis/serving/v1/revision_validation.go RevisionSpec.Validate (after SetDefaults)."""
    revision_fields = {"containerConcurrency", "timeoutSeconds", "responseStartTimeoutSeconds", "idleTimeoutSeconds"}
    pod = {k: v for k, v in spec.items() if k not in revision_fields}
    _validate_pod_spec(ctx, path, pod)
    # validateTimeoutSeconds: 0 < t <= max-revision-timeout-seconds (config-defaults, default 600).
    timeout = spec.get("timeoutSeconds")
    if timeout and not 0 <= timeout <= MAX_REVISION_TIMEOUT_SECONDS:
        ctx.add(f"{path}.timeoutSeconds", f"expected 0 <= {timeout} <= {MAX_REVISION_TIMEOUT_SECONDS}")
    # pkg/apis/serving/metadata_validation.go ValidateContainerConcurrency (allow-container-concurrency-zero
    # defaults to true, container-concurrency-max-limit to 1000).
    concurrency = spec.get("containerConcurrency")
    if concurrency is not None and not 0 <= concurrency <= CONTAINER_CONCURRENCY_MAX:
        ctx.add(f"{path}.containerConcurrency", f"expected 0 <= {concurrency} <= {CONTAINER_CONCURRENCY_MAX}")


# pkg/apis/serving/fieldmask.go PodSpecMask: always kept, and kept only with their flag.
_POD_ALWAYS = {"serviceAccountName", "containers", "volumes", "imagePullSecrets", "enableServiceLinks"}
_POD_GATED = {
    "affinity": "kubernetes.podspec-affinity",
    "topologySpreadConstraints": "kubernetes.podspec-topologyspreadconstraints",
    "hostAliases": "kubernetes.podspec-hostaliases",
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "tolerations": "kubernetes.podspec-tolerations",
    "securityContext": "kubernetes.podspec-securitycontext",
    "shareProcessNamespace": "kubernetes.podspec-shareprocessnamespace",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
    "initContainers": "kubernetes.podspec-init-containers",
    "dnsPolicy": "kubernetes.podspec-dnspolicy",
    "dnsConfig": "kubernetes.podspec-dnsconfig",
    "hostIPC": "kubernetes.podspec-hostipc",
    "hostPID": "kubernetes.podspec-hostpid",
    "hostNetwork": "kubernetes.podspec-hostnetwork",
}


def _validate_pod_spec(ctx: _Context, path: str, pod: Object) -> None:
    """pkg/apis/serving/k8s_validation.go ValidatePodSpec."""
    # PodSpecMask keeps automountServiceAccountToken only when it is false.
    if pod.get("automountServiceAccountToken") is True:
        ctx.add(f"{path}.automountServiceAccountToken", "must not set the field(s)")
    _mask(ctx, path, {k: v for k, v in pod.items() if k != "automountServiceAccountToken"}, _POD_ALWAYS, _POD_GATED)
    security = pod.get("securityContext")
    if security and ctx.on("kubernetes.podspec-securitycontext"):
        # PodSecurityContextMask with the flag on.
        _mask(ctx, f"{path}.securityContext", security,
              {"runAsUser", "runAsGroup", "runAsNonRoot", "fsGroup", "supplementalGroups", "seccompProfile"})
    containers = list(pod.get("containers") or [])
    mounted = {m.get("name") for c in [*containers, *(pod.get("initContainers") or [])] for m in c.get("volumeMounts") or []}
    volumes = _validate_volumes(ctx, f"{path}.volumes", pod.get("volumes") or [], mounted)
    if pod.get("initContainers") and not ctx.on("kubernetes.podspec-init-containers"):
        ctx.add(f"{path}.initContainers", "pod spec support for init-containers is off", "kubernetes.podspec-init-containers")
    # validateContainersPorts: one port across all containers; its name defaults to "http".
    ports = [p for c in containers for p in c.get("ports") or []]
    if len(ports) > 1:
        ctx.add(f"{path}.containers[*].ports", "more than one container port is set "
                "(only a single port is allowed across all containers)")
    if not ports and len(containers) > 1:
        ctx.add(f"{path}.containers[*].ports", "missing field(s)")
    port_name = (ports[0].get("name") if ports else "") or "http"
    if not containers:
        ctx.add(f"{path}.containers", "missing field(s)")
    elif len(containers) == 1:
        _validate_container(ctx, f"{path}.containers[0]", containers[0], volumes, port_name, user=True)
    else:
        if not ctx.on("multi-container"):
            ctx.add(f"{path}.containers", "multi-container is off", "multi-container")
        for i, container in enumerate(containers):
            _validate_container(ctx, f"{path}.containers[{i}]", container, volumes, port_name,
                                user=bool(container.get("ports")))
    name = pod.get("serviceAccountName")
    if name and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
        ctx.add(f"{path}.serviceAccountName", "invalid value: not a DNS-1123 subdomain")


def _validate_volumes(ctx: _Context, path: str, volumes: list[Object], mounted: set[Any]) -> dict[str, Object]:
    """ValidateVolumes + validateVolume (k8s_validation.go) with VolumeSourceMask (fieldmask.go)."""
    by_name: dict[str, Object] = {}
    source_flags = {
        "emptyDir": "kubernetes.podspec-volumes-emptydir",
        "persistentVolumeClaim": "kubernetes.podspec-persistent-volume-claim",
        # Only at main; at knative-v1.16.0 no flag allows them.
        "hostPath": "kubernetes.podspec-volumes-hostpath",
        "csi": "kubernetes.podspec-volumes-csi",
        "ephemeral": "kubernetes.podspec-volumes-ephemeral",
        "image": "kubernetes.podspec-volumes-image",
    }
    for i, volume in enumerate(volumes):
        vpath = f"{path}[{i}]"
        name = volume.get("name", "")
        if name in by_name:
            ctx.add(f"{vpath}.name", f"duplicate volume name {name!r}")
        if name not in mounted:
            ctx.add(f"{vpath}.name", f"volume with name {name!r} not mounted")
        if not name:
            ctx.add(f"{vpath}.name", "missing field(s)")
        # Volume sources are pointers in Go: an empty emptyDir {} is still a source.
        sources = [k for k in volume if k != "name" and volume[k] is not None]
        for source in sources:
            if source in ("secret", "configMap", "projected"):
                continue
            flag = source_flags.get(source)
            if flag is None or not ctx.on(flag):
                ctx.add(f"{vpath}.{source}", f"{source} volumes are not allowed",
                        flag if flag and (ctx.version == "main" or flag not in MAIN_ONLY_FLAGS) else None)
        if not sources:
            ctx.add(vpath, "expected exactly one, got neither (secret, configMap, projected, ...)")
        elif len(sources) > 1:
            ctx.add(vpath, f"expected exactly one, got both: {sources}")
        claim = volume.get("persistentVolumeClaim")
        # validatePersistentVolumeClaims: a writable claim also needs the write flag.
        if claim is not None and not claim.get("readOnly") and not ctx.on("kubernetes.podspec-persistent-volume-write"):
            ctx.add(f"{vpath}.persistentVolumeClaim", "persistent volume write support is disabled, but the claim "
                    "is not read-only", "kubernetes.podspec-persistent-volume-write")
        empty_dir = volume.get("emptyDir")
        if empty_dir and empty_dir.get("medium") not in (None, "", "Memory"):
            ctx.add(f"{vpath}.emptyDir.medium", f"invalid value: {empty_dir['medium']}")
        by_name[name] = volume
    return by_name


_CONTAINER_FIELDS = {
    "name", "args", "command", "env", "workingDir", "envFrom", "image", "imagePullPolicy", "livenessProbe",
    "ports", "readinessProbe", "resources", "securityContext", "startupProbe", "terminationMessagePath",
    "terminationMessagePolicy", "volumeMounts",
}  # fieldmask.go ContainerMask
_IMAGE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?::\d+)?(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
                    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?", re.IGNORECASE)


def _validate_container(ctx: _Context, path: str, container: Object, volumes: Mapping[str, Object], port_name: str,
                        *, user: bool) -> None:
    """ValidateUserContainer / validateSidecarContainer and validate (k8s_validation.go)."""
    if user:
        _validate_probe(ctx, f"{path}.livenessProbe", container.get("livenessProbe"), port_name, user=True)
        _validate_readiness_probe(ctx, f"{path}.readinessProbe",
                                  _defaulted_probe(container.get("readinessProbe"), True), port_name)
        _validate_probe(ctx, f"{path}.startupProbe", container.get("startupProbe"), port_name, user=True)
    else:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if container.get(probe) and not ctx.on("multi-container-probing"):
                ctx.add(f"{path}.{probe}", "must not set the field(s)", "multi-container-probing")
    _mask(ctx, path, container, _CONTAINER_FIELDS)
    if container.get("name") in RESERVED_CONTAINER_NAMES:
        ctx.add(f"{path}.name", f"{container['name']!r} is a reserved container name")
    for i, env in enumerate(container.get("env") or []):
        epath = f"{path}.env[{i}]"
        _mask(ctx, epath, env, {"name", "value", "valueFrom"})
        if not env.get("name"):
            ctx.add(f"{epath}.name", "missing field(s)")
        elif env["name"] in RESERVED_ENV:
            ctx.add(f"{epath}.name", f"{env['name']!r} is a reserved environment variable")
        source = env.get("valueFrom")
        if source:
            # EnvVarSourceMask: fieldRef/resourceFieldRef only with kubernetes.podspec-fieldref.
            _mask(ctx, f"{epath}.valueFrom", source, {"configMapKeyRef", "secretKeyRef"},
                  {"fieldRef": "kubernetes.podspec-fieldref", "resourceFieldRef": "kubernetes.podspec-fieldref"})
    for i, env_from in enumerate(container.get("envFrom") or []):
        _mask(ctx, f"{path}.envFrom[{i}]", env_from, {"prefix", "configMapRef", "secretRef"})
        refs = [k for k in ("configMapRef", "secretRef") if env_from.get(k)]
        if len(refs) != 1:
            ctx.add(f"{path}.envFrom[{i}]", "expected exactly one of configMapRef, secretRef")
    image = container.get("image", "")
    if not image:
        ctx.add(f"{path}.image", "missing field(s)")
    elif not _IMAGE.fullmatch(image):
        ctx.add(f"{path}.image", f"Failed to parse image reference {image!r}")
    for i, port in enumerate((container.get("ports") or [])[:1]):
        _validate_port(ctx, f"{path}.ports[{i}]", port)
    resources = container.get("resources")
    if resources:
        _mask(ctx, f"{path}.resources", resources, {"limits", "requests"})
    _validate_security_context(ctx, f"{path}.securityContext", container.get("securityContext"))
    if container.get("terminationMessagePolicy") not in (None, "", "File", "FallbackToLogsOnError"):
        ctx.add(f"{path}.terminationMessagePolicy", "invalid value")
    _validate_mounts(ctx, f"{path}.volumeMounts", container.get("volumeMounts") or [], volumes)


def _validate_port(ctx: _Context, path: str, port: Object) -> None:
    """validateContainerPorts + validateContainerPortBasic (ContainerPortMask drops hostIP/hostPort)."""
    _mask(ctx, path, port, {"containerPort", "name", "protocol"})
    number = port.get("containerPort", 0)
    if number in RESERVED_PORTS:
        ctx.add(f"{path}.containerPort", f"{number} is a reserved port, please use a different value")
    if not 0 <= number <= 65535:
        ctx.add(f"{path}.containerPort", "expected 0 <= containerPort <= 65535")
    if port.get("protocol") not in (None, "", "TCP"):
        ctx.add(f"{path}.protocol", f"invalid value: {port['protocol']}")
    if port.get("name", "") not in VALID_PORT_NAMES:
        ctx.add(f"{path}.name", f"Port name {port['name']} is not allowed (must be empty, 'h2c' or 'http1')")


def _validate_security_context(ctx: _Context, path: str, security: Object | None) -> None:
    """validateSecurityContext with SecurityContextMask and CapabilitiesMask (fieldmask.go)."""
    if not security:
        return
    if security.get("privileged") is True:
        ctx.add(f"{path}.privileged", "must not set the field(s)")
    _mask(ctx, path, {k: v for k, v in security.items() if k != "privileged"},
          {"capabilities", "readOnlyRootFilesystem", "runAsUser", "runAsGroup", "runAsNonRoot",
           "allowPrivilegeEscalation", "seccompProfile"})
    capabilities = security.get("capabilities")
    if capabilities:
        _mask(ctx, f"{path}.capabilities", capabilities, {"drop"},
              {"add": "kubernetes.containerspec-addcapabilities"})
    for key in ("runAsUser", "runAsGroup"):
        value = security.get(key)
        if value is not None and not 0 <= value <= 2**31 - 1:
            ctx.add(f"{path}.{key}", f"expected 0 <= {value} <= 2147483647")


def _validate_mounts(ctx: _Context, path: str, mounts: list[Object], volumes: Mapping[str, Object]) -> None:
    """validateVolumeMounts (k8s_validation.go) with VolumeMountMask."""
    seen_paths: set[str] = set()
    for i, mount in enumerate(mounts):
        mpath = f"{path}[{i}]"
        _mask(ctx, mpath, mount, {"name", "readOnly", "mountPath", "subPath"},
              {"mountPropagation": "kubernetes.podspec-volumes-mount-propagation"})
        volume = volumes.get(mount.get("name", ""))
        if volume is None:
            ctx.add(f"{mpath}.name", "volumeMount has no matching volume")
            volume = {}
        mount_path = mount.get("mountPath", "")
        clean = re.sub(r"/+", "/", mount_path).rstrip("/") or "/"
        if not mount_path:
            ctx.add(f"{mpath}.mountPath", "missing field(s)")
        elif clean in RESERVED_PATHS:
            ctx.add(f"{mpath}.mountPath", f"mountPath {clean!r} is a reserved path")
        elif not mount_path.startswith("/"):
            ctx.add(f"{mpath}.mountPath", f"invalid value: {mount_path}")
        elif clean in seen_paths:
            ctx.add(f"{mpath}.mountPath", f"{mount_path!r} must be unique")
        seen_paths.add(clean)
        # "volume mount should be readOnly for this type of volume" (secret, configMap, projected)
        # cannot fire on creation: SetDefaults (revision_defaults.go applyDefault) has already made
        # those mounts read-only.
        claim = volume.get("persistentVolumeClaim")
        if claim and claim.get("readOnly") and not mount.get("readOnly"):
            ctx.add(f"{mpath}.readOnly", "volume is readOnly but volume mount is not")


_PROBE_FIELDS = {"exec", "httpGet", "tcpSocket", "grpc", "initialDelaySeconds", "timeoutSeconds", "periodSeconds",
                 "successThreshold", "failureThreshold", "terminationGracePeriodSeconds"}  # ProbeMask + HandlerMask


def _validate_probe(ctx: _Context, path: str, probe: Object | None, port_name: str, *, user: bool) -> None:
    """validateProbe (k8s_validation.go)."""
    if probe is None:
        return
    _mask(ctx, path, probe, _PROBE_FIELDS)
    handlers = [h for h in ("httpGet", "tcpSocket", "exec", "grpc") if probe.get(h) is not None]
    for handler in ("httpGet", "tcpSocket"):
        action = probe.get(handler)
        if action is None:
            continue
        allowed = {"host", "path", "scheme", "httpHeaders", "port"} if handler == "httpGet" else {"host", "port"}
        _mask(ctx, f"{path}.{handler}", action, allowed)
        port = action.get("port")
        if user and isinstance(port, str) and port and port != port_name:
            ctx.add(f"{path}.{handler}.port", f"Probe port must match container port ({port_name!r}), not {port!r}")
        if not user and not port:
            ctx.add(f"{path}.{handler}.port", "Probe port must be specified")
    if not handlers:
        ctx.add(path, "expected exactly one, got neither (httpGet, tcpSocket, exec, grpc)")
    elif len(handlers) > 1:
        ctx.add(path, f"expected exactly one, got both: {handlers}")


def _validate_readiness_probe(ctx: _Context, path: str, probe: Object | None, port_name: str) -> None:
    """validateReadinessProbe: periodSeconds 0 means Knative's own aggressive probing."""
    if probe is None:
        return
    _validate_probe(ctx, path, probe, port_name, user=True)
    period = probe.get("periodSeconds", 0)
    if period < 0:
        ctx.add(f"{path}.periodSeconds", "expected periodSeconds >= 0")
    if probe.get("initialDelaySeconds", 0) < 0:
        ctx.add(f"{path}.initialDelaySeconds", "expected initialDelaySeconds >= 0")
    if probe.get("successThreshold", 0) < 1:
        ctx.add(f"{path}.successThreshold", "expected successThreshold >= 1")
    if period == 0:
        for key in ("failureThreshold", "timeoutSeconds"):
            if probe.get(key):
                ctx.add(f"{path}.{key}", f"{key} is disallowed when periodSeconds is zero")
    else:
        for key in ("timeoutSeconds", "failureThreshold"):
            if probe.get(key, 0) < 1:
                ctx.add(f"{path}.{key}", f"expected {key} >= 1")


# --- autoscaling annotations (pkg/apis/autoscaling/annotation_validation.go) -------------------------

_AS = "autoscaling.knative.dev/"
# register.go: each KeyPriority accepts the current key and older spellings.
_KEYS = {
    "class": ("class",), "min-scale": ("min-scale", "minScale"), "max-scale": ("max-scale", "maxScale"),
    "initial-scale": ("initial-scale", "initialScale"), "window": ("window",), "target": ("target",),
    "target-utilization-percentage": ("target-utilization-percentage",),
    "target-burst-capacity": ("target-burst-capacity",), "metric": ("metric",),
    "panic-window-percentage": ("panic-window-percentage", "panicWindowPercentage"),
    "panic-threshold-percentage": ("panic-threshold-percentage", "panicThresholdPercentage"),
    "scale-to-zero-pod-retention-period": ("scale-to-zero-pod-retention-period",),
    "scale-down-delay": ("scale-down-delay",), "activation-scale": ("activation-scale",),
}


def _get(annotations: Mapping[str, str], name: str) -> tuple[str, str] | None:
    for alias in _KEYS[name]:
        if _AS + alias in annotations:
            return _AS + alias, annotations[_AS + alias]
    return None


def _int_ge0(ctx: _Context, path: str, annotations: Mapping[str, str], name: str) -> int:
    found = _get(annotations, name)
    if found is None:
        return 0
    key, value = found
    if not re.fullmatch(r"[+-]?\d+", value) or not -(2**31) <= int(value) < 2**31:
        ctx.add(f"{path}.{key}", f"invalid value: {value}")
        return 0
    if int(value) < 0:
        ctx.add(f"{path}.{key}", f"expected 0 <= {value} <= 2147483647")
        return 0
    return int(value)


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def _validate_annotations(ctx: _Context, path: str, annotations: Mapping[str, str]) -> None:
    """ValidateAnnotations with config-autoscaler at its defaults."""
    found = _get(annotations, "class")
    klass = found[1] if found else KPA
    if found and found[1].endswith("autoscaling.knative.dev") and found[1] not in (KPA, HPA):
        ctx.add(f"{path}.{found[0]}", f"invalid value: {found[1]}")
    # validateMinMaxScale (max-scale-limit 0: no upper bound).
    low = _int_ge0(ctx, path, annotations, "min-scale")
    high = _int_ge0(ctx, path, annotations, "max-scale")
    if high and high < low:
        ctx.add(f"{path}.{_AS}max-scale", f"max-scale={high} is less than min-scale={low}")
    found = _get(annotations, "activation-scale")
    if found:
        number: float | None = int(found[1]) if re.fullmatch(r"[+-]?\d+", found[1]) else None
        if number is None or number < 2 or low > number or (high and high < number):
            ctx.add(f"{path}.{found[0]}", f"invalid activation-scale {found[1]}")
    # validateFloats.
    for name, low_bound, high_bound in (("panic-window-percentage", 1.0, 100.0),
                                         ("panic-threshold-percentage", 110.0, 1000.0),
                                         ("target-utilization-percentage", 1.0, 100.0)):
        found = _get(annotations, name)
        if found:
            number = _float(found[1])
            if number is None or not low_bound <= number <= high_bound:
                ctx.add(f"{path}.{found[0]}", f"expected {low_bound:g} <= {found[1]} <= {high_bound:g}")
    found = _get(annotations, "target")
    if found:
        number = _float(found[1])
        if number is None or number < 0.01:  # TargetMin
            ctx.add(f"{path}.{found[0]}", f"target {found[1]} should be at least 0.01")
    found = _get(annotations, "target-burst-capacity")
    if found:
        number = _float(found[1])
        if number is None or (number < 0 and number != -1):
            ctx.add(f"{path}.{found[0]}", f"invalid value: {found[1]}")
    # validateWindow: 6s (WindowMin) to 1h (WindowMax), whole seconds.
    found = _get(annotations, "window")
    if found:
        seconds = parse_duration(found[1])
        if seconds is None:
            ctx.add(f"{path}.{found[0]}", f"invalid value: {found[1]}")
        elif not 6 <= seconds <= 3600:
            ctx.add(f"{path}.{found[0]}", f"expected 6s <= {found[1]} <= 1h0m0s")
        elif seconds != int(seconds):
            ctx.add(f"{path}.{found[0]}", "must be specified with at most second precision")
    # validateLastPodRetention and validateScaleDownDelay: 0 to WindowMax.
    for name in ("scale-to-zero-pod-retention-period", "scale-down-delay"):
        found = _get(annotations, name)
        if found:
            seconds = parse_duration(found[1])
            if seconds is None or not 0 <= seconds <= 3600:
                ctx.add(f"{path}.{found[0]}", f"expected 0s <= {found[1]} <= 1h0m0s")
            elif name == "scale-down-delay" and seconds != round(seconds):
                ctx.add(f"{path}.{found[0]}", "must be specified with at most second precision")
    # validateMetric.
    found = _get(annotations, "metric")
    if found and ((klass == KPA and found[1] not in ("concurrency", "rps")) or (klass == HPA and not found[1])):
        ctx.add(f"{path}.{found[0]}", f"invalid value: {found[1]}")
    # validateInitialScale: 0 only with allow-zero-initial-scale (config-autoscaler, default false).
    found = _get(annotations, "initial-scale")
    if found:
        if not re.fullmatch(r"[+-]?\d+", found[1]) or int(found[1]) < 0:
            ctx.add(f"{path}.{found[0]}", f"invalid value: {found[1]} (must be >= 0)")
        elif int(found[1]) == 0 and not ALLOW_ZERO_INITIAL_SCALE:
            ctx.add(f"{path}.{found[0]}", "initial-scale=0 not allowed by cluster (allow-zero-initial-scale)")


def flags_needed(problems: Iterable[Problem]) -> set[str] | None:
    """The flags that would admit the Service, or None when some problem no flag lifts."""
    problems = list(problems)
    if any(p.flag is None for p in problems):
        return None
    return {p.flag for p in problems if p.flag is not None}
