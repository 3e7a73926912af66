"""One peer of a job: the round (``round``), the exchange inbox, receiver and sender, the gradient
function client, recovery from other peers' Redis, the replica, the HTTP endpoint and the process.

Modules import downward only: ``process`` → ``round`` → the parts → ``errors``.
"""

from p2ptrain.peer.errors import PeerError
from p2ptrain.peer.process import serve_peer
from p2ptrain.peer.report import RoundReport
from p2ptrain.peer.round import Peer

__all__ = ["Peer", "PeerError", "RoundReport", "serve_peer"]
