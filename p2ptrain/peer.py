"""One peer: the training round of the SPIRT architecture, and the peer's HTTP endpoint.

Each round the peer publishes its model version to its Redis, fans its minibatch out to the gradient
function as signed CloudEvents, reads the in-database average, sends it to every other peer, waits for
a quorum (or the round deadline), aggregates what arrived with the configured robust rule and takes an
optimizer step, then checkpoints to Redis. Its endpoint receives other peers' gradients (``POST /``),
and serves ``/status``, ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlparse

import httpx
import numpy as np
import redis
import torch
from prometheus_client import make_asgi_app

from p2ptrain import metrics, wire
from p2ptrain.aggregate import AggregationError, aggregate, minimum_gradients
from p2ptrain.checkpoint import CheckpointError, median_state, model_file, pack_state, unpack_state
from p2ptrain.config import RuntimeConfig, Secrets
from p2ptrain.data import Dataset, batch_indices, load_dataset, shard_indices, split_micro_batches
from p2ptrain.models import build_model
from p2ptrain.store import Keys, PeerStore, checkpoint_round, read_checkpoint

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# Gradients for rounds this far ahead of ours are buffered (faster peers); further ones are refused.
ROUND_WINDOW = 4
_EVAL_BATCH = 4096
# Consecutive rounds without a single successful gradient function call before the peer gives up.
MAX_ROUNDS_WITHOUT_GRADIENT = 3
# How long a peer waits for its own Redis to come back (restarted pod, network blip) before failing.
REDIS_OUTAGE_SECONDS = 120.0
# Test accuracies whose first crossing a peer reports (round and training seconds): time to accuracy.
ACCURACY_MILESTONES = (0.5, 0.8, 0.9, 0.95, 0.99)


class PeerError(RuntimeError):
    """The peer cannot continue (its Redis is gone, no gradient could be computed, ...)."""


@dataclass
class RoundReport:
    round: int
    loss: float | None
    samples: int
    phases: dict[str, float]
    peers_used: int
    accuracy: float | None = None
    test_loss: float | None = None


def record_milestones(reached: dict[str, dict[str, float]], accuracy: float, round_number: int, seconds: float) -> None:
    """Remember when each accuracy milestone was first reached (time to accuracy)."""
    for milestone in ACCURACY_MILESTONES:
        if accuracy >= milestone and f"{milestone:g}" not in reached:
            reached[f"{milestone:g}"] = {"round": round_number, "seconds": round(seconds, 3)}


@dataclass
class PeerStatus:
    peer: int
    state: str = "starting"
    round: int = 0
    rounds: int = 0
    epoch: float = 0.0
    loss: float | None = None
    accuracy: float | None = None
    test_loss: float | None = None
    message: str = ""
    phases_last: dict[str, float] = field(default_factory=dict)
    phases_first: dict[str, float] = field(default_factory=dict)
    phases_total: dict[str, float] = field(default_factory=dict)
    rounds_timed: int = 0
    function_cold_starts: int = 0
    function_retries: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, int] = field(default_factory=dict)
    training_seconds: float = 0.0  # sum of this run's round times
    caught_up: dict[str, int] = field(default_factory=dict)  # rounds skipped by adopting peers' state
    recovered: int = 0  # gradients taken from other peers' outboxes after their events were missed
    reached: dict[str, dict[str, float]] = field(default_factory=dict)  # "0.9" -> first round, seconds

    def record_accuracy(self, accuracy: float) -> None:
        record_milestones(self.reached, accuracy, self.round, self.training_seconds)

    def as_dict(self) -> dict[str, Any]:
        mean = {k: v / self.rounds_timed for k, v in self.phases_total.items()} if self.rounds_timed else {}
        return {
            "peer": self.peer,
            "state": self.state,
            "round": self.round,
            "rounds": self.rounds,
            "epoch": self.epoch,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "testLoss": self.test_loss,
            "message": self.message,
            "phases": self.phases_last,
            "phasesMean": mean,
            "phasesFirst": self.phases_first,
            "functionColdStarts": self.function_cold_starts,
            "functionRetries": self.function_retries,
            "rejected": self.rejected,
            "excluded": self.excluded,
            "trainingSeconds": self.training_seconds,
            "reached": self.reached,
            "caughtUp": self.caught_up,
            "recovered": self.recovered,
        }


class Peer:
    def __init__(
        self,
        config: RuntimeConfig,
        index: int,
        secrets: Secrets,
        *,
        record_gradients: bool = False,
    ) -> None:
        spec = config.spec
        if not 0 <= index < spec.peers:
            raise PeerError(f"peer index {index} is out of range for a job of {spec.peers} peers")
        self.config = config
        self.spec = spec
        self.index = index
        self.secrets = secrets
        self.source = f"/jobs/{spec.namespace}/{spec.name}/peers/{index}"
        self.labels = metrics.peer_labels(spec.name, spec.namespace, index)
        self.status = PeerStatus(peer=index)
        self.record_gradients = record_gradients
        self.applied_gradients: list[np.ndarray] = []
        self.batches: list[np.ndarray] = []

        self.dataset: Dataset = load_dataset(spec.dataset)
        torch.manual_seed(spec.seed)  # identical initial replicas on every peer
        self.model = build_model(spec.model, self.dataset.input_shape, self.dataset.num_classes)
        self.optimizer = _build_optimizer(self.model, spec)
        self.numel = sum(p.numel() for p in self.model.parameters())
        self.shard = shard_indices(len(self.dataset.y_train), spec.peers, index, spec.dataset.split_seed)
        self.rounds = spec.total_rounds(len(self.shard))
        self.status.rounds = self.rounds

        address = config.redis[index]
        self.redis = redis.Redis(host=address.host, port=address.port, password=secrets.redis_password, socket_timeout=60)
        self.store = PeerStore(
            self.redis,
            Keys(spec.name, index),
            accumulator_mode=spec.redis.accumulator,
            key_ttl_seconds=spec.redis.key_ttl_seconds,
        )
        self._peer_clients: dict[int, redis.Redis] = {}
        self._inbox: dict[int, dict[int, np.ndarray]] = {}
        self._newest_from: dict[int, int] = {}  # the latest round each peer sent a gradient for
        self._sending: set[asyncio.Task[Any]] = set()
        self._rounds_without_gradient = 0
        self._published: tuple[int, np.ndarray] | None = None  # the model version functions are reading
        self._inbox_changed = asyncio.Condition()
        self._round = 0
        self._http: httpx.AsyncClient | None = None
        self._metrics_app = make_asgi_app()

    # --- the HTTP endpoint --------------------------------------------------------------------------
    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI app: ``POST /`` takes gradient events; ``GET /status``, ``/model`` (safetensors of this
        replica, as trained so far), ``/healthz``, ``/metrics``."""
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, method = scope["path"], scope["method"]
        if path == "/metrics":
            await self._metrics_app(scope, receive, send)
        elif path == "/healthz" and method == "GET":
            await _respond(send, 200, b"ok")
        elif path == "/status" and method == "GET":
            await _respond_json(send, 200, self.status.as_dict())
        elif path == "/model" and method == "GET":
            tensors = self.final_state()  # copied between optimizer steps, serialised off the loop
            metadata = {"p2ptrain.job": json.dumps(self.spec.to_dict()), "p2ptrain.round": str(self.status.round)}
            model_bytes = await asyncio.to_thread(model_file, tensors, metadata)
            await _respond(send, 200, model_bytes, content_type=b"application/octet-stream")
        elif path == "/" and method == "POST":
            body = await _read_body(receive, self._max_body_bytes())
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            status, reason, text = await self.receive_event(headers, body)
            await _respond(send, status, text.encode(), reason=reason)
        else:
            await _respond(send, 404, b"not found")

    def _max_body_bytes(self) -> int:
        return max(self.spec.exchange.inline_limit_bytes, 4 * self.numel) + 64 * 1024

    def _decode_gradient(self, blob: bytes) -> np.ndarray:
        """A peer's gradient (inline, by dataref or from its outbox), checked against this model."""
        return wire.decode_tensor(blob, expected_numel=self.numel, max_bytes=self._max_body_bytes() + 4 * self.numel)

    async def receive_event(self, headers: dict[str, str], body: bytes | None) -> tuple[int, str, str]:
        """Decode, validate and file a peer's averaged gradient. Returns (status, reason, message)."""
        try:
            if body is None:
                raise wire.WireError("oversize", f"event body exceeds {self._max_body_bytes()} bytes")
            event = wire.from_http(headers, body)
            wire.verify(event, self.secrets.signing_key)
            if event.get_type() != wire.GRADIENT_AVERAGED:
                raise wire.WireError("malformed", f"unexpected event type {event.get_type()!r}")
            sender, round_index = self._sender_and_round(event)
            if round_index < self._round:
                raise wire.WireError("stale", f"gradient for round {round_index} from peer {sender} came after it closed")
            if round_index > self._round + ROUND_WINDOW:
                raise wire.WireError("stale", f"gradient for round {round_index} is too far ahead of round {self._round}")
            if sender in self._inbox.get(round_index, {}):
                raise wire.WireError("duplicate", f"peer {sender} already sent its round {round_index} gradient")
            payload = wire.event_bytes(event)
            dataref = event.get_extension(wire.DATAREF_ATTRIBUTE)
            if dataref:
                payload = await asyncio.to_thread(self._fetch_dataref, sender, str(dataref))
            gradient = self._decode_gradient(payload)
        except wire.WireError as exc:
            metrics.EVENTS_REJECTED_TOTAL.labels(**self.labels, reason=exc.reason).inc()
            self.status.rejected[exc.reason] = self.status.rejected.get(exc.reason, 0) + 1
            log.warning("rejected event: %s", exc, extra={"reason": exc.reason})
            status = {"signature": 401, "stale": 409, "duplicate": 409, "oversize": 413}.get(exc.reason, 400)
            return status, exc.reason, f"{exc.reason}: {exc}"
        metrics.EXCHANGE_RECEIVED_BYTES_TOTAL.labels(**self.labels).inc(len(payload))
        await self._file_gradient(round_index, sender, gradient)
        return 202, "accepted", "accepted"

    def _sender_and_round(self, event: Any) -> tuple[int, int]:
        try:
            sender = int(event.get_extension("peer"))
            round_index = int(event.get_extension("round"))
        except (TypeError, ValueError) as exc:
            raise wire.WireError("malformed", "event needs integer 'peer' and 'round' extensions") from exc
        if not 0 <= sender < self.spec.peers or sender == self.index:
            raise wire.WireError("unknown-peer", f"peer {sender} is not another peer of this job")
        if event.get_source() != f"/jobs/{self.spec.namespace}/{self.spec.name}/peers/{sender}":
            raise wire.WireError("unknown-peer", f"source {event.get_source()!r} does not match peer {sender}")
        return sender, round_index

    def _fetch_dataref(self, sender: int, dataref: str) -> bytes:
        """Claim check: fetch a large gradient from the sender's Redis, only from the job's own servers."""
        url = urlparse(dataref)
        expected = self.config.redis[sender]
        key = url.path.lstrip("/")
        if url.scheme != "redis" or url.hostname != expected.host or url.port != expected.port:
            raise wire.WireError("dataref", f"dataref {dataref!r} does not point at peer {sender}'s Redis")
        if not key.startswith(f"p2p:{self.spec.name}:{sender}:out:"):
            raise wire.WireError("dataref", f"dataref key {key!r} is not peer {sender}'s outbox")
        try:
            blob = cast(bytes | None, self._peer_redis(sender).get(key))
        except redis.RedisError as exc:
            raise wire.WireError("dataref", f"cannot read dataref from peer {sender}'s Redis: {exc}") from exc
        if blob is None:
            raise wire.WireError("dataref", f"dataref {key} has expired or was never written")
        return bytes(blob)

    def _fetch_outbox(self, peer: int, round_index: int) -> np.ndarray | None:
        """Another peer's gradient for a round, from the outbox in its Redis; None if not there (yet)."""
        try:
            blob = cast(bytes | None, self._peer_redis(peer).get(Keys(self.spec.name, peer).outbox(round_index)))
            if blob is None:
                return None
            return self._decode_gradient(bytes(blob))
        except (redis.RedisError, wire.WireError) as exc:
            log.info("cannot take peer %d's round %d gradient from its outbox: %s", peer, round_index + 1, exc)
            return None

    def _peer_redis(self, peer: int) -> redis.Redis:
        """A client for another peer's Redis (claim checks, catching up), only at the job's own address."""
        client = self._peer_clients.get(peer)
        if client is None:
            address = self.config.redis[peer]
            client = redis.Redis(host=address.host, port=address.port, password=self.secrets.redis_password, socket_timeout=30)
            self._peer_clients[peer] = client
        return client

    async def _file_gradient(self, round_index: int, sender: int, gradient: np.ndarray) -> None:
        async with self._inbox_changed:
            self._inbox.setdefault(round_index, {})[sender] = gradient
            self._newest_from[sender] = max(round_index, self._newest_from.get(sender, -1))
            self._inbox_changed.notify_all()

    # --- the round -----------------------------------------------------------------------------------
    async def run(self) -> list[RoundReport]:
        """Train every round; resumes from the checkpoint in Redis if there is one."""
        reports: list[RoundReport] = []
        start = await asyncio.to_thread(self._resume)
        self.status.state = "training"
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        async with httpx.AsyncClient(limits=limits, timeout=self.spec.function.timeout_seconds) as http:
            self._http = http
            await self._wait_for_peers()
            start = await asyncio.to_thread(self._catch_up, start)
            for round_index in range(start, self.rounds):
                reports.append(await self._run_round_through_redis_outages(round_index))
            if self._sending:  # the last rounds' gradients still on their way (bounded by the deadline)
                await asyncio.wait(set(self._sending))
            self._http = None
        await asyncio.to_thread(self.store.expire_job_keys, self.spec.redis.key_ttl_seconds)
        self.status.state = "succeeded"
        self.status.message = f"finished {self.rounds} rounds"
        return reports

    async def _run_round_through_redis_outages(self, round_index: int) -> RoundReport:
        """Run a round; if this peer's Redis goes away (pod restarted, network blip), wait for it and
        run the round again — every step is idempotent (versioned keys, per-part accumulation,
        duplicate gradients refused by the other peers)."""
        while True:
            try:
                return await self.run_round(round_index)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as exc:
                address = self.config.redis[self.index]
                log.warning("lost this peer's Redis at %s in round %d: %s; waiting up to %.0fs for it",
                            address, round_index + 1, exc, REDIS_OUTAGE_SECONDS)
                self.status.message = f"waiting for Redis at {address}"
                if not await asyncio.to_thread(self._wait_for_redis, REDIS_OUTAGE_SECONDS):
                    raise PeerError(f"this peer's Redis at {address} did not come back within "
                                    f"{REDIS_OUTAGE_SECONDS:.0f}s: {exc}") from exc
                self.status.message = ""
                log.info("Redis at %s is back; running round %d again", address, round_index + 1)

    def _wait_for_redis(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        delay = 0.1
        while time.monotonic() < deadline:
            try:
                if self.redis.ping():
                    return True
            except redis.RedisError:
                pass
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return False

    async def run_round(self, round_index: int) -> RoundReport:
        spec = self.spec
        self._round = round_index
        self.status.round = round_index
        self.status.epoch = round_index * spec.batch_size / max(1, len(self.shard))
        metrics.ROUND.labels(**self.labels).set(round_index)
        phases: dict[str, float] = {}
        round_started = time.perf_counter()
        deadline = time.monotonic() + spec.exchange.round_deadline_seconds

        t0 = time.perf_counter()
        params = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
        model_key = await asyncio.to_thread(self.store.publish_model, round_index, params.numpy())
        self._published = (round_index, params.numpy())
        phases["publish"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        indices = batch_indices(self.shard, round_index, spec.batch_size, spec.seed + self.index)
        if self.record_gradients:
            self.batches.append(indices)
        receipts = await self._fan_out(round_index, model_key, indices, deadline)
        phases["fanout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        average = await asyncio.to_thread(self.store.read_average, round_index)
        await asyncio.to_thread(self.store.clear_round, round_index)
        phases["average"] = time.perf_counter() - t0
        samples = int(sum(r["samples"] for r in receipts))
        loss = sum(r["loss"] * r["samples"] for r in receipts) / samples if samples else None

        t0 = time.perf_counter()
        if average is not None:
            own, _, _ = average
            await self._file_gradient(round_index, self.index, own)
            await self._send_to_peers(round_index, own)
        gradients = await self._wait_for_quorum(round_index, deadline)
        phases["exchange"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        combined = self._aggregate(gradients)
        phases["aggregate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if combined is not None:
            self._apply(combined)
        evaluation = self._evaluate() if self._should_evaluate(round_index) else None
        state = pack_state(self.model, self.optimizer, {"round": round_index, "loss": loss})
        await asyncio.to_thread(self.store.save_checkpoint, round_index, state, {"loss": loss})
        phases["update"] = time.perf_counter() - t0

        self._report(round_index, loss, phases, time.perf_counter() - round_started, len(gradients), evaluation)
        return RoundReport(
            round=round_index,
            loss=loss,
            samples=samples,
            phases=phases,
            peers_used=len(gradients),
            accuracy=evaluation[0] if evaluation else None,
            test_loss=evaluation[1] if evaluation else None,
        )

    async def _fan_out(self, round_index: int, model_key: str, indices: np.ndarray, deadline: float) -> list[dict[str, Any]]:
        parts = split_micro_batches(indices, self.spec.functions_per_peer)
        keys = self.store.keys
        address = self.config.redis[self.index]
        calls = [
            self._call_function(
                {
                    "peer": self.index,
                    "round": round_index,
                    "version": round_index,
                    "part": f"{round_index}:{n}",
                    "redis": str(address),
                    "model": model_key,
                    "accumulator": keys.accumulator(round_index),
                    "accumulatorMeta": keys.accumulator_meta(round_index),
                    "indices": part.tolist(),
                },
                deadline,
            )
            for n, part in enumerate(parts)
        ]
        results = await asyncio.gather(*calls)
        receipts = [r for r in results if r is not None]
        if receipts:
            self._rounds_without_gradient = 0
            return receipts
        # A round without our own gradient still aggregates the others'; only a lasting outage fails.
        self._rounds_without_gradient += 1
        if self._rounds_without_gradient >= MAX_ROUNDS_WITHOUT_GRADIENT:
            raise PeerError(
                f"no gradient function call succeeded in {self._rounds_without_gradient} rounds in a row "
                f"(last: round {round_index + 1}); is the gradient function at {self.config.function_url} up?"
            )
        log.warning("round %d: no gradient function call succeeded before the deadline; "
                    "aggregating the other peers' gradients only", round_index + 1)
        return receipts

    async def _call_function(self, request: dict[str, Any], deadline: float) -> dict[str, Any] | None:
        """One micro-batch, retried with backoff (cold starts, killed instances) until the deadline."""
        assert self._http is not None
        attempts = self.spec.function.retries + 1
        last_error = ""
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            event = wire.build_event(
                wire.GRADIENT_REQUESTED,
                self.source,
                data=request,
                subject=f"round/{request['round']}",
                extensions={"round": request["round"], "peer": self.index},
                key=self.secrets.signing_key,
            )
            headers, body = wire.to_http(event)
            try:
                response = await self._http.post(
                    self.config.function_url,
                    headers=headers,
                    content=body,
                    timeout=min(self.spec.function.timeout_seconds, remaining),
                )
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    reply = wire.from_http(dict(response.headers), response.content)
                    wire.verify(reply, self.secrets.signing_key)
                    receipt = wire.event_json(reply)
                    if receipt.get("cold"):
                        self.status.function_cold_starts += 1
                    return receipt
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                if 400 <= response.status_code < 500 and response.status_code not in (408, 409, 429):
                    break  # the request itself is wrong; retrying cannot help
                if response.headers.get("x-p2ptrain-reason") == "version" and self._published is not None:
                    # Our Redis lost the model version (it restarted empty): publish it again.
                    await asyncio.to_thread(self.store.publish_model, *self._published)
            if attempt + 1 < attempts:
                log.info("retrying micro-batch", extra={"part": request["part"], "attempt": attempt + 1, "error": last_error})
                metrics.FUNCTION_RETRIES_TOTAL.labels(**self.labels).inc()
                self.status.function_retries += 1
                await asyncio.sleep(min(0.1 * 2**attempt, 2.0) * (1 + random.random()))
        log.warning("micro-batch %s failed: %s", request["part"], last_error)
        return None

    async def _send_to_peers(self, round_index: int, gradient: np.ndarray) -> None:
        exchange = self.spec.exchange
        blob = wire.encode_tensor(gradient, exchange.dtype, exchange.compression)
        extensions: dict[str, str | int] = {"round": round_index, "peer": self.index}
        data = blob
        # Always parked in our outbox: a peer that missed the event (it restarted, or could not be
        # reached) fetches it from there instead of closing the round without us.
        key = await asyncio.to_thread(self.store.put_outbox, round_index, blob)
        if len(blob) > exchange.inline_limit_bytes:
            address = self.config.redis[self.index]
            extensions[wire.DATAREF_ATTRIBUTE] = f"redis://{address.host}:{address.port}/{key}"
            data = b""
        event = wire.build_event(
            wire.GRADIENT_AVERAGED,
            self.source,
            data=data,
            subject=f"round/{round_index}",
            extensions=extensions,
            key=self.secrets.signing_key,
        )
        headers, body = wire.to_http(event)
        others = [i for i in range(self.spec.peers) if i != self.index]
        # Delivered in the background (retried until the deadline): an unreachable peer must not hold
        # up our round, which only needs a quorum.
        for peer in others:
            sending = asyncio.create_task(self._post_to_peer(peer, headers, body))
            self._sending.add(sending)
            sending.add_done_callback(self._sending.discard)
        metrics.EXCHANGE_SENT_BYTES_TOTAL.labels(**self.labels).inc(len(blob) * len(others))

    async def _post_to_peer(self, peer: int, headers: dict[str, str], body: bytes) -> None:
        assert self._http is not None
        deadline = time.monotonic() + self.spec.exchange.round_deadline_seconds
        delay = 0.05
        while time.monotonic() < deadline:
            try:
                response = await self._http.post(self.config.peer_urls[peer] + "/", headers=headers, content=body, timeout=10)
            except httpx.HTTPError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if response.status_code >= 400 and response.status_code != 409:
                log.warning("peer %d refused our gradient: %s", peer, response.text[:200])
            return

    async def _wait_for_quorum(self, round_index: int, deadline: float) -> dict[int, np.ndarray]:
        quorum = self.spec.quorum
        async with self._inbox_changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._inbox_changed.wait_for(lambda: self._round_closed(round_index, quorum)),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            gradients = self._inbox.pop(round_index, {})
            for old in [r for r in self._inbox if r < round_index]:
                del self._inbox[old]
        if len(gradients) < quorum:
            # Closed by the deadline or because the missing peers moved on: their gradients may still
            # be in their outboxes (they sent while we were down, or could not reach us).
            absent = [p for p in range(self.spec.peers) if p not in gradients and p != self.index]
            for peer, gradient in zip(absent, await asyncio.gather(
                *(asyncio.to_thread(self._fetch_outbox, p, round_index) for p in absent)
            ), strict=True):
                if gradient is not None:
                    gradients[peer] = gradient
                    self.status.recovered += 1
                    metrics.GRADIENTS_RECOVERED_TOTAL.labels(**self.labels).inc()
                    log.info("took peer %d's round %d gradient from its outbox", peer, round_index + 1)
        missing = self.spec.peers - len(gradients)
        if missing:
            metrics.PEERS_EXCLUDED_TOTAL.labels(**self.labels, reason="deadline").inc(missing)
            self.status.excluded["deadline"] = self.status.excluded.get("deadline", 0) + missing
        metrics.PEERS_ACTIVE.labels(**self.labels).set(len(gradients))
        metrics.record_excluded_rounds(self.labels, self.spec.peers, gradients)
        return gradients

    def _round_closed(self, round_index: int, quorum: int) -> bool:
        """A quorum arrived, or every peer still missing has already sent a later round's gradient.

        Peers send their rounds in order, so one that has moved past this round will never send it
        (it was down, or we were): waiting for the deadline could not help, and a peer that is behind
        catches up one quick round at a time instead of one deadline at a time.
        """
        arrived = self._inbox.get(round_index, {})
        if len(arrived) >= quorum:
            return True
        missing = [p for p in range(self.spec.peers) if p not in arrived and p != self.index]
        return all(self._newest_from.get(p, -1) > round_index for p in missing)

    def _aggregate(self, gradients: dict[int, np.ndarray]) -> torch.Tensor | None:
        rule = self.spec.aggregation
        if len(gradients) < minimum_gradients(rule.rule, rule.byzantine):
            log.warning("only %d gradients arrived: %s needs more; skipping this round's update", len(gradients), rule.rule)
            return None
        stacked = torch.from_numpy(np.stack([gradients[i] for i in sorted(gradients)]))
        params: dict[str, Any] = {}
        if rule.rule == "multi-krum" and rule.multi_krum_select is not None:
            params["m"] = min(rule.multi_krum_select, len(gradients))
        try:
            return aggregate(rule.rule, stacked, rule.byzantine, **params)
        except AggregationError as exc:
            log.warning("aggregation failed: %s; skipping this round's update", exc)
            return None

    def _apply(self, gradient: torch.Tensor) -> None:
        if self.record_gradients:
            self.applied_gradients.append(gradient.numpy().copy())
        offset = 0
        for p in self.model.parameters():
            n = p.numel()
            p.grad = gradient[offset : offset + n].view_as(p).clone()
            offset += n
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _should_evaluate(self, round_index: int) -> bool:
        every = self.spec.evaluation.every_rounds
        return (round_index + 1) % every == 0 or round_index + 1 == self.rounds

    def _evaluate(self) -> tuple[float, float] | None:
        data = self.dataset
        if len(data.y_test) == 0:
            return None
        self.model.eval()
        correct, loss_sum = 0, 0.0
        with torch.no_grad():
            for start in range(0, len(data.y_test), _EVAL_BATCH):
                x = torch.from_numpy(data.x_test[start : start + _EVAL_BATCH])
                y = torch.from_numpy(data.y_test[start : start + _EVAL_BATCH])
                logits = self.model(x)
                loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(dim=1) == y).sum())
        self.model.train()
        n = len(data.y_test)
        return correct / n, loss_sum / n

    def _report(
        self,
        round_index: int,
        loss: float | None,
        phases: dict[str, float],
        total: float,
        peers_used: int,
        evaluation: tuple[float, float] | None,
    ) -> None:
        for phase, seconds in phases.items():
            metrics.ROUND_PHASE_SECONDS.labels(**self.labels, phase=phase).observe(seconds)
        metrics.ROUND_SECONDS.labels(**self.labels).observe(total)
        metrics.ROUNDS_TOTAL.labels(**self.labels).inc()
        # The first round of a run pays the functions' cold starts: reported apart from the steady state.
        if not self.status.phases_first:
            self.status.phases_first = dict(phases)
        else:
            for phase, seconds in phases.items():
                self.status.phases_total[phase] = self.status.phases_total.get(phase, 0.0) + seconds
            self.status.rounds_timed += 1
        self.status.phases_last = dict(phases)
        self.status.round = round_index + 1
        self.status.training_seconds += total
        if loss is not None:
            metrics.LOSS.labels(**self.labels).set(loss)
            self.status.loss = loss
        if evaluation is not None:
            self.status.accuracy, self.status.test_loss = evaluation
            self.status.record_accuracy(evaluation[0])
            metrics.ACCURACY.labels(**self.labels).set(evaluation[0])
            metrics.TEST_LOSS.labels(**self.labels).set(evaluation[1])
        log.info(
            "round done",
            extra={
                "round": round_index + 1,  # 1-based like status.round and the progress display
                "of": self.rounds,
                "loss": loss,
                "accuracy": evaluation[0] if evaluation else None,
                "peers_used": peers_used,
                "seconds": round(total, 4),
                **{phase: round(seconds, 4) for phase, seconds in phases.items()},
            },
        )

    def _resume(self) -> int:
        """Continue after the last checkpointed round, if this peer's Redis has one."""
        try:
            saved = self.store.load_checkpoint()
        except redis.RedisError as exc:
            raise PeerError(f"cannot reach this peer's Redis at {self.config.redis[self.index]}: {exc}") from exc
        if saved is None:
            return 0
        round_index, state, _ = saved
        try:
            unpack_state(state, self.model, self.optimizer)
        except CheckpointError as exc:
            log.warning("ignoring checkpoint: %s", exc)
            return 0
        log.info("resumed from checkpoint", extra={"round": round_index})
        return round_index + 1

    def _catch_up(self, start: int) -> int:
        """Start from the other peers' state when they are ahead (a restarted or late peer).

        Reads the latest checkpoint in every other peer's Redis (the claim-check path; it works while
        those peers are busy training). With a Byzantine budget f, a round counts as reached only when
        f+1 peers report it, and with 2f+1 checkpoints the adopted state is their coordinate-wise median,
        so f lying peers can neither drag nor poison a restarting one.
        """
        # Rounds first (a few bytes each): the states are read only when this peer is behind.
        rounds_of: dict[int, int] = {}
        for peer in range(self.spec.peers):
            if peer == self.index:
                continue
            try:
                reached_by_peer = checkpoint_round(self._peer_redis(peer), Keys(self.spec.name, peer))
            except redis.RedisError as exc:
                log.info("cannot read peer %d's checkpoint: %s", peer, exc)
                continue
            if reached_by_peer is not None:
                rounds_of[peer] = reached_by_peer
        byzantine = self.spec.aggregation.byzantine
        rounds = sorted(rounds_of.values(), reverse=True)
        if len(rounds) <= byzantine or rounds[byzantine] < start:
            return start  # nobody (trustworthy) is ahead of us
        robust = byzantine > 0 and len(rounds_of) >= 2 * byzantine + 1
        wanted = sorted(rounds_of) if robust else [max(rounds_of, key=lambda p: rounds_of[p])]
        candidates: list[tuple[int, int, bytes]] = []
        for peer in wanted:
            try:
                saved = read_checkpoint(self._peer_redis(peer), Keys(self.spec.name, peer))
            except redis.RedisError as exc:
                log.info("cannot read peer %d's checkpoint: %s", peer, exc)
                continue
            if saved is not None:
                candidates.append((peer, saved[0], saved[1]))
        if not candidates:
            return start
        if robust:
            state = median_state([c[2] for c in candidates])
            reached = sorted(c[1] for c in candidates)[(len(candidates) - 1) // 2]
            source = f"the median of peers {[c[0] for c in candidates]}"
        else:
            peer, reached, state = candidates[0]
            source = f"peer {peer}"
        try:
            unpack_state(state, self.model, self.optimizer)
        except CheckpointError as exc:
            log.warning("cannot adopt the other peers' state, continuing from round %d: %s", start, exc)
            return start
        log.info("caught up: adopted the state after round %d from %s", reached + 1, source,
                 extra={"skipped_rounds": reached + 1 - start})
        self.status.caught_up = {"from": start, "to": reached + 1}
        metrics.CATCH_UPS_TOTAL.labels(**self.labels).inc()
        return reached + 1

    async def _wait_for_peers(self) -> None:
        """Start together: wait (up to one round deadline) until every peer's endpoint answers."""
        assert self._http is not None
        deadline = time.monotonic() + self.spec.exchange.round_deadline_seconds
        pending = {i for i in range(self.spec.peers) if i != self.index}
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                with contextlib.suppress(httpx.HTTPError):
                    if (await self._http.get(self.config.peer_urls[i] + "/healthz", timeout=1)).status_code == 200:
                        pending.discard(i)
            if pending:
                await asyncio.sleep(0.1)
        if pending:
            log.warning("starting without peers %s: they did not answer in time", sorted(pending))

    def final_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def _build_optimizer(model: torch.nn.Module, spec: Any) -> torch.optim.Optimizer:
    opt = spec.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.learning_rate, momentum=opt.momentum, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=opt.learning_rate, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, weight_decay=opt.weight_decay)
    raise PeerError(f"optimizer.name={opt.name!r} is not supported")


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or None once it exceeds ``limit`` bytes (the rest is drained, not kept)."""
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks) if size <= limit else None


async def _respond(send: Send, status: int, body: bytes, *, reason: str | None = None, content_type: bytes = b"text/plain") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if reason:
        headers.append((b"x-p2ptrain-reason", reason.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send: Send, status: int, payload: Any) -> None:
    await _respond(send, status, json.dumps(payload).encode(), content_type=b"application/json")


async def serve_peer(peer: Peer, *, host: str, port: int, metrics_port: int | None, linger: bool) -> int:
    """Run a peer with its HTTP endpoint until training ends (and, with ``linger``, until signalled).

    In a cluster the peer lingers so its status stays readable and a late peer can still fetch state;
    the local runner lets it exit. SIGTERM/SIGINT stop it; the exit code says how it ended.
    """
    import signal

    import hypercorn.asyncio
    import hypercorn.config
    from prometheus_client import start_http_server

    if metrics_port:
        start_http_server(metrics_port)
    config = hypercorn.config.Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")  # through our formatter, once
    config.graceful_timeout = 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = asyncio.create_task(hypercorn.asyncio.serve(peer.app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    training = asyncio.create_task(peer.run())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({training, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if training.done():
        exc = training.exception()
        if exc is not None:
            peer.status.state = "failed"
            peer.status.message = str(exc)
            log.error("peer %d failed: %s", peer.index, exc, exc_info=exc)
            code = 1
        if linger:
            await stopped
    else:
        training.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await training
        code = 143
    stop.set()
    await server
    return code
