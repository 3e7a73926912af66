"""kopf handlers: thin wiring from events on P2PTrainingJobs to the pure builders and lifecycle.

create/resume build the children and create them (idempotently: replays and operator restarts create
nothing twice, and a finished job is never rebuilt); a timer polls the peers' ``/status`` and moves the
phase; a daemon deletes finished jobs exactly when ``ttlSecondsAfterFinished`` runs out; field handlers
suspend and resume, and refuse changes the engine cannot apply to a running job. Handlers return None
and write status through ``patch.status``.
"""

from __future__ import annotations

import asyncio
import datetime
import secrets
import time
from collections.abc import Callable
from typing import Any

import httpx
import kopf

from p2ptrain import metrics
from p2ptrain.config import ChildNames
from p2ptrain.spec import API_GROUP, API_VERSION, PLURAL, JobSpec, SpecError, parse_spec
from p2ptrain_operator.builders import build_children, build_export_job, selector
from p2ptrain_operator.kube import Kube
from p2ptrain_operator.lifecycle import Observed, Phase, Transition, conditions, next_phase
from p2ptrain_operator.settings import Settings

FINALIZER = f"{API_GROUP}/finalizer"
EXPORT_RUNNING, EXPORT_FAILED = "Running", "Failed"  # status.modelExport while not yet Succeeded
_PHASES: dict[tuple[str, str], Phase] = {}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def _job(spec: Any, meta: Any) -> JobSpec:
    return parse_spec(dict(spec), name=meta["name"], namespace=meta.get("namespace") or "default")


def _record(meta: Any, phase: Phase) -> None:
    _PHASES[(meta.get("namespace") or "default", meta["name"])] = phase
    for p in Phase:
        metrics.OPERATOR_JOBS.labels(phase=p.value).set(sum(1 for v in _PHASES.values() if v == p))


def _write_status(patch: Any, status: Any, transition: Transition, generation: int | None) -> None:
    patch.status["phase"] = transition.phase.value
    patch.status["message"] = transition.message
    patch.status["conditions"] = conditions(transition, status.get("conditions") or [], _now(), generation)
    if generation is not None:
        patch.status["observedGeneration"] = generation


