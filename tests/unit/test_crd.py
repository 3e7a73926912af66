"""The CRD: structural, its CEL rules behave (checked with cel-python), every example validates, it is
valid for exactly the Kubernetes versions the chart claims, and it is the one place for every default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from p2ptrain.config import PEER_PORT, ChildNames
from p2ptrain.schema import cel_property_name, cel_view
from p2ptrain.spec import (
    JobSpec,
    SpecError,
    crd,
    defaulted_spec,
    load_manifest,
    openapi_schema,
    parse_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        found += _walk(schema["items"], f"{path}[]")
    return found


def test_crd_is_structural_with_status_and_printer_columns() -> None:
    definition = crd()
    assert definition["spec"]["names"]["shortNames"][0] == "p2pjob"
    version = definition["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Round", "Loss", "Accuracy", "Peers-Ready", "Age"} <= columns
    for path, schema in _walk(version["schema"]["openAPIV3Schema"]):
        assert "type" in schema or schema.get("x-kubernetes-preserve-unknown-fields"), f"{path or '<root>'} has no type"


def test_crd_file_in_the_package_is_the_one_in_crds() -> None:
    assert crd() == yaml.safe_load((ROOT / "crds" / "p2ptrainingjobs.p2ptrain.dev.yaml").read_text())


def _rules() -> dict[str, str]:
    spec_schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return {rule["message"]: rule["rule"] for rule in spec_schema["x-kubernetes-validations"]}


def _holds(rule: str, spec: dict[str, Any]) -> bool:
    env = celpy.Environment()
    seen = cel_view(defaulted_spec(spec), openapi_schema()["properties"]["spec"])  # names as the server escapes them
    return bool(env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel(seen)}))


@pytest.mark.parametrize(
    "message,spec,expected",
    [
        ("aggregation.rule=krum needs peers > 2*byzantine + 2", {"peers": 4, "aggregation": {"rule": "krum", "byzantine": 1}}, False),
        ("aggregation.rule=krum needs peers > 2*byzantine + 2", {"peers": 5, "aggregation": {"rule": "krum", "byzantine": 1}}, True),
        ("aggregation.rule=median/trimmed-mean needs peers > 2*byzantine", {"peers": 2, "aggregation": {"rule": "median", "byzantine": 1}}, False),
        ("set either spec.rounds or spec.epochs, not both", {"rounds": 3, "epochs": 1}, False),
        ("set either spec.rounds or spec.epochs, not both", {"rounds": 3}, True),
        ("exchange.quorum cannot exceed peers", {"peers": 2, "exchange": {"quorum": 3}}, False),
        ("function.minScale cannot exceed function.maxScale", {"function": {"minScale": 3, "maxScale": 2}}, False),
        ("function.minScale cannot exceed function.maxScale", {"function": {"minScale": 2, "maxScale": 2}}, True),
        ("aggregation.rule=mean tolerates no Byzantine peer: set aggregation.byzantine=0 or pick a robust rule",
         {"aggregation": {"rule": "mean", "byzantine": 1}}, False),
    ],
)
def test_cel_rules_evaluate_as_the_api_server_would(message: str, spec: dict[str, Any], expected: bool) -> None:
    base = {"model": {}, "dataset": {}}
    assert _holds(_rules()[message], {**base, **spec}) is expected


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_against_the_crd(path: Path) -> None:
    spec = load_manifest(path)
    assert spec.name == yaml.safe_load(path.read_text())["metadata"]["name"]


# --- job names: the CRD's root-level rules, exact to the longest child name ----------------------------

LABEL_MAX = 63  # DNS-1035 labels (Service names, hostnames) and label values
REVISION_HASH_MAX = 10  # a ControllerRevision hash is a uint32 written in decimal


def _root_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    return rules


def _name_accepted(name: str, topology: str = "p2p") -> bool:
    env = celpy.Environment()
    self = celpy.json_to_cel({"metadata": {"name": name}, "spec": {"topology": topology}})
    return all(bool(env.program(env.compile(r["rule"])).evaluate({"self": self})) for r in _root_rules())


def _derived_names(job: str, topology: str = "p2p") -> list[str]:
    """Every name and label value Kubernetes and Knative derive from the job's children (each <= 63)."""
    names = ChildNames(job)
    peers_max = openapi_schema()["properties"]["spec"]["properties"]["peers"]["maximum"]
    statefulsets = [names.redis, names.peer]
    if topology == "ps":  # the aggregator and its Redis: one pod each
        return [*_derived_names(job), *(f"{sts}-{'0' * REVISION_HASH_MAX}" for sts in (names.aggregator, names.aggregator_redis)),
                f"{names.aggregator}-0", f"{names.aggregator_redis}-0"]
    return [
        # A StatefulSet's pods carry controller-revision-hash: <statefulset>-<hash>.
        *(f"{sts}-{'0' * REVISION_HASH_MAX}" for sts in statefulsets),
        # Its pods are <statefulset>-<ordinal>; the name is also the pod's hostname.
        *(f"{sts}-{peers_max - 1}" for sts in statefulsets),
        names.redis, names.peers_service,  # headless Services: DNS-1035 labels
        names.gradient,  # Knative Service: host label of its route and the serving.knative.dev/service label
        names.export,  # a Job's name is its pods' job-name label value
    ]


