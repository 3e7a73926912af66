"""A peer's Redis layout against a real redis-server: model versions, checkpoints with a version
token, outbox, and expiry at job end."""

from __future__ import annotations

import numpy as np

from p2ptrain import wire
from p2ptrain.store import OUTBOX_ROUNDS, Keys, PeerStore


def _store(redis_server, job: str = "job", peer: int = 1) -> PeerStore:
    return PeerStore(redis_server.client(), Keys(job, peer), accumulator_mode="lua", key_ttl_seconds=3600)


def test_keys_are_namespaced_by_job_and_peer() -> None:
    keys = Keys("digits", 3)
    names = [keys.model(5), keys.accumulator(5), keys.accumulator_meta(5), keys.outbox(5), keys.checkpoint]
    assert all(name.startswith("p2p:digits:3:") for name in names)
    assert len(set(names)) == len(names)


def test_published_models_expire_and_old_versions_are_dropped(redis_server) -> None:
    store = _store(redis_server)
    params = np.arange(10, dtype=np.float32)
    for version in range(4):
        store.publish_model(version, params + version)
    client = redis_server.client()
    assert client.exists(store.keys.model(0)) == 0 and client.exists(store.keys.model(1)) == 0
    blob = client.get(store.keys.model(3))
    np.testing.assert_array_equal(wire.decode_tensor(blob), params + 3)
    assert 0 < client.ttl(store.keys.model(3)) <= 600


def test_an_older_checkpoint_never_replaces_a_newer_one(redis_server) -> None:
    store = _store(redis_server)
    assert store.save_checkpoint(5, b"state-5", {"loss": 0.5})
    assert not store.save_checkpoint(4, b"state-4", {"loss": 0.9})
    assert store.load_checkpoint() == (5, b"state-5", {"loss": 0.5})
    assert store.save_checkpoint(6, b"state-6", {"loss": 0.4})
    assert store.load_checkpoint() == (6, b"state-6", {"loss": 0.4})


def test_a_checkpoint_written_between_the_compare_and_the_write_is_never_overwritten(redis_server, monkeypatch) -> None:
    """The write is atomic without a script: a newer state that lands after the round was compared makes
    the transaction fail, and the retry compares again (and gives way); an older one is replaced."""
    store, other = _store(redis_server), _store(redis_server)  # two connections, one peer's keys
    racer: list[tuple[int, bytes]] = [(9, b"state-9")]
    pipeline = store.client.pipeline

    def racing_pipeline(*args, **kwargs):
        pipe = pipeline(*args, **kwargs)
        multi = pipe.multi

        def multi_after_a_racer() -> None:
            if racer:
                round_index, state = racer.pop()
                assert other.save_checkpoint(round_index, state, {"by": "racer"})
            multi()

        pipe.multi = multi_after_a_racer
        return pipe

    monkeypatch.setattr(store.client, "pipeline", racing_pipeline)
    assert not store.save_checkpoint(7, b"state-7", {"by": "us"})
    assert store.load_checkpoint() == (9, b"state-9", {"by": "racer"})

    racer.append((10, b"state-10"))  # raced again, but ours is newer still: written on the retry
    assert store.save_checkpoint(11, b"state-11", {"by": "us"})
    assert store.load_checkpoint() == (11, b"state-11", {"by": "us"})


def test_no_checkpoint_reads_as_none(redis_server) -> None:
    assert _store(redis_server).load_checkpoint() is None


def test_job_keys_get_a_ttl_at_the_end_and_other_jobs_are_untouched(redis_server) -> None:
    store = _store(redis_server)
    store.save_checkpoint(1, b"s", {})
    store.put_outbox(1, b"blob")
    client = redis_server.client()
    client.set("p2p:other:1:checkpoint", b"x")
    client.set(store.keys.model(9), b"no ttl yet")  # a key written without one must get one too
    client.set(store.keys.outbox(2), b"shorter", ex=30)  # a shorter TTL is kept, never extended
    assert store.expire_job_keys(120) == 5
    for key in (store.keys.checkpoint, store.keys.checkpoint_meta, store.keys.outbox(1), store.keys.model(9)):
        assert 60 < client.ttl(key) <= 120, key  # the fixture's key TTL is 3600: only expire_job_keys gives 120
    assert 0 < client.ttl(store.keys.outbox(2)) <= 30
    assert client.ttl("p2p:other:1:checkpoint") == -1


def test_the_outbox_keeps_only_the_last_rounds(redis_server) -> None:
    store = _store(redis_server)
    for round_index in range(OUTBOX_ROUNDS + 3):
        store.put_outbox(round_index, f"gradient-{round_index}".encode())
    client = redis_server.client()
    kept = [r for r in range(OUTBOX_ROUNDS + 3) if client.exists(store.keys.outbox(r))]
    assert kept == list(range(3, OUTBOX_ROUNDS + 3))
    assert client.get(store.keys.outbox(OUTBOX_ROUNDS + 2)) == f"gradient-{OUTBOX_ROUNDS + 2}".encode()