def register(registry: kopf.OperatorRegistry, settings: Settings, kube: Callable[[], Kube]) -> None:
    """Declare every handler on ``registry``; ``kube()`` gives the client for children."""
    resource = (API_GROUP, API_VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = 20  # INFO: transitions become Kubernetes events
        settings.watching.server_timeout = 60

    @kopf.on.resume(*resource, registry=registry)
    @kopf.on.create(*resource, registry=registry)
    async def reconcile(body: Any, spec: Any, meta: Any, status: Any, patch: Any, logger: Any, **_: Any) -> None:
        started = time.perf_counter()
        phase = Phase(status.get("phase") or Phase.PENDING.value)
        _record(meta, phase)
        if phase.is_terminal:
            return  # a finished job is never rebuilt, whatever replays this handler
        try:
            job = _job(spec, meta)
        except SpecError as exc:
            transition = Transition(Phase.FAILED, "InvalidSpec", str(exc))
            _write_status(patch, status, transition, meta.get("generation"))
            metrics.OPERATOR_JOBS_FAILED_TOTAL.inc()
            raise kopf.PermanentError(str(exc)) from exc
        children = build_children(
            job, body, settings, redis_password=secrets.token_hex(24), signing_key=secrets.token_hex(32)
        )
        created = [c for c in children if await kube().create(c)]
        if job.run_policy.suspend:
            await _scale(kube(), job, 0)
        if created:
            logger.info(f"created {len(created)} children: {', '.join(c['metadata']['name'] for c in created)}")
            if created[0]["kind"] == "Secret":
                metrics.OPERATOR_JOBS_CREATED_TOTAL.inc()
        if phase == Phase.PENDING:
            transition = next_phase(phase, Observed(peers=job.peers, suspended=job.run_policy.suspend))
            _write_status(patch, status, transition, meta.get("generation"))
            patch.status["startTime"] = status.get("startTime") or _now()
            patch.status["peersReady"] = 0
            patch.status["peersReadyText"] = f"0/{job.peers}"
            patch.status["rounds"] = 0
            kopf.info(body, reason=transition.reason, message=f"created {len(created)} children")
            _record(meta, transition.phase)
        metrics.OPERATOR_RECONCILE_SECONDS.labels(handler="reconcile").observe(time.perf_counter() - started)

    @kopf.timer(*resource, registry=registry, interval=settings.poll_seconds, initial_delay=settings.poll_seconds / 2)
    async def observe(body: Any, spec: Any, meta: Any, status: Any, patch: Any, logger: Any, **_: Any) -> None:
        started = time.perf_counter()
        phase = Phase(status.get("phase") or Phase.PENDING.value)
        if phase == Phase.SUCCEEDED and status.get("modelExport") in (EXPORT_RUNNING, EXPORT_FAILED):
            await _follow_export(kube(), body, _job(spec, meta), settings, status.get("modelExport"), patch)
            return
        if phase.is_terminal or phase == Phase.PENDING:
            return
        try:
            job = _job(spec, meta)
        except SpecError:
            return
        reports = await _poll_peers(settings, job)
        restarts = await _restarts(kube(), job)
        start = _parse_time(status.get("startTime"))
        observed = Observed(
            peers=job.peers,
            peer_states=[r.get("state") if r else None for r in reports],
            restarts=restarts,
            previous_restarts=int(status.get("restarts") or 0),
            suspended=job.run_policy.suspend,
            backoff_limit=job.run_policy.backoff_limit,
            elapsed_seconds=time.time() - start if start else None,
            active_deadline_seconds=job.run_policy.active_deadline_seconds,
            failure_message=next((f"peer {r['peer']}: {r.get('message', '')}" for r in reports if r and r.get("state") == "failed"), ""),
        )
        transition = next_phase(phase, observed)
        _write_progress(patch, job, reports, restarts)
        if transition.phase != phase:
            _write_status(patch, status, transition, meta.get("generation"))
            (kopf.warn if transition.phase in (Phase.FAILED, Phase.RESTARTING) else kopf.info)(
                body, reason=transition.reason, message=transition.message
            )
            if transition.phase == Phase.RESTARTING:
                metrics.OPERATOR_JOBS_RESTARTED_TOTAL.inc()
            if transition.phase == Phase.SUSPENDED:
                await _scale(kube(), job, 0)
            if transition.phase.is_terminal:
                patch.status["completionTime"] = _now()
                (metrics.OPERATOR_JOBS_SUCCEEDED_TOTAL if transition.phase == Phase.SUCCEEDED
                 else metrics.OPERATOR_JOBS_FAILED_TOTAL).inc()
                if transition.phase == Phase.SUCCEEDED and job.output is not None:
                    # The model lives in Redis 0: write it out before anything is scaled down.
                    await kube().create(build_export_job(job, body, settings))
                    patch.status["modelExport"] = EXPORT_RUNNING
                    kopf.info(body, reason="ExportingModel",
                              message=f"writing the model to pvc {job.output.claim_name}:{job.output.path}")
                elif job.run_policy.clean_pod_policy != "None":
                    await _scale(kube(), job, 0)
            _record(meta, transition.phase)
        metrics.OPERATOR_RECONCILE_SECONDS.labels(handler="observe").observe(time.perf_counter() - started)

    @kopf.daemon(*resource, registry=registry, cancellation_timeout=1.0)
    async def expire(body: Any, meta: Any, stopped: Any, logger: Any, **_: Any) -> None:
        """Delete a finished job exactly ttlSecondsAfterFinished after completion (not on a resync)."""
        while not stopped:
            ttl = (body.get("spec", {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
            finished = _parse_time(body.get("status", {}).get("completionTime"))
            exporting = body.get("status", {}).get("modelExport") == EXPORT_RUNNING
            if ttl is not None and finished is not None and not exporting:  # never delete the model's source
                remaining = finished + ttl - time.time()
                if remaining <= 0:
                    logger.info(f"ttlSecondsAfterFinished={ttl} reached: deleting the job")
                    await kube().delete(f"{API_GROUP}/{API_VERSION}", "P2PTrainingJob", meta["namespace"], meta["name"])
                    return
                await stopped.wait(min(remaining, 1.0))
            else:
                await stopped.wait(1.0)  # the daemon's body is live: re-read status every second

    @kopf.on.field(*resource, field="spec.runPolicy.suspend", registry=registry)
    async def suspend(body: Any, spec: Any, meta: Any, status: Any, patch: Any, new: Any, old: Any, **_: Any) -> None:
        phase = Phase(status.get("phase") or Phase.PENDING.value)
        if phase.is_terminal or old is None:  # creation is reconcile()'s job
            return
        job = _job(spec, meta)
        await _scale(kube(), job, 0 if new else job.peers)
        transition = (
            Transition(Phase.SUSPENDED, "Suspended", "runPolicy.suspend is true: peers and Redis scaled to zero")
            if new else Transition(Phase.CREATED, "Resumed", "runPolicy.suspend is false: peers scaled back up")
        )
        _write_status(patch, status, transition, meta.get("generation"))
        kopf.info(body, reason=transition.reason, message=transition.message)
        _record(meta, transition.phase)

    @kopf.on.field(*resource, field="spec.peers", registry=registry)
    def refuse_rescale(body: Any, status: Any, patch: Any, old: Any, new: Any, **_: Any) -> None:
        if old is None or old == new:
            return
        message = (
            f"spec.peers changed from {old} to {new} on a created job: the engine shards the data once per job, "
            "so the change is not applied; create a new job to use a different number of peers"
        )
        patch.status["message"] = message
        kopf.warn(body, reason="PeersChangeRejected", message=message)
        raise kopf.PermanentError(message)


def _write_progress(patch: Any, job: JobSpec, reports: list[dict[str, Any] | None], restarts: int) -> None:
    live = [r for r in reports if r]
    ready = sum(1 for r in live if r.get("state") in ("training", "succeeded"))
    patch.status["peersReady"] = ready
    patch.status["peersReadyText"] = f"{ready}/{job.peers}"
    patch.status["restarts"] = restarts
    if live:
        patch.status["round"] = min(int(r.get("round") or 0) for r in live)
        patch.status["rounds"] = max(int(r.get("rounds") or 0) for r in live)
        patch.status["epoch"] = round(min(float(r.get("epoch") or 0) for r in live), 3)
        losses = [float(r["loss"]) for r in live if r.get("loss") is not None]
        accuracies = [float(r["accuracy"]) for r in live if r.get("accuracy") is not None]
        if losses:
            patch.status["loss"] = round(sum(losses) / len(losses), 5)
        if accuracies:
            patch.status["accuracy"] = round(sum(accuracies) / len(accuracies), 5)


async def _poll_peers(settings: Settings, job: JobSpec) -> list[dict[str, Any] | None]:
    async def one(client: httpx.AsyncClient, index: int) -> dict[str, Any] | None:
        url = settings.peer_status_url.format(
            job=job.name, index=index, namespace=job.namespace, domain=settings.cluster_domain
        )
        try:
            response = await client.get(url, timeout=2)
            return response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    async with httpx.AsyncClient() as client:
        return list(await asyncio.gather(*(one(client, i) for i in range(job.peers))))


async def _restarts(kube: Kube, job: JobSpec) -> int:
    wanted = selector(job.name, "peer")
    query = ",".join(f"{k}={v}" for k, v in wanted.items())
    pods = await kube.list("v1", "Pod", job.namespace, query)
    total = 0
    for pod in pods:
        labels = pod.get("metadata", {}).get("labels", {})
        if all(labels.get(k) == v for k, v in wanted.items()):  # emulators may ignore labelSelector
            total += sum(int(c.get("restartCount", 0)) for c in pod.get("status", {}).get("containerStatuses", []))
    return total


async def _follow_export(kube: Kube, body: Any, job: JobSpec, settings: Settings, current: str, patch: Any) -> None:
    """Wait for the export Job; when it is done, record where the model is and clean up the pods."""
    names = ChildNames(job.name)
    export = await kube.get("batch/v1", "Job", job.namespace, names.export)
    if export is None:  # deleted by hand to retry, or lost: run it again
        await kube.create(build_export_job(job, body, settings))
        patch.status["modelExport"] = EXPORT_RUNNING
        return
    state = export.get("status", {})
    failed = next((c for c in state.get("conditions", []) if c.get("type") == "Failed" and c.get("status") == "True"), None)
    if int(state.get("succeeded") or 0) >= 1:
        assert job.output is not None
        patch.status["modelExport"] = "Succeeded"
        patch.status["model"] = f"pvc://{job.output.claim_name}/{job.output.path}"
        kopf.info(body, reason="ModelExported", message=f"model written to pvc {job.output.claim_name}:{job.output.path}")
        if job.run_policy.clean_pod_policy != "None":
            await _scale(kube, job, 0)
    elif failed is not None and current != EXPORT_FAILED:
        message = (f"exporting the model failed: {failed.get('message') or failed.get('reason')}; Redis is kept "
                   f"so no work is lost: fix the claim, then `kubectl delete job {names.export}` to retry")
        patch.status["modelExport"] = EXPORT_FAILED
        patch.status["message"] = message
        kopf.warn(body, reason="ModelExportFailed", message=message)


async def _scale(kube: Kube, job: JobSpec, replicas: int) -> None:
    names = ChildNames(job.name)
    for name in (names.peer, names.redis):
        obj = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "namespace": job.namespace}}
        await kube.patch(obj, {"spec": {"replicas": replicas}})
