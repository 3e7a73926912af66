"""Chaos runs: a 5-peer job run locally (real redis-server, peer and function processes) under faults.

Each drill is bounded in time and prints what it checked: the job finished, its final accuracy against
the clean run's, per-round sample counts exact (every micro-batch counted once: the peers' round logs
compare the function replies' samples with what their Redis accumulator summed), no committed round
lost (each peer's rounds strictly increase across restarts; rounds skipped by catching up are counted
as taken from the others), replicas identical at the end. Drills:

- clean: the baseline;
- kill peers: SIGKILL peer 1, and later peers 2 and 3 together; the runner restarts them like pods;
- function faults: 20 % of gradient-function calls refused (503), or timed out (504) after the function
  ran and summed its gradient, by a fault-injecting front (``tests/integration/chaos.py``);
- Redis crash: a peer's redis-server killed and restarted on its data (``redis.persistence: aof``);
- operator killed: the real kopf operator against kmock (an emulated API server; no cluster runs
  here) follows the live job through the peers' real statuses; it is stopped mid-job and started
  again, and must take the job to Succeeded without creating any child twice.

Writes the table to ``docs/chaos.md``. Usage: ``python bench/chaos.py [--rounds N] [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the drills' helpers live with the tests that run the cheap ones

from report import publish  # noqa: E402

from p2ptrain.local import LocalRun  # noqa: E402
from p2ptrain.spec import JobSpec, parse_manifest  # noqa: E402
from tests.integration.chaos import (  # noqa: E402
    FunctionFaults,
    crash_redis,
    drill,
    kill_peers,
    lowest_round,
    wait_for,
)

DRILL_TIMEOUT_SECONDS = 900


def job_spec(name: str, rounds: int, **overrides: Any) -> JobSpec:
    spec: dict[str, Any] = {
        "peers": 5, "functionsPerPeer": 2, "batchSize": 32, "rounds": rounds,
        "model": {"name": "mlp", "args": {"hidden": 32}}, "dataset": {"name": "digits"},
        "optimizer": {"learningRate": 0.1, "momentum": 0.9},
        "exchange": {"quorum": 4, "roundDeadlineSeconds": 20},
        "function": {"maxScale": 3, "idleSeconds": 60, "retries": 6},
        "evaluation": {"everyRounds": 10},
        "training": {"hashEveryRounds": 1, "resyncEveryRounds": 10},
        "runPolicy": {"backoffLimit": 5},
        **overrides,
    }
    manifest = {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": name}, "spec": spec}
    return parse_manifest(manifest)


async def kill_one_then_two(run: LocalRun) -> None:
    rounds = run.spec.rounds or 0
    await wait_for(lambda: lowest_round(run) >= rounds // 5, 300, "the first kill's round")
    await kill_peers(run, [1])
    await wait_for(lambda: lowest_round(run) >= rounds // 2, 600, "the second kill's round")
    await kill_peers(run, [2, 3])


async def redis_crash(run: LocalRun) -> None:
    await wait_for(lambda: lowest_round(run) >= (run.spec.rounds or 0) // 3, 300, "the crash's round")
    kept = await crash_redis(run, 2, down_seconds=2.0)
    print(f"peer 2's Redis crashed at round {lowest_round(run)} and came back holding checkpoint round "
          f"{None if kept is None else kept + 1} from its AOF", flush=True)


async def operator_drill(spec: JobSpec, workdir: Path) -> dict[str, Any]:
    """The local job, watched by the real operator (kmock API); the operator is stopped mid-job."""
    import kmock

    from tests.operator.harness import CHILDREN, RESOURCES, Cluster, FakePeers, job_manifest

    peers = FakePeers()  # answers the operator's status polls with the real peers' statuses (relayed)
    children = [(r, n.replace("digits", spec.name)) for r, n in CHILDREN]
    checks: dict[str, Any] = {}
    try:
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            for key, info in RESOURCES.items():
                k8s.resources[key] = kmock.ResourceInfo(**info)
            k8s.objects["v1/namespaces", None, "default"] = {"apiVersion": "v1", "kind": "Namespace",
                                                            "metadata": {"name": "default"}}
            cluster = Cluster(k8s, str(server.url).rstrip("/"), peers)
            manifest = job_manifest(spec.name, **{k: v for k, v in spec_manifest(spec).items() if k != "peers"})
            manifest["spec"]["peers"] = spec.peers
            await cluster.apply(manifest)
            await asyncio.to_thread(cluster.start_operator)
            phases: list[str] = []

            async def chaos(run: LocalRun) -> None:
                async def relay() -> None:
                    while True:
                        for p in run.peers:
                            if p.status is not None:
                                peers.reports[(spec.name, p.index)] = dict(p.status)
                        phase = (cluster.job(spec.name) or {}).get("status", {}).get("phase")
                        if phase and (not phases or phases[-1] != phase):
                            phases.append(phase)
                        await asyncio.sleep(0.2)

                relaying = asyncio.ensure_future(relay())
                run_task_done = asyncio.Event()
                checks["relay"] = (relaying, run_task_done)
                await wait_for(lambda: lowest_round(run) >= (run.spec.rounds or 0) // 3, 300, "a third of the rounds")
                await wait_for(lambda: "Running" in phases, 60, "the operator to see the job running")
                await asyncio.to_thread(cluster.stop_operator)
                checks["operator_stopped_at_round"] = lowest_round(run)
                await wait_for(lambda: lowest_round(run) >= (run.spec.rounds or 0) * 2 // 3, 600, "two thirds")
                await asyncio.to_thread(cluster.start_operator)

            result = await drill(spec, workdir, chaos=chaos, timeout=DRILL_TIMEOUT_SECONDS)
            relaying, _ = checks.pop("relay")
            with contextlib.suppress(TimeoutError):  # a job that never succeeds is reported below
                await wait_for(lambda: bool(phases) and phases[-1] == "Succeeded", 60, "the job to succeed")
            relaying.cancel()
            status = (cluster.job(spec.name) or {}).get("status", {})
            result["operator"] = {
                "phases": phases, "final_round": status.get("round"), **checks,
                # kmock keeps every version of an object: a child deleted and created again would show a
                # version with a deletionTimestamp; the restarted operator's creates must have met 409s
                "children_never_recreated": all(
                    not any(v.get("metadata", {}).get("deletionTimestamp") for v in cluster.versions(r, n))
                    and cluster.child(r, n) is not None
                    for r, n in children
                ),
                "create_attempts_per_child": sorted({cluster.creates(r, n) for r, n in children}),
            }
            result["finished"] = result["finished"] and phases[-1:] == ["Succeeded"]
            while cluster.operators:
                await asyncio.to_thread(cluster.stop_operator)
            return result
    finally:
        peers.close()


def spec_manifest(spec: JobSpec) -> dict[str, Any]:
    """The job's spec as the manifest wrote it (what the operator is given)."""
    return {
        "functionsPerPeer": spec.functions_per_peer, "batchSize": spec.batch_size, "rounds": spec.rounds,
        "exchange": {"quorum": spec.quorum, "roundDeadlineSeconds": spec.exchange.round_deadline_seconds},
        "training": {"resyncEveryRounds": spec.training.resync_every_rounds},
    }


