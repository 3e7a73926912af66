"""The Redis layout of one peer: model versions, gradient accumulators, exchange outbox, checkpoint.

Every key is namespaced ``p2p:{job}:{peer}:...`` and carries a TTL so a finished or abandoned job's
data expires. Gradients are summed into the accumulator by the gradient functions (see
``p2ptrain.accumulator``); this module owns the names and the peer's reads and writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis

from p2ptrain import bulkread, wire
from p2ptrain.accumulator import ROUND_KEY_TTL_SECONDS, Accumulator, detect
from p2ptrain.checkpoint import CheckpointError, model_file, model_tensors
from p2ptrain.config import RedisAddress

OUTBOX_ROUNDS = 8  # rounds of sent gradients each peer keeps for others to fetch


def connect(address: RedisAddress, password: str | None, *, socket_timeout: float = 30) -> redis.Redis:
    """A client for a job's Redis (a peer's own, or another peer's): the one place clients are made.
    Large values (models, gradients) are received straight into their buffer (``p2ptrain.bulkread``)."""
    client = redis.Redis(host=address.host, port=address.port, password=password, socket_timeout=socket_timeout)
    if bulkread.PARSER is not None:
        client.connection_pool.connection_kwargs["parser_class"] = bulkread.PARSER
    return client


@dataclass(frozen=True)
class Keys:
    job: str
    peer: int

    @property
    def prefix(self) -> str:
        return f"p2p:{self.job}:{self.peer}"

    def model(self, version: int) -> str:
        return f"{self.prefix}:model:{version}"

    def accumulator(self, round_index: int) -> str:
        return f"{self.prefix}:acc:{round_index}"

    def accumulator_meta(self, round_index: int) -> str:
        return f"{self.prefix}:accmeta:{round_index}"

    def outbox(self, round_index: int) -> str:
        return f"{self.prefix}:out:{round_index}"

    def sync(self, round_index: int) -> str:
        """A sync round's hash, state and chosen peers (``peer/resync.py``), read by the other peers."""
        return f"{self.prefix}:sync:{round_index}"

    def is_outbox(self, key: str) -> bool:
        """Whether ``key`` names one of this peer's outbox entries (a dataref must, nothing else)."""
        head, _, round_text = key.rpartition(":")
        return head == f"{self.prefix}:out" and round_text.isdigit()

    def owns(self, key: str) -> bool:
        return key.startswith(f"{self.prefix}:")

    @property
    def checkpoint(self) -> str:
        return f"{self.prefix}:checkpoint"

    @property
    def checkpoint_meta(self) -> str:
        return f"{self.prefix}:checkpoint:meta"


def checkpoint_round(client: redis.Redis, keys: Keys) -> int | None:
    """The round of a peer's latest checkpoint, without reading the state itself."""
    value = client.hget(keys.checkpoint_meta, "round")
    return None if value is None else int(cast(bytes, value))


def read_checkpoint(client: redis.Redis, keys: Keys) -> tuple[int, bytes, dict[str, Any]] | None:
    """A peer's latest checkpoint (round, state, metadata), read atomically; also from another peer's Redis."""
    pipe = client.pipeline(transaction=True)
    pipe.get(keys.checkpoint)
    pipe.hgetall(keys.checkpoint_meta)
    state, meta = pipe.execute()
    if state is None or not meta:
        return None
    return int(meta[b"round"]), state, json.loads(meta[b"meta"])


def export_model(client: redis.Redis, keys: Keys, output: Path, metadata: dict[str, str]) -> int:
    """Write the model of a peer's latest checkpoint to ``output`` (safetensors); returns its round."""
    saved = read_checkpoint(client, keys)
    if saved is None:
        raise CheckpointError(f"no checkpoint of job {keys.job!r} peer {keys.peer} in this Redis")
    round_index, state, _ = saved
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    partial.write_bytes(model_file(model_tensors(state), {**metadata, "p2ptrain.round": str(round_index + 1)}))
    partial.replace(output)  # readers never see half a model
    return round_index


