"""The exchange inbox: the gradients of other peers (and our own) filed by round, and the wait that
closes a round on a quorum, on the deadline, or as soon as every missing peer has moved past it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

import numpy as np

from p2ptrain import retry


class Inbox:
    def __init__(self, peers: int, index: int) -> None:
        self.peers = peers
        self.index = index
        self.current_round = 0  # the round this peer is in; older gradients are stale
        self._gradients: dict[int, dict[int, np.ndarray]] = {}
        self._newest_from: dict[int, int] = {}  # the latest round each peer sent a gradient for
        self._changed = asyncio.Condition()

    def holds(self, round_index: int, sender: int) -> bool:
        return sender in self._gradients.get(round_index, {})

    async def file(self, round_index: int, sender: int, gradient: np.ndarray) -> bool:
        """File a gradient; False if this sender's gradient for the round is already here (a duplicate)."""
        async with self._changed:
            if self.holds(round_index, sender):
                return False
            self._gradients.setdefault(round_index, {})[sender] = gradient
            self._newest_from[sender] = max(round_index, self._newest_from.get(sender, -1))
            self._changed.notify_all()
        return True

    async def collect(self, round_index: int, quorum: int, deadline: float) -> dict[int, np.ndarray]:
        """The round's gradients once it closes (see ``closed``) or at ``deadline``; forgets older rounds."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.closed(round_index, quorum)), timeout=retry.remaining(deadline)
                )
            gradients = self._gradients.pop(round_index, {})
            for old in [r for r in self._gradients if r < round_index]:
                del self._gradients[old]
        return gradients

    async def wait_for(self, round_index: int, senders: Collection[int], deadline: float) -> dict[int, np.ndarray]:
        """The round's gradients from ``senders`` once all are here or at ``deadline``; the round stays open."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: all(self.holds(round_index, s) for s in senders)),
                    timeout=retry.remaining(deadline),
                )
            arrived = self._gradients.get(round_index, {})
            return {s: arrived[s] for s in senders if s in arrived}

    async def wait_closed(self, round_index: int, quorum: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the round to close, without collecting it (the aggregator
        checks the peers' outboxes between waits)."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.closed(round_index, quorum)), timeout=timeout)
            return self.closed(round_index, quorum)

    def closed(self, round_index: int, quorum: int) -> bool:
        """A quorum arrived, or every peer still missing has already sent a later round's gradient.

        Peers send their rounds in order, so one that has moved past this round will never send it
        (it was down, or we were): waiting for the deadline could not help, and a peer that is behind
        catches up one quick round at a time instead of one deadline at a time.
        """
        arrived = self._gradients.get(round_index, {})
        if len(arrived) >= quorum:
            return True
        missing = [p for p in range(self.peers) if p not in arrived and p != self.index]
        return all(self._newest_from.get(p, -1) > round_index for p in missing)

    def missing(self, gradients: dict[int, np.ndarray]) -> list[int]:
        return [p for p in range(self.peers) if p not in gradients and p != self.index]
