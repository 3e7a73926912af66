"""Chaos drills that are cheap enough to run as tests: local runs with real processes (redis-server,
peer and function processes, HTTP), with faults injected by ``tests/integration/chaos.py`` (a front for
the gradient function, outside production code). ``bench/chaos.py`` runs the bigger ones.
"""

from __future__ import annotations

from pathlib import Path

from p2ptrain.spec import JobSpec

from .chaos import FunctionFaults, crash_redis, drill, lowest_round, wait_for
from .harness import make_spec

_BASE_TRAINING = {"hashEveryRounds": 1, "resyncEveryRounds": 5}


def _spec(name: str, **overrides: object) -> JobSpec:
    base: dict[str, object] = {
        "peers": 3, "functionsPerPeer": 2, "batchSize": 32, "rounds": 10,
        "exchange": {"quorum": 2, "roundDeadlineSeconds": 30},
        "function": {"maxScale": 2, "idleSeconds": 30},
        "evaluation": {"everyRounds": 5},
        "training": _BASE_TRAINING,
    }
    return make_spec(name=name, **{**base, **overrides})


def _assert_clean(result: dict[str, object]) -> None:
    assert result["finished"], result
    assert result["sample_counts_exact"], result["wrong_counts"]
    assert result["committed_rounds_lost"] == [] and result["rounds_redone_wrongly"] == [], result
    assert result["replicas_identical_at_end"], result


async def test_a_slow_peer_in_a_local_run_drifts_and_the_replicas_end_identical(tmp_path: Path) -> None:
    spec = _spec("slowpeer", rounds=8, training={"hashEveryRounds": 1, "resyncEveryRounds": 4})
    faults = FunctionFaults(delay_seconds={2: 0.6})
    result = await drill(spec, tmp_path, faults=faults, timeout=300)
    _assert_clean(result)
    replicas = result["summary"]["replicas"]
    # the recorded hashes differ after some rounds (peer 2 aggregated other gradients than 0 and 1) ...
    assert replicas["drift_rounds"] and not set(replicas["drift_rounds"]) & {4, 8}, replicas
    # ... and every peer reported the same hash after the syncs (round 4, and the last)
    assert replicas["identical_at_end"] and result["resyncs"] >= 3, result
    assert faults.injected["delayed"] > 0


async def test_a_fifth_of_function_calls_failing_or_timing_out_loses_and_doubles_no_micro_batch(tmp_path: Path) -> None:
    spec = _spec("flaky", function={"maxScale": 2, "idleSeconds": 30, "retries": 6})
    faults = FunctionFaults(fail_rate=0.2, seed=7)
    result = await drill(spec, tmp_path, faults=faults, timeout=400)
    _assert_clean(result)
    # both kinds of fault happened: refused calls, and calls that timed out after their gradient landed
    assert faults.injected["refused"] > 0 and faults.injected["timed-out"] > 0, faults.injected


async def test_a_peer_redis_killed_and_restarted_with_aof_loses_no_round(tmp_path: Path) -> None:
    # A checkpoint after every round (the default is every 4): the AOF must give back the latest one.
    spec = _spec("redisaof", rounds=40, redis={"persistence": "aof"},
                 training={**_BASE_TRAINING, "checkpointEveryRounds": 1})
    crashed_at: list[int] = []
    kept: list[int | None] = []  # the checkpoint round the restarted Redis loaded from its AOF

    async def chaos(run) -> None:  # type: ignore[no-untyped-def]
        await wait_for(lambda: lowest_round(run) >= 3, 240, "round 3")
        crashed_at.append(run.peers[1].status["round"])
        kept.append(await crash_redis(run, 1, down_seconds=2.0))

    result = await drill(spec, tmp_path, chaos=chaos, timeout=400)
    _assert_clean(result)
    # It crashed mid-run, and came back with the peer's committed checkpoint (0-based round) from its AOF:
    # while the peer runs round r, round r - 1's checkpoint may still be on its way (written in the
    # background), so the AOF holds round r - 2's at least. (The peer may be well past the others' round 3
    # when the crash comes: the other two make the quorum without the slowest.)
    assert crashed_at[0] < spec.rounds and kept[0] is not None and kept[0] >= crashed_at[0] - 2, (crashed_at, kept)
