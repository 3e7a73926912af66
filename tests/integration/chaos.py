"""Chaos drills on a local run with real processes, shared by ``tests/integration/test_chaos.py`` and
``bench/chaos.py``: a fault-injecting front for the gradient function, peer and Redis kills, and the
checks every drill makes (the job finishes, per-round sample counts are exact, no committed round is
lost, replicas end identical).

The faults live here, outside production code: ``faulty_functions`` subclasses the local runner's
function service (the stand-in for the Knative Service) and is swapped in for one run only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2ptrain import local
from p2ptrain.autoscale import LocalFunctionService
from p2ptrain.data import load_dataset, shard_indices
from p2ptrain.local import LocalRun, RunOptions
from p2ptrain.spec import JobSpec
from p2ptrain.store import Keys, checkpoint_round


@dataclass
class FunctionFaults:
    """What the front does to gradient requests (``ce-peer`` tells whose micro-batch a request is)."""

    # Half of the failing calls are refused (503) before the function runs; the other half time out
    # after the function ran (its gradient is in the peer's Redis): the peer gets 504, as from Knative's
    # queue-proxy at its timeout, after ``reply_lost_seconds`` (set it past function.timeoutSeconds for
    # the peer's own timeout to fire first).
    fail_rate: float = 0.0
    reply_lost_seconds: float = 0.0
    delay_seconds: dict[int, float] = field(default_factory=dict)  # per peer: its requests are slow
    seed: int = 0
    injected: Counter[str] = field(default_factory=Counter)


def faulty_functions(faults: FunctionFaults) -> type[LocalFunctionService]:
    rng = random.Random(faults.seed)

    class FaultyFunctions(LocalFunctionService):
        async def forward(
            self, method: str, path: str, headers: dict[str, str], body: bytes
        ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            peer = headers.get("ce-peer", "")
            delay = faults.delay_seconds.get(int(peer), 0.0) if peer.isdigit() else 0.0
            if delay:
                faults.injected["delayed"] += 1
                await asyncio.sleep(delay)  # the injected slowness itself
            roll = rng.random()
            if roll < faults.fail_rate / 2:
                faults.injected["refused"] += 1
                return 503, [(b"content-type", b"text/plain")], b"injected failure"
            answer = await super().forward(method, path, headers, body)
            if roll < faults.fail_rate:
                # the peer retries a micro-batch whose gradient is already summed: it must not count twice
                faults.injected["timed-out"] += 1
                await asyncio.sleep(faults.reply_lost_seconds)
                return 504, [(b"content-type", b"text/plain")], b"injected timeout"
            return answer

    return FaultyFunctions


@contextlib.contextmanager
def functions_with(faults: FunctionFaults | None) -> Iterator[None]:
    """Run the local runner's function front with ``faults`` (nothing changes for None)."""
    if faults is None:
        yield
        return
    original = local.LocalFunctionService
    local.LocalFunctionService = faulty_functions(faults)  # type: ignore[misc]
    try:
        yield
    finally:
        local.LocalFunctionService = original  # type: ignore[misc]


# --- driving a run ----------------------------------------------------------------------------------
async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def lowest_round(run: LocalRun) -> int:
    """The fewest rounds any peer has finished, from the statuses the runner polls."""
    return min((p.status["round"] if p.status else 0) for p in run.peers) if run.peers else 0


@contextlib.asynccontextmanager
async def running(spec: JobSpec, workdir: Path, faults: FunctionFaults | None = None) -> AsyncIterator[
    tuple[LocalRun, asyncio.Task[dict[str, Any]]]
]:
    """A local run in the background (its logs kept in ``workdir``); stopped on the way out."""
    workdir.mkdir(parents=True, exist_ok=True)
    options = RunOptions(output=workdir / "model.safetensors", workdir=workdir, quiet=True, keep_logs=True)
    with functions_with(faults):
        run = LocalRun(spec, options, out=open(workdir / "runner.txt", "w", encoding="utf-8"))  # noqa: SIM115
        task = asyncio.ensure_future(run.run())
        try:
            yield run, task
        finally:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
            run.out.close()


async def kill_peers(run: LocalRun, peers: list[int]) -> None:
    """SIGKILL peer processes (as the OOM killer would); the runner restarts them like pods."""
    for index in peers:
        run.peers[index].process.kill()
    await wait_for(lambda: all(run.peers[i].process.poll() is None for i in peers), 60, f"peers {peers} to restart")


async def crash_redis(run: LocalRun, peer: int, down_seconds: float) -> int | None:
    """Kill a peer's redis-server and start it again on the same port and data directory; returns the
    round of the peer's checkpoint the restarted server holds (None: it came back empty)."""
    server = run.redis_servers[peer]
    await asyncio.to_thread(server.crash)
    await asyncio.sleep(down_seconds)  # the outage itself
    await asyncio.to_thread(server.start)
    client = server.client()
    try:
        return await asyncio.to_thread(checkpoint_round, client, Keys(run.spec.name, peer))
    finally:
        client.close()


