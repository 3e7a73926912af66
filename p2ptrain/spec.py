"""The typed P2PTrainingJob spec, parsed once from a manifest.

The CRD in ``crds/`` is the only definition of the fields: parsing applies its defaults, validates
against its openAPIV3Schema and evaluates its CEL rules (``x-kubernetes-validations``), so a manifest
is accepted or rejected here exactly as ``kubectl apply`` would, with one error naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from p2ptrain.aggregation_spec import AggregationSpec
from p2ptrain.schema import (
    API_GROUP,
    API_VERSION,
    KIND,
    PLURAL,
    SpecError,
    apply_defaults,
    crd,
    crd_default,
    openapi_schema,
    require_finite,
    validate_rules,
    validate_schema,
)

__all__ = ["API_GROUP", "API_VERSION", "KIND", "PLURAL", "AggregationSpec", "SpecError", "crd", "crd_default", "openapi_schema"]


@dataclass(frozen=True)
class ModelSpec:
    name: str = crd_default("model.name")
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSpec:
    name: str = crd_default("dataset.name")
    path: str | None = None
    claim_name: str | None = None
    format: str = crd_default("dataset.format")
    split_seed: int = crd_default("dataset.splitSeed")
    test_fraction: float = crd_default("dataset.testFraction")
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = crd_default("optimizer.name")
    learning_rate: float = crd_default("optimizer.learningRate")
    momentum: float = crd_default("optimizer.momentum")
    weight_decay: float = crd_default("optimizer.weightDecay")


@dataclass(frozen=True)
class ExchangeSpec:
    quorum: int | None = None
    round_deadline_seconds: float = crd_default("exchange.roundDeadlineSeconds")
    dtype: str = crd_default("exchange.dtype")
    compression: str = crd_default("exchange.compression")
    inline_limit_bytes: int = crd_default("exchange.inlineLimitBytes")


@dataclass(frozen=True)
class AttackSpec:
    """FOR EVALUATION ONLY: peers that turn Byzantine (``evaluation.attack``; see p2ptrain/attack.py)."""

    kind: str
    peers: tuple[int, ...]
    acknowledge: str
    factor: float = crd_default("evaluation.attack.factor")
    sigma: float = crd_default("evaluation.attack.sigma")
    z: float = crd_default("evaluation.attack.z")
    epsilon: float = crd_default("evaluation.attack.epsilon")
    stale_rounds: int = crd_default("evaluation.attack.staleRounds")

    def __post_init__(self) -> None:
        object.__setattr__(self, "peers", tuple(self.peers))  # JSON round trips hand back a list


@dataclass(frozen=True)
class EvaluationSpec:
    every_rounds: int = crd_default("evaluation.everyRounds")
    attack: AttackSpec | None = None

    def attacks(self, peer: int) -> bool:
        """Whether ``peer`` is one of this evaluation's attackers."""
        return self.attack is not None and peer in self.attack.peers


@dataclass(frozen=True)
class TrainingSpec:
    on_divergence: str = "fail"  # or "skipRound"
    explosion_factor: float = 10.0
    hash_every_rounds: int = 1
    checkpoint_every_rounds: int = crd_default("training.checkpointEveryRounds")
    resync_every_rounds: int = crd_default("training.resyncEveryRounds")


@dataclass(frozen=True)
class FunctionSpec:
    # function.mode: "serverless" fans micro-batches out to the gradient function; "inline" computes them
    # in the peer (p2ptrain.peer.inline), with no function and no Knative Service.
    mode: str = crd_default("function.mode")
    min_scale: int = crd_default("function.minScale")
    max_scale: int = crd_default("function.maxScale")
    container_concurrency: int = crd_default("function.containerConcurrency")
    timeout_seconds: int = crd_default("function.timeoutSeconds")
    idle_seconds: float = crd_default("function.idleSeconds")
    retries: int = crd_default("function.retries")
    image: str | None = None
    resources: Mapping[str, Any] | None = None
    device: str = crd_default("function.device")  # auto | cpu | cuda (cuda needs an nvidia.com/gpu limit)

    @property
    def inline(self) -> bool:
        """Whether the peers compute their gradients in-process (no gradient function at all)."""
        return self.mode == "inline"


@dataclass(frozen=True)
class RedisSpec:
    accumulator: str = crd_default("redis.accumulator")
    persistence: str = crd_default("redis.persistence")
    storage: str | None = None
    key_ttl_seconds: int = crd_default("redis.keyTtlSeconds")
    image: str | None = None


@dataclass(frozen=True)
class MetricsSpec:
    port: int = crd_default("metrics.port")


@dataclass(frozen=True)
class OutputSpec:
    """Where the operator writes the trained model (a PersistentVolumeClaim) when the job succeeds."""

    claim_name: str
    path: str = crd_default("output.path")


@dataclass(frozen=True)
class RunPolicy:
    suspend: bool = crd_default("runPolicy.suspend")
    backoff_limit: int = crd_default("runPolicy.backoffLimit")
    active_deadline_seconds: int | None = None
    ttl_seconds_after_finished: int | None = None
    clean_pod_policy: str = crd_default("runPolicy.cleanPodPolicy")


