"""In-database accumulation against real redis-server processes, with the module and with Lua.

Both back-ends must agree: weighted mean, idempotent parts, atomic concurrent adds, and bad input
refused with the server's message and nothing changed.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import redis

from p2ptrain import wire
from p2ptrain.accumulator import Accumulator, AccumulatorError, detect
from p2ptrain.native import module_path
from p2ptrain.redis_server import RedisServer


def _grads(k: int, d: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(d).astype("<f4") for _ in range(k)]


def test_detect_picks_the_backend_the_server_has(accumulating_redis) -> None:
    kind, server = accumulating_redis
    assert detect(server.client()).kind == kind
    assert detect(server.client(), "lua").kind == "lua"


def test_module_mode_without_the_module_is_a_clear_error(redis_server) -> None:
    with pytest.raises(AccumulatorError, match="not loaded"):
        detect(redis_server.client(), "module")


def test_weighted_mean_matches_numpy(accumulating_redis) -> None:
    _, server = accumulating_redis
    client = server.client()
    accumulator = detect(client)
    grads, weights = _grads(5, 10_000), [3.0, 1.0, 2.0, 5.0, 1.0]
    for i, (g, w) in enumerate(zip(grads, weights, strict=True)):
        assert accumulator.add(client, "acc", "meta", f"part{i}", w, g.tobytes())
    result = accumulator.mean(client, "acc", "meta")
    assert result is not None
    mean, total, parts = result
    expected = sum(w * g.astype(np.float64) for g, w in zip(grads, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)
    assert (total, parts) == (12.0, 5)


def _accumulated(accumulating_redis, k: int, d: int, seed: int) -> tuple[redis.Redis, Accumulator, list[np.ndarray]]:
    """A client of the server, its accumulator, and ``k`` gradients added into "acc", part i with weight 1 + i."""
    _, server = accumulating_redis
    client = server.client()
    accumulator = detect(client)
    grads = _grads(k, d, seed=seed)
    for i, g in enumerate(grads):
        assert accumulator.add(client, "acc", "meta", f"part{i}", 1.0 + i, g.tobytes())
    return client, accumulator, grads


def test_take_mean_reads_the_mean_and_clears_the_round_in_one_call(accumulating_redis) -> None:
    client, accumulator, _ = _accumulated(accumulating_redis, 2, 1000, seed=3)
    expected = accumulator.mean(client, "acc", "meta")
    taken = accumulator.take_mean(client, "acc", "meta")
    assert expected is not None and taken is not None
    np.testing.assert_array_equal(taken[0], expected[0])
    assert taken[1:] == expected[1:] == (3.0, 2)
    assert client.exists("acc", "meta") == 0
    assert accumulator.take_mean(client, "acc", "meta") is None  # nothing left, and no error
    # Redis restarted empty: the Lua library went with it, and there is nothing to read.
    client.function_flush()
    assert accumulator.take_mean(client, "acc", "meta") is None


def test_a_repeated_part_is_counted_once(accumulating_redis) -> None:
    _, server = accumulating_redis
    client = server.client()
    accumulator = detect(client)
    (g,) = _grads(1, 100)
    assert accumulator.add(client, "acc", "meta", "round3:0", 4.0, g.tobytes())
    assert not accumulator.add(client, "acc", "meta", "round3:0", 4.0, (g * 10).tobytes())
    mean, total, parts = accumulator.mean(client, "acc", "meta")  # type: ignore[misc]
    np.testing.assert_allclose(mean, g, rtol=1e-6)
    assert (total, parts) == (4.0, 1)


def test_concurrent_adds_are_atomic(accumulating_redis) -> None:
    _, server = accumulating_redis
    accumulator = detect(server.client())
    grads = _grads(16, 2_000, seed=1)

    def add(i: int) -> None:
        client = server.client()
        accumulator.add(client, "acc", "meta", f"p{i}", 1.0, grads[i].tobytes())
        accumulator.add(client, "acc", "meta", f"p{i}", 1.0, grads[i].tobytes())  # a retry

    threads = [threading.Thread(target=add, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mean, total, parts = accumulator.mean(server.client(), "acc", "meta")  # type: ignore[misc]
    assert (total, parts) == (16.0, 16)
    np.testing.assert_allclose(mean, np.mean(grads, axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "weight,blob,message",
    [
        (1.0, b"abc", "multiple of 4"),
        (1.0, b"", "positive multiple of 4"),
        (1.0, np.ones(7, dtype="<f4").tobytes(), "shape mismatch: accumulator has 8 floats, got 7"),
        (0.0, np.ones(8, dtype="<f4").tobytes(), "weight must be a finite positive number"),
        (float("inf"), np.ones(8, dtype="<f4").tobytes(), "weight must be a finite positive number"),
        (1.0, np.array([1, 2, np.nan, 4, 5, 6, 7, 8], dtype="<f4").tobytes(), "non-finite"),
    ],
    ids=["ragged", "empty", "wrong-shape", "zero-weight", "inf-weight", "nan"],
)
def test_bad_input_is_refused_and_changes_nothing(accumulating_redis, weight: float, blob: bytes, message: str) -> None:
    _, server = accumulating_redis
    client = server.client()
    accumulator = detect(client)
    accumulator.add(client, "acc", "meta", "good", 2.0, np.arange(8, dtype="<f4").tobytes())
    before = (client.get("acc"), client.hgetall("meta"))
    with pytest.raises(AccumulatorError, match=message):
        accumulator.add(client, "acc", "meta", "bad", weight, blob)
    assert (client.get("acc"), client.hgetall("meta")) == before


def test_mean_of_nothing_is_none(accumulating_redis) -> None:
    _, server = accumulating_redis
    assert detect(server.client()).mean(server.client(), "absent", "absent-meta") is None


def _built(monkeypatch: pytest.MonkeyPatch, cache: Path, clones: tuple[str, ...] | None = None) -> Path:
    """The module built afresh into ``cache`` (with ``clones`` as the CPU-clone flags, when given)."""
    from p2ptrain import native

    monkeypatch.setenv("P2PTRAIN_CACHE", str(cache))
    monkeypatch.delenv("P2PTRAIN_REDIS_MODULE", raising=False)
    if clones is not None:
        monkeypatch.setattr(native, "CLONES", clones)
    native._build.cache_clear()
    try:
        built = module_path()
    finally:
        native._build.cache_clear()
    assert built is not None
    return built


def test_module_builds_from_a_clean_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _built(monkeypatch, tmp_path)
    assert built is not None and built.parent == tmp_path and built.stat().st_size > 0
    with RedisServer(password="pw", module=built) as server:
        assert detect(server.client()).kind == "module"


def test_module_builds_without_the_cpu_clones_where_the_compiler_refuses_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A toolchain without ifunc support refuses target_clones: the module is built without them
    rather than falling back to Lua (a flag no compiler knows stands in for that refusal here)."""
    built = _built(monkeypatch, tmp_path, ("-DP2PTRAIN_CLONES", "--no-such-flag-p2ptrain"))
    with RedisServer(password="pw", module=built) as server:
        client = server.client()
        accumulator = detect(client)
        assert accumulator.kind == "module"
        accumulator.add(client, "acc", "meta", "a", 2.0, np.array([1.0, 2.0], dtype="<f4").tobytes())
        result = accumulator.mean(client, "acc", "meta")
        assert result is not None and result[0].tolist() == [1.0, 2.0]


