"""Exactly the API access the operator and its uninstall hook use, in RBAC rule form.

The Helm chart renders its rules from the same lists (a chart test keeps them equal), and the operator
tests record every request over a whole job lifecycle and check both directions: every call is
granted, and every grant is called, except ``UNOBSERVABLE`` (grants an API emulator cannot exercise,
each with its reason).

Every resource here is namespaced: with one watched namespace the chart binds the rules with a Role
there, cluster-wide with a ClusterRole. kopf needs nothing cluster-scoped because the operator turns
its CRD and namespace scanning off (``handlers.configure``).
"""

from __future__ import annotations

from typing import Any

Rule = dict[str, Any]

OPERATOR_RULES: list[Rule] = [
    # kopf lists and watches the jobs and patches them (finalizer, progress annotations); the TTL deletes.
    {"apiGroups": ["p2ptrain.dev"], "resources": ["p2ptrainingjobs"], "verbs": ["list", "watch", "patch", "delete"]},
    {"apiGroups": ["p2ptrain.dev"], "resources": ["p2ptrainingjobs/status"], "verbs": ["patch"]},
    # Children carry ownerReferences with blockOwnerDeletion: true; the OwnerReferencesPermissionEnforcement
    # admission plugin (OpenShift enables it) refuses those without update on the owner's finalizers.
    {"apiGroups": ["p2ptrain.dev"], "resources": ["p2ptrainingjobs/finalizers"], "verbs": ["update"]},
    # Children are created once and owned by the job: garbage collection deletes them, not the operator.
    {"apiGroups": [""], "resources": ["secrets", "configmaps", "services"], "verbs": ["create"]},
    {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["create", "patch"]},  # patch: scale to 0 and back
    {"apiGroups": ["serving.knative.dev"], "resources": ["services"], "verbs": ["create"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "create"]},  # the model export Job
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},  # container restarts of a job's peers
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},  # kopf.info/warn
]

# The pre-delete hook (``p2ptrain operator cleanup``): delete every job and, if no operator releases
# them, remove the operator's finalizer.
CLEANUP_RULES: list[Rule] = [
    {"apiGroups": ["p2ptrain.dev"], "resources": ["p2ptrainingjobs"], "verbs": ["list", "delete", "patch"]},
]

UNOBSERVABLE: dict[tuple[str, str, str], str] = {
    ("p2ptrain.dev", "p2ptrainingjobs/finalizers", "update"):
        "checked by the OwnerReferencesPermissionEnforcement admission plugin when a child with "
        "blockOwnerDeletion is created; no request is made for it, so an emulator cannot observe it",
}


def grants(rules: list[Rule]) -> set[tuple[str, str, str]]:
    """Every (apiGroup, resource, verb) the rules allow."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def allows(api_group: str, resource: str, verb: str, rules: list[Rule] = OPERATOR_RULES) -> bool:
    return (api_group, resource, verb) in grants(rules)
