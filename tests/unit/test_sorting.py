"""The comparator network behind the coordinate-wise rules: Batcher's network sorts (0-1 principle, every
input), and the pruned plans give exactly the ranks asked for, against ``torch.sort``."""

from __future__ import annotations

import itertools

import pytest
import torch

from p2ptrain import sorting
from p2ptrain.sorting import batcher, ordered_blocks, plan


@pytest.mark.parametrize("n", range(1, 11))
def test_batchers_network_sorts_every_zero_one_input(n: int) -> None:
    # A comparator network that sorts every 0-1 sequence sorts every sequence (Knuth, 5.3.4).
    network = batcher(n)
    for bits in itertools.product((0, 1), repeat=n):
        values = list(bits)
        for i, j in network:
            assert i < j
            if values[i] > values[j]:
                values[i], values[j] = values[j], values[i]
        assert values == sorted(bits), (n, bits)


def test_the_networks_are_batchers_sizes_and_the_median_of_four_is_pruned_to_six_operations() -> None:
    assert [len(batcher(n)) for n in (2, 4, 8, 16)] == [1, 5, 19, 63]
    operations = sum(int(want_min) + int(want_max) for _, _, want_min, want_max in plan(4, (1, 2)))
    assert operations == 6  # odd-even transposition took 12
    assert plan(5, (0, 4)) == ()  # every rank, as a set: nothing to compare (a trimmed mean with f = 0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 12])
def test_every_rank_range_and_the_whole_order_match_torch_sort_across_blocks(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sorting, "BLOCK_COLUMNS", 64)  # several blocks, the last one short
    generator = torch.Generator().manual_seed(n)
    grads = torch.randn(n, 200, generator=generator)
    grads[:, :20] = 1.0  # ties
    grads[: n // 2, 20:40] = -0.0
    before = grads.clone()
    reference = torch.sort(grads, dim=0).values
    for lo in range(n):
        for hi in range(lo, n):
            got = torch.cat([torch.stack(values) for _, values in ordered_blocks(grads, ranks=(lo, hi))], dim=1)
            torch.testing.assert_close(torch.sort(got, dim=0).values, reference[lo : hi + 1], rtol=0, atol=0)
    whole = torch.cat([torch.stack(values) for _, values in ordered_blocks(grads)], dim=1)
    torch.testing.assert_close(whole, reference, rtol=0, atol=0)
    rows = list(range(n - 1, -1, -2))
    chosen = torch.cat([torch.stack(values) for _, values in ordered_blocks(grads, rows)], dim=1)
    torch.testing.assert_close(chosen, torch.sort(grads[rows], dim=0).values, rtol=0, atol=0)
    assert torch.equal(grads, before)  # the input rows are read, never written


def test_ranks_outside_the_rows_are_refused() -> None:
    with pytest.raises(ValueError, match=r"ranks \(2, 4\) outside 0..3"):
        next(ordered_blocks(torch.zeros(4, 8), ranks=(2, 4)))


@pytest.mark.parametrize("rule,n,f", [("median", 6, 1), ("trimmed-mean", 7, 2), ("bulyan", 7, 1)])
def test_the_rules_give_the_same_result_in_many_blocks_as_in_one(rule: str, n: int, f: int,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from p2ptrain.aggregate import aggregate

    grads = torch.randn(n, 300, generator=torch.Generator().manual_seed(7))
    whole = aggregate(rule, grads, f)
    monkeypatch.setattr(sorting, "BLOCK_COLUMNS", 64)
    torch.testing.assert_close(aggregate(rule, grads, f), whole, rtol=0, atol=0)