def test_cpu_clones_compute_the_same_bits_as_the_baseline_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The AVX2 kernels the loader picks on this CPU and the baseline ones round identically: a job's
    result does not depend on the CPU its Redis runs on."""
    from p2ptrain import wire
    from p2ptrain.dbupdate import AdamSettings, ModelUpdater, SgdSettings
    from p2ptrain.native import CLONES

    arrays = _grads(5, 10_001, seed=3)  # odd length: vector tails too
    results = []
    for name, clones in (("clones", CLONES), ("baseline", ())):
        with RedisServer(password="pw", module=_built(monkeypatch, tmp_path / name, clones)) as server:
            client = server.client()
            for n, array in enumerate(arrays):
                client.execute_command("P2P.ACCUM", "acc", "meta", f"p{n}", repr(0.5 + n), array.tobytes())
            mean = client.execute_command("P2P.MEAN", "acc", "meta")[0]
            updater = ModelUpdater("module")
            steps: tuple[SgdSettings | AdamSettings, ...] = (
                SgdSettings(lr=0.1, momentum=0.9, weight_decay=1e-4), AdamSettings(lr=0.01, weight_decay=1e-2))
            for kind, settings in enumerate(steps):
                client.set(f"m{kind}:0", wire.encode_tensor(arrays[0]))
                for version, gradient in enumerate(arrays[1:]):
                    updater.step(client, settings, f"m{kind}:{version}", f"m{kind}:{version + 1}", f"s{kind}", gradient)
            results.append((mean, client.get("m0:4"), client.get("m1:4"), client.get("s0"), client.get("s1")))
    assert len(results[0][0]) == 10_001 * 4 and all(value for value in results[0])
    assert results[0] == results[1]


def test_accumulator_keys_expire_even_when_a_late_call_recreates_them(accumulating_redis) -> None:
    """The peer clears a round's keys after reading its mean; a function call that arrives later
    recreates them, and they must carry a TTL rather than stay forever."""
    from p2ptrain.accumulator import ROUND_KEY_TTL_SECONDS
    from p2ptrain.store import Keys, PeerStore

    _, server = accumulating_redis
    client = server.client()
    store = PeerStore(client, Keys("ttl", 0), key_ttl_seconds=60)
    acc, meta = store.keys.accumulator(3), store.keys.accumulator_meta(3)
    grad = np.arange(8, dtype="<f4").tobytes()
    assert store.add_gradient(3, "3:0", 2.0, grad)
    assert all(0 < client.ttl(key) <= ROUND_KEY_TTL_SECONDS for key in (acc, meta))
    store.clear_round(3)
    assert store.add_gradient(3, "3:1", 2.0, grad)  # the late call
    assert all(0 < client.ttl(key) <= ROUND_KEY_TTL_SECONDS for key in (acc, meta))


def _accum(client, kind: str, *args: object) -> object:
    """P2P.ACCUM as a client in any language sends it: the module's command or the Lua function."""
    if kind == "module":
        return client.execute_command("P2P.ACCUM", *args)
    return client.fcall("p2p_accum", 2, *args)