@dataclass(frozen=True)
class JobSpec:
    """Everything a peer, a function, the operator and the local runner need to know about a job."""

    name: str
    namespace: str
    model: ModelSpec
    dataset: DatasetSpec
    peers: int = crd_default("peers")
    functions_per_peer: int = crd_default("functionsPerPeer")
    batch_size: int = crd_default("batchSize")
    rounds: int | None = None
    epochs: float | None = None
    seed: int = crd_default("seed")
    update: str = crd_default("update")  # where the optimizer step runs: "peer" or "database"
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
    # p2p (peers exchange and aggregate) or ps (one aggregator does; p2ptrain.ps)
    topology: str = crd_default("topology")

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
# Parsing


def load_manifest(path: str | Path) -> JobSpec:
    """Read a manifest file (the same YAML ``kubectl apply`` takes) and parse it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read manifest {path}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): save the manifest as UTF-8"
        ) from exc
    try:
        documents = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {_yaml_problem(exc)}") from exc
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) == 1:
        return parse_manifest(jobs[0])
    if len(jobs) > 1:
        raise SpecError(f"{path} must contain exactly one {KIND} document, found {len(jobs)}")
    if len(documents) == 1:
        # One document of another kind (a typo such as `kind: P2PTrainingjob`): say what it has.
        return parse_manifest(documents[0])
    found = ", ".join(_describe_document(d) for d in documents) or "no document"
    raise SpecError(f"{path} must contain one document of kind {KIND} (apiVersion {API_GROUP}/{API_VERSION}); found {found}")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where in the file, and what is wrong there."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    return " ".join(str(error).split())


def _describe_document(document: Any) -> str:
    if isinstance(document, dict):
        return f"kind {document.get('kind')!r}"
    return f"a {type(document).__name__}"


class _StrictLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: a key given twice in one mapping is an error, not a silent overwrite."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<` merges may override keys, by design
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:
                    continue  # unhashable keys are reported by the base class
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first given on line {first.line + 1})", key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]
        return result


def parse_manifest(manifest: Mapping[str, Any]) -> JobSpec:
    """Validate a whole custom resource (apiVersion, kind, metadata, spec) and return its spec."""
    if not isinstance(manifest, Mapping):
        raise SpecError(f"manifest: expected a mapping (apiVersion, kind, metadata, spec), got a {type(manifest).__name__}")
    if manifest.get("kind") != KIND:
        raise SpecError(f"kind: expected {KIND!r}, got {manifest.get('kind')!r}")
    expected_api = f"{API_GROUP}/{API_VERSION}"
    if manifest.get("apiVersion") != expected_api:
        raise SpecError(f"apiVersion: expected {expected_api!r}, got {manifest.get('apiVersion')!r}")
    metadata = manifest.get("metadata") or {}
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not isinstance(name, str) or not name:
        raise SpecError(f"metadata.name: required, expected a string, got {name!r}")
    namespace = metadata.get("namespace") or "default"
    if "spec" not in manifest:
        raise SpecError("spec: required field is missing")
    job = parse_spec(manifest["spec"], name=name, namespace=str(namespace))
    # The name rules are the CRD's root-level CEL rules (the limit depends on spec.topology): the API
    # server applies the very same ones, to the defaulted spec.
    validate_rules({"metadata": {"name": name}, "spec": defaulted_spec(manifest["spec"])}, openapi_schema(), "",
                   recurse=False)
    return job


def parse_spec(raw_spec: Any, *, name: str, namespace: str = "default") -> JobSpec:
    """Apply the CRD's defaults to ``raw_spec``, validate it, and build the typed spec."""
    spec_schema = openapi_schema()["properties"]["spec"]
    require_finite(raw_spec, "spec")
    spec = apply_defaults(copy.deepcopy(raw_spec), spec_schema)
    validate_schema(spec, spec_schema)
    validate_rules(spec, spec_schema, "spec")
    return _build(spec, name=name, namespace=namespace)


def defaulted_spec(raw_spec: Any) -> dict[str, Any]:
    """The spec with the CRD's defaults filled in, as the API server would store it."""
    result: dict[str, Any] = apply_defaults(copy.deepcopy(raw_spec), openapi_schema()["properties"]["spec"])
    return result


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
        update=spec["update"],
        model=pick(ModelSpec, spec["model"]),
        dataset=pick(DatasetSpec, spec["dataset"]),
        optimizer=pick(OptimizerSpec, spec["optimizer"]),
        aggregation=pick(AggregationSpec, spec["aggregation"]),
        exchange=pick(ExchangeSpec, spec["exchange"]),
        evaluation=EvaluationSpec(
            every_rounds=spec["evaluation"]["everyRounds"],
            attack=pick(AttackSpec, spec["evaluation"]["attack"]) if "attack" in spec["evaluation"] else None,
        ),
        training=pick(TrainingSpec, spec["training"]),
        function=pick(FunctionSpec, spec["function"]),
        redis=pick(RedisSpec, spec["redis"]),
        metrics=pick(MetricsSpec, spec["metrics"]),
        image=spec.get("image"),
        run_policy=pick(RunPolicy, spec["runPolicy"]),
        output=pick(OutputSpec, spec["output"]) if "output" in spec else None,
        topology=spec["topology"],
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
    ("EvaluationSpec", "attack"): AttackSpec,
    ("JobSpec", "training"): TrainingSpec,
    ("JobSpec", "function"): FunctionSpec,
    ("JobSpec", "redis"): RedisSpec,
    ("JobSpec", "metrics"): MetricsSpec,
    ("JobSpec", "run_policy"): RunPolicy,
    ("JobSpec", "output"): OutputSpec,
}
