"""What keeps the exchange's fixed cost down, against real parts (two peers' endpoints served by
``asgi.serve``, real redis-server processes, the hot-path client): a gradient event that carries its
gradient goes out while the outbox write is still under way, so the other peers do not wait a Redis
round trip for it every round. Timing figures: bench/call.py and bench/round.py."""

from __future__ import annotations

import asyncio

import numpy as np

from p2ptrain.peer.sender import GradientSender
from p2ptrain.poster import Poster

from .harness import make_spec, running_job, wait_until


async def test_an_event_carrying_its_gradient_reaches_a_peer_while_the_outbox_write_waits() -> None:
    spec = make_spec("exchange-cost", peers=2)
    async with running_job(spec) as job:
        sending_peer, receiving_peer = job.peers
        gradient = np.full(sending_peer.replica.numel, 0.5, dtype=np.float32)
        paused = job.redis[0].client()
        # The sender's Redis holds every write (the outbox SET) until unpaused; reads and the
        # receiving peer's Redis are untouched.
        paused.execute_command("CLIENT", "PAUSE", 60_000, "WRITE")
        try:
            async with Poster() as http:
                sender = GradientSender(sending_peer.ctx, sending_peer.store, http)
                sending = asyncio.create_task(sender.send(0, gradient))
                await wait_until(lambda: receiving_peer.inbox.holds(0, 0), timeout=30)
                received_while_parking = receiving_peer.inbox.holds(0, 0) and not sending.done()
                paused.execute_command("CLIENT", "UNPAUSE")
                await asyncio.wait_for(sending, timeout=30)
                await sender.drain()
        finally:
            paused.execute_command("CLIENT", "UNPAUSE")
        assert received_while_parking
        # And it is parked all the same, for a peer that misses the event.
        assert paused.get(sending_peer.store.keys.outbox(0)) is not None
