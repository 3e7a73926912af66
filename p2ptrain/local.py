"""The local runner: ``p2ptrain run JOB.yaml`` runs a cluster's job on one machine.

It reads the same manifest ``kubectl apply`` takes, starts one ``redis-server`` per peer on free
loopback ports, a local stand-in for the Knative gradient Service (instances scale from and to zero),
and one process per peer; shows progress; writes the trained model and a JSON summary; and stops every
process it started on success, failure or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from p2ptrain import asgi, native, scrape_targets
from p2ptrain.autoscale import LocalFunctionService, ScaleStats, child_env, terminate
from p2ptrain.checkpoint import CheckpointError
from p2ptrain.config import CONFIG_ENV, REDIS_PASSWORD_ENV, SIGNING_KEY_ENV, RedisAddress, RuntimeConfig
from p2ptrain.cost import Prices, job_cost
from p2ptrain.metrics import ROUND_PHASES
from p2ptrain.poster import Poster, PostError
from p2ptrain.ps.local import (
    LOG_NAME,
    PeerProcess,
    aggregator_addresses,
    aggregator_command,
    aggregator_summary,
    write_model,
)
from p2ptrain.redis_server import RedisServer, free_ports
from p2ptrain.spec import JobSpec
from p2ptrain.status import PeerState, ReplicaCheck, StatusError, parse_status
from p2ptrain.summary import (
    ProgressDisplay,
    checked_replicas,
    format_summary,
    log_tail,
    starting_line,
    sum_counts,
)

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.5
# How long peers and function instances get to exit after SIGTERM before SIGKILL: on an interrupt
# the user is waiting, and a peer's state is already checkpointed in Redis each round.
STOP_GRACE_SECONDS = 5.0
INTERRUPT_GRACE_SECONDS = 1.5


class RunError(RuntimeError):
    """The local run could not finish; the message says what failed and where its logs are; ``exit_code``
    is 3 when training diverged (``spec.training.onDivergence: fail``), 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Exit codes of ``p2ptrain run`` (documented in the CLI's epilog).
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass(frozen=True)
class RunOptions:
    output: Path | None = None
    summary: Path | None = None
    workdir: Path | None = None
    quiet: bool = False
    keep_logs: bool = False
    prices: Prices | None = None  # from --prices: the summary's cost block is also priced
    # from --signing-key-file (a fresh random key otherwise); kept out of repr so it is never logged
    signing_key: str | None = field(default=None, repr=False)


class LocalRun:
    def __init__(self, spec: JobSpec, options: RunOptions, out: TextIO = sys.stderr) -> None:
        self.spec = spec
        self.options = options
        self.out = out
        self.redis_servers: list[RedisServer] = []
        self.peers: list[PeerProcess] = []
        self.functions: LocalFunctionService | None = None
        self.workdir = options.workdir or Path(tempfile.mkdtemp(prefix=f"p2ptrain-{spec.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = secrets.token_hex(24)
        self.signing_key = options.signing_key or secrets.token_hex(32)
        self.replicas = ReplicaCheck(spec.peers + (spec.topology == "ps"))  # ps: the aggregator's hash too
        self.display = ProgressDisplay(out, quiet=options.quiet, inline=spec.function.inline)
        self._stop_servers: asyncio.Event | None = None
        self._function_server: asyncio.Task[None] | None = None
        self.restarts = {"peer": 0, "aggregator": 0}  # by role; the aggregator's: topology ps
        self.aggregator: PeerProcess | None = None  # topology ps; its Redis is the last of redis_servers
        self.processes: list[PeerProcess] = []  # the peers and the aggregator
        self._targets: scrape_targets.TargetsFile | None = None
        self._stopped = False

    # --- entry ----------------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        """Run the job to the end and return the summary; always stops every process it started."""
        started = time.monotonic()
        self._stop_servers = asyncio.Event()
        try:
            config = await self._start()
            await self._train()
            summary = await asyncio.to_thread(self._finish, config, time.monotonic() - started)
            return summary
        except asyncio.CancelledError:
            await self.stop(grace=INTERRUPT_GRACE_SECONDS)
            raise
        finally:
            await self.stop()

    async def _start(self) -> RuntimeConfig:
        spec = self.spec
        module = None
        if spec.redis.accumulator != "lua":
            module = await asyncio.to_thread(native.module_path)
            if module is None and spec.redis.accumulator == "module":
                raise RunError("redis.accumulator=module but the p2ptrain Redis module could not be built (is gcc installed?)")
        self.display.say(starting_line(spec, module is not None))
        for _ in range(spec.peers + (spec.topology == "ps")):  # ps: the last one is the aggregator's
            server = RedisServer(password=self.password, module=module, persistence=spec.redis.persistence)
            self.redis_servers.append(server)
            await _finish_even_if_cancelled(asyncio.to_thread(server.start))

        secrets_env = {REDIS_PASSWORD_ENV: self.password, SIGNING_KEY_ENV: self.signing_key}
        function_port, aggregator_port, *peer_ports = free_ports(spec.peers + 2)  # distinct: one job's servers
        config = RuntimeConfig(
            spec=spec,
            peer_urls=tuple(f"http://127.0.0.1:{p}" for p in peer_ports),
            redis=tuple(RedisAddress(s.host, s.port) for s in self.redis_servers[: spec.peers]),
            function_url=f"http://127.0.0.1:{function_port}/",
            **aggregator_addresses(spec, self.redis_servers, aggregator_port),
        )
        config_path = self.workdir / "job.json"
        config_path.write_text(config.to_json(), encoding="utf-8")

        env = child_env({**secrets_env, CONFIG_ENV: str(config_path)})
        if not spec.function.inline:  # inline peers compute their own gradients: no instances, no activator
            await self._start_functions(env, function_port)

        peer_command = [sys.executable, "-m", "p2ptrain", "--log-level", "INFO", "peer", "--config", str(config_path)]
        if spec.topology == "ps":
            command = aggregator_command(config_path, aggregator_port)
            self.aggregator = PeerProcess.start(spec.peers, aggregator_port, command, self.workdir / LOG_NAME, env, "aggregator")
        for index, port in enumerate(peer_ports):
            command = [*peer_command, "--index", str(index), "--port", str(port), "--listen", "127.0.0.1"]
            self.peers.append(PeerProcess.start(index, port, command, self.workdir / f"peer-{index}.log", env))
        self.processes = self.peers + ([self.aggregator] if self.aggregator else [])
        self._targets = scrape_targets.for_local_run(self.workdir, spec.name, spec.namespace, peer_ports, self.functions)
        self._targets.start()
        return config

    async def _start_functions(self, env: dict[str, str], port: int) -> None:
        """The local stand-in for the Knative Service: instances from zero, behind an activator on ``port``."""
        spec = self.spec
        self.functions = LocalFunctionService(
            spec.function, [sys.executable, "-m", "p2ptrain", "function"], env, self.workdir,
            {"job": spec.name, "namespace": spec.namespace},
        )
        await self.functions.start()
        assert self._stop_servers is not None
        self._function_server = asyncio.create_task(
            # no error log: the runner's own output is the progress display
            asgi.serve(self.functions.app, [f"127.0.0.1:{port}"], self._stop_servers, graceful_timeout=1)
        )

    def _restart_or_fail(self, peer: PeerProcess, code: int) -> None:
        """A peer process ended before the job did: restart it like a pod, or fail the run.

        As Kubeflow's ``restartPolicy: ExitCode``: a peer killed by a signal (OOM killer, ``kill -9``) is
        restarted — it resumes from its checkpoint and catches up with the others — up to
        ``runPolicy.backoffLimit`` restarts in all; an exit code is the peer's own verdict and final.
        """
        limit = self.spec.run_policy.backoff_limit
        restarts = sum(self.restarts.values())  # the aggregator (topology ps) resumes from its Redis too
        if code < 0 and restarts < limit:
            self.restarts[peer.role] += 1
            self.display.say(
                f"{peer.name} was killed ({signal.Signals(-code).name}); restarting it "
                f"({restarts + 1} of backoffLimit={limit} restarts)"
            )
            peer.restart()
            return
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        spent = f" after {restarts} restarts (backoffLimit={limit})" if code < 0 else ""
        raise RunError(
            f"{peer.name} {how} before the job finished{spent}:\n"
            + log_tail(peer.log_path) + f"\n(full log: {peer.log_path})"
        )

    async def _train(self) -> None:
        # p2ptrain.poster, not httpx: four GETs every half second cost this process 17 % of its CPU with httpx.
        async with Poster(max_connections=len(self.processes) + 1, timeout_seconds=2) as http:
            while True:
                for peer in self.processes:
                    code = peer.process.poll()
                    if code is not None:
                        self._restart_or_fail(peer, code)
                        continue
                    with contextlib.suppress(PostError, ValueError, StatusError):
                        response = await http.get(f"http://127.0.0.1:{peer.port}/status")
                        if response.status == 200:
                            peer.status = parse_status(json.loads(response.content))
                            self.replicas.note(peer.status)
                states = [PeerState(p.status["state"]) if p.status else PeerState.STARTING for p in self.processes]
                self._show_progress()
                if PeerState.FAILED in states:
                    failed = next(p for p, state in zip(self.processes, states, strict=True) if state is PeerState.FAILED)
                    assert failed.status is not None
                    raise RunError(f"{failed.name} failed: {failed.status['message']}\n" + log_tail(failed.log_path),
                                   exit_code=3 if failed.status.get("failure") == "divergence" else 1)
                if all(s is PeerState.SUCCEEDED for s in states):
                    self._show_progress(final=True)
                    return
                await asyncio.sleep(_POLL_SECONDS)

    def _finish(self, config: RuntimeConfig, wall_seconds: float) -> dict[str, Any]:
        statuses = [p.status for p in self.peers if p.status is not None]
        if len(statuses) != len(self.peers):
            raise RunError("a peer finished without reporting its status")
        accuracies = [s["accuracy"] for s in statuses if s["accuracy"] is not None]
        losses = [s["loss"] for s in statuses if s["loss"] is not None]
        lead = statuses[0]
        phases = {p: sum(s["phasesMean"].get(p, 0.0) for s in statuses) / len(statuses) for p in ROUND_PHASES}
        first = {p: sum(s["phasesFirst"].get(p, 0.0) for s in statuses) / len(statuses) for p in ROUND_PHASES}
        summary: dict[str, Any] = {
            "job": self.spec.name,
            "mode": self.spec.function.mode,
            "peers": self.spec.peers,
            "functions_per_peer": self.spec.functions_per_peer,
            "aggregation": self.spec.aggregation.rule,
            "rounds": min(int(s.get("round", 0)) for s in statuses),
            "test_accuracy": lead.get("accuracy"),
            "test_accuracy_min": min(accuracies) if accuracies else None,
            "test_loss": lead.get("testLoss"),
            # the mean over peers of their last round's training loss: what the progress line shows
            "final_loss": sum(losses) / len(losses) if losses else None,
            "replicas": checked_replicas(self.replicas, self.display),
            "wall_seconds": wall_seconds,
            "phases": phases,
            "round_seconds": sum(phases.values()),
            "phases_first_round": first,
            "first_round_seconds": sum(first.values()),
            # peer 0's first evaluation at or above each accuracy, in seconds of training (rounds summed)
            "time_to_accuracy": lead.get("reached", {}),
            "function": (self.functions.stats if self.functions else ScaleStats()).as_dict(),  # zeros inline
            "rejected_events": sum_counts(s.get("rejected", {}) for s in statuses),
            "excluded_peers": sum_counts(s.get("excluded", {}) for s in statuses),
            "function_retries": sum(s.get("functionRetries", 0) for s in statuses),
            "function_failures": sum_counts(s.get("functionFailures", {}) for s in statuses),
            "send_failures": sum(s.get("sendFailures", 0) for s in statuses),
            "skipped_updates": sum_counts(s.get("skippedUpdates", {}) for s in statuses),
            "peer_restarts": self.restarts["peer"],
            "topology": self.spec.topology,
            **aggregator_summary(self.aggregator, self.restarts["aggregator"]),
            "recovered_gradients": sum(s.get("recovered", 0) for s in statuses),  # taken from outboxes
            "per_peer": [
                {"peer": s["peer"], "accuracy": s["accuracy"], "loss": s["loss"], "rounds": s["round"],
                 "caught_up": s.get("caughtUp", {})}
                for s in statuses
            ],
            "logs": str(self.workdir),
            # topology ps: the aggregator's ledger too (its Redis, pod and the gradients it takes in)
            "cost": job_cost(s.get("cost") for s in [*statuses, self.aggregator.status if self.aggregator else None] if s),
        }
        if self.options.prices is not None:
            summary["cost"]["money"] = self.options.prices.price(summary["cost"])
        output = self.options.output or Path(f"{self.spec.name}-model.safetensors")
        summary["model"] = str(_write_model(self.redis_servers[-1 if self.aggregator else 0], self.spec, output))
        if self.options.summary is not None:
            self.options.summary.parent.mkdir(parents=True, exist_ok=True)
            self.options.summary.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary

    # --- shutdown -------------------------------------------------------------------------------------
    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop peers and function instances (together: SIGTERM, SIGKILL after ``grace`` seconds), then
        the Redis servers; safe to call more than once."""
        if self._stopped:
            return
        self._stopped = True
        if self._targets is not None:
            await self._targets.close()
            self._targets = None
        for peer in self.processes:
            if peer.process.poll() is None:
                peer.process.terminate()
        peers = asyncio.gather(*(asyncio.to_thread(terminate, p.process, grace) for p in self.processes))
        await asyncio.gather(peers, self._stop_functions(grace))
        for server in self.redis_servers:
            await asyncio.to_thread(server.stop)
        if self.options.workdir is None and not self.options.keep_logs and self._succeeded():
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def _stop_functions(self, grace: float) -> None:
        if self.functions is not None:
            if self._stop_servers is not None and self._function_server is not None:
                self._stop_servers.set()
                with contextlib.suppress(Exception):
                    await self._function_server
            await self.functions.stop(grace)

    def _show_progress(self, final: bool = False) -> None:
        statuses = [p.status for p in self.peers if p.status]
        running = self.functions.serving if self.functions else 0
        cold = self.functions.stats.cold_starts if self.functions else 0
        self.display.show(statuses, running, cold, final=final)

    def _succeeded(self) -> bool:
        return bool(self.peers) and all(p.status and p.status["state"] == PeerState.SUCCEEDED for p in self.processes)

    def process_count(self) -> dict[str, int]:
        return {
            "peers": sum(1 for p in self.processes if p.process.poll() is None),  # ps: the aggregator too
            "functions": self.functions.running if self.functions else 0,
            "redis": sum(1 for s in self.redis_servers if s.process is not None and s.process.poll() is None),
        }


def _write_model(server: RedisServer, spec: JobSpec, output: Path) -> Path:
    try:
        return write_model(server, spec, output)
    except CheckpointError as exc:
        raise RunError(f"cannot write the model: {exc}") from exc


async def _finish_even_if_cancelled(work: Awaitable[object]) -> None:
    """Await ``work``; if the caller is cancelled meanwhile, let it finish first, then re-raise.

    For a thread that starts a process: cancelling the await does not stop the thread, and a stop
    racing with a half-done start would leave the process (and its directory) behind.
    """
    future = asyncio.ensure_future(work)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


def run_job(spec: JobSpec, options: RunOptions, out: TextIO = sys.stderr) -> int:
    """Run a job locally; returns the process exit code (0 ok, 1 failed, 3 diverged, 130 SIGINT, 143 SIGTERM)."""
    runner = LocalRun(spec, options, out)
    received: list[signal.Signals] = []

    async def main() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()

        def interrupt(sig: signal.Signals) -> None:
            # The first signal cancels the run, whose ``finally`` stops everything; a second one must
            # not cancel that cleanup half-way.
            if not received:
                received.append(sig)
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, interrupt, sig)
        loop.set_exception_handler(asgi.quiet_cancellation)
        return await runner.run()

    try:
        summary = asgi.run(main())
    except asyncio.CancelledError:
        left = runner.process_count()
        sig = received[0] if received else signal.SIGINT
        out.write(
            f"\ninterrupted ({sig.name}): stopped {len(runner.peers)} peers, the function instances and "
            f"{len(runner.redis_servers)} Redis servers (left running: {sum(left.values())}); logs in {runner.workdir}\n"
        )
        return EXIT_INTERRUPTED[sig]
    except RunError as exc:
        out.write(f"\nerror: {exc}\nlogs: {runner.workdir}\n")
        return exc.exit_code
    out.write(format_summary(summary) + "\n")
    return 0
