"""The gradient function: one micro-batch in, its gradient summed into the peer's Redis, a receipt out.

It is a func-python (Knative Python functions) Function: ``handle(scope, receive, send)`` gets the
decoded CloudEvent in ``scope["event"]``. Each ``gradient.requested`` event names a peer, a model
version and the sample indices; the function loads that version from the peer's Redis (cached per
version), computes the gradient with torch, adds it into the peer's accumulator in Redis (idempotently,
so retries never double-count) and replies with a ``gradient.computed`` event (loss, samples, timings).
The event boundary runs in four visible steps: decode, validate, process, encode. Decoding happens in
:class:`FunctionFront`, ahead of func-python's own parser: the body is read within a size budget, the
content type and required attributes are checked, and every refusal is a 4xx naming its reason and
counted in ``p2ptrain_function_invocations_total{outcome=<reason>}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import redis
import torch
from cloudevents.core.v1.event import CloudEvent

from p2ptrain import asgi, memory, metrics, wire
from p2ptrain.accumulator import Accumulator, AccumulatorError, detect
from p2ptrain.config import CONFIG_ENV, ConfigError, RedisAddress, RuntimeConfig, Secrets
from p2ptrain.data import Dataset, load_dataset
from p2ptrain.device import pick_device
from p2ptrain.models import GradientModel, build_model
from p2ptrain.store import Keys, connect

log = logging.getLogger(__name__)

Scope = asgi.Scope
Receive = asgi.Receive
Send = Callable[..., Awaitable[None]]  # func-python's send also carries ``.binary`` and ``.http``

SOURCE = "/functions/gradient"
# A gradient request is a small JSON object (at most batchSize sample indices); 1 MiB leaves room for
# batches of over 100k samples and refuses anything that is plainly not a request.
MAX_REQUEST_BYTES = 1 << 20
REJECT_STATUS = {"signature": 401, "oversize": 413, "content-type": 415, "method": 405, "not-ready": 503}
_MODEL_CACHE_VERSIONS = 16


@dataclass(frozen=True)
class GradientRequest:
    """A validated ``gradient.requested`` event."""

    peer: int
    round: int
    version: int
    part: str
    redis: RedisAddress
    model_key: str
    accumulator_key: str
    accumulator_meta_key: str
    indices: np.ndarray


class RequestError(ValueError):
    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


class GradientFunction:
    """The function instance func-python serves (``new()`` returns one)."""

    def __init__(self, config: RuntimeConfig | None = None, secrets: Secrets | None = None) -> None:
        self.config = config
        self.secrets = secrets
        self._ready = False
        self._served = 0
        self._lock = threading.Lock()
        self._clients: dict[RedisAddress, tuple[redis.Redis, Accumulator]] = {}
        self._versions = VersionCache(_MODEL_CACHE_VERSIONS)
        self._dataset: Dataset | None = None
        self._model: torch.nn.Module | None = None
        self._numel = 0  # the model's parameter count, once it is built
        # A GradientModel computes one gradient at a time, so two requests computing at once need two:
        # idle ones wait here for reuse.
        self._computers: queue.SimpleQueue[GradientModel] = queue.SimpleQueue()
        self._labels: dict[str, str] = {}
        self._device = torch.device("cpu")
        self._failure: str | None = None  # why start failed: what readiness reports

    # --- lifecycle (func-python calls these) ----------------------------------------------------
    def configure(self, env: dict[str, str]) -> None:
        """Read the job's config and secrets from the environment (the edge); ConfigError names what is
        missing. Cheap, so ``serve`` runs it before binding and exits on failure."""
        if self.config is None:
            path = env.get(CONFIG_ENV)
            if not path:
                raise ConfigError(f"{CONFIG_ENV} must name the job's runtime config (job.json); it is not set")
            self.config = RuntimeConfig.from_file(path)
        if self.secrets is None:
            self.secrets = Secrets.from_env()
        self._labels = {"job": self.config.spec.name, "namespace": self.config.spec.namespace}

    def start(self, env: dict[str, str]) -> None:
        """Configure, then load the data set and the model skeleton (once: ``serve`` may have done it)."""
        if self._ready:
            return
        self.configure(env)
        assert self.config is not None
        torch.set_num_threads(int(env.get("P2PTRAIN_TORCH_THREADS", "1")))
        spec = self.config.spec
        try:
            self._device = pick_device(spec.function.device)
        except ConfigError as exc:
            self._failure = str(exc)
            raise
        self._dataset = load_dataset(spec.dataset)
        torch.manual_seed(spec.seed)
        self._model = build_model(spec.model, self._dataset.input_shape, self._dataset.num_classes).to(self._device)
        self._numel = sum(p.numel() for p in self._model.parameters())
        self._model.train()
        self._ready = True
        metrics.FUNCTION_INSTANCE_START_TIME_SECONDS.labels(**self._labels).set_to_current_time()
        log.info("gradient function ready on %s", self._device,
                 extra={"job": spec.name, "namespace": spec.namespace, "device": str(self._device)})

    @property
    def model(self) -> torch.nn.Module | None:
        """The model skeleton (its parameters are the initial ones; requests bring their own)."""
        return self._model

    @property
    def dataset(self) -> Dataset | None:
        return self._dataset

    def stop(self) -> None:
        for client, _ in self._clients.values():
            client.close()
        self._clients.clear()

    def alive(self) -> tuple[bool, str]:
        return True, "OK"

    def ready(self) -> tuple[bool, str]:
        if self._failure is not None:
            return False, self._failure
        return (True, "OK") if self._ready else (False, "loading data and model")

    # --- the event boundary -----------------------------------------------------------------------
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        event: wire.Incoming | CloudEvent = scope["event"]
        try:
            request = self.validate(event)
            result = await asyncio.to_thread(self.process, request)
        except (RequestError, wire.WireError) as exc:
            status = exc.status if isinstance(exc, RequestError) else REJECT_STATUS.get(exc.reason, 400)
            status = 401 if exc.reason == "signature" else status
            self.count_rejected(exc)
            await _reply_error(send, status, exc.reason, str(exc))
            return
        except (AccumulatorError, redis.RedisError) as exc:
            metrics.FUNCTION_INVOCATIONS_TOTAL.labels(**self._labels, outcome="redis").inc()
            log.warning("gradient could not be stored: %s", exc)
            await _reply_error(send, 503, "redis", f"gradient could not be stored in the peer's Redis: {exc}")
            return
        except Exception as exc:  # a bug, not bad input: keep serving, count it, leave the traceback in the log
            metrics.FUNCTION_INVOCATIONS_TOTAL.labels(**self._labels, outcome="error").inc()
            log.exception("gradient request failed")
            await _reply_error(send, 500, "error", f"gradient function failed: {type(exc).__name__}: {exc}")
            return
        result["timings"]["total"] = time.perf_counter() - started
        result["cost"]["wallSeconds"] = result["timings"]["total"]
        metrics.FUNCTION_INVOCATIONS_TOTAL.labels(**self._labels, outcome="ok").inc()
        metrics.FUNCTION_DURATION_SECONDS.labels(**self._labels).observe(result["timings"]["total"])
        assert self.secrets is not None
        reply = wire.build_event(
            wire.GRADIENT_COMPUTED,
            SOURCE,
            data=result,
            subject=f"round/{request.round}",
            extensions={"round": request.round, "peer": request.peer},
            key=self.secrets.signing_key,
        )
        # Encoded here, not by func-python's sender: one dict of headers, no second event model.
        headers, body = wire.to_http(reply)
        out = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await asgi.respond(getattr(send, "http", send), 200, body, headers=out)

    def count_rejected(self, exc: RequestError | wire.WireError) -> None:
        metrics.FUNCTION_INVOCATIONS_TOTAL.labels(**self._labels, outcome=exc.reason).inc()
        log.warning("rejected gradient request: %s", exc, extra={"reason": exc.reason})

    def validate(self, event: wire.Incoming | CloudEvent) -> GradientRequest:
        """Check signature, type and every field against this job's config."""
        if not self._ready or self.config is None or self.secrets is None or self._dataset is None:
            raise RequestError("not-ready", "function is still starting", status=503)
        wire.verify(event, self.secrets.signing_key)
        if event.get_type() != wire.GRADIENT_REQUESTED:
            raise RequestError("malformed", f"event type must be {wire.GRADIENT_REQUESTED}, got {event.get_type()}")
        data = wire.event_json(event)
        spec = self.config.spec
        try:
            peer = int(data["peer"])
            round_index = int(data["round"])
            version = int(data["version"])
            part = str(data["part"])
            address = str(data["redis"])
            keys = (str(data["model"]), str(data["accumulator"]), str(data["accumulatorMeta"]))
            indices = np.asarray(data["indices"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError("malformed", f"gradient request field missing or of the wrong type: {exc!r}") from exc
        if not 0 <= peer < spec.peers:
            raise RequestError("unknown-peer", f"peer {peer} is not in this job (peers={spec.peers})")
        expected = self.config.redis[peer]
        if address != str(expected):
            # Never connect where an event says: only to the peer's own Redis from the job config.
            raise RequestError("unknown-peer", f"redis {address!r} is not peer {peer}'s Redis ({expected})")
        owned = Keys(spec.name, peer)
        if not all(owned.owns(k) for k in keys):
            raise RequestError("malformed", f"keys must start with {owned.prefix + ':'!r}")
        if indices.ndim != 1 or not 0 < indices.size <= spec.batch_size:
            raise RequestError("shape", f"indices must be a list of 1..{spec.batch_size} sample numbers")
        n_train = len(self._dataset.y_train)
        if indices.min() < 0 or indices.max() >= n_train:
            raise RequestError("shape", f"sample indices must lie in [0, {n_train})")
        if version < 0 or round_index < 0:
            raise RequestError("version", "round and version must be non-negative")
        return GradientRequest(peer, round_index, version, part, expected, *keys, indices=indices)

    def process(self, request: GradientRequest) -> dict[str, Any]:
        """Compute the micro-batch's gradient and add it into the peer's accumulator."""
        assert self._dataset is not None and self._model is not None
        timings: dict[str, float] = {}
        cpu_started = cpu_clock()
        with self._lock:
            self._served += 1
            cold = self._served == 1
        if cold:
            metrics.FUNCTION_COLD_STARTS_TOTAL.labels(**self._labels).inc()
        t0 = time.perf_counter()
        client, accumulator = self._client(request.redis)
        flat, model_read_bytes = self._load_params(client, request)
        timings["load"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with self._computer() as computer:  # held until the gradient, its buffer, is sent
            loss, correct, gradient = self._compute(computer, flat, request.indices, copy=False)
            timings["compute"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            blob = wire.raw_float32(gradient)
            added = accumulator.add(client, request.accumulator_key, request.accumulator_meta_key, request.part,
                                    float(request.indices.size), blob)
            timings["accumulate"] = time.perf_counter() - t0
        # What this invocation used, so the peer can account without scraping (docs/wire.md, "cost");
        # ``handle`` adds the wall time of the whole request.
        usage = {
            "cpuSeconds": cpu_clock() - cpu_started,
            "memoryBytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB; peak RSS
            "modelReadBytes": model_read_bytes,
            "accumulatorWriteBytes": len(blob),
        }
        return {
            "peer": request.peer, "round": request.round, "part": request.part, "samples": int(request.indices.size),
            "loss": loss, "correct": correct, "added": added, "cold": cold, "pid": os.getpid(),
            "device": self._device.type, "timings": timings, "cost": usage,
        }

    def gradient(self, flat_params: torch.Tensor, indices: np.ndarray) -> tuple[float, int, torch.Tensor]:
        """The gradient on these training samples (``GradientModel.gradient``), safe to call from
        concurrent threads."""
        with self._computer() as computer:
            return self._compute(computer, flat_params, indices, copy=True)

    def _compute(self, computer: GradientModel, flat_params: torch.Tensor, indices: np.ndarray,
                 *, copy: bool) -> tuple[float, int, torch.Tensor]:
        assert self._dataset is not None
        loss, correct, gradient = computer.gradient(
            flat_params, self._dataset.x_train[indices], self._dataset.y_train[indices], copy=copy
        )
        return loss, correct, gradient.cpu()  # on a GPU, a copy to the host

    @contextlib.contextmanager
    def _computer(self) -> Iterator[GradientModel]:
        """A ``GradientModel`` of this request's own, given back after."""
        assert self._model is not None
        try:
            computer = self._computers.get_nowait()
        except queue.Empty:
            computer = GradientModel(self._model)  # one more request computing at once than ever before
        try:
            yield computer
        finally:
            self._computers.put(computer)

    def _client(self, address: RedisAddress) -> tuple[redis.Redis, Accumulator]:
        with self._lock:
            if address not in self._clients:
                assert self.secrets is not None and self.config is not None
                client = connect(address, self.secrets.redis_password, socket_timeout=30)
                self._clients[address] = (client, detect(client, self.config.spec.redis.accumulator))
            return self._clients[address]

    def _load_params(self, client: redis.Redis, request: GradientRequest) -> tuple[torch.Tensor, int]:
        """The version's parameters and the bytes read from Redis for them (0 from the cache, or when
        another request's read of the same version was waited for)."""
        return self._versions.get((request.peer, request.version), lambda: self._read_params(client, request))

    def _read_params(self, client: redis.Redis, request: GradientRequest) -> tuple[torch.Tensor, int]:
        blob = cast(bytes | bytearray | None, client.get(request.model_key))
        if blob is None:
            raise RequestError("version", f"model version {request.version} is not in peer {request.peer}'s Redis", 409)
        assert self._model is not None
        numel = self._numel
        # Cached on the compute device: a version crosses to the GPU once, not once per micro-batch.
        flat = torch.from_numpy(wire.decode_tensor(blob, expected_numel=numel, reuse=True)).to(self._device)
        metrics.FUNCTION_MODEL_LOADS_TOTAL.labels(**self._labels).inc()
        return flat, len(blob)


class VersionCache:
    """The newest ``size`` model versions an instance has read, by (peer, version), and the reads in
    flight: a request for a version another request is reading now waits for that read instead of
    reading the same bytes again (the micro-batches of a round arrive together). A failed read is not
    remembered; the requests that waited for it fail with its error."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._done: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._reading: dict[tuple[int, int], concurrent.futures.Future[torch.Tensor]] = {}

    def get(self, key: tuple[int, int], read: Callable[[], tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
        """The version and the bytes this call read for it (0 when cached or read by another call)."""
        with self._lock:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key], 0
            pending = self._reading.get(key)
            reader = pending is None
            if pending is None:
                pending = self._reading[key] = concurrent.futures.Future()
        if not reader:
            return pending.result(), 0
        try:
            value, read_bytes = read()
        except BaseException as exc:
            with self._lock:
                del self._reading[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            self._done[key] = value
            while len(self._done) > self.size:
                self._done.popitem(last=False)
            del self._reading[key]
        pending.set_result(value)
        return value, read_bytes


def cpu_clock() -> float:
    """CPU seconds of the thread handling a request: with torch on one thread (the default,
    ``P2PTRAIN_TORCH_THREADS=1``) that is all of its compute, and requests served at once are told
    apart; with more torch threads the work spreads over torch's pool, so the whole process is counted."""
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


async def _reply_error(send: Send, status: int, reason: str, message: str) -> None:
    await asgi.respond(getattr(send, "http", send), status, message.encode(), reason=reason)


def new() -> GradientFunction:
    """func-python's constructor hook: configuration is read in ``start`` from the environment."""
    memory.keep_freed_buffers()  # served by func-python's own entry point, not p2ptrain's
    return GradientFunction()
