"""Where a round's aggregate becomes the next model version, and the checkpoint off the critical path.

``spec.update: peer`` takes the optimizer step on this peer's torch replica and publishes every
version to Redis. ``spec.update: database`` takes it inside the peer's Redis, where the model lives
(:class:`p2ptrain.dbupdate.ModelUpdater`): version *v + 1* appears beside *v* and the gradient
functions read it with no re-publish; the torch replica is brought level (read back) only when it is
needed: evaluation, the parameter hash, the checkpoint, the end of the run.

The checkpoint of round *r* is copied and written by background threads while round *r + 1* fans out
and exchanges. At most one is in flight, and the next optimizer step waits for its copy, so it always
holds exactly round *r*'s state; a peer killed before it lands resumes at round *r* as it did when the
write was synchronous (every step of a round is idempotent).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from p2ptrain import asgi
from p2ptrain.accumulator import ROUND_KEY_TTL_SECONDS
from p2ptrain.dbupdate import (
    AdamSettings,
    ModelUpdater,
    SgdSettings,
    read_model,
    read_state,
    settings_for,
    write_state,
)
from p2ptrain.ledger import PeerCost
from p2ptrain.peer.replica import Replica
from p2ptrain.spec import JobSpec
from p2ptrain.store import PeerStore

log = logging.getLogger(__name__)


class RoundUpdate:
    """Publish, step, read back and checkpoint for one peer (``spec.update`` picks where the step runs)."""

    def __init__(self, spec: JobSpec, replica: Replica, store: PeerStore, cost: PeerCost) -> None:
        self.spec = spec
        self.cost = cost
        self.replica = replica
        self.store = store
        self.in_database = spec.update == "database"
        self._settings: SgdSettings | AdamSettings | None = None
        self._updater: ModelUpdater | None = None
        if self.in_database:
            opt = spec.optimizer
            self._settings = settings_for(opt.name, lr=opt.learning_rate, momentum=opt.momentum,
                                          weight_decay=opt.weight_decay)
            self._updater = ModelUpdater.like(store.accumulator)
        self._stepped_to: int | None = None  # the version the last in-database step wrote
        self._replica_behind = False  # Redis holds a newer version than the torch replica
        self._pending: asyncio.Future[Any] | None = None  # the checkpoint in flight: copy, then write
        self._packing: asyncio.Future[tuple[bytes | None, str | None]] | None = None  # its copy (and hash)

    @property
    def model_bytes(self) -> int:
        return 4 * self.replica.numel

    @property
    def state_key(self) -> str:
        return f"{self.store.keys.prefix}:optstate"

    # --- publish ---------------------------------------------------------------------------------------
    async def publish(self, round_index: int, publish: Any) -> str:
        """The key of model version ``round_index`` for the functions. ``publish(round, params)`` is the
        function client's publish, used whenever the replica's parameters must be written."""
        # The last step wrote this version, or (a round run again after a Redis outage) already took this
        # round's step: the version in Redis is the one to compute at, and the step will be a no-op.
        if self.in_database and self._stepped_to in (round_index, round_index + 1):
            if await asyncio.to_thread(self.store.client.exists, self.store.keys.model(round_index)):
                return self.store.keys.model(round_index)
            log.warning("model version %d is gone from Redis (restarted?): publishing it from the replica",
                        round_index)
        if self.in_database:
            await self.wait_for_checkpoint()  # its read-back (sync) and this one must not interleave
        # spec.update: peer: the previous round's checkpoint goes on being written to Redis while this
        # version is published and computed on (the replica's lock covers only the packing); the step
        # waits for the checkpoint's copy of the state, which it is about to change.
        if self._replica_behind:
            await asyncio.to_thread(self.sync)
        # The replica's parameters live in a wire tensor: published as they are (they do not change before
        # the step, after the functions have read them); otherwise a copy.
        as_they_are = self.replica.wire_model()
        if as_they_are is None:
            params = await asgi.off_loop_if_large(self.model_bytes, self.replica.parameters)
            key: str = await publish(round_index, params, None)
        else:
            key = await publish(round_index, *as_they_are)
        if self.in_database:
            # The optimizer state in Redis now follows the replica's, and no stale next version (a
            # step taken before a restart) can stand in for this run's step.
            await asyncio.to_thread(self._seed, round_index)
        return key

    def _seed(self, round_index: int) -> None:
        assert self._settings is not None
        client = self.store.client
        client.delete(self.store.keys.model(round_index + 1), self.state_key)
        state = flat_optimizer_state(self.replica, self._settings)
        if state is not None:
            write_state(client, self._settings, self.state_key, state)
        self._stepped_to = None

    # --- the step --------------------------------------------------------------------------------------
    async def apply(self, round_index: int, gradient: torch.Tensor) -> None:
        """One optimizer step with the round's aggregate: model version ``round_index + 1``."""
        # The checkpoint in flight copies (reads back, packs) the state this step is about to change: wait
        # for its copy; its write to Redis goes on during the step.
        await self.wait_for_pack()
        if not self.in_database:  # a step reads the parameters, the gradient and a state (SGD's momentum) once
            await asgi.off_loop_if_large(3 * self.model_bytes, self.replica.apply, gradient,
                                         limit=asgi.STREAM_ON_LOOP_MAX_BYTES)
            return
        await asyncio.to_thread(self._step_in_database, round_index, gradient.numpy())

    def _step_in_database(self, round_index: int, gradient: np.ndarray) -> None:
        assert self._updater is not None and self._settings is not None
        keys = self.store.keys
        # Version round - 1 is read by no function any more: the step writes the new version into it.
        self._updater.step(self.store.client, self._settings, keys.model(round_index), keys.model(round_index + 1),
                           self.state_key, gradient, ttl_seconds=ROUND_KEY_TTL_SECONDS,
                           reuse=keys.model(round_index - 1) if round_index >= 1 else None)
        self._stepped_to = round_index + 1
        self._replica_behind = True

    def sync(self) -> None:
        """Bring the torch replica level with the version the last in-database step wrote (blocking)."""
        if not self._replica_behind or self._stepped_to is None:
            return
        assert self._settings is not None
        client, numel = self.store.client, self.replica.numel
        params = read_model(client, self.store.keys.model(self._stepped_to), expected_numel=numel)
        state = read_state(client, self._settings, self.state_key, numel)
        load_flat(self.replica, params, state)
        self._replica_behind = False

    def replica_replaced(self) -> None:
        """The replica's state was replaced (re-synchronisation): the next publish writes it to Redis
        and seeds the in-database optimizer state from it, as after a catch-up."""
        self._stepped_to = None
        self._replica_behind = False

    async def synced(self) -> Replica:
        """The replica, level with the newest version (for evaluation and the parameter hash)."""
        if self._replica_behind:
            await asyncio.to_thread(self.sync)
        return self.replica

    # --- the checkpoint --------------------------------------------------------------------------------
    async def checkpoint(self, round_index: int, loss: float | None,
                         hashed: Callable[[str], None] | None = None) -> None:
        """Start checkpointing round ``round_index``'s state in the background (after the previous write):
        the state is copied (packed) first, then written to Redis; the next step waits for the copy only.
        With ``hashed``, the copy also hashes the parameters and ``hashed(digest)`` gets it (on the loop)."""
        await self._in_background(round_index, loss, hashed, write=True)

    async def hash_in_background(self, round_index: int, hashed: Callable[[str], None]) -> None:
        """The parameter hash of round ``round_index`` alone, taken as a checkpoint's copy is (in a worker
        thread, the next step waiting for it), with nothing written: for a round without a checkpoint."""
        await self._in_background(round_index, None, hashed, write=False)

    async def _in_background(self, round_index: int, loss: float | None, hashed: Callable[[str], None] | None,
                             *, write: bool) -> None:
        await self.wait_for_checkpoint()
        packing = asyncio.ensure_future(asyncio.to_thread(self._pack, round_index, loss, hashed is not None, write))
        self._packing = packing
        self._pending = asyncio.ensure_future(self._write_when_packed(packing, round_index, loss, hashed))

    def _pack(self, round_index: int, loss: float | None, with_hash: bool, write: bool) -> tuple[bytes | None, str | None]:
        self.sync()
        state = self.replica.pack({"round": round_index, "loss": loss}) if write else None
        return state, self.replica.params_hash() if with_hash else None

    async def _write_when_packed(self, packing: asyncio.Future[tuple[bytes | None, str | None]], round_index: int,
                                 loss: float | None, hashed: Callable[[str], None] | None) -> None:
        state, digest = await packing
        if hashed is not None and digest is not None:
            hashed(digest)
        if state is not None:
            await asyncio.to_thread(self.store.save_checkpoint, round_index, state, {"loss": loss})
            self.cost.redis_bytes("checkpointWritten", len(state))

    async def wait_for_pack(self) -> None:
        """Wait until the checkpoint in flight holds its copy of the state (its errors: ``wait_for_checkpoint``)."""
        packing, self._packing = self._packing, None
        if packing is not None:
            await asyncio.wait([packing])

    async def wait_for_checkpoint(self) -> None:
        """Wait for the write in flight, if any; its error (Redis gone) is raised here, once."""
        pending, self._pending, self._packing = self._pending, None, None
        if pending is not None:
            await pending

    async def close(self) -> None:
        """Let a write in flight finish and leave the replica level (the run's final state).

        Called on every way out of a run: a failure here is logged, never raised over the run's own.
        """
        try:
            await self.wait_for_checkpoint()
            await asyncio.to_thread(self.sync)
        except Exception as exc:  # the run's own outcome stands; this is its epilogue
            log.warning("the last checkpoint or read-back failed: %s", exc)