# --- what every drill checks ------------------------------------------------------------------------
_ROUND_DONE = re.compile(r"round done .*?\bround=(\d+) .*?\bsamples=(\d+)(?: accumulated_samples=(\S+))?")


@dataclass(frozen=True)
class RoundLine:
    round: int  # 1-based
    samples: int  # from the function replies
    accumulated: float | None  # summed in the peer's Redis


def round_lines(log_path: Path) -> list[RoundLine]:
    lines = []
    for match in _ROUND_DONE.finditer(log_path.read_text(encoding="utf-8", errors="replace")):
        accumulated = None if match[3] is None else float(match[3])
        lines.append(RoundLine(int(match[1]), int(match[2]), accumulated))
    return lines


def expected_samples(spec: JobSpec) -> int:
    """Samples in one peer's minibatch (every peer's shard holds at least one batch)."""
    shard = shard_indices(len(load_dataset(spec.dataset).y_train), spec.peers, 0, spec.dataset.split_seed)
    return min(spec.batch_size, len(shard))


def check_run(spec: JobSpec, run: LocalRun, summary: dict[str, Any]) -> dict[str, Any]:
    """The drill's verdict from the summary and the peers' own round logs (one line per round run)."""
    rounds = summary["rounds"]
    batch = expected_samples(spec)
    per_peer = {p.index: round_lines(p.log_path) for p in run.peers}
    # Exact: every micro-batch whose reply the peer counted is in its Redis sum, and nothing is summed
    # twice (the sum never exceeds one minibatch). Late: the sum holds micro-batches whose replies came
    # after the peer stopped waiting at the round deadline (their gradients are in the round's average;
    # only the loss misses them). Short: fewer samples than a minibatch summed (calls still failing at
    # the deadline, a cold start under load, say). Late and short are reported, not errors.
    wrong_counts = [
        (peer, line.round, line.samples, line.accumulated)
        for peer, lines in per_peer.items() for line in lines
        if not line.samples <= (line.accumulated or 0.0) <= batch
    ]
    short = [(p, line.round) for p, lines in per_peer.items() for line in lines if (line.accumulated or 0) < batch]
    late = [(p, line.round) for p, lines in per_peer.items() for line in lines if (line.accumulated or 0) > line.samples]
    lost: list[tuple[int, int]] = []
    rerun: list[tuple[int, int]] = []
    statuses = {p.index: p.status for p in run.peers if p.status is not None}
    for peer, lines in per_peer.items():
        caught = statuses[peer].get("caughtUp", {}) if peer in statuses else {}
        done = {line.round for line in lines}
        skipped = set(range(caught["from"] + 1, caught["to"] + 1)) if caught else set()
        lost += [(peer, r) for r in range(1, rounds + 1) if r not in done and r not in skipped]
        # A round is logged after its checkpoint is written: a restarted peer (or one whose Redis came
        # back) goes on after its last logged round, so the rounds in its log strictly increase.
        rerun += [(peer, after.round) for before, after in itertools.pairwise(lines)
                  if after.round <= before.round]
    return {
        "finished": all(p["rounds"] == rounds for p in summary["per_peer"]) and rounds == spec.rounds,
        "accuracy": summary["test_accuracy"],
        "rounds_logged": sum(len(v) for v in per_peer.values()),
        "sample_counts_exact": not wrong_counts,
        "wrong_counts": wrong_counts[:10],
        "short_rounds": len(short),
        "late_replies_rounds": len(late),
        "committed_rounds_lost": sorted(set(lost))[:10],
        "rounds_redone_wrongly": sorted(set(rerun))[:10],
        "replicas_identical_at_end": summary["replicas"].get("identical_at_end", summary["replicas"]["identical"]),
        "resyncs": sum(status.get("resyncs", 0) for status in statuses.values()),
        "peer_restarts": summary["peer_restarts"],
    }


async def drill(spec: JobSpec, workdir: Path, chaos: Callable[[LocalRun], Awaitable[None]] | None = None,
                faults: FunctionFaults | None = None, timeout: float = 600) -> dict[str, Any]:
    """Run ``spec`` locally while ``chaos`` acts on it; the checks of ``check_run`` plus what was injected."""
    started = time.monotonic()
    async with running(spec, workdir, faults) as (run, task):
        if chaos is not None:
            await chaos(run)
        summary = await asyncio.wait_for(task, timeout)
        result = check_run(spec, run, summary)
    result["summary"] = summary
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    result["injected"] = dict(faults.injected) if faults else {}
    return result
