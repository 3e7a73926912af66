"""This peer's replica of the model: the model and optimizer, the robust aggregation of a round's
gradients, the optimizer step, evaluation and (un)packing of state.

Everything here is CPU work that the round runs in a worker thread; a lock keeps one thread at a time
on the model, so ``GET /model`` never reads a half-applied step.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch
import xxhash

from p2ptrain import wire
from p2ptrain.aggregate import AggregationError, CenteredClipping, aggregate, mean_of_rows, minimum_gradients
from p2ptrain.checkpoint import CheckpointError, extra_tensors, pack_state, unpack_state
from p2ptrain.data import Dataset, load_dataset
from p2ptrain.models import build_model
from p2ptrain.momentum import CHECKPOINT_KEY, WorkerMomentum
from p2ptrain.peer.errors import PeerError
from p2ptrain.spec import AggregationSpec, JobSpec, OptimizerSpec

log = logging.getLogger(__name__)

_EVAL_BATCH = 4096


class SkipUpdate(Exception):
    """This round's gradients cannot be aggregated; ``reason`` is one of ``metrics.SKIP_REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def build_optimizer(model: torch.nn.Module, opt: OptimizerSpec) -> torch.optim.Optimizer:
    if opt.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.learning_rate, momentum=opt.momentum, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(model.parameters(), lr=opt.learning_rate, weight_decay=opt.weight_decay)
    if opt.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, weight_decay=opt.weight_decay)
    raise PeerError(f"optimizer.name={opt.name!r} is not supported: use sgd, adam or adamw")


def aggregate_gradients(
    rule: AggregationSpec,
    gradients: dict[int, np.ndarray],
    *,
    stack: torch.Tensor | None = None,
    clipping: CenteredClipping | None = None,
) -> torch.Tensor:
    """The configured robust rule over the round's gradients (ordered by peer); raises ``SkipUpdate``.

    ``stack``: a preallocated [peers, d] float32 matrix the gradients are copied into (one copy, no
    new allocation per round); for the mean, a [d] vector the mean is written into (the result is then
    that buffer, valid until the next call). ``clipping``: the job's centered-clipping state.
    """
    needed = minimum_gradients(rule.rule, rule.byzantine)
    if len(gradients) < needed:
        raise SkipUpdate("too-few-gradients", f"only {len(gradients)} gradients arrived: {rule.rule} needs {needed}")
    rows = [gradients[i] for i in sorted(gradients)]
    params: dict[str, Any] = {}
    if rule.rule == "multi-krum" and rule.multi_krum_select is not None:
        params["m"] = min(rule.multi_krum_select, len(gradients))
    try:
        if rule.rule == "mean":  # the rows as they arrived: no [peers, d] copy for the default rule
            return mean_of_rows(rows, out=stack)
        stacked = _stack(rows, stack)
        if rule.rule == "centered-clipping" and clipping is not None:
            return clipping(stacked, rule.byzantine)
        return aggregate(rule.rule, stacked, rule.byzantine, **params)
    except AggregationError as exc:
        raise SkipUpdate("rule-failed", f"aggregation failed: {exc}") from exc


def _stack(rows: list[np.ndarray], stack: torch.Tensor | None) -> torch.Tensor:
    if stack is None or stack.shape[0] < len(rows) or any(r.shape != (stack.shape[1],) for r in rows):
        return torch.from_numpy(np.stack(rows))
    target = stack[: len(rows)]
    out = target.numpy()
    for slot, row in enumerate(rows):
        out[slot] = row
    return target


def _in_one_wire_tensor(model: torch.nn.Module, numel: int) -> bytearray | None:
    """Move the parameters of ``model`` into one uncompressed float32 ``p2ptrain.wire`` tensor: each
    parameter becomes a view of its payload, so the optimizer steps it in place and publishing a model
    version sends this buffer as it is (no concatenation, no encoding: two 4.5 MB copies fewer a round
    for a 1.13M-parameter model). None, and nothing moved, unless every parameter is float32 on the CPU."""
    parameters = list(model.parameters())
    if not parameters or any(p.dtype != torch.float32 or p.device.type != "cpu" for p in parameters):
        return None
    buffer, flat = wire.float32_buffer(numel)
    offset = 0
    with torch.no_grad():
        for p in parameters:
            n = p.numel()
            flat[offset : offset + n].copy_(p.reshape(-1))
            p.data = flat[offset : offset + n].view_as(p)
            offset += n
    return buffer


