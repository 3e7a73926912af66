"""The peer's HTTP endpoint (ASGI): ``POST /`` takes gradient events; ``GET /status``, ``/model``
(safetensors of this replica as trained so far), ``/healthz`` and ``/metrics``.

Nothing large is computed on the event loop: the model is copied and serialised in a worker thread, so
``/healthz`` answers while the round aggregates or evaluates.
"""

from __future__ import annotations

import asyncio
import json

from prometheus_client import make_asgi_app

from p2ptrain import asgi
from p2ptrain.checkpoint import model_file
from p2ptrain.peer.receiver import EventReceiver
from p2ptrain.peer.replica import Replica
from p2ptrain.spec import JobSpec
from p2ptrain.status import PeerStatus


class PeerEndpoint:
    def __init__(self, spec: JobSpec, status: PeerStatus, receiver: EventReceiver, replica: Replica) -> None:
        self.spec = spec
        self.status = status
        self.receiver = receiver
        self.replica = replica
        self._metrics_app = make_asgi_app()

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] == "lifespan":
            await asgi.lifespan(receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/metrics":
            await self._metrics_app(scope, receive, send)
        elif path == "/healthz" and method == "GET":
            await asgi.respond(send, 200, b"ok")
        elif path == "/status" and method == "GET":
            await asgi.respond_json(send, 200, self.status.as_dict())
        elif path == "/model" and method == "GET":
            await asgi.respond(send, 200, await asyncio.to_thread(self._model_file),
                               content_type=b"application/octet-stream")
        elif path == "/" and method == "POST":
            body = await asgi.read_body(receive, self.receiver.max_body_bytes, scope)
            status, reason, text = await self.receiver.receive(asgi.headers_of(scope), body)
            # An oversize body is not read to its end: the connection cannot carry another request.
            await asgi.respond(send, status, text.encode(), reason=reason, close=body is None)
        else:
            await asgi.respond(send, 404, b"not found")

    def _model_file(self) -> bytes:
        tensors = self.replica.final_state()  # copied between optimizer steps
        metadata = {"p2ptrain.job": json.dumps(self.spec.to_dict()), "p2ptrain.round": str(self.status.round)}
        return model_file(tensors, metadata)
