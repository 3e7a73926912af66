"""The wire contract of docs/wire.md, exercised by a client that is not p2ptrain (standard-library
Python run as a subprocess with no site-packages) against a real peer endpoint and a real function."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from prometheus_client import REGISTRY

from p2ptrain import wire
from p2ptrain.store import Keys, PeerStore

from .harness import make_spec, running_job

CLIENT = Path(__file__).parent / "clients" / "foreign_client.py"


def foreign_post(url: str, mode: str, key_file: Path, event_type: str, source: str, content_type: str,
                 data: bytes, tmp_path: Path, *extensions: str) -> tuple[int, str]:
    data_file = tmp_path / f"data-{mode}-{len(list(tmp_path.iterdir()))}"
    data_file.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(CLIENT), url, mode, str(key_file), event_type, source, content_type,
         str(data_file), *extensions],
        capture_output=True, text=True, timeout=60, check=True,
    )
    status, _, reason = done.stdout.strip().partition(" ")
    return int(status), reason


def tensor_as_documented(values: list[float]) -> bytes:
    """docs/wire.md's tensor layout, built without p2ptrain: magic, version 1, dtype 1 (float32),
    compression 0, a pad byte, the element count, then little-endian float32 values."""
    return struct.pack("<4sBBBxQ", b"P2PT", 1, 1, 0, len(values)) + struct.pack(f"<{len(values)}f", *values)


def rejected(job: str, reason: str) -> float:
    labels = {"job": job, "namespace": "default", "peer": "0", "reason": reason}
    return REGISTRY.get_sample_value("p2ptrain_events_rejected_total", labels) or 0.0


async def test_a_foreign_client_signs_events_the_peer_and_the_function_accept(tmp_path: Path) -> None:
    spec = make_spec(name="foreign", peers=2, functionsPerPeer=1, batchSize=8, rounds=1)
    async with running_job(spec) as job:
        key_file = tmp_path / "signing-key"
        key_file.write_bytes(job.secrets.signing_key)
        wrong_key = tmp_path / "wrong-key"
        wrong_key.write_bytes(b"not-the-job-key")
        peer0 = job.peers[0]
        numel = peer0.others.numel
        gradient = tensor_as_documented([0.25] * numel)
        sender = wire.peer_source(spec.namespace, spec.name, 1)
        peer_url = job.config.peer_urls[0] + "/"

        async def to_peer(mode: str, key: Path, round_index: int) -> tuple[int, str]:
            return await asyncio.to_thread(foreign_post, peer_url, mode, key, wire.GRADIENT_AVERAGED, sender,
                                           wire.OCTET_STREAM, gradient, tmp_path, "peer=1", f"round={round_index}")

        assert await to_peer("binary", wrong_key, 0) == (401, "signature")
        assert await to_peer("binary", key_file, 0) == (202, "accepted")
        assert await to_peer("structured", key_file, 1) == (202, "accepted")
        assert peer0.inbox.holds(0, 1) and peer0.inbox.holds(1, 1)
        filed = await peer0.inbox.collect(1, quorum=1, deadline=time.monotonic() + 5)
        np.testing.assert_array_equal(filed[1], np.full(numel, 0.25, np.float32))

        # The function: a gradient request for a model version the peer published.
        assert job.function.model is not None
        keys = Keys(spec.name, 0)
        store = PeerStore(job.redis[0].client(), keys, key_ttl_seconds=60)
        model_key = store.publish_model(0, torch.nn.utils.parameters_to_vector(job.function.model.parameters()).detach().numpy())
        address = job.config.redis[0]

        async def to_function(mode: str, key: Path, part: str) -> tuple[int, str]:
            # Spaced, unsorted JSON as another serialiser writes it: signed as sent.
            request = {"round": 0, "peer": 0, "version": 0, "part": part, "redis": str(address), "model": model_key,
                       "accumulator": keys.accumulator(0), "accumulatorMeta": keys.accumulator_meta(0),
                       "indices": list(range(8))}
            data = json.dumps(request, indent=1).encode()
            return await asyncio.to_thread(foreign_post, job.config.function_url, mode, key, wire.GRADIENT_REQUESTED,
                                           sender, wire.JSON, data, tmp_path)

        assert await to_function("binary", wrong_key, "0:0") == (401, "signature")
        assert (await to_function("binary", key_file, "0:0"))[0] == 200
        assert (await to_function("structured", key_file, "0:1"))[0] == 200