def _longest_job_name(topology: str) -> int:
    return max(n for n in range(1, 254) if all(len(d) <= LABEL_MAX for d in _derived_names("a" * n, topology)))


@pytest.mark.parametrize("topology", ["p2p", "ps"])
def test_the_crd_name_limit_is_exactly_the_longest_name_whose_children_fit(topology: str) -> None:
    longest = _longest_job_name(topology)
    assert _name_accepted("a" * longest, topology)
    assert not _name_accepted("a" * (longest + 1), topology)


@pytest.mark.parametrize("name", ["digits", "a", "cnn-4-peers", "x9"])
def test_the_crd_accepts_dns_1035_job_names(name: str) -> None:
    assert _name_accepted(name)


@pytest.mark.parametrize("name", ["my.job", "1digits", "-job", "job-", "Job", "my_job", "a" * 60])
def test_the_crd_refuses_names_its_children_cannot_have(name: str) -> None:
    assert not _name_accepted(name)


def test_the_local_parser_applies_the_same_name_rule() -> None:
    manifest = {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "my.job"},
                "spec": {"model": {}, "dataset": {}}}
    with pytest.raises(SpecError, match=r'metadata.name "my.job" is not a DNS-1035 label'):
        parse_manifest(manifest)
    longest = _longest_job_name("p2p")
    manifest["metadata"] = {"name": "a" * (longest + 1)}
    with pytest.raises(SpecError, match=rf"has {longest + 1} characters; at most {longest} fit"):
        parse_manifest(manifest)


# --- metrics.port must not collide with the peers' own port ---------------------------------------------

def _metrics_port_accepted(port: int) -> bool:
    schema = openapi_schema()["properties"]["spec"]["properties"]["metrics"]["properties"]["port"]
    env = celpy.Environment()
    return all(bool(env.program(env.compile(r["rule"])).evaluate({"self": celpy.json_to_cel(port)}))
               for r in schema.get("x-kubernetes-validations", []))


def test_the_crd_refuses_the_peers_http_port_as_metrics_port() -> None:
    assert not _metrics_port_accepted(PEER_PORT)
    assert _metrics_port_accepted(9090)


# --- the Kubernetes versions the chart claims --------------------------------------------------------------

def _floor() -> tuple[int, int]:
    chart = yaml.safe_load((ROOT / "charts" / "p2ptrain" / "Chart.yaml").read_text())
    match = re.fullmatch(r">=(\d+)\.(\d+)\.0-0", chart["kubeVersion"])
    assert match, f"Chart.yaml kubeVersion {chart['kubeVersion']!r} is not of the form >=X.Y.0-0"
    return int(match[1]), int(match[2])


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


CLAIMED = sorted({v for v in kubernetes_validate.utils.all_versions() if _minor(v) >= _floor()}, key=_minor)


