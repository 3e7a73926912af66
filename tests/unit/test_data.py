"""Data sets and sampling: built-ins, on-disk loaders on files the tests write, and shard walking."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain.data import DataError, batch_indices, load_dataset, shard_indices, split_micro_batches
from p2ptrain.spec import DatasetSpec


def test_digits_are_8x8_images_in_unit_range_with_a_seeded_split() -> None:
    data = load_dataset(DatasetSpec("digits", split_seed=0, test_fraction=0.2))
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert len(data.y_train) + len(data.y_test) == 1797 and len(data.y_test) == 359
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    other = load_dataset(DatasetSpec("digits", split_seed=1, test_fraction=0.2))
    assert not np.array_equal(data.y_test, other.y_test)


def test_digits_read_without_importing_sklearn_are_sklearns_digits() -> None:
    """The file scikit-learn ships, read directly (a function instance's cold start skips the import), and
    the fallback through ``load_digits`` give the same arrays."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from p2ptrain import data as data_module

    images, target = data_module._digits()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(target, reference.target)
    code = ("import sys; from p2ptrain.data import load_dataset; from p2ptrain.spec import DatasetSpec; "
            "load_dataset(DatasetSpec('digits')); print('sklearn' in sys.modules)")
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert imported.strip() == "False"


def test_synthetic_set_follows_its_arguments() -> None:
    data = load_dataset(DatasetSpec("synthetic", args={"samples": 500, "features": 6, "classes": 3}))
    assert data.input_shape == (6,) and data.num_classes == 3
    assert len(data.y_train) + len(data.y_test) == 500


def _idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_mnist_idx_files_load(tmp_path: Path, compress: bool) -> None:
    suffix = ".gz" if compress else ""
    rng = np.random.default_rng(0)
    _idx(tmp_path / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (12, 28, 28)), compress)
    _idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", np.arange(12) % 10, compress)
    _idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (4, 28, 28)), compress)
    _idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(4), compress)
    data = load_dataset(DatasetSpec("path", path=str(tmp_path)))
    assert data.x_train.shape == (12, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert data.y_train.tolist() == [i % 10 for i in range(12)] and data.x_train.max() <= 1.0


def test_truncated_idx_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    _idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28)))
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    _idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: header promises 3920 bytes"):
        load_dataset(DatasetSpec("path", path=str(tmp_path), format="mnist-idx"))


def test_idx_with_wrong_magic_is_refused(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + b"\0" * 20)
    with pytest.raises(DataError, match="wrong IDX magic"):
        load_dataset(DatasetSpec("path", path=str(tmp_path), format="mnist-idx"))


def _cifar_batch(path: Path, n: int, label: int = 3) -> None:
    records = np.zeros((n, 3073), dtype=np.uint8)
    records[:, 0] = label
    records[:, 1:] = 255
    path.write_bytes(records.tobytes())


def test_cifar10_binary_batches_load(tmp_path: Path) -> None:
    _cifar_batch(tmp_path / "data_batch_1.bin", 5)
    _cifar_batch(tmp_path / "data_batch_2.bin", 3, label=7)
    _cifar_batch(tmp_path / "test_batch.bin", 2)
    data = load_dataset(DatasetSpec("path", path=str(tmp_path)))
    assert data.x_train.shape == (8, 3, 32, 32) and data.x_test.shape == (2, 3, 32, 32)
    assert set(data.y_train.tolist()) == {3, 7} and data.x_train.max() == 1.0


def test_partial_cifar_record_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1.bin").write_bytes(b"\x01" * 3000)
    _cifar_batch(tmp_path / "test_batch.bin", 1)
    with pytest.raises(DataError, match=r"data_batch_1.bin: size 3000 is not a whole number"):
        load_dataset(DatasetSpec("path", path=str(tmp_path), format="cifar10"))


def test_pickled_cifar_is_never_unpickled(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({"data": [1, 2, 3]}))
    with pytest.raises(DataError, match="never loads"):
        load_dataset(DatasetSpec("path", path=str(tmp_path)))