async def main_async(rounds: int, only: list[str]) -> list[tuple[str, dict[str, Any]]]:
    drills: dict[str, Any] = {
        "clean": lambda d: drill(job_spec("chaos-clean", rounds), d, timeout=DRILL_TIMEOUT_SECONDS),
        "kill 1 then 2 of 5 peers": lambda d: drill(job_spec("chaos-kill", rounds), d, chaos=kill_one_then_two,
                                                   timeout=DRILL_TIMEOUT_SECONDS),
        "20 % function calls fail or time out": lambda d: drill(
            job_spec("chaos-faults", rounds), d, faults=FunctionFaults(fail_rate=0.2, seed=1),
            timeout=DRILL_TIMEOUT_SECONDS),
        "peer Redis killed, restarted (aof)": lambda d: drill(
            job_spec("chaos-redis", rounds, redis={"persistence": "aof"}), d, chaos=redis_crash,
            timeout=DRILL_TIMEOUT_SECONDS),
        "operator killed mid-job (kmock)": lambda d: operator_drill(job_spec("chaos-operator", rounds), d),
    }
    results = []
    base = Path(tempfile.mkdtemp(prefix="p2ptrain-chaos-"))  # the drills' logs, kept for a look afterwards
    print(f"logs: {base}", flush=True)
    for name, run in drills.items():
        if only and not any(o in name for o in only):
            continue
        started = time.monotonic()
        try:
            result = await run(base / name.split()[0])
        except Exception as exc:  # a drill that breaks is a result too: report it, run the others
            result = {"finished": False, "error": f"{type(exc).__name__}: {exc}"[:300],
                      "wall_seconds": round(time.monotonic() - started, 1)}
        result.pop("summary", None)
        print(f"{name}: {result}", flush=True)
        results.append((name, result))
    return results


