"""Where the optimizer step runs (``spec.update``) and the background checkpoint, against real parts:
redis-server processes (with the p2ptrain module and with the Lua fallback), HTTP CloudEvents, torch.

``update: database`` must train exactly like ``update: peer`` (float tolerance: Redis does the same
float32 arithmetic in another order), and a peer restarted from the checkpoint written in the
background must continue to the same parameters as a run that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import torch

from p2ptrain import native
from p2ptrain.peer import Peer

from .harness import make_spec, running_job


def _module(kind: str) -> Any:
    if kind == "lua":
        return None
    path = native.module_path()
    assert path is not None, "the p2ptrain Redis module could not be built"
    return path


async def _train(spec: Any, module: Any) -> tuple[dict[str, torch.Tensor], float]:
    async with running_job(spec, module=module) as job:
        reports = await job.train(timeout=300)
        states = [p.final_state() for p in job.peers]
        for state in states[1:]:
            for name, tensor in state.items():
                torch.testing.assert_close(tensor, states[0][name])
        accuracy = reports[0][-1].accuracy
        assert accuracy is not None
        return states[0], accuracy


@pytest.mark.parametrize("kind", ["module", "lua"])
async def test_database_update_trains_like_the_peer_update(kind: str) -> None:
    settings: dict[str, Any] = dict(peers=2, functionsPerPeer=2, batchSize=64, rounds=60,
                                    optimizer={"learningRate": 0.1, "momentum": 0.9},
                                    evaluation={"everyRounds": 20})
    on_peer, peer_accuracy = await _train(make_spec(name=f"onpeer{kind}", update="peer", **settings), _module(kind))
    in_db, db_accuracy = await _train(make_spec(name=f"indb{kind}", update="database", **settings), _module(kind))
    assert in_db.keys() == on_peer.keys()
    for name, tensor in on_peer.items():
        torch.testing.assert_close(in_db[name], tensor, rtol=1e-3, atol=1e-4)
    assert db_accuracy >= 0.93, db_accuracy
    assert abs(db_accuracy - peer_accuracy) <= 0.01


@pytest.mark.parametrize("update", ["peer", "database"])
async def test_a_restarted_peer_continues_to_the_uninterrupted_parameters(update: str) -> None:
    """The checkpoint is written in the background; the run's end waits for it, and a restart from it
    (momentum restored, into Redis too for ``database``) reaches what five straight rounds reach."""
    settings: dict[str, Any] = dict(peers=1, functionsPerPeer=2, batchSize=16,
                                    optimizer={"learningRate": 0.1, "momentum": 0.9}, update=update)
    straight, _ = await _train(make_spec(name=f"straight{update}", rounds=5, **settings), None)
    spec = make_spec(name=f"restart{update}", rounds=3, **settings)
    async with running_job(spec) as job:
        await job.train()
        trained = job.peers[0].final_state()
        longer = dataclasses.replace(job.config, spec=dataclasses.replace(spec, rounds=5))
        restarted = Peer(longer, 0, job.secrets)  # a fresh process would build exactly this
        assert await restarted.resume() == 3
        for name, tensor in restarted.final_state().items():
            torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)
        reports = await restarted.run()
        assert [r.round for r in reports] == [3, 4]
        for name, tensor in restarted.final_state().items():
            torch.testing.assert_close(tensor, straight[name], rtol=1e-5, atol=1e-6)


async def test_the_step_waits_for_the_checkpoints_copy_and_not_for_its_write() -> None:
    """With a checkpoint after every round (``checkpointEveryRounds: 1``), each holds exactly that round's
    parameters even while the next round's step runs during its (slowed) write to Redis, and the write of
    round r still lands before round r + 1's."""
    from p2ptrain.checkpoint import model_tensors

    spec = make_spec(name="slowckpt", peers=1, functionsPerPeer=2, batchSize=16, rounds=4,
                     optimizer={"learningRate": 0.1, "momentum": 0.9}, training={"checkpointEveryRounds": 1})
    async with running_job(spec) as job:
        peer = job.peers[0]
        after_step: list[torch.Tensor] = []
        saved: list[tuple[int, bytes]] = []
        events: list[str] = []
        apply, save = peer.replica.apply, peer.store.save_checkpoint

        def stepping(gradient: torch.Tensor) -> None:
            apply(gradient)
            events.append(f"step {len(after_step)}")
            after_step.append(torch.nn.utils.parameters_to_vector(peer.replica.model.parameters()).detach().clone())

        def slow_save(round_index: int, state: bytes, meta: dict[str, Any]) -> None:
            time.sleep(0.3)  # the injected slowness: a large model's write
            save(round_index, state, meta)
            events.append(f"saved {round_index}")
            saved.append((round_index, state))

        peer.replica.apply = stepping  # type: ignore[method-assign]
        peer.store.save_checkpoint = slow_save  # type: ignore[method-assign]
        await job.train()
    assert [r for r, _ in saved] == [0, 1, 2, 3]
    names = [name for name, _ in peer.replica.model.named_parameters()]
    for round_index, state in saved:
        tensors = model_tensors(state)
        flat = torch.cat([tensors[name].reshape(-1) for name in names])
        torch.testing.assert_close(flat, after_step[round_index], rtol=0, atol=0)
    # Round r + 1's step ran while round r's write was still sleeping: the step did not wait for it.
    assert events.index("step 1") < events.index("saved 0"), events


