"""kopf handlers: thin wiring from events on P2PTrainingJobs to the pure builders and lifecycle.

Every handler is a module-level function typed with kopf's own argument types, registered by
``build_registry`` (the timer's interval is a setting); what
they share (settings, the Kubernetes client, the HTTP client that polls peers, the jobs-by-phase
registry) lives in kopf's ``memo``, created once at startup and closed at cleanup.

create/resume build the children and create them (idempotently: replays and operator restarts create
nothing twice, and a finished job is never rebuilt); a timer polls the peers' ``/status`` and moves the
phase, suspending and resuming too (the only handler that scales a created job's pods, so no two handlers
act on one another's stale view); a daemon deletes finished jobs exactly when ``ttlSecondsAfterFinished``
runs out; a field handler refuses changes the engine cannot apply to a running job; an event handler
keeps the jobs-by-phase gauge equal to the jobs that exist. Handlers return None and write status
through ``patch.status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import httpx
import kopf

from p2ptrain.config import ChildNames
from p2ptrain.cost import job_cost
from p2ptrain.spec import API_GROUP, API_VERSION, PLURAL, JobSpec, SpecError, parse_spec
from p2ptrain.status import PeerState, StatusDict, parse_status
from p2ptrain_operator import metrics, ps
from p2ptrain_operator.builders import (
    build_children,
    build_export_job,
    knative_flags_needed,
    knative_warnings,
    selector,
)
from p2ptrain_operator.kube import ApiException, Connection, Kube
from p2ptrain_operator.lifecycle import Observed, Phase, Transition, conditions, next_phase, restart_cause
from p2ptrain_operator.settings import Settings

FINALIZER = f"{API_GROUP}/finalizer"
EXPORT_RUNNING, EXPORT_FAILED = "Running", "Failed"  # status.modelExport while not yet Succeeded
RESOURCE = (API_GROUP, API_VERSION, PLURAL)

class OperatorMemo(kopf.Memo):
    """What every handler shares. kopf gives each job a shallow copy, so the clients are the same objects."""

    settings: Settings
    connection: Connection | None  # None: in-cluster credentials
    kube: Kube
    http: httpx.AsyncClient
    phases: dict[tuple[str, str], str]  # (namespace, name) -> phase, of the jobs that exist


def new_memo(settings: Settings, connection: Connection | None) -> OperatorMemo:
    memo = OperatorMemo()
    memo.settings, memo.connection, memo.phases = settings, connection, {}
    return memo


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC).timestamp()


def _job(spec: kopf.Spec, meta: kopf.Meta) -> JobSpec:
    return parse_spec(dict(spec), name=meta["name"], namespace=meta.get("namespace") or "default")


def _phase(status: kopf.Status) -> Phase:
    return Phase(status.get("phase") or Phase.PENDING.value)


def _write_status(patch: kopf.Patch, status: kopf.Status, transition: Transition, generation: int | None) -> None:
    patch.status["phase"] = transition.phase.value
    patch.status["message"] = transition.message
    patch.status["conditions"] = conditions(transition, status.get("conditions") or [], _now(), generation)
    if generation is not None:
        patch.status["observedGeneration"] = generation


def configure(settings: kopf.OperatorSettings, memo: OperatorMemo, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = 20  # INFO: transitions become Kubernetes events
    settings.watching.server_timeout = 60
    # No watching of CRDs or namespaces: the chart installs the CRD before the operator, and the
    # watched namespace is given. This keeps RBAC to the jobs and their children (no cluster-wide
    # reads of CRDs or namespaces), and lets a namespaced Role suffice when one namespace is watched.
    settings.scanning.disabled = True
    memo.kube = Kube(memo.connection or Connection.in_cluster())
    memo.http = httpx.AsyncClient(timeout=2)


async def close(memo: OperatorMemo, **_: Any) -> None:
    await memo.http.aclose()
    memo.kube.close()


def login(memo: OperatorMemo, **kwargs: Any) -> kopf.ConnectionInfo | None:
    connection = memo.connection
    if connection is not None:
        return kopf.ConnectionInfo(server=connection.server, insecure=connection.insecure, token=connection.token(),
                                   ca_path=connection.ca_path)
    return kopf.login_with_service_account(**kwargs) or kopf.login_via_client(**kwargs)


def track_phase(type: str | None, body: kopf.Body, meta: kopf.Meta, memo: OperatorMemo, **_: Any) -> None:
    """The jobs-by-phase gauge counts the jobs that exist now: a deleted job leaves it."""
    key = (meta.get("namespace") or "default", meta["name"])
    if type == "DELETED":
        memo.phases.pop(key, None)
    else:
        memo.phases[key] = body.get("status", {}).get("phase") or Phase.PENDING.value
    for phase in Phase:
        metrics.JOBS.labels(phase=phase.value).set(sum(1 for v in memo.phases.values() if v == phase.value))


async def reconcile(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                    logger: kopf.Logger, memo: OperatorMemo, **_: Any) -> None:
    async with measured_handler("reconcile"):
        await _reconcile(body, spec, meta, status, patch, logger, memo)


@contextlib.asynccontextmanager
async def measured_handler(handler: str) -> AsyncIterator[None]:
    """Time every run of a handler (those that find nothing to do included) and count its errors.

    A spec that can never work (kopf.PermanentError) is the job's failure, reported in its status,
    not the operator's: only errors kopf will retry count in p2ptrain_operator_reconcile_errors_total.
    """
    started = time.perf_counter()
    try:
        yield
    except kopf.PermanentError:
        raise
    except Exception:
        metrics.RECONCILE_ERRORS_TOTAL.labels(handler=handler).inc()
        raise
    finally:
        metrics.RECONCILE_SECONDS.labels(handler=handler).observe(time.perf_counter() - started)


async def _reconcile(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                     logger: kopf.Logger, memo: OperatorMemo) -> None:
    phase = _phase(status)
    if phase.is_terminal:
        return  # a finished job is never rebuilt, whatever replays this handler
    try:
        job = _job(spec, meta)
        children = build_children(  # a SpecError here too: function.resources that inline peers cannot scale
            job, dict(body), memo.settings, redis_password=secrets.token_hex(24), signing_key=secrets.token_hex(32)
        )
    except SpecError as exc:
        transition = Transition(Phase.FAILED, "InvalidSpec", str(exc))
        _write_status(patch, status, transition, meta.get("generation"))
        metrics.JOBS_FAILED_TOTAL.inc()
        raise kopf.PermanentError(str(exc)) from exc
    missing = await memo.kube.unserved(children)
    if missing:  # create nothing until the cluster serves every kind of child, and say what is missing
        _wait_for_cluster(body, status, patch, meta, "KnativeServingMissing", _missing_apis_message(missing),
                          memo.settings)
    created = []
    for child in children:
        try:
            if await memo.kube.create(child):
                created.append(child)
        except ApiException as exc:
            if exc.status not in (400, 422):  # 400/422: invalid, or refused by an admission webhook
                raise
            _wait_for_cluster(body, status, patch, meta, *_refusal(job, child, exc), memo.settings)
    if job.run_policy.suspend:
        await _scale(memo.kube, job, 0)
    if created:
        logger.info(f"created {len(created)} children: {', '.join(c['metadata']['name'] for c in created)}")
        if created[0]["kind"] == "Secret":
            metrics.JOBS_CREATED_TOTAL.inc()
    if phase == Phase.PENDING:
        transition = next_phase(phase, Observed(peers=job.peers, suspended=job.run_policy.suspend))
        _write_status(patch, status, transition, meta.get("generation"))
        patch.status["startTime"] = status.get("startTime") or _now()
        patch.status["peersReady"] = 0
        patch.status["peersReadyText"] = f"0/{job.peers}"
        patch.status["rounds"] = 0
        patch.status["mode"] = job.function.mode  # serverless (Knative Service) or inline (none)
        kopf.info(body, reason=transition.reason, message=f"created {len(created)} children")
        flags = knative_flags_needed(job)
        if flags:
            message = (f"the gradient function needs Knative feature flag(s) {', '.join(flags)} set to enabled in "
                       "config-features (knative-serving namespace); without them Knative refuses its Service")
            patch.status["knativeFlagsNeeded"] = flags
            kopf.warn(body, reason="KnativeFlagsNeeded", message=message)
        for warning in knative_warnings(job):
            kopf.warn(body, reason="KnativeSettingAdjusted", message=warning)


def _wait_for_cluster(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, meta: kopf.Meta, reason: str,
                      message: str, settings: Settings) -> NoReturn:
    """The cluster cannot take the job's children yet (Knative missing, or refusing a child for a
    feature flag): say so in the status and one event, create nothing more, and have kopf retry, since
    the cluster's configuration may change (Knative installed, the flag turned on)."""
    _write_status(patch, status, Transition(Phase.PENDING, reason, message), meta.get("generation"))
    if status.get("message") != message:  # one event, not one per retry
        kopf.warn(body, reason=reason, message=message)
    raise kopf.TemporaryError(message, delay=max(1.0, settings.poll_seconds))