def test_accum_ex_sets_both_ttls_in_the_one_command_and_a_bad_ex_changes_nothing(accumulating_redis) -> None:
    kind, server = accumulating_redis
    client = server.client()
    detect(client)  # loads the Lua library where there is no module
    grad = np.arange(4, dtype="<f4").tobytes()
    assert _accum(client, kind, "acc", "meta", "a", "1", grad, "EX", 100) == 1
    assert 90 < client.ttl("acc") <= 100 and 90 < client.ttl("meta") <= 100
    client.persist("acc")
    client.persist("meta")
    assert _accum(client, kind, "acc", "meta", "a", "1", grad, "ex", 50) == 0  # a retried part: TTLs still set
    assert 40 < client.ttl("acc") <= 50 and 40 < client.ttl("meta") <= 50
    before = (client.get("acc"), client.hgetall("meta"))
    for bad in (("EX", 0), ("EX", "soon"), ("PX", 10), ("EX",)):
        with pytest.raises(redis.ResponseError, match="EX seconds|wrong number of arguments"):
            _accum(client, kind, "acc", "meta", "b", "1", grad, *bad)
    assert (client.get("acc"), client.hgetall("meta")) == before
    assert _accum(client, kind, "acc2", "meta2", "a", "1", grad) == 1  # without EX: no TTL, as before
    assert client.ttl("acc2") == -1 and client.ttl("meta2") == -1


def test_take_mean_can_park_the_mean_as_a_wire_tensor(accumulating_redis) -> None:
    """P2P.MEANSTORE (p2p_meanstore in Lua): the reply is the mean, and ``store`` holds the same
    values as a p2ptrain wire tensor with the TTL; the extra keys go in the same round trip."""
    client, accumulator, grads = _accumulated(accumulating_redis, 3, 5000, seed=7)
    client.set("out", b"an older value")  # replaced
    client.set("old-out", b"x")
    taken = accumulator.take_mean(client, "acc", "meta", store="out", ttl_seconds=90, delete=("old-out",))
    assert taken is not None
    mean, total, parts = taken
    expected = sum((1.0 + i) * g.astype(np.float64) for i, g in enumerate(grads)) / 6.0
    np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-6)
    assert (total, parts) == (6.0, 3)
    parked = client.get("out")
    assert parked is not None
    np.testing.assert_array_equal(wire.decode_tensor(bytes(parked), expected_numel=mean.size), mean)
    assert 0 < client.ttl("out") <= 90
    assert client.exists("acc", "meta", "old-out") == 0
    # Nothing accumulated: nothing parked, the key left as it was.
    assert accumulator.take_mean(client, "acc", "meta", store="out") is None
    assert client.get("out") == parked


def test_parking_refuses_a_non_string_or_an_accumulator_key(accumulating_redis) -> None:
    _, server = accumulating_redis
    client = server.client()
    accumulator = detect(client)
    (g,) = _grads(1, 100)
    client.hset("hash", "a", "1")
    for store, message in (("hash", "WRONGTYPE"), ("acc", "dst must differ")):
        assert accumulator.add(client, "acc", "meta", "p", 1.0, g.tobytes())
        with pytest.raises(AccumulatorError, match=message):
            accumulator.take_mean(client, "acc", "meta", store=store)
    assert client.hgetall("hash") == {b"a": b"1"}
