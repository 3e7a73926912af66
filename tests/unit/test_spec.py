"""The spec parser: one typed object from a manifest, with the CRD's defaults, or one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from p2ptrain.config import RuntimeConfig, cluster_config
from p2ptrain.spec import JobSpec, SpecError, defaulted_spec, load_manifest, parse_manifest, spec_from_dict


def manifest(**spec: object) -> dict:
    return {
        "apiVersion": "p2ptrain.dev/v1alpha1",
        "kind": "P2PTrainingJob",
        "metadata": {"name": "job", "namespace": "ml"},
        "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, **spec},
    }


def test_minimal_manifest_gets_the_crd_defaults() -> None:
    spec = parse_manifest(manifest())
    assert (spec.name, spec.namespace) == ("job", "ml")
    assert (spec.peers, spec.functions_per_peer, spec.batch_size) == (4, 2, 64)
    assert spec.aggregation.rule == "mean" and spec.quorum == 4
    assert spec.function.min_scale == 0 and spec.function.timeout_seconds == 60
    assert spec.optimizer.name == "sgd" and spec.redis.accumulator == "auto"
    assert spec.run_policy.backoff_limit == 3


def test_defaults_come_from_the_crd_file() -> None:
    defaulted = defaulted_spec({"model": {}, "dataset": {}})
    assert defaulted["model"]["name"] == "mlp" and defaulted["dataset"]["name"] == "digits"
    assert defaulted["exchange"]["inlineLimitBytes"] == 65536


def test_camel_case_fields_map_to_typed_fields() -> None:
    spec = parse_manifest(
        manifest(
            peers=5,
            functionsPerPeer=3,
            exchange={"quorum": 3, "roundDeadlineSeconds": 5, "dtype": "float16"},
            aggregation={"rule": "multi-krum", "byzantine": 1, "multiKrumSelect": 2},
            runPolicy={"ttlSecondsAfterFinished": 60, "activeDeadlineSeconds": 600},
        )
    )
    assert spec.functions_per_peer == 3 and spec.quorum == 3
    assert spec.exchange.round_deadline_seconds == 5 and spec.exchange.dtype == "float16"
    assert spec.aggregation.multi_krum_select == 2
    assert spec.run_policy.ttl_seconds_after_finished == 60


@pytest.mark.parametrize(
    "rounds,epochs,shard,expected",
    [(7, None, 100, 7), (None, 2.0, 100, 4), (None, None, 100, 2), (None, 0.5, 10, 1)],
)
def test_total_rounds(rounds: int | None, epochs: float | None, shard: int, expected: int) -> None:
    extra = {k: v for k, v in {"rounds": rounds, "epochs": epochs}.items() if v is not None}
    spec = parse_manifest(manifest(batchSize=50, **extra))
    assert spec.total_rounds(shard) == expected


def test_typed_spec_round_trips_through_json_config() -> None:
    spec = parse_manifest(manifest(model={"name": "cnn", "args": {"channels": 8}}, seed=3))
    assert spec_from_dict(spec.to_dict()) == spec
    config = cluster_config(spec)
    assert RuntimeConfig.from_json(config.to_json()) == config
    assert config.peer_urls[2] == "http://job-peer-2.job-peers.ml.svc.cluster.local:8080"
    assert str(config.redis[1]) == "job-redis-1.job-redis.ml.svc.cluster.local:6379"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda m: m.update(apiVersion="v1"), "apiVersion"),
        (lambda m: m.update(kind="Job"), "kind"),
        (lambda m: m["metadata"].update(name="Bad_Name"), "metadata.name"),
        (lambda m: m.pop("spec"), "spec: required"),
        (lambda m: m["spec"].update(peers="four"), "spec.peers: expected integer"),
        (lambda m: m["spec"]["optimizer"].update(name="lbfgs") if "optimizer" in m["spec"] else m["spec"].update(
            optimizer={"name": "lbfgs"}), "spec.optimizer.name: expected one of"),
        (lambda m: m["spec"].update(peerz=3), "unknown field"),
        (lambda m: m["spec"].update(function={"minScale": 3, "maxScale": 2}), "minScale cannot exceed"),
        (lambda m: m["spec"].update(batchSize=1, functionsPerPeer=2), "batchSize must be at least"),
        (lambda m: m["spec"].update(exchange={"quorum": 9}), "quorum cannot exceed peers"),
    ],
)
def test_bad_manifests_name_the_field(mutate, message: str) -> None:
    m = manifest()
    mutate(m)
    with pytest.raises(SpecError, match=message):
        parse_manifest(m)


def test_load_manifest_reports_unreadable_and_ambiguous_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed", encoding="utf-8")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_manifest(broken)
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump_all([manifest(), manifest()]), encoding="utf-8")
    with pytest.raises(SpecError, match="exactly one P2PTrainingJob"):
        load_manifest(two)


def test_load_manifest_skips_other_kinds_in_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Namespace"}, manifest()]), encoding="utf-8")
    assert isinstance(load_manifest(path), JobSpec)


def test_duplicate_keys_are_refused_but_merge_keys_still_work(tmp_path: Path) -> None:
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text(yaml.safe_dump(manifest()).replace("spec:\n", "spec:\n  seed: 1\n  seed: 2\n"), encoding="utf-8")
    with pytest.raises(SpecError, match=r"line \d+, column 3: found duplicate key 'seed' \(first given on line \d+\)"):
        load_manifest(duplicate)
    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "common: &common {name: mlp}\n"
        "---\n"
        "apiVersion: p2ptrain.dev/v1alpha1\nkind: P2PTrainingJob\nmetadata: {name: job}\n"
        "spec:\n  model: &m {name: logreg}\n  dataset: {name: digits}\n  optimizer: {<<: {name: adam}, name: sgd}\n",
        encoding="utf-8",
    )
    spec = load_manifest(merged)
    assert spec.model.name == "logreg" and spec.optimizer.name == "sgd"


def test_a_lone_document_of_another_kind_is_named(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({**manifest(), "kind": "TrainingJob"}), encoding="utf-8")
    with pytest.raises(SpecError, match="kind: expected 'P2PTrainingJob', got 'TrainingJob'"):
        load_manifest(path)


def test_non_finite_numbers_are_refused_anywhere_in_the_spec() -> None:
    with pytest.raises(SpecError, match=r"spec.model.args.dropout: expected a finite number, got nan"):
        parse_manifest(manifest(model={"name": "mlp", "args": {"dropout": float("nan")}}))
    with pytest.raises(SpecError, match=r"spec.exchange.roundDeadlineSeconds: expected a finite number, got inf"):
        parse_manifest(manifest(exchange={"roundDeadlineSeconds": float("inf")}))