class PeerStore:
    """A peer's view of its own Redis (blocking client; call from a worker thread in async code)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, accumulator_mode: str = "auto", key_ttl_seconds: int) -> None:
        self.client = client
        self.keys = keys
        self.key_ttl_seconds = key_ttl_seconds
        self.accumulator: Accumulator = detect(client, accumulator_mode)

    def publish_model(self, version: int, params: np.ndarray, encoded: memoryview | None = None) -> str:
        """Write model version ``version`` (flat float32 parameters) for the gradient functions;
        ``encoded``: the same as a wire tensor already (``Replica.wire_model``), sent as it is."""
        key = self.keys.model(version)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, wire.encode_tensor(params) if encoded is None else encoded, ex=ROUND_KEY_TTL_SECONDS)
        if version >= 2:
            pipe.delete(self.keys.model(version - 2))
        pipe.execute()
        return key

    def add_gradient(self, round_index: int, part: str, weight: float, blob: bytes) -> bool:
        """Accumulate one micro-batch gradient, as a function does (used by tests and benchmarks)."""
        return self.accumulator.add(
            self.client, self.keys.accumulator(round_index), self.keys.accumulator_meta(round_index),
            part, weight, blob,
        )

    def read_average(self, round_index: int) -> tuple[np.ndarray, float, int] | None:
        """The weighted mean of the gradients accumulated for a round, read in one call."""
        return self.accumulator.mean(
            self.client, self.keys.accumulator(round_index), self.keys.accumulator_meta(round_index)
        )

    def take_average(self, round_index: int, *, park: bool = False) -> tuple[np.ndarray, float, int] | None:
        """``read_average`` and ``clear_round`` in one round trip: what the round does once a round.

        ``park``: the average is also parked in the round's outbox as ``put_outbox`` would, by Redis
        itself (``P2P.MEANSTORE``): for a peer that sends its average as it is (float32, uncompressed),
        the 4 bytes a parameter are not sent back to Redis."""
        keys = self.keys
        return self.accumulator.take_mean(
            self.client, keys.accumulator(round_index), keys.accumulator_meta(round_index),
            store=keys.outbox(round_index) if park else None, ttl_seconds=ROUND_KEY_TTL_SECONDS,
            delete=self._outbox_dropped(round_index) if park else (),
        )

    def clear_round(self, round_index: int) -> None:
        self.client.delete(self.keys.accumulator(round_index), self.keys.accumulator_meta(round_index))

    def put_outbox(self, round_index: int, blob: bytes) -> str:
        """Park an encoded gradient for other peers to fetch by reference (``dataref``, missed events).

        Only the last ``OUTBOX_ROUNDS`` rounds are kept: a peer further behind catches up from state.
        """
        key = self.keys.outbox(round_index)
        pipe = self.client.pipeline(transaction=False)
        pipe.set(key, blob, ex=ROUND_KEY_TTL_SECONDS)
        if dropped := self._outbox_dropped(round_index):
            pipe.delete(*dropped)
        pipe.execute()
        return key

    def _outbox_dropped(self, round_index: int) -> tuple[str, ...]:
        """The outbox key that parking round ``round_index`` pushes out of the last ``OUTBOX_ROUNDS``."""
        return (self.keys.outbox(round_index - OUTBOX_ROUNDS),) if round_index >= OUTBOX_ROUNDS else ()

    def save_checkpoint(self, round_index: int, state: bytes, meta: dict[str, Any]) -> bool:
        """Persist model+optimizer state for ``round_index``; False if a newer one is already there.

        A WATCH/MULTI transaction, not a Lua script: a script gets the state as an argument, which Redis
        copies into Lua and back into a string (21 ms of the server's CPU for the 9 MB state of a
        1.13M-parameter model with momentum, against 5 ms for this; the job's round 17% shorter). Atomic
        all the same: EXEC fails if the round compared against changed meanwhile, and it is compared again.
        """
        keys = self.keys
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(keys.checkpoint_meta)
                    current = pipe.hget(keys.checkpoint_meta, "round")
                    if current is not None and round_index <= int(cast(bytes, current)):
                        return False
                    pipe.multi()
                    pipe.set(keys.checkpoint, state, ex=self.key_ttl_seconds)
                    pipe.delete(keys.checkpoint_meta)
                    pipe.hset(keys.checkpoint_meta, mapping={"round": round_index, "meta": json.dumps(meta)})
                    pipe.expire(keys.checkpoint_meta, self.key_ttl_seconds)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue  # another writer got in between: compare again

    def load_checkpoint(self) -> tuple[int, bytes, dict[str, Any]] | None:
        return read_checkpoint(self.client, self.keys)

    def expire_job_keys(self, seconds: int) -> int:
        """Give every key of this peer a TTL (at job end): nothing of a job outlives it for long."""
        count = 0
        for key in self.client.scan_iter(match=f"{self.keys.prefix}:*", count=500):
            self.client.expire(key, seconds, lt=True)  # shorten, never extend, a TTL
            count += 1
        return count
