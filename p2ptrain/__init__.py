"""p2ptrain: peer-to-peer, serverless, Byzantine-robust data-parallel training (SPIRT on Kubernetes).

The engine lives here (spec, wire, store, aggregation, peer, gradient function, local runner); the
Kubernetes operator is the ``p2ptrain_operator`` package in ``operator/``.
"""

__version__ = "0.1.0"
