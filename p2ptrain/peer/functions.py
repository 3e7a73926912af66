"""The gradient function client: publish the model version the functions read, fan a round's
minibatch out as signed ``gradient.requested`` events, retry each micro-batch with backoff until the
deadline, and check every reply.

A failed attempt of any kind — no answer, an error status, or a 200 whose reply fails its signature
or schema — is counted, logged and retried; a micro-batch that never succeeds is left out of the
round. Only ``MAX_ROUNDS_WITHOUT_GRADIENT`` rounds in a row without any gradient fail the peer. A
non-finite gradient is not an outage: it is never retried, and the round raises ``Diverged``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from p2ptrain import metrics, retry, wire
from p2ptrain.data import split_micro_batches
from p2ptrain.ledger import tensor_blob_bytes
from p2ptrain.peer.context import PeerContext, PeerPart
from p2ptrain.peer.divergence import Diverged
from p2ptrain.peer.errors import PeerError
from p2ptrain.poster import Poster, PostError
from p2ptrain.store import PeerStore

log = logging.getLogger(__name__)

# Consecutive rounds without a single successful gradient function call before the peer gives up.
MAX_ROUNDS_WITHOUT_GRADIENT = 3
_CALL_BACKOFF = retry.Backoff(first=0.1, cap=2.0, jitter=True)


@dataclass(frozen=True)
class Receipt:
    """A checked ``gradient.computed`` reply."""

    samples: int
    loss: float
    cold: bool
    cost: Mapping[str, float] = field(default_factory=dict)  # the reply's optional ``cost`` (docs/wire.md)


class _NonFinite(Exception):
    """The function computed a non-finite gradient: the model or the data diverged, not an outage."""


def is_non_finite_answer(status: int, reason: str | None, text: str) -> bool:
    """Whether an error reply says the micro-batch's gradient is not finite.

    The function may name it (``X-P2PTrain-Reason: non-finite``); otherwise the accumulator's refusal
    reaches the peer as a 503 "redis" reply carrying the accumulator's error text.
    """
    return reason == "non-finite" or (status >= 400 and "non-finite" in text)


def left_out_non_finite(ctx: PeerContext, round_index: int, non_finite: list[str]) -> None:
    """``training.onDivergence=skipRound``: micro-batches with non-finite gradients leave the round
    (logged, counted); the rest of it goes on."""
    log.warning("round %d: %d micro-batch(es) had non-finite gradients and are left out: %s",
                round_index + 1, len(non_finite), non_finite[0], extra={"reason": "divergence"})
    ctx.status.count_skipped_update("divergence")
    metrics.UPDATES_SKIPPED_TOTAL.labels(**ctx.labels, reason="divergence").inc()
    metrics.DIVERGENCES_TOTAL.labels(**ctx.labels, cause="non-finite-gradient").inc()


class BadReply(ValueError):
    """A 200 from the function whose event cannot be trusted or read."""


def read_receipt(headers: dict[str, str], body: bytes, key: bytes) -> Receipt:
    try:
        reply = wire.from_http(headers, body)
        wire.verify(reply, key)
        data = wire.event_json(reply)
    except wire.WireError as exc:
        raise BadReply(f"{exc.reason}: {exc}") from exc
    samples, loss = data.get("samples"), data.get("loss")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        raise BadReply(f"reply field 'samples' must be a non-negative integer, got {samples!r}")
    if not isinstance(loss, int | float) or isinstance(loss, bool):
        raise BadReply(f"reply field 'loss' must be a number, got {loss!r}")
    cost = data.get("cost", {})
    if not isinstance(cost, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in cost.values()
    ):
        raise BadReply(f"reply field 'cost' must be an object of non-negative numbers, got {cost!r}")
    return Receipt(samples=samples, loss=float(loss), cold=bool(data.get("cold")), cost=cost)


class FunctionClient(PeerPart):
    def __init__(self, ctx: PeerContext, store: PeerStore, http: Poster) -> None:
        super().__init__(ctx)
        self.store = store
        self.http = http
        self._published: tuple[int, np.ndarray, memoryview | None] | None = None  # the version functions read
        self._rounds_without_gradient = 0

    async def publish(self, round_index: int, params: np.ndarray, encoded: memoryview | None = None) -> str:
        """Write model version ``round_index`` for the functions (``encoded``: ``params`` as a wire tensor
        already, sent as it is)."""
        key = await asyncio.to_thread(self.store.publish_model, round_index, params, encoded)
        self.cost.redis_bytes("modelPublished", tensor_blob_bytes(params.size))
        self._published = (round_index, params, encoded)
        return key

    async def fan_out(
        self, round_index: int, model_key: str, indices: np.ndarray, deadline: float, *, skip_non_finite: bool = False
    ) -> list[Receipt]:
        """Every micro-batch of the round; the receipts of those that succeeded before the deadline.

        A non-finite gradient raises ``Diverged`` after every call has ended, or with ``skip_non_finite``
        leaves that micro-batch out (counted).
        """
        keys = self.store.keys
        address = self.config.redis[self.index]
        calls = [
            self._call(
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
            for n, part in enumerate(split_micro_batches(indices, self.spec.functions_per_peer))
        ]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        non_finite = [a for a in answers if isinstance(a, _NonFinite)]
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, _NonFinite):
                raise answer
        if non_finite and not skip_non_finite:
            raise Diverged("non-finite-gradient", round_index, f"the gradient function answered: {non_finite[0]}")
        receipts = [r for r in answers if isinstance(r, Receipt)]
        if non_finite:
            # training.onDivergence=skipRound: those micro-batches are left out (the accumulator refused
            # them), the rest of the round goes on; a diverged model is not an outage of the function.
            left_out_non_finite(self.ctx, round_index, [str(a) for a in non_finite])
            return receipts
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

    async def average(self, round_index: int, park: bool = False) -> tuple[np.ndarray, float, int] | None:
        """The round's mean gradient, as the functions summed it in Redis; the accumulator is cleared.
        ``park``: Redis also parks it in the round's outbox (``PeerStore.take_average``)."""
        average = await asyncio.to_thread(functools.partial(self.store.take_average, round_index, park=park))
        self.cost.redis_bytes("meanRead", average[0].nbytes if average is not None else 0)
        return average

    async def _call(self, request: dict[str, Any], deadline: float) -> Receipt | None:
        """One micro-batch, retried with backoff (cold starts, killed instances, bad replies) until the deadline."""
        attempts = self.spec.function.retries + 1
        last_error = ""
        for attempt in range(attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if attempt:
                # Counted when made, not when planned: a retry the deadline cut off never reached the
                # function, so attempts (billed invocations) = micro-batches + retries.
                metrics.FUNCTION_RETRIES_TOTAL.labels(**self.labels).inc()
                self.status.function_retries += 1
            event = wire.build_event(
                wire.GRADIENT_REQUESTED,
                wire.peer_source(self.spec.namespace, self.spec.name, self.index),
                data=request,
                subject=f"round/{request['round']}",
                extensions={"round": request["round"], "peer": self.index},
                key=self.secrets.signing_key,
            )
            headers, body = wire.to_http(event)
            self.cost.invoked()
            try:
                response = await self.http.post(
                    self.config.function_url,
                    headers=headers,
                    content=body,
                    timeout=min(self.spec.function.timeout_seconds, remaining),
                )
            except PostError as exc:
                last_error = self._failed("http", str(exc))
            else:
                if response.status == 200:
                    try:
                        receipt = read_receipt(response.headers, response.content, self.secrets.signing_key)
                    except BadReply as exc:
                        last_error = self._failed("reply", f"bad reply: {exc}")
                    else:
                        if receipt.cold:
                            self.status.function_cold_starts += 1
                        self.cost.computed(receipt.cost, receipt.cold)
                        return receipt
                else:
                    if is_non_finite_answer(
                        response.status, response.headers.get("x-p2ptrain-reason"), response.text[:1000]
                    ):
                        raise _NonFinite(f"micro-batch {request['part']}: {response.text[:200]}")
                    last_error = self._failed("status", f"HTTP {response.status}: {response.text[:200]}")
                    if 400 <= response.status < 500 and response.status not in (408, 409, 429):
                        break  # the request itself is wrong; retrying cannot help
                    if response.headers.get("x-p2ptrain-reason") == "version" and self._published is not None:
                        # Our Redis lost the model version (it restarted empty): publish it again.
                        await asyncio.to_thread(self.store.publish_model, *self._published)
                        self.cost.redis_bytes("modelPublished", tensor_blob_bytes(self._published[1].size))
            if attempt + 1 < attempts:
                log.info("retrying micro-batch", extra={"part": request["part"], "attempt": attempt + 1, "error": last_error})
                await retry.sleep_before_retry(_CALL_BACKOFF, attempt, deadline)
        log.warning("micro-batch %s failed: %s", request["part"], last_error)
        return None

    def _failed(self, reason: str, detail: str) -> str:
        metrics.FUNCTION_CALL_FAILURES_TOTAL.labels(**self.labels, reason=reason).inc()
        self.status.count_function_failure(reason)
        return detail