class Replica:
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.dataset: Dataset = load_dataset(spec.dataset)
        torch.manual_seed(spec.seed)  # identical initial replicas on every peer
        self.model = build_model(spec.model, self.dataset.input_shape, self.dataset.num_classes)
        self.optimizer = build_optimizer(self.model, spec.optimizer)
        self._params = [(p, p.numel()) for p in self.model.parameters()]  # the step walks them every round
        self.numel = sum(n for _, n in self._params)
        self._wire = _in_one_wire_tensor(self.model, self.numel)
        self.lock = threading.Lock()  # one thread at a time on the model and optimizer
        rule = spec.aggregation
        # Reused every round: a fresh [peers, d] matrix per round costs page faults, not just a copy.
        # The mean gathers nothing (it sums the gradients where they are): its buffer is the one vector
        # it sums into, which the round's step reads before the next round's mean overwrites it.
        shape = (self.numel,) if rule.rule == "mean" else (spec.peers, self.numel)
        self.stack = torch.empty(shape, dtype=torch.float32)
        # Centered clipping's center is the previous round's aggregate: one instance for the whole job,
        # its center saved in the checkpoint so a restarted peer aggregates exactly as the others do.
        self.clipping = CenteredClipping(radius=rule.radius) if rule.rule == "centered-clipping" else None
        # aggregation.momentum: this peer's momentum of its own gradients is what it publishes, and
        # state of the run like the center: saved in the checkpoint, adopted on catch-up and resync.
        self.momentum = WorkerMomentum(rule.momentum) if rule.momentum > 0 else None

    def aggregate(self, gradients: dict[int, np.ndarray]) -> torch.Tensor:
        """This round's robust aggregate (raises ``SkipUpdate``); updates the rule's state, if any."""
        return aggregate_gradients(self.spec.aggregation, gradients, stack=self.stack, clipping=self.clipping)

    def published(self, round_index: int, gradient: np.ndarray) -> np.ndarray:
        """What this peer sends for its own ``gradient``: with aggregation.momentum, its momentum."""
        return gradient if self.momentum is None else self.momentum.step(round_index, gradient)

    def parameters(self) -> np.ndarray:
        """A copy of the flat parameters (what the gradient functions compute at)."""
        with self.lock:
            return torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().numpy()  # a new tensor

    def wire_model(self) -> tuple[np.ndarray, memoryview] | None:
        """The parameters as they are, no copy: (flat float32 view, the whole float32 wire tensor) for
        publishing, valid until the next step changes them. None for a model whose parameters are not
        all float32 on the CPU (``parameters`` copies them then)."""
        if self._wire is None:
            return None
        return np.frombuffer(self._wire, dtype="<f4", offset=wire.TENSOR_HEADER_BYTES), memoryview(self._wire)

    def params_hash(self) -> str:
        """XXH3-128 of the parameters' float32 bytes: equal on every peer while the replicas are identical.

        A check that honest replicas agree, not a defence (a peer reports its own hash): a fast
        non-cryptographic hash does, and SHA-256 cost 2.3 ms of CPU per 10^6 parameters every round
        (XXH3: 0.06 ms), 5-10% of a 1.13M-parameter round on 2 cores (docs/design-notes.md)."""
        digest = xxhash.xxh3_128()
        with self.lock:  # parameter by parameter, in place: the digest of their concatenation, no copy
            for p in self.model.parameters():
                digest.update(p.detach().contiguous().numpy().astype("<f4", copy=False).data)
        return digest.hexdigest()[:16]

    def apply(self, gradient: torch.Tensor) -> None:
        """One optimizer step with ``gradient`` (flat) as every parameter's gradient."""
        with self.lock:
            offset = 0
            for p, n in self._params:
                # A view, not a copy: torch's optimizers read ``grad`` and never write into it.
                p.grad = gradient[offset : offset + n].view_as(p)
                offset += n
            self.optimizer.step()
            for p, _ in self._params:  # zero_grad(set_to_none=True) without its per-call wrappers
                p.grad = None

    def evaluate(self) -> tuple[float, float] | None:
        """(accuracy, mean loss) on the held-out split; None when the data set has none."""
        data = self.dataset
        if len(data.y_test) == 0:
            return None
        with self.lock:
            self.model.eval()
            correct, loss_sum = 0, 0.0
            try:
                with torch.no_grad():
                    for start in range(0, len(data.y_test), _EVAL_BATCH):
                        x = torch.from_numpy(data.x_test[start : start + _EVAL_BATCH])
                        y = torch.from_numpy(data.y_test[start : start + _EVAL_BATCH])
                        logits = self.model(x)
                        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
                        correct += int((logits.argmax(dim=1) == y).sum())
            finally:
                self.model.train()
        n = len(data.y_test)
        return correct / n, loss_sum / n

    def pack(self, meta: dict[str, Any]) -> bytes:
        with self.lock:
            extra = {}
            if self.clipping is not None and self.clipping.center is not None:
                extra["clipping.center"] = self.clipping.center
            if self.momentum is not None:
                # Always present (zeros: no history yet), so every peer's checkpoints have one layout
                # and the median of several (catch-up, resync) can be taken.
                momentum = self.momentum.state_after(int(meta["round"]))
                extra[CHECKPOINT_KEY] = torch.zeros(self.numel) if momentum is None else torch.from_numpy(momentum)
            return pack_state(self.model, self.optimizer, meta, extra)

    def load(self, state: bytes) -> None:
        """Adopt a packed state (own checkpoint or other peers'); raises ``CheckpointError``."""
        with self.lock:
            meta = unpack_state(state, self.model, self.optimizer)
            if self.momentum is not None:
                momentum = extra_tensors(state).get(CHECKPOINT_KEY)
                if momentum is not None and momentum.shape != (self.numel,):
                    raise CheckpointError(f"{CHECKPOINT_KEY} has shape {tuple(momentum.shape)}, expected ({self.numel},)")
                if momentum is not None:  # none in the ps aggregator's state: the peer keeps its own
                    self.momentum.restore(int(meta.get("round", -1)), momentum.numpy())
            if self.clipping is not None:
                center = extra_tensors(state).get("clipping.center")
                if center is not None and center.shape != (self.numel,):
                    raise CheckpointError(f"clipping.center has shape {tuple(center.shape)}, expected ({self.numel},)")
                self.clipping.center = center  # None: rebuilt from the next round's median

    def final_state(self) -> dict[str, torch.Tensor]:
        with self.lock:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
