"""The peer's exception family."""

from __future__ import annotations


class PeerError(RuntimeError):
    """The peer cannot continue (its Redis is gone, no gradient could be computed, ...)."""
