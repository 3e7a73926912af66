"""``topology: ps``: the aggregator (a parameter server with its own Redis) that takes every peer's
averaged gradient, aggregates, updates and checkpoints the model the peers then read. The peers' side
is ``p2ptrain.peer.ps_round``; docs/topology.md describes both."""

from p2ptrain.ps.aggregator import Aggregator

__all__ = ["Aggregator"]
