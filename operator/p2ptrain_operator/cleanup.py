"""Uninstall cleanup (``p2ptrain operator cleanup``): delete every job and make sure none is left.

kopf puts the ``p2ptrain.dev/finalizer`` on every job (the operator has a timer and a daemon), so a
job outlives the operator that would release it and deleting the CRD then hangs. The chart runs this
as a ``pre-delete`` hook while the operator still runs: the jobs are deleted, the operator releases
them, and the children follow by owner reference. When no operator releases a job within the timeout
(it was stopped or never started), the cleanup removes the operator's finalizer itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from p2ptrain.spec import API_GROUP, API_VERSION, PLURAL
from p2ptrain_operator.kube import MERGE_PATCH, ApiException, Kube

log = logging.getLogger(__name__)
FINALIZER = f"{API_GROUP}/finalizer"


@dataclass
class CleanupReport:
    deleted: list[str] = field(default_factory=list)  # namespace/name of every job deleted
    released: list[str] = field(default_factory=list)  # jobs whose finalizer the cleanup removed itself
    left: list[str] = field(default_factory=list)  # jobs still there at the end (other finalizers)


async def _jobs(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    result: Any
    if namespace:
        call = kube.custom.list_namespaced_custom_object
        result = await asyncio.to_thread(call, API_GROUP, API_VERSION, namespace, PLURAL)
    else:
        result = await asyncio.to_thread(kube.custom.list_cluster_custom_object, API_GROUP, API_VERSION, PLURAL)
    items: list[dict[str, Any]] = result.get("items") or []
    return items


def _key(job: dict[str, Any]) -> str:
    return f"{job['metadata'].get('namespace')}/{job['metadata']['name']}"


async def _wait_gone(kube: Kube, namespace: str, until: float, poll: float) -> list[dict[str, Any]]:
    """Poll the API until no job is left or ``until`` (monotonic) passes; the jobs still there."""
    while True:
        remaining = await _jobs(kube, namespace)
        if not remaining or time.monotonic() >= until:
            return remaining
        await asyncio.sleep(min(poll, max(0.0, until - time.monotonic())))


async def _release(kube: Kube, job: dict[str, Any]) -> bool:
    """Remove the operator's finalizer from ``job``; False when it changed meanwhile or is gone."""
    meta = job["metadata"]
    log.warning("no operator released %s in time: removing %s", _key(job), FINALIZER)
    rest = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
    patch: dict[str, Any] = {"metadata": {"finalizers": rest or None}}
    if meta.get("resourceVersion"):
        patch["metadata"]["resourceVersion"] = meta["resourceVersion"]  # refused (409) if the job changed
    try:
        await asyncio.to_thread(kube.custom.patch_namespaced_custom_object, API_GROUP, API_VERSION,
                                meta["namespace"], PLURAL, meta["name"], patch, _content_type=MERGE_PATCH)
    except ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    return True


async def cleanup(kube: Kube, namespace: str = "", timeout: float = 60.0, poll: float = 1.0) -> CleanupReport:
    """Delete every job in ``namespace`` ("" = every namespace) and wait until they are gone.

    Jobs still held by the operator's finalizer after ``timeout`` seconds are released by removing that
    finalizer (the operator is not running); other finalizers are left to their owners and reported.
    """
    report = CleanupReport()
    for job in await _jobs(kube, namespace):
        meta = job["metadata"]
        try:
            await asyncio.to_thread(kube.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION,
                                    meta["namespace"], PLURAL, meta["name"], propagation_policy="Background")
            report.deleted.append(_key(job))
        except ApiException as exc:
            if exc.status != 404:
                raise
    remaining = await _wait_gone(kube, namespace, time.monotonic() + timeout, poll)
    for _ in range(3):  # a job that changed under a release (409) is released again from a fresh read
        held = [job for job in remaining if FINALIZER in (job["metadata"].get("finalizers") or [])]
        if not held:
            break
        for job in held:
            if await _release(kube, job):
                report.released.append(_key(job))
        # Without other finalizers a released job goes at once: a short wait, so the whole run stays
        # within timeout + 30 s (the hook Job's deadline allows for that).
        remaining = await _wait_gone(kube, namespace, time.monotonic() + min(timeout, 10.0), poll)
    report.left = [_key(job) for job in remaining]
    report.released = sorted(set(report.released))
    return report
