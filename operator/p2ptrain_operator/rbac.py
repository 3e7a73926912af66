"""Exactly the API access the operator uses, in ClusterRole rule form.

The Helm chart renders its ClusterRole from the same list, and the operator tests check that every
request the operator made is covered by it.
"""

from __future__ import annotations

from typing import Any

CHILD_VERBS = ["get", "list", "watch", "create", "patch", "delete"]

REQUIRED_RULES: list[dict[str, Any]] = [
    {"apiGroups": ["p2ptrain.dev"], "resources": ["p2ptrainingjobs"], "verbs": ["get", "list", "watch", "patch", "delete"]},
    {"apiGroups": ["p2ptrain.dev"], "resources": ["p2ptrainingjobs/status"], "verbs": ["get", "patch"]},
    {"apiGroups": [""], "resources": ["secrets", "configmaps", "services"], "verbs": CHILD_VERBS},
    {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": CHILD_VERBS},
    {"apiGroups": ["serving.knative.dev"], "resources": ["services"], "verbs": CHILD_VERBS},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "create"]},  # the model export Job
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]


def allows(api_group: str, resource: str, verb: str) -> bool:
    return any(
        api_group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in REQUIRED_RULES
    )