class _Crash(Exception):
    """The process dies at the start of a round (the test's stand-in for a killed pod)."""


@pytest.mark.parametrize("update", ["peer", "database"])
async def test_a_peer_killed_between_checkpoints_re_runs_the_rounds_since_to_the_same_parameters(update: str) -> None:
    """``training.checkpointEveryRounds: 3``: the state is written after rounds 3 and 6 and the last, not
    after the others. A peer that dies in round 5 restarts from round 3's state, runs rounds 4 and 5
    again, and ends where a run that never stopped ends (the others' gradients of re-run rounds come
    from their outboxes: ``test_local_run``'s killed-peer test covers that with real processes)."""
    settings: dict[str, Any] = dict(peers=1, functionsPerPeer=2, batchSize=16, rounds=7, update=update,
                                    optimizer={"learningRate": 0.1, "momentum": 0.9},
                                    training={"checkpointEveryRounds": 3})
    straight, _ = await _train(make_spec(name=f"every3{update}", **settings), None)
    spec = make_spec(name=f"crash3{update}", **settings)
    async with running_job(spec) as job:
        peer = job.peers[0]
        written: list[int] = []
        save, run_round = peer.store.save_checkpoint, peer.run_round

        def recording_save(round_index: int, state: bytes, meta: dict[str, Any]) -> bool:
            written.append(round_index)
            return save(round_index, state, meta)

        async def crashing_round(round_index: int) -> Any:
            if round_index == 4:  # rounds 0-3 done (1-based: 1-4): the last state written is round 3's
                raise _Crash
            return await run_round(round_index)

        peer.store.save_checkpoint = recording_save  # type: ignore[method-assign]
        peer.run_round = crashing_round  # type: ignore[method-assign]
        with pytest.raises(_Crash):
            await peer.run()
        assert written == [2], "a checkpoint was written in a round that was not due"
        restarted = Peer(job.config, 0, job.secrets)  # a fresh process would build exactly this
        assert await restarted.resume() == 3
        reports = await restarted.run()
        assert [r.round for r in reports] == [3, 4, 5, 6]
        for name, tensor in restarted.final_state().items():
            torch.testing.assert_close(tensor, straight[name], rtol=1e-5, atol=1e-6)
        # The parameters' hash is still reported every round (hashEveryRounds: 1), checkpoint or not.
        assert sorted(int(r) for r in restarted.status.params_hashes) == [4, 5, 6, 7]


@pytest.mark.parametrize("update", ["peer", "database"])
async def test_a_large_models_hash_in_a_round_without_a_checkpoint_is_that_rounds(update: str) -> None:
    """Above 128 KiB of parameters, a round that writes no checkpoint hashes them in a worker thread while
    the next round starts (its step waits for the hash): every round's hash equals the one a run that
    writes a checkpoint every round takes from the checkpoint's copy."""
    settings: dict[str, Any] = dict(peers=1, functionsPerPeer=2, batchSize=16, rounds=6, update=update,
                                    model={"name": "mlp", "args": {"hidden": [256, 256]}},  # 85,002 parameters
                                    optimizer={"learningRate": 0.1, "momentum": 0.9})
    hashes: dict[int, dict[str, str]] = {}
    for every in (1, 4):
        spec = make_spec(name=f"hash{every}{update}", training={"checkpointEveryRounds": every}, **settings)
        async with running_job(spec) as job:
            await job.train(timeout=300)
            hashes[every] = dict(job.peers[0].status.params_hashes)
    assert sorted(int(r) for r in hashes[4]) == [1, 2, 3, 4, 5, 6]
    assert hashes[4] == hashes[1]
