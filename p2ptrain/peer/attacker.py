"""FOR EVALUATION ONLY: a peer that ``spec.evaluation.attack`` names turns Byzantine on the sending path.

``PeerAttack.outgoing`` takes the peer's honest in-database average and returns what the attacker sends
instead (``p2ptrain.attack``), or None to send nothing. What the attackers know, stated once:
- their own honest gradient (and, for label-flip, their own minibatch, relabelled);
- for alie and ipm, the honest gradients of *this* round that reached them: honest peers broadcast
  before they aggregate, so an attacker waits for them (up to half of what is left of the round
  deadline) and uses what arrived — the omniscient, colluding attacker of the literature, limited to
  what the network really delivered. Attackers collude only in knowing who the honest peers are.
Label flipping is computed here, in the attacker, not by the gradient function: the function serves
honest peers too and stays free of evaluation-only switches (no attack flag can travel in a request
event), and a data-poisoning attacker controls its own data anyway. The attacker still fans out its
micro-batches, so the function sees the same load as from an honest peer.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import torch

from p2ptrain import metrics, retry
from p2ptrain.attack import Attacker, flip_labels
from p2ptrain.models import GradientModel
from p2ptrain.peer.context import PeerContext, PeerPart
from p2ptrain.peer.inbox import Inbox
from p2ptrain.peer.replica import Replica

log = logging.getLogger(__name__)


class PeerAttack(PeerPart):
    def __init__(self, ctx: PeerContext, inbox: Inbox, replica: Replica) -> None:
        super().__init__(ctx)
        attack = self.spec.evaluation.attack
        assert attack is not None and self.index in attack.peers, "built by for_peer"
        self.inbox = inbox
        self.replica = replica
        self.honest_peers = [p for p in range(self.spec.peers) if p not in attack.peers]
        self.attacker = Attacker(
            attack.kind, factor=attack.factor, sigma=attack.sigma, z=attack.z, epsilon=attack.epsilon,
            stale_rounds=attack.stale_rounds, seed=self.spec.seed * 1_000_003 + self.index,
        )
        # A copy of its own: the replica's model is read meanwhile (GET /model).
        self._computer = GradientModel(replica.model) if attack.kind == "label-flip" else None
        self.status.attack = attack.kind
        metrics.PEER_ATTACKING.labels(**self.labels, kind=attack.kind).set(1)
        log.warning("EVALUATION ONLY: peer %d is a Byzantine attacker (%s) as spec.evaluation.attack says; "
                    "this job's model is not a real training result", self.index, attack.kind,
                    extra={"reason": "attack"})

    @classmethod
    def for_peer(cls, ctx: PeerContext, inbox: Inbox, replica: Replica) -> PeerAttack | None:
        """The attack this peer runs, or None for an honest peer (every peer of a real job)."""
        return cls(ctx, inbox, replica) if ctx.spec.evaluation.attacks(ctx.index) else None

    async def outgoing(
        self, round_index: int, own: np.ndarray, indices: np.ndarray, deadline: float
    ) -> np.ndarray | None:
        """What this attacker sends for the round in place of ``own`` (None: nothing)."""
        if self.attacker.kind == "label-flip":
            own = await asyncio.to_thread(self._flipped_gradient, indices)
        # What it would publish as an honest peer (aggregation.momentum: its momentum); alie and ipm
        # are crafted from what the honest peers publish, the same momenta when momentum is set.
        own = self.replica.published(round_index, own)
        honest = None
        if self.attacker.needs_honest:
            wait_until = time.monotonic() + retry.remaining(deadline) / 2
            arrived = await self.inbox.wait_for(round_index, self.honest_peers, wait_until)
            if len(arrived) < len(self.honest_peers):
                log.info("round %d: %d of %d honest gradients reached the attacker in time", round_index + 1,
                         len(arrived), len(self.honest_peers))
            honest = np.stack([arrived[p] for p in sorted(arrived)]) if arrived else None
        return await asyncio.to_thread(self.attacker.craft, own, honest)

    def _flipped_gradient(self, indices: np.ndarray) -> np.ndarray:
        """The gradient of this round's minibatch with flipped labels, at the round's parameters."""
        assert self._computer is not None
        data = self.replica.dataset
        params = torch.from_numpy(self.replica.parameters())
        labels = flip_labels(data.y_train[indices], data.num_classes)
        _, _, gradient = self._computer.gradient(params, data.x_train[indices], labels)
        result: np.ndarray = gradient.numpy().astype(np.float32, copy=False)
        return result
