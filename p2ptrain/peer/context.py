"""What every part of one peer shares: the job's runtime config, which peer this is, its secrets,
its live status and its metric labels. ``Peer`` builds one ``PeerContext``; each part it composes
(function client, sender, receiver, other peers) takes it instead of the same six arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from p2ptrain import metrics
from p2ptrain.config import RuntimeConfig, Secrets
from p2ptrain.cost import memory_bytes
from p2ptrain.ledger import PeerCost
from p2ptrain.spec import JobSpec
from p2ptrain.status import PeerStatus


def due(every: int, round_index: int, rounds: int) -> bool:
    """Whether what a peer does every ``every`` rounds and after the last (evaluation, hash, checkpoint,
    resync) is due after round ``round_index`` (0-based) of ``rounds``."""
    return (round_index + 1) % every == 0 or round_index + 1 == rounds


@dataclass(frozen=True)
class PeerContext:
    config: RuntimeConfig
    index: int
    secrets: Secrets
    status: PeerStatus
    labels: dict[str, str] = field(init=False)
    cost: PeerCost = field(init=False)  # the peer's ledger, kept in status.cost

    def __post_init__(self) -> None:
        spec = self.config.spec
        object.__setattr__(self, "labels", self.metric_labels())
        ledger = PeerCost(self.labels, self.status.cost, memory_bytes(spec.function.resources))
        object.__setattr__(self, "cost", ledger)

    def metric_labels(self) -> dict[str, str]:
        return metrics.peer_labels(self.spec.name, self.spec.namespace, self.index)

    @property
    def spec(self) -> JobSpec:
        return self.config.spec


class PeerPart:
    """A part of a peer: the shared context, with its fields at hand."""

    def __init__(self, ctx: PeerContext) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.spec = ctx.spec
        self.index = ctx.index
        self.secrets = ctx.secrets
        self.status = ctx.status
        self.labels = ctx.labels
        self.cost = ctx.cost
