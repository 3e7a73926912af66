"""The P2PTrainingJob CRD as data, and the API server's view of a spec: defaults, schema, CEL rules.

``crds/`` is the only definition of the spec's fields. This module applies its defaults, validates a
spec against its openAPIV3Schema (strict: unknown fields are errors) and evaluates its CEL rules
(``x-kubernetes-validations``) with cel-python, so a manifest is refused here as ``kubectl apply``
would refuse it. ``spec`` builds the typed spec on top of it.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Mapping
from importlib import resources
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


# ---------------------------------------------------------------------------------------------------
# The CRD as data


@functools.cache
def crd() -> dict[str, Any]:
    """The P2PTrainingJob CustomResourceDefinition (the file in ``crds/``)."""
    text = resources.files("p2ptrain").joinpath("crd.yaml").read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # trusted, ours
    return loaded


def openapi_schema() -> dict[str, Any]:
    version = next(v for v in crd()["spec"]["versions"] if v["name"] == API_VERSION)
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def crd_default(path: str) -> Any:
    """The CRD's ``default`` for a spec field (``"optimizer.learningRate"``): the one place defaults live."""
    schema = openapi_schema()["properties"]["spec"]
    for part in path.split("."):
        schema = schema["properties"][part]
    return copy.deepcopy(schema["default"])


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


def require_finite(value: Any, where: str) -> None:
    """NaN and infinity cannot be sent to the API server (JSON has neither), so they are refused here too."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value}")
    if isinstance(value, Mapping):
        for key, sub in value.items():
            require_finite(sub, f"{where}.{key}")
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            require_finite(sub, f"{where}[{index}]")


def validate_schema(spec: Any, schema: Mapping[str, Any]) -> None:
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


def validate_rules(value: Any, schema: Mapping[str, Any], where: str, *, recurse: bool = True) -> None:
    """Evaluate the CRD's CEL rules bottom-up, as the API server does."""
    if recurse and isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate_rules(value[key], sub, f"{where}.{key}" if where else key)
    for rule in schema.get("x-kubernetes-validations", []):
        if not _cel(rule["rule"])(value):
            message = rule.get("message", rule["rule"])
            if "messageExpression" in rule:
                message = str(_cel(rule["messageExpression"], boolean=False)(value))
            raise SpecError(f"{where}: {message}" if where else message)


@functools.cache
def _cel(expression: str, boolean: bool = True) -> Any:
    env = celpy.Environment()
    program = env.program(env.compile(expression))

    def evaluate(value: Any) -> Any:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        return bool(result) if boolean else result

    return evaluate
