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
from celpy import celtypes

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
    rules = schema.get("x-kubernetes-validations", [])
    seen = cel_view(value, schema) if rules else value
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue  # a transition rule: it judges an update against the stored object, never a new job
        if not _cel(rule["rule"])(seen):
            message = rule.get("message", rule["rule"])
            if "messageExpression" in rule:
                message = str(_cel(rule["messageExpression"], boolean=False)(seen))
            raise SpecError(f"{where}: {message}" if where else message)


# Property names CEL cannot spell as fields; Kubernetes exposes them as ``__<name>__`` (and escapes
# ``__ . - /`` inside names), so a rule reads ``self.__function__.minScale`` for ``function``.
CEL_RESERVED = frozenset({
    "true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
    "import", "let", "loop", "package", "namespace", "return", "var", "void", "while",
})


def cel_property_name(name: str) -> str:
    """The name a CEL rule uses for the declared property ``name`` (the API server's escaping)."""
    if name in CEL_RESERVED:
        return f"__{name}__"
    for raw, escaped in (("__", "__underscores__"), (".", "__dot__"), ("-", "__dash__"), ("/", "__slash__")):
        name = name.replace(raw, escaped)
    return name


def cel_view(value: Any, schema: Mapping[str, Any]) -> Any:
    """``value`` as a CEL rule sees it: declared properties under their escaped names, recursively;
    map keys (``additionalProperties``) and preserved unknown fields keep theirs, as on the server."""
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, sub in value.items():
            if key in properties:
                out[cel_property_name(key)] = cel_view(sub, properties[key])
            else:
                out[key] = cel_view(sub, additional) if isinstance(additional, dict) else sub
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [cel_view(item, schema["items"]) for item in value]
    return value


def _cel_format(template: Any, args: Any) -> Any:
    """Kubernetes' ``'%d of %s'.format([n, s])`` (the strings extension, which cel-python lacks): the
    CRD's messages use it because the server cannot bound the cost of ``'a' + string(n)``."""
    return celtypes.StringType(str(template) % tuple(args))


@functools.cache
def _cel(expression: str, boolean: bool = True) -> Any:
    env = celpy.Environment()
    program = env.program(env.compile(expression), functions={"format": _cel_format})

    def evaluate(value: Any) -> Any:
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        return bool(result) if boolean else result

    return evaluate
