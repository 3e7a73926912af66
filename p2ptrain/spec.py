"""The typed P2PTrainingJob spec, parsed once from a manifest.

The CRD in ``crds/`` is the only definition of the fields: parsing applies its defaults, validates
against its openAPIV3Schema and evaluates its CEL rules (``x-kubernetes-validations``), so a manifest
is accepted or rejected here exactly as ``kubectl apply`` would, with one error naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml

API_GROUP = "p2ptrain.dev"
API_VERSION = "v1alpha1"
KIND = "P2PTrainingJob"
PLURAL = "p2ptrainingjobs"


class SpecError(ValueError):
    """A manifest that can never run; the message names the field at fault."""


@dataclass(frozen=True)
class ModelSpec:
    name: str = "mlp"
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    name: str = "digits"
    path: str | None = None
    claim_name: str | None = None
    format: str = "auto"
    split_seed: int = 0
    test_fraction: float = 0.2
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class AggregationSpec:
    rule: str = "mean"
    byzantine: int = 0
    multi_krum_select: int | None = None


@dataclass(frozen=True)
class ExchangeSpec:
    quorum: int | None = None
    round_deadline_seconds: float = 60.0
    dtype: str = "float32"
    compression: str = "none"
    inline_limit_bytes: int = 65536


@dataclass(frozen=True)
class EvaluationSpec:
    every_rounds: int = 1


@dataclass(frozen=True)
class TrainingSpec:
    on_divergence: str = "fail"  # or "skipRound"
    explosion_factor: float = 10.0
    hash_every_rounds: int = 1


@dataclass(frozen=True)
class FunctionSpec:
    min_scale: int = 0
    max_scale: int = 4
    container_concurrency: int = 2
    timeout_seconds: int = 60
    idle_seconds: float = 30.0
    retries: int = 3
    image: str | None = None
    resources: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RedisSpec:
    accumulator: str = "auto"
    persistence: str = "none"
    storage: str | None = None
    key_ttl_seconds: int = 86400
    image: str | None = None


@dataclass(frozen=True)
class MetricsSpec:
    port: int = 9090


@dataclass(frozen=True)
class OutputSpec:
    """Where the operator writes the trained model (a PersistentVolumeClaim) when the job succeeds."""

    claim_name: str
    path: str = "model.safetensors"


@dataclass(frozen=True)
class RunPolicy:
    suspend: bool = False
    backoff_limit: int = 3
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    clean_pod_policy: str = "Running"


@dataclass(frozen=True)
class JobSpec:
    """Everything a peer, a function, the operator and the local runner need to know about a job."""

    name: str
    namespace: str
    model: ModelSpec
    dataset: DatasetSpec
    peers: int = 4
    functions_per_peer: int = 2
    batch_size: int = 64
    rounds: int | None = None
    epochs: float | None = None
    seed: int = 0
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    exchange: ExchangeSpec = field(default_factory=ExchangeSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    function: FunctionSpec = field(default_factory=FunctionSpec)
    redis: RedisSpec = field(default_factory=RedisSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    image: str | None = None
    run_policy: RunPolicy = field(default_factory=RunPolicy)
    output: OutputSpec | None = None

    @property
    def quorum(self) -> int:
        """Gradients (own included) a peer waits for before aggregating."""
        return self.exchange.quorum if self.exchange.quorum is not None else self.peers

    def total_rounds(self, shard_size: int) -> int:
        """Rounds to run, given the number of training samples in one peer's shard."""
        if self.rounds is not None:
            return self.rounds
        epochs = self.epochs if self.epochs is not None else 1.0
        return max(1, math.ceil(epochs * shard_size / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe form, used to hand the parsed spec to child processes and pods."""
        return _to_jsonable(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------------
# The CRD as data


@functools.cache
def crd() -> dict[str, Any]:
    """The P2PTrainingJob CustomResourceDefinition (the file in ``crds/``)."""
    text = resources.files("p2ptrain").joinpath("crd.yaml").read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def openapi_schema() -> dict[str, Any]:
    version = next(v for v in crd()["spec"]["versions"] if v["name"] == API_VERSION)
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


# ---------------------------------------------------------------------------------------------------
# Parsing


def load_manifest(path: str | Path) -> JobSpec:
    """Read a manifest file (the same YAML ``kubectl apply`` takes) and parse it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read manifest {path}: {exc.strerror}") from exc
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from exc
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        raise SpecError(f"{path} must contain exactly one {KIND} document, found {len(jobs)}")
    return parse_manifest(jobs[0])


def parse_manifest(manifest: Mapping[str, Any]) -> JobSpec:
    """Validate a whole custom resource (apiVersion, kind, metadata, spec) and return its spec."""
    if not isinstance(manifest, Mapping):
        raise SpecError("manifest must be a mapping")
    expected_api = f"{API_GROUP}/{API_VERSION}"
    if manifest.get("apiVersion") != expected_api:
        raise SpecError(f"apiVersion: expected {expected_api!r}, got {manifest.get('apiVersion')!r}")
    if manifest.get("kind") != KIND:
        raise SpecError(f"kind: expected {KIND!r}, got {manifest.get('kind')!r}")
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not _is_dns_label(name):
        raise SpecError(f"metadata.name: expected a DNS label (lowercase, digits, '-', <= 40 chars), got {name!r}")
    namespace = metadata.get("namespace") or "default"
    if "spec" not in manifest:
        raise SpecError("spec: required field is missing")
    return parse_spec(manifest["spec"], name=name, namespace=str(namespace))


def parse_spec(raw_spec: Any, *, name: str, namespace: str = "default") -> JobSpec:
    """Apply the CRD's defaults to ``raw_spec``, validate it, and build the typed spec."""
    spec_schema = openapi_schema()["properties"]["spec"]
    spec = apply_defaults(copy.deepcopy(raw_spec), spec_schema)
    _validate_schema(spec, spec_schema)
    _validate_rules(spec, spec_schema, "spec")
    return _build(spec, name=name, namespace=namespace)


def defaulted_spec(raw_spec: Any) -> dict[str, Any]:
    """The spec with the CRD's defaults filled in, as the API server would store it."""
    result: dict[str, Any] = apply_defaults(copy.deepcopy(raw_spec), openapi_schema()["properties"]["spec"])
    return result


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """Fill in ``default``s the way the API server does for structural schemas."""
    if isinstance(value, dict) and schema.get("type") == "object":
        for key, sub in schema.get("properties", {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _validate_schema(spec: Any, schema: Mapping[str, Any]) -> None:
    validator = jsonschema.Draft4Validator(_strict(schema))
    errors = sorted(validator.iter_errors(spec), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        error = errors[0]
        where = ".".join(["spec", *map(str, error.absolute_path)])
        raise SpecError(f"{where}: {_describe(error)}")


def _strict(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Unknown fields are errors (as with kubectl's strict field validation), except where preserved."""
    out = dict(schema)
    if out.get("type") == "object" and "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = _strict(out["items"])
    return out


def _describe(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return f"unknown field ({error.message})"
    if error.validator == "required":
        return f"required field is missing ({error.message})"
    if error.validator == "type":
        return f"expected {error.validator_value}, got {error.instance!r}"
    if error.validator == "enum":
        return f"expected one of {error.validator_value}, got {error.instance!r}"
    return error.message


def _validate_rules(value: Any, schema: Mapping[str, Any], where: str) -> None:
    """Evaluate the CRD's CEL rules bottom-up, as the API server does."""
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _validate_rules(value[key], sub, f"{where}.{key}")
    for rule in schema.get("x-kubernetes-validations", []):
        if not _cel(rule["rule"])(value):
            message = rule.get("message", rule["rule"])
            if "messageExpression" in rule:
                message = str(_cel(rule["messageExpression"], boolean=False)(value))
            raise SpecError(f"{where}: {message}")


@functools.cache
def _cel(expression: str, boolean: bool = True) -> Any:
    env = celpy.Environment()
    program = env.program(env.compile(expression))

    def evaluate(value: Any) -> Any:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        return bool(result) if boolean else result

    return evaluate


def _is_dns_label(name: str) -> bool:
    # 40 leaves room for the child-object suffixes (e.g. "-redis-12") inside the 63-character limit.
    return 0 < len(name) <= 40 and name[0].isalpha() and name[-1].isalnum() and all(
        c.islower() or c.isdigit() or c == "-" for c in name
    )


def _build(spec: Mapping[str, Any], *, name: str, namespace: str) -> JobSpec:
    def pick(cls: type, data: Mapping[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {_snake(k): v for k, v in data.items() if _snake(k) in names}
        return cls(**kwargs)

    return JobSpec(
        name=name,
        namespace=namespace,
        peers=spec["peers"],
        functions_per_peer=spec["functionsPerPeer"],
        batch_size=spec["batchSize"],
        rounds=spec.get("rounds"),
        epochs=spec.get("epochs"),
        seed=spec["seed"],
        model=pick(ModelSpec, spec["model"]),
        dataset=pick(DatasetSpec, spec["dataset"]),
        optimizer=pick(OptimizerSpec, spec["optimizer"]),
        aggregation=pick(AggregationSpec, spec["aggregation"]),
        exchange=pick(ExchangeSpec, spec["exchange"]),
        evaluation=pick(EvaluationSpec, spec["evaluation"]),
        training=pick(TrainingSpec, spec["training"]),
        function=pick(FunctionSpec, spec["function"]),
        redis=pick(RedisSpec, spec["redis"]),
        metrics=pick(MetricsSpec, spec["metrics"]),
        image=spec.get("image"),
        run_policy=pick(RunPolicy, spec["runPolicy"]),
        output=pick(OutputSpec, spec["output"]) if "output" in spec else None,
    )


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    return value


def spec_from_dict(data: Mapping[str, Any]) -> JobSpec:
    """Rebuild a JobSpec from :meth:`JobSpec.to_dict` output (trusted: it was validated once)."""

    def build(cls: type, values: Mapping[str, Any]) -> Any:
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            v = values[f.name]
            sub = _NESTED.get((cls.__name__, f.name))
            kwargs[f.name] = build(sub, v) if sub is not None and v is not None else v
        return cls(**kwargs)

    result: JobSpec = build(JobSpec, data)
    return result


_NESTED: dict[tuple[str, str], type] = {
    ("JobSpec", "model"): ModelSpec,
    ("JobSpec", "dataset"): DatasetSpec,
    ("JobSpec", "optimizer"): OptimizerSpec,
    ("JobSpec", "aggregation"): AggregationSpec,
    ("JobSpec", "exchange"): ExchangeSpec,
    ("JobSpec", "evaluation"): EvaluationSpec,
    ("JobSpec", "training"): TrainingSpec,
    ("JobSpec", "function"): FunctionSpec,
    ("JobSpec", "redis"): RedisSpec,
    ("JobSpec", "metrics"): MetricsSpec,
    ("JobSpec", "run_policy"): RunPolicy,
    ("JobSpec", "output"): OutputSpec,
}
