"""Resident memory of the operator and of its uninstall hook, each measured in a fresh process, N times.

The chart's requests and limits (``operator.resources`` in charts/p2ptrain/values.yaml, the cleanup
Job in templates/cleanup-hook.yaml) are sized from these figures. Each is read from ``/proc``
(VmRSS: resident now; VmHWM: the process's peak):

- operator started: ``p2ptrain operator --help`` dispatched as the console script does, up to the
  operator's own parser: every module the operator runs with is imported, nothing is connected;
- cleanup started: ``p2ptrain operator cleanup --help``, the same way;
- operator reconciling: the operator's kopf loop (``main.operate``) against kmock, an emulated API
  server (no cluster runs here), with ``--jobs`` jobs applied; read once every job is Created and
  its peers (fake ``/status`` servers) have been polled three times over;
- cleanup run: ``run_cleanup`` against kmock deleting ``--jobs`` jobs that carry the operator's
  finalizer with no operator running, so it also releases them after its timeout.

Usage: ``python bench/operator_memory.py [--runs 5] [--jobs 20] [--tree DIR]``. ``--tree`` measures
another copy of the project (its ``p2ptrain`` and ``operator/`` first on the measured processes'
path), e.g. ``git archive HEAD~1 | tar -x -C DIR``, to compare before and after a change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the emulated cluster is the operator tests' harness

STATUS = """
def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}
"""
STARTED = STATUS + """
import json, sys
from p2ptrain.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(status()))
"""
# What `p2ptrain operator` runs after its parser, with a Connection to the emulated API server in
# place of the in-cluster one.
RECONCILING = """
import asyncio, sys
from p2ptrain import cli  # the console script's module, as `p2ptrain operator` loads it
from p2ptrain_operator.kube import Connection
from p2ptrain_operator.main import operate
from p2ptrain_operator.settings import Settings
asyncio.run(operate(Settings.from_env(), Connection(server=sys.argv[1], insecure=True), liveness=False))
"""
CLEANUP = STATUS + """
import json, sys
from p2ptrain import cli
from p2ptrain_operator.kube import Connection
from p2ptrain_operator.main import run_cleanup
code = run_cleanup(Connection(server=sys.argv[1], insecure=True), "", timeout=1.0, poll=0.1)
print(json.dumps({**status(), "exit": code}))
"""


def _environment(tree: Path, **extra: str) -> dict[str, str]:
    path = [str(tree), str(tree / "operator"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **extra}


def _child(tree: Path, code: str, *args: str) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=_environment(tree),
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"the measured process failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _tail(log: IO[str]) -> str:
    log.seek(0)
    return "the operator's log ends with:\n" + log.read()[-3000:]


def _proc_status(pid: int) -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


async def _with_cluster(tree: Path, jobs: int, what: str) -> dict[str, int]:
    import kmock

    from tests.operator import harness
    from tests.operator.harness import FINALIZER, Cluster, FakePeers, eventually, job_manifest, phase

    peers = FakePeers()
    with contextlib.ExitStack() as stack:
        stack.callback(peers.close)
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            for key, info in harness.RESOURCES.items():
                k8s.resources[key] = kmock.ResourceInfo(**info)
            k8s.objects["v1/namespaces", None, "default"] = {"apiVersion": "v1", "kind": "Namespace",
                                                            "metadata": {"name": "default"}}
            cluster = Cluster(k8s, str(server.url).rstrip("/"), peers)
            names = [f"job-{i}" for i in range(jobs)]
            for name in names:
                manifest = job_manifest(name)
                if what == "cleanup":
                    manifest["metadata"]["finalizers"] = [FINALIZER]
                await cluster.apply(manifest)
            if what == "cleanup":
                return await asyncio.to_thread(_child, tree, CLEANUP, cluster.url)
            env = _environment(tree, P2PTRAIN_OPERATOR_POLL_SECONDS="0.3",
                               P2PTRAIN_OPERATOR_PEER_STATUS_URL=peers.url_template,
                               P2PTRAIN_OPERATOR_AGGREGATOR_STATUS_URL=peers.aggregator_url_template)
            with tempfile.TemporaryFile("w+") as log:
                process = await asyncio.create_subprocess_exec(sys.executable, "-c", RECONCILING, cluster.url,
                                                               cwd=tree, env=env, stderr=log)
                try:
                    await eventually(lambda: all(phase(cluster, n) == "Created" for n in names), timeout=120,
                                     describe=lambda: _tail(log))
                    polls = peers.polls
                    await eventually(lambda: peers.polls >= polls + 3 * 2 * jobs, timeout=120,  # 2 peers a job
                                     describe=lambda: _tail(log))
                    return _proc_status(process.pid)
                finally:
                    peers.close()  # first: an operator stopped mid-poll would break the fake peers' pipe
                    process.terminate()
                    await process.wait()


def _summary(samples: list[dict[str, int]]) -> str:
    parts = []
    for key in ("VmRSS", "VmHWM"):
        mib = sorted(s[key] / 1024 for s in samples)
        parts.append(f"{key} median {statistics.median(mib):6.1f} MiB (min {mib[0]:.1f}, max {mib[-1]:.1f})")
    return ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=20, help="jobs in the emulated cluster (default 20)")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the copy of the project to measure")
    args = parser.parse_args()
    tree = args.tree.resolve()
    probes: dict[str, Any] = {
        "operator started": lambda: _child(tree, STARTED, "operator", "--help"),
        "cleanup started": lambda: _child(tree, STARTED, "operator", "cleanup", "--help"),
        f"operator reconciling {args.jobs} jobs": lambda: asyncio.run(_with_cluster(tree, args.jobs, "operator")),
        f"cleanup of {args.jobs} jobs": lambda: asyncio.run(_with_cluster(tree, args.jobs, "cleanup")),
    }
    print(f"{tree}: {args.runs} runs each, {sys.executable}")
    for name, probe in probes.items():
        samples = [probe() for _ in range(args.runs)]
        print(f"{name:32} {_summary(samples)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
