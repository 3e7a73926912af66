"""``function.mode: inline``: peers compute their own micro-batches, with real Redis, real HTTP between
the peers and real torch. The serverless path (a real gradient function over HTTP) is the reference:
on the same job, seed and round, an inline round must move the parameters exactly as far."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from p2ptrain import metrics
from p2ptrain.peer.divergence import Diverged

from .harness import make_spec, running_job


async def _parameters_after_training(spec) -> tuple[list[np.ndarray], int]:  # type: ignore[no-untyped-def]
    """Every peer's flat parameters after ``spec.rounds`` rounds, and the function calls served."""
    async with running_job(spec) as job:
        await job.train()
        params = [torch.nn.utils.parameters_to_vector(p.replica.model.parameters()).detach().numpy().copy()
                  for p in job.peers]
        return params, job.function._served


@pytest.mark.parametrize("rounds", [1, 3])
async def test_an_inline_round_updates_the_parameters_as_the_serverless_round_does(rounds: int) -> None:
    """25 samples in 3 micro-batches of 9, 8 and 8: only the serverless path's weighting by sample count
    gives the same step (an unweighted mean of the micro-batch means would not); momentum carries any
    difference into the next rounds."""
    serverless = make_spec(name="same", peers=2, functionsPerPeer=3, batchSize=25, rounds=rounds,
                           optimizer={"learningRate": 0.5, "momentum": 0.9})
    inline = dataclasses.replace(serverless, function=dataclasses.replace(serverless.function, mode="inline"))
    assert serverless.function.mode == "serverless" and inline.function.inline

    expected, served_serverless = await _parameters_after_training(serverless)
    got, served_inline = await _parameters_after_training(inline)

    assert served_serverless == 2 * 3 * rounds and served_inline == 0  # inline never calls the function
    start = make_spec(name="same", peers=2, functionsPerPeer=3, batchSize=25, rounds=rounds)
    async with running_job(start) as job:  # the untrained replica: the test must see the parameters move
        initial = torch.nn.utils.parameters_to_vector(job.peers[0].replica.model.parameters()).detach().numpy()
    for inline_params, serverless_params in zip(got, expected, strict=True):
        assert not np.allclose(inline_params, initial)
        np.testing.assert_allclose(inline_params, serverless_params, rtol=1e-5, atol=1e-7)


def _digits_overflowing(tmp_path: Path, every: int) -> Path:
    """Digits with every ``every``-th sample at 3e38: finite in the file, Inf after the first layer."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x[::every] = np.float32(3e38)
    path = tmp_path / "digits-overflow.npz"
    np.savez(path, x=x, y=digits.target.astype(np.int64))
    return path


async def test_an_inline_non_finite_gradient_fails_the_peer_naming_the_micro_batch(tmp_path: Path) -> None:
    spec = make_spec(name="inline-nan", peers=1, functionsPerPeer=2, batchSize=32, rounds=3,
                     function={"mode": "inline"}, dataset={"name": "path", "path": str(_digits_overflowing(tmp_path, 7))})
    async with running_job(spec) as job:
        with pytest.raises(Diverged) as raised:
            await job.train()
    assert raised.value.cause == "non-finite-gradient" and raised.value.round == 0
    assert "micro-batch 0:" in str(raised.value) and "non-finite values" in str(raised.value)


async def test_inline_skip_round_leaves_the_diverging_micro_batch_out_and_trains_on(tmp_path: Path) -> None:
    spec = make_spec(name="inline-skip", peers=1, functionsPerPeer=4, batchSize=32, rounds=6,
                     function={"mode": "inline"}, training={"onDivergence": "skipRound"},
                     dataset={"name": "path", "path": str(_digits_overflowing(tmp_path, 20))})
    async with running_job(spec) as job:
        (reports,) = await job.train()
        peer = job.peers[0]
    assert [r.round for r in reports] == list(range(6))
    skipped = peer.status.skipped_updates.get("divergence", 0)
    assert skipped >= 1, peer.status.skipped_updates
    labels = metrics.peer_labels(spec.name, spec.namespace, 0)
    counted = metrics.DIVERGENCES_TOTAL.labels(**labels, cause="non-finite-gradient")._value.get()
    assert 1 <= counted <= skipped  # the loss check may skip rounds too, under its own cause
    # The micro-batches left out are not in the samples the round trained on.
    assert any(r.samples < spec.batch_size for r in reports)
    assert all(r.loss is not None and np.isfinite(r.loss) for r in reports if r.samples)