def test_npz_with_splits_and_with_x_y(tmp_path: Path) -> None:
    split = tmp_path / "split.npz"
    np.savez(split, x_train=np.ones((6, 4)), y_train=np.arange(6) % 2, x_test=np.ones((2, 4)), y_test=np.array([0, 1]))
    data = load_dataset(DatasetSpec("path", path=str(split)))
    assert data.x_train.shape == (6, 4) and data.num_classes == 2
    whole = tmp_path / "whole.npz"
    np.savez(whole, x=np.zeros((10, 3), dtype=np.uint8), y=np.arange(10) % 5)
    data = load_dataset(DatasetSpec("path", path=str(whole), test_fraction=0.3))
    assert len(data.y_test) == 3 and data.num_classes == 5


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"a": np.ones(3)}, "must hold arrays x_train"),
        ({"x": np.ones((4, 2)), "y": np.ones(3, dtype=np.int64)}, r"x must be \[N, ...\] and y \[N\]"),
        ({"x": np.ones((3, 2)), "y": np.array([0, -1, 1])}, "non-negative integers"),
        ({"x": np.array([object(), 1], dtype=object), "y": np.ones(2)}, "array 'x' is not a plain numeric array"),
        ({"x": np.array([["a", "b"], ["c", "d"]]), "y": np.array([0, 1])}, "x must hold numbers, got dtype <U1"),
        ({"x": np.array([[0.0, np.nan], [1.0, 2.0]]), "y": np.array([0, 1])}, "x holds NaN or infinite values"),
        ({"x_train": np.ones((2, 2)), "y_train": np.array([0, 1]), "x_test": np.full((1, 2), np.inf),
          "y_test": np.array([0])}, "x_test holds NaN or infinite values"),
    ],
    ids=["missing-keys", "length-mismatch", "negative-label", "object-array", "strings", "nan", "inf-in-test"],
)
def test_bad_npz_files_are_refused(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as caught:
        load_dataset(DatasetSpec("path", path=str(path)))
    assert "allow_pickle" not in str(caught.value)


def _valid_npz(path: Path) -> bytes:
    np.savez_compressed(path, x=np.random.default_rng(0).random((200, 16)), y=np.arange(200) % 4)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["random-bytes", "truncated", "corrupt-member", "empty"])
def test_files_that_are_not_npz_archives_are_named_and_never_unpickled(tmp_path: Path, damage: str) -> None:
    path = tmp_path / f"{damage}.npz"
    if damage == "random-bytes":
        path.write_bytes(np.random.default_rng(1).bytes(4096))
    elif damage == "truncated":
        path.write_bytes(_valid_npz(path)[:-700])
    elif damage == "corrupt-member":
        data = bytearray(_valid_npz(path))
        data[200:400] = bytes(200)  # inside the first member's compressed bytes; the directory stays intact
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")
    with pytest.raises(DataError) as caught:
        load_dataset(DatasetSpec("path", path=str(path)))
    message = str(caught.value)
    assert message.startswith(f"{path} is not a valid .npz file"), message
    assert "pickle" not in message.replace("never unpickles", ""), message


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere.npz does not exist"):
        load_dataset(DatasetSpec("path", path=str(tmp_path / "nowhere.npz")))


@settings(max_examples=50, deadline=None)
@given(n=st.integers(4, 500), peers=st.integers(1, 4), seed=st.integers(0, 100))
def test_shards_are_disjoint_and_cover_the_training_set(n: int, peers: int, seed: int) -> None:
    shards = [shard_indices(n, peers, p, seed) for p in range(peers)]
    together = np.concatenate(shards)
    assert sorted(together.tolist()) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@settings(max_examples=50, deadline=None)
@given(size=st.integers(1, 60), batch=st.integers(1, 25), seed=st.integers(0, 50))
def test_batches_walk_the_shard_covering_it_every_epoch(size: int, batch: int, seed: int) -> None:
    shard = np.arange(100, 100 + size)
    epochs = 3
    rounds = -(-epochs * size // batch)
    walked = np.concatenate([batch_indices(shard, r, batch, seed) for r in range(rounds)])
    assert set(walked.tolist()) <= set(shard.tolist())
    for epoch in range(epochs):
        assert sorted(walked[epoch * size : (epoch + 1) * size].tolist()) == shard.tolist()
    np.testing.assert_array_equal(batch_indices(shard, 2, batch, seed), batch_indices(shard, 2, batch, seed))


def test_micro_batches_are_near_equal_and_preserve_order() -> None:
    parts = split_micro_batches(np.arange(10), 3)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert np.concatenate(parts).tolist() == list(range(10))
    assert len(split_micro_batches(np.arange(2), 5)) == 2