def table(results: list[tuple[str, dict[str, Any]]], rounds: int) -> list[str]:
    clean = dict(results).get("clean", {}).get("accuracy")
    lines = [
        "## Chaos runs",
        "",
        f"`python bench/chaos.py --rounds {rounds}`: 5 peers (digits, MLP), 2 micro-batches per peer and round, "
        "quorum 4 of 5, `resyncEveryRounds: 10`, real redis-server, peer and function processes on one machine. "
        "Sample counts exact: in every round of every peer, every micro-batch the function replies counted is in "
        "the peer's Redis sum and the sum never exceeds one minibatch (nothing summed twice). Short rounds: "
        "peer-rounds that summed less than a minibatch (calls still failing at the round deadline); late: "
        "peer-rounds whose sum holds micro-batches whose replies came after the deadline. "
        "Rounds lost: a committed round missing from a peer's log (and not caught up) or run again.",
        "",
        "| drill | finished | accuracy (clean) | sample counts exact | committed rounds lost | replicas identical at end "
        "| short / late rounds | resyncs | peer restarts | injected | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results:
        if "error" in r:
            lines.append(f"| {name} | no: {r['error']} | | | | | | | | | {r['wall_seconds']} |")
            continue
        accuracy = f"{r['accuracy']:.3f}" + (f" ({clean:.3f})" if clean is not None else "")
        lost = len(r["committed_rounds_lost"]) + len(r["rounds_redone_wrongly"])
        injected = ", ".join(f"{k} {v}" for k, v in r.get("injected", {}).items()) or "-"
        if "operator" in r:
            op = r["operator"]
            injected = (f"operator stopped at round {op.get('operator_stopped_at_round')}; phases "
                        f"{' → '.join(op['phases'])}; children never re-created: {op['children_never_recreated']} "
                        f"(create attempts per child: {op['create_attempts_per_child']})")
        lines.append(
            f"| {name} | {'yes' if r['finished'] else 'NO'} | {accuracy} | {'yes' if r['sample_counts_exact'] else 'NO'} "
            f"| {lost} | {'yes' if r['replicas_identical_at_end'] else 'NO'} | {r['short_rounds']} / {r['late_replies_rounds']} | {r['resyncs']} "
            f"| {r['peer_restarts']} "
            f"| {injected} | {r['wall_seconds']} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--only", nargs="*", default=[], help="run the drills whose name contains one of these")
    parser.add_argument("--output", default=str(ROOT / "docs/chaos.md"))
    args = parser.parse_args()
    results = asyncio.run(main_async(args.rounds, args.only))
    publish(table(results, args.rounds), args.output)


if __name__ == "__main__":
    main()