def flat_optimizer_state(replica: Replica, settings: SgdSettings | AdamSettings) -> dict[str, np.ndarray | float] | None:
    """The torch optimizer's state as :func:`p2ptrain.dbupdate.read_state` names it (flat); None before step 1."""
    if not settings.has_state:
        return None
    with replica.lock:
        params = list(replica.model.parameters())
        states = [replica.optimizer.state.get(p, {}) for p in params]
        if not all(states):
            return None
        if isinstance(settings, SgdSettings):
            return {"momentum_buffer": _flat(s["momentum_buffer"] for s in states)}
        return {
            "step": float(states[0]["step"]),
            "exp_avg": _flat(s["exp_avg"] for s in states),
            "exp_avg_sq": _flat(s["exp_avg_sq"] for s in states),
        }


def load_flat(replica: Replica, params: np.ndarray, state: dict[str, np.ndarray | float] | None) -> None:
    """Write flat parameters and flat optimizer state (as Redis keeps them) into the torch replica."""
    with replica.lock, torch.no_grad():
        flat = torch.from_numpy(params)
        offset = 0
        for p in replica.model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        if state is None:
            return
        offset = 0
        for p in replica.model.parameters():
            n = p.numel()
            entry = replica.optimizer.state[p]
            for name, value in state.items():
                if isinstance(value, np.ndarray):
                    entry[name] = torch.from_numpy(value[offset : offset + n].copy()).view_as(p)
                else:
                    entry[name] = torch.tensor(value, dtype=torch.float32)
            offset += n


def _flat(tensors: Any) -> np.ndarray:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).numpy()