@pytest.mark.parametrize("version", CLAIMED)
def test_the_crd_is_valid_for_every_kubernetes_version_the_chart_claims(version: str) -> None:
    kubernetes_validate.validate(crd(), version, strict=True)


def test_claimed_versions_reach_the_newest_the_validator_ships() -> None:
    assert CLAIMED and CLAIMED[-1] == kubernetes_validate.latest_version()


def _message_expressions(schema: dict[str, Any]) -> list[str]:
    return [r["messageExpression"] for _, s in _walk(schema) for r in s.get("x-kubernetes-validations", [])
            if "messageExpression" in r]


def test_the_floor_is_the_first_version_whose_cel_has_format() -> None:
    """The messages format numbers with CEL's strings library ``'%d'.format([n])`` (``'a' + string(n)``
    has a cost the server cannot bound, and it refuses the CRD): Kubernetes serves that library's
    version 2 from 1.29 on (k8s.io/apiserver pkg/cel/environment/base.go), and refuses the CRD below."""
    expressions = _message_expressions(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    assert any(".format([" in e for e in expressions)
    assert not any("string(" in e for e in expressions)
    assert _floor() == (1, 29)


def test_docs_state_the_chart_floor() -> None:
    major, minor = _floor()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for claim in re.findall(r"Kubernetes (\d+\.\d+)\+", doc.read_text()):
            assert claim == f"{major}.{minor}", f"{doc.name} claims Kubernetes {claim}+; the chart needs {major}.{minor}+"


# --- one place for every default ---------------------------------------------------------------------------

def _defaults(schema: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, schema["default"])] if "default" in schema and path else []
    for name, sub in schema.get("properties", {}).items():
        found += _defaults(sub, (*path, name))
    return found


SPEC_DEFAULTS = _defaults(openapi_schema()["properties"]["spec"])


def _snake(camel: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m[0].lower(), camel)


@pytest.mark.parametrize("path,default", SPEC_DEFAULTS, ids=[".".join(p) for p, _ in SPEC_DEFAULTS])
def test_every_crd_default_is_the_parsed_and_the_dataclass_default(path: tuple[str, ...], default: Any) -> None:
    minimal = {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "job"},
               "spec": {"model": {}, "dataset": {}, "output": {"claimName": "models"},
                        # optional objects are given with only their required fields, so their defaults show
                        "evaluation": {"attack": {"acknowledge": "evaluation-only", "kind": "silent", "peers": [0]}}}}
    parsed: Any = parse_manifest(minimal)
    owner: Any = JobSpec
    for part in path:
        owner, parsed = parsed, getattr(parsed, _snake(part))
    if isinstance(default, dict) and not default and dataclasses.is_dataclass(parsed):
        return  # an object defaulted to {}: its fields are checked one by one
    assert parsed == default, f"spec.{'.'.join(path)} parses to {parsed!r}; the CRD default is {default!r}"
    field = next(f for f in dataclasses.fields(owner) if f.name == _snake(path[-1]))
    dataclass_default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    assert dataclass_default == default, (
        f"{type(owner).__name__}.{field.name} defaults to {dataclass_default!r}; the CRD default is {default!r}"
    )


# --- property names as CEL sees them (the server's escaping) ---------------------------------------------

@pytest.mark.parametrize("name,escaped", [
    ("function", "__function__"), ("namespace", "__namespace__"), ("minScale", "minScale"),
    ("a-b", "a__dash__b"), ("a.b/c", "a__dot__b__slash__c"), ("x__y", "x__underscores__y"),
])
def test_property_names_are_escaped_as_the_api_server_escapes_them(name: str, escaped: str) -> None:
    assert cel_property_name(name) == escaped


def test_map_keys_keep_their_names_in_cel() -> None:
    function = openapi_schema()["properties"]["spec"]["properties"]["function"]
    seen = cel_view({"resources": {"limits": {"nvidia.com/gpu": 1}}}, function)
    assert seen == {"resources": {"limits": {"nvidia.com/gpu": 1}}}
