"""Strict Kubernetes OpenAPI validation for every version the chart claims, with cached validators.

``kubernetes_validate.validate`` re-reads and re-compiles the schema (and its multi-megabyte
definitions file) on every call; validating each object against a dozen versions that way is slow.
This keeps its schema files and semantics (strict: no unknown fields) and builds each validator once.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from packaging.version import Version
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parents[2]
CHART_YAML = ROOT / "charts" / "p2ptrain" / "Chart.yaml"
_SCHEMAS = resources.files("kubernetes_validate").joinpath("kubernetes-json-schema")


def chart_floor() -> tuple[int, int]:
    """(major, minor) of the lowest Kubernetes that Chart.yaml's kubeVersion (``>=1.27.0-0``) admits."""
    constraint = yaml.safe_load(CHART_YAML.read_text())["kubeVersion"]
    match = re.fullmatch(r"\s*>=\s*v?(\d+)\.(\d+)(?:\.\d+)?(?:-\S*)?\s*", constraint)
    if match is None:
        raise ValueError(f"{CHART_YAML}: kubeVersion {constraint!r} is not of the form '>=1.N.0-0'")
    return int(match.group(1)), int(match.group(2))


def claimed_versions() -> list[str]:
    """Every minor from the chart's floor to the newest kubernetes-validate ships, e.g. ["1.27", ...]."""
    floor = chart_floor()
    shipped = sorted({Version(v).release[:2] for v in kubernetes_validate.utils.all_versions()})
    versions = [f"{major}.{minor}" for major, minor in shipped if (major, minor) >= floor]
    if not versions or shipped[0] > floor:
        raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {floor[0]}.{floor[1]}")
    return versions


@functools.cache
def _definitions(version: str) -> Registry:
    text = _SCHEMAS.joinpath(f"v{version}.0-local-strict", "_definitions.json").read_text()
    return Resource.from_contents(json.loads(text)) @ Registry()


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    # Same file naming as kubernetes_validate.validate: rbac.authorization.k8s.io/v1 -> rbac-v1.
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    path = _SCHEMAS.joinpath(f"v{version}.0-local-strict", f"{kind.lower()}-{group_version}.json")
    schema = json.loads(path.read_text())
    registry = Resource.from_contents(schema) @ _definitions(version)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: dict[str, Any], version: str) -> None:
    """Raise jsonschema.ValidationError where ``obj`` is not a valid object of Kubernetes ``version``."""
    _validator(version, obj["apiVersion"], obj["kind"]).validate(obj)
