"""Coordinate-wise order statistics of n gradients by a comparator network, vectorised over the columns.

Per coordinate, the median, trimmed mean and Bulyan's window need the n values in order. A network of
compare-exchanges, each a vectorised ``minimum`` and ``maximum`` over a cache-sized block of columns,
is several times faster than ``sort`` along dim 0 (which sorts every column on its own). The network is
Batcher's odd-even merge sort (O(n log^2 n) comparators: 5 for n = 4, 19 for 8, against 6 and 28 for
odd-even transposition), pruned to what the caller reads:

- ``ranks=(lo, hi)``: only the *set* of values of ranks lo..hi (a median, a trimmed mean). The last
  comparators, which only order values inside that range or outside it, are dropped; so is every
  comparator whose output nobody reads, and a comparator with one output read computes only that one.
  The median of 4 then takes 6 elementwise operations instead of 12.
- no ``ranks``: the whole order (Bulyan's windows).

The input rows are never written, nor copied: the first comparators read them where they are.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import torch

# Columns per block: the rows of a block stay in cache while they are compared, so each gradient is read
# from memory about once, not once per comparator; and few enough blocks that torch's ~10 us a call do
# not dominate (1.13M columns, n = 4, 8, 16: median 6.3, 19.0, 58.5 ms with 32768-column blocks; 3.7,
# 11.3, 32.7 ms with these).
BLOCK_COLUMNS = 131072


def batcher(n: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network for ``n`` wires (any n): comparators (i, j), i < j, in order;
    each puts the smaller value on i."""
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < n:
        k = p
        while k > 0:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@functools.lru_cache(maxsize=64)
def plan(n: int, ranks: tuple[int, int] | None) -> tuple[tuple[int, int, bool, bool], ...]:
    """The comparators to run, as (i, j, min wanted on i, max wanted on j): the network for ``n`` pruned
    to the positions ``ranks`` (as a set) or, without ranks, to the whole order."""
    pairs = batcher(n)
    lo, hi = ranks if ranks is not None else (0, n - 1)
    if ranks is not None:  # the set on lo..hi does not change under comparators inside it or outside it
        while pairs and ((lo <= pairs[-1][0] and pairs[-1][1] <= hi) or pairs[-1][1] < lo or pairs[-1][0] > hi):
            pairs.pop()
    live = set(range(lo, hi + 1))
    kept: list[tuple[int, int, bool, bool]] = []
    for i, j in reversed(pairs):
        want_min, want_max = i in live, j in live
        if want_min or want_max:
            kept.append((i, j, want_min, want_max))
            live |= {i, j}
    return tuple(reversed(kept))


def ordered_blocks(
    grads: torch.Tensor, rows: Sequence[int] | None = None, ranks: tuple[int, int] | None = None
) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """Per block of columns, the chosen ``rows`` (default all) ordered per coordinate, smallest first;
    with ``ranks=(lo, hi)``, only the values of those ranks (in no particular order among themselves).
    The tensors yielded are reused buffers (or views of ``grads``), valid until the next block."""
    chosen = list(range(grads.shape[0])) if rows is None else list(rows)
    n, d = len(chosen), grads.shape[1]
    lo, hi = ranks if ranks is not None else (0, n - 1)
    if not 0 <= lo <= hi < n:
        raise ValueError(f"ranks {ranks} outside 0..{n - 1}")
    steps = plan(n, ranks)
    width = min(BLOCK_COLUMNS, d)
    pool = torch.empty(n + 2, width, dtype=grads.dtype)  # each wire holds at most one; two being written
    for start in range(0, d, width):
        stop = min(d, start + width)
        buffers = list(pool[:, : stop - start])
        free = list(range(n + 2))
        wires: list[torch.Tensor | None] = [grads[row, start:stop] for row in chosen]
        owner: list[int | None] = [None] * n
        for i, j, want_min, want_max in steps:
            a, b = wires[i], wires[j]
            assert a is not None and b is not None, "a pruned plan reads only live wires"
            low = high = None
            if want_min:
                low = free.pop()
                torch.minimum(a, b, out=buffers[low])
            if want_max:
                high = free.pop()
                torch.maximum(a, b, out=buffers[high])
            free += [k for k in (owner[i], owner[j]) if k is not None]
            owner[i], owner[j] = low, high
            wires[i] = buffers[low] if low is not None else None
            wires[j] = buffers[high] if high is not None else None
        picked = wires[lo : hi + 1]
        assert all(w is not None for w in picked), "every rank asked for is computed"
        yield slice(start, stop), [w for w in picked if w is not None]