def _missing_apis_message(missing: list[str]) -> str:
    return (f"this cluster does not serve {', '.join(missing)}: install Knative Serving (the gradient function is "
            "a Knative Service), or set spec.function.mode: inline; nothing is created until it is served")


def _refusal(job: JobSpec, child: dict[str, Any], exc: ApiException) -> tuple[str, str]:
    """(reason, message) for a child the cluster refused, in the server's own words."""
    knative = child["apiVersion"].startswith("serving.knative.dev/")
    message = f"the cluster refused {child['kind']} {child['metadata']['name']}: {_api_message(exc)}"
    if knative and (flags := knative_flags_needed(job)):
        message += f" (this job needs Knative feature flag(s) {', '.join(flags)} enabled in config-features)"
    return ("KnativeRefused" if knative else "ChildRefused"), message


def _api_message(exc: ApiException) -> str:
    """The server's own words (its Status message), else the HTTP reason."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


async def observe(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                   logger: kopf.Logger, memo: OperatorMemo, **_: Any) -> None:
    async with measured_handler("observe"):
        await _observe(body, spec, meta, status, patch, logger, memo)


async def _observe(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch,
                   logger: kopf.Logger, memo: OperatorMemo) -> None:
    phase = _phase(status)
    exporting = phase == Phase.SUCCEEDED and status.get("modelExport") in (EXPORT_RUNNING, EXPORT_FAILED)
    if (phase.is_terminal and not exporting) or phase == Phase.PENDING:
        return
    try:
        job = _job(spec, meta)
    except SpecError as exc:
        # reconcile() failed the job at creation; a spec broken later (an edit) is reported, not polled.
        logger.warning(f"not observing the peers: the spec no longer parses: {exc}")
        return
    if exporting:
        await _follow_export(memo, body, job, str(status.get("modelExport")), patch)
        return
    reports = await _poll_peers(memo, job)
    restarts, last_restart = await _restarts(memo.kube, job)
    start = _parse_time(status.get("startTime"))
    states = [PeerState(r["state"]) if r else None for r in reports]
    failure = next((f"peer {r['peer']}: {r.get('message', '')}" for r in reports if r and r["state"] == PeerState.FAILED), "")
    aggregator = None
    if job.topology == "ps":  # the aggregator is one more part that must succeed, and may fail the job
        aggregator = await ps.poll_aggregator(memo.http, memo.settings, job)
        patch.status["aggregator"] = ps.aggregator_status(aggregator)
        states.append(PeerState(aggregator["state"]) if aggregator else None)
        failure = failure or ps.failure_message(aggregator)
    observed = Observed(
        peers=len(states),
        peer_states=states,
        restarts=restarts,
        previous_restarts=int(status.get("restarts") or 0),
        suspended=job.run_policy.suspend,
        backoff_limit=job.run_policy.backoff_limit,
        elapsed_seconds=time.time() - start if start else None,
        active_deadline_seconds=job.run_policy.active_deadline_seconds,
        failure_message=failure,
        last_restart=last_restart,
    )
    transition = next_phase(phase, observed)
    _write_progress(patch, job, reports, restarts, aggregator)
    if transition.phase != phase:
        _write_status(patch, status, transition, meta.get("generation"))
        (kopf.warn if transition.phase in (Phase.FAILED, Phase.RESTARTING) else kopf.info)(
            body, reason=transition.reason, message=transition.message
        )
        if transition.phase == Phase.RESTARTING:
            metrics.JOBS_RESTARTED_TOTAL.inc()
        if transition.phase == Phase.SUSPENDED:
            await _scale(memo.kube, job, 0)
        elif phase == Phase.SUSPENDED and not transition.phase.is_terminal:  # resumed
            await _scale(memo.kube, job, job.peers)
        if transition.phase.is_terminal:
            patch.status["completionTime"] = _now()
            (metrics.JOBS_SUCCEEDED_TOTAL if transition.phase == Phase.SUCCEEDED else metrics.JOBS_FAILED_TOTAL).inc()
            if transition.phase == Phase.SUCCEEDED and job.output is not None:
                # The model lives in Redis 0: write it out before anything is scaled down.
                await _start_export(memo, body, job, patch)
            elif job.run_policy.clean_pod_policy != "None":
                await _scale(memo.kube, job, 0)


async def expire(body: kopf.Body, meta: kopf.Meta, stopped: kopf.DaemonStopped, logger: kopf.Logger,
                  memo: OperatorMemo, **_: Any) -> None:
    """Delete a finished job exactly ttlSecondsAfterFinished after completion (not on a resync)."""
    while not stopped:
        ttl = (body.get("spec", {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        finished = _parse_time(body.get("status", {}).get("completionTime"))
        exporting = body.get("status", {}).get("modelExport") == EXPORT_RUNNING
        if ttl is not None and finished is not None and not exporting:  # never delete the model's source
            remaining = finished + ttl - time.time()
            if remaining <= 0:
                logger.info(f"ttlSecondsAfterFinished={ttl} reached: deleting the job")
                await memo.kube.delete_training_job(meta["namespace"], meta["name"])
                return
            await stopped.wait(min(remaining, 1.0))
        else:
            await stopped.wait(1.0)  # the daemon's body is live: re-read status every second


def refuse_rescale(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, old: Any, new: Any, **_: Any) -> None:
    if old is None or old == new:
        return
    message = (
        f"spec.peers changed from {old} to {new} on a created job: the engine shards the data once per job, "
        "so the change is not applied; create a new job to use a different number of peers"
    )
    patch.status["message"] = message
    kopf.warn(body, reason="PeersChangeRejected", message=message)
    raise kopf.PermanentError(message)


def _write_progress(patch: kopf.Patch, job: JobSpec, reports: list[StatusDict | None], restarts: int,
                    aggregator: StatusDict | None = None) -> None:
    live = [r for r in reports if r]
    ready = sum(1 for r in live if r["state"] in (PeerState.TRAINING, PeerState.SUCCEEDED))
    patch.status["peersReady"] = ready
    patch.status["peersReadyText"] = f"{ready}/{job.peers}"
    patch.status["restarts"] = restarts
    if live:
        patch.status["round"] = min(int(r.get("round") or 0) for r in live)
        patch.status["rounds"] = max(int(r.get("rounds") or 0) for r in live)
        patch.status["epoch"] = round(min(float(r.get("epoch") or 0) for r in live), 3)
        losses = [float(loss) for r in live if (loss := r.get("loss")) is not None]
        accuracies = [float(acc) for r in live if (acc := r.get("accuracy")) is not None]
        if losses:
            patch.status["loss"] = round(sum(losses) / len(losses), 5)
        if accuracies:
            patch.status["accuracy"] = round(sum(accuracies) / len(accuracies), 5)
    if len(live) == job.peers and (job.topology != "ps" or aggregator):
        # Only a complete poll is summed: a peer (or the aggregator) that did not answer would make the
        # totals dip. Topology ps: the aggregator's ledger is part of the job's.
        patch.status["cost"] = job_cost([*(r.get("cost") for r in live), aggregator.get("cost") if aggregator else None])


async def _poll_peers(memo: OperatorMemo, job: JobSpec) -> list[StatusDict | None]:
    """Each peer's ``/status`` (None where it does not answer, or answers what is not a peer status),
    through the one shared HTTP client; the status schema is ``p2ptrain.status``, shared with the peers."""
    settings = memo.settings

    async def one(index: int) -> StatusDict | None:
        url = settings.peer_status_url.format(
            job=job.name, index=index, namespace=job.namespace, domain=settings.cluster_domain
        )
        try:
            response = await memo.http.get(url)
            return parse_status(response.json()) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):  # StatusError is a ValueError
            return None

    return list(await asyncio.gather(*(one(i) for i in range(job.peers))))


async def _restarts(kube: Kube, job: JobSpec) -> tuple[int, str]:
    """Container restarts summed over the job's restarting pods, and why the latest one ended."""
    total, causes = 0, []
    for component in ps.RESTARTING_COMPONENTS[job.topology]:  # ps: the aggregator's restarts count too
        wanted = selector(job.name, component)
        pods = await kube.list_pods(job.namespace, ",".join(f"{k}={v}" for k, v in wanted.items()))
        for pod in pods:
            labels = pod.get("metadata", {}).get("labels") or {}
            if all(labels.get(k) == v for k, v in wanted.items()):  # emulators may ignore labelSelector
                statuses = (pod.get("status") or {}).get("containerStatuses") or []
                total += sum(int(c.get("restartCount", 0)) for c in statuses)
                if (cause := restart_cause(pod)) is not None:
                    causes.append(cause)
    return total, max(causes)[1] if causes else ""


async def _start_export(memo: OperatorMemo, body: kopf.Body, job: JobSpec, patch: kopf.Patch) -> None:
    """The one place the export Job is started: at success, and again when it was deleted to retry."""
    assert job.output is not None
    await memo.kube.create(build_export_job(job, dict(body), memo.settings))
    patch.status["modelExport"] = EXPORT_RUNNING
    kopf.info(body, reason="ExportingModel", message=f"writing the model to pvc {job.output.claim_name}:{job.output.path}")


async def _follow_export(memo: OperatorMemo, body: kopf.Body, job: JobSpec, current: str, patch: kopf.Patch) -> None:
    """Wait for the export Job; when it is done, record where the model is and clean up the pods."""
    names = ChildNames(job.name)
    export = await memo.kube.read_job(job.namespace, names.export)
    if export is None:  # deleted by hand to retry, or lost: run it again
        await _start_export(memo, body, job, patch)
        return
    state = export.get("status") or {}
    failed = next((c for c in state.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"), None)
    if int(state.get("succeeded") or 0) >= 1:
        assert job.output is not None
        patch.status["modelExport"] = "Succeeded"
        patch.status["model"] = f"pvc://{job.output.claim_name}/{job.output.path}"
        kopf.info(body, reason="ModelExported", message=f"model written to pvc {job.output.claim_name}:{job.output.path}")
        if job.run_policy.clean_pod_policy != "None":
            await _scale(memo.kube, job, 0)
    elif failed is not None and current != EXPORT_FAILED:
        message = (f"exporting the model failed: {failed.get('message') or failed.get('reason')}; Redis is kept "
                   f"so no work is lost: fix the claim, then `kubectl delete job {names.export}` to retry")
        patch.status["modelExport"] = EXPORT_FAILED
        patch.status["message"] = message
        kopf.warn(body, reason="ModelExportFailed", message=message)


async def _scale(kube: Kube, job: JobSpec, replicas: int) -> None:
    names = ChildNames(job.name)
    for name, count in [(names.peer, replicas), (names.redis, replicas), *ps.stateful_sets(job, replicas)]:
        await kube.scale_stateful_set(job.namespace, name, count)


def build_registry(settings: Settings) -> kopf.OperatorRegistry:
    """A registry with every handler; the memo given to ``kopf.operator`` must come from ``new_memo``."""
    registry = kopf.OperatorRegistry()
    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(close)
    kopf.on.login(registry=registry)(login)
    kopf.on.event(*RESOURCE, registry=registry)(track_phase)
    kopf.on.resume(*RESOURCE, registry=registry)(reconcile)
    kopf.on.create(*RESOURCE, registry=registry)(reconcile)
    kopf.timer(*RESOURCE, registry=registry, interval=settings.poll_seconds,
               initial_delay=settings.poll_seconds / 2)(observe)
    kopf.daemon(*RESOURCE, registry=registry, cancellation_timeout=1.0)(expire)
    kopf.on.field(*RESOURCE, field="spec.peers", registry=registry)(refuse_rescale)
    return registry
