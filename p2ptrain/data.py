"""Data sets and the deterministic sampling every peer and function agrees on.

Built-ins need no download (scikit-learn's handwritten digits, a seeded synthetic set); files are read
from `.npz` (never with pickle), MNIST IDX (optionally gzipped) and CIFAR-10 *binary* batches. A data
set is split into train/test once (seeded) and the training set into one disjoint shard per peer; each
round a peer takes the next minibatch of its shard, in a fresh seeded order every epoch.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from p2ptrain.spec import DatasetSpec


class DataError(ValueError):
    """A data set that cannot be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray  # float32 [N, *input_shape], values in [0, 1] for images
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    input_shape: tuple[int, ...]
    num_classes: int


def load_dataset(spec: DatasetSpec) -> Dataset:
    """The data set a spec names (cached per process: peers and functions load it once)."""
    return _load(json.dumps({"name": spec.name, "path": spec.path, "format": spec.format, "seed": spec.split_seed,
                             "test": spec.test_fraction, "args": dict(spec.args)}, sort_keys=True))


def forget_datasets() -> None:
    """Drop the per-process cache (a process that only checked a data set need not hold it)."""
    _load.cache_clear()


@functools.lru_cache(maxsize=4)
def _load(key: str) -> Dataset:
    cfg = json.loads(key)
    name, seed, test = cfg["name"], cfg["seed"], cfg["test"]
    if name == "digits":
        images, target = _digits()
        x = (images / 16.0).astype(np.float32)[:, None, :, :]
        return _split(x, target.astype(np.int64), seed, test)
    if name == "synthetic":
        return _synthetic(seed, test, **cfg["args"])
    if name == "path":
        return _from_path(Path(cfg["path"]), cfg["format"], seed, test)
    raise DataError(f"unknown dataset {name!r}; known: digits, synthetic, path")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (8x8 images, 0..16), read from the file it ships without importing it: the
    import costs 1.7 s of every function instance's cold start (scale from zero) and 27 ms the read.
    ``sklearn.datasets.load_digits`` where that file is not where scikit-learn has kept it for years."""
    found = importlib.util.find_spec("sklearn")
    for root in (found.submodule_search_locations or []) if found else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


def _synthetic(seed: int, test: float, samples: int = 2000, features: int = 20, classes: int = 4) -> Dataset:
    from sklearn.datasets import make_classification

    if classes < 2 or features < 2 or samples < 2 * classes:
        raise DataError(f"synthetic dataset needs classes >= 2, features >= 2, samples >= 2*classes; got {classes}, {features}, {samples}")
    x, y = make_classification(
        n_samples=samples, n_features=features, n_informative=max(2, features // 2), n_classes=classes,
        n_clusters_per_class=1, random_state=seed,
    )
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    return _split(x.astype(np.float32), y.astype(np.int64), seed, test)


def _split(x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float) -> Dataset:
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return _dataset(x[train], y[train], x[test], y[test])


def _dataset(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> Dataset:
    classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    return Dataset(
        np.ascontiguousarray(x_train, dtype=np.float32), np.ascontiguousarray(y_train, dtype=np.int64),
        np.ascontiguousarray(x_test, dtype=np.float32), np.ascontiguousarray(y_test, dtype=np.int64),
        tuple(int(d) for d in x_train.shape[1:]), classes,
    )


# --- files -----------------------------------------------------------------------------------------

def _from_path(path: Path, fmt: str, seed: int, test: float) -> Dataset:
    if not path.exists():
        raise DataError(f"dataset path {path} does not exist")
    if fmt == "auto":
        fmt = _detect_format(path)
    if fmt == "npz":
        return _npz(path, seed, test)
    if fmt == "mnist-idx":
        return _mnist(path)
    if fmt == "cifar10":
        return _cifar10(path)
    raise DataError(f"unknown dataset format {fmt!r}")


def _detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".npz":
        return "npz"
    if path.is_dir():
        names = {p.name for p in path.iterdir()}
        if any(n.startswith("train-images-idx3-ubyte") for n in names):
            return "mnist-idx"
        if "data_batch_1.bin" in names or "test_batch.bin" in names:
            return "cifar10"
        if "data_batch_1" in names:
            raise DataError(
                f"{path} holds the pickled 'python version' of CIFAR-10, which p2ptrain never loads "
                "(unpickling files runs code): use the binary version (data_batch_1.bin ... test_batch.bin)"
            )
    raise DataError(f"cannot tell the format of {path}: expected a .npz file, MNIST IDX files or CIFAR-10 .bin batches")


def _npz(path: Path, seed: int, test: float) -> Dataset:
    arrays = _read_npz(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        _check_xy(path, parts[0], parts[1], "x_train", "y_train")
        _check_xy(path, parts[2], parts[3], "x_test", "y_test")
        return _dataset(*(_as_float(parts[0]), parts[1].astype(np.int64), _as_float(parts[2]), parts[3].astype(np.int64)))
    if {"x", "y"} <= arrays.keys():
        _check_xy(path, arrays["x"], arrays["y"], "x", "y")
        return _split(_as_float(arrays["x"]), arrays["y"].astype(np.int64), seed, test)
    raise DataError(f"{path} must hold arrays x_train, y_train, x_test, y_test (or x, y); found {sorted(arrays)}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, or a DataError naming the file; object arrays are refused, never unpickled."""
    # np.load falls back to unpickling for anything that is not a zip or .npy file; refuse that up front,
    # so random bytes get "not a valid .npz", not advice about pickle.
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a valid .npz file: no zip archive found (truncated, or not written by numpy.savez)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                try:
                    arrays[key] = archive[key]
                except ValueError as exc:
                    raise DataError(
                        f"{path} is not a valid .npz file: array {key!r} is not a plain numeric array "
                        "(object arrays and malformed members are refused; p2ptrain never unpickles data)"
                    ) from exc
    except DataError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path} is not a valid .npz file: {exc or type(exc).__name__} (truncated or corrupt)") from exc
    except Exception as exc:
        # Parsing a damaged member header can raise almost anything (SyntaxError, TokenError, ...);
        # its text would be garbage, so name only the kind of failure.
        raise DataError(f"{path} is not a valid .npz file: {type(exc).__name__} while reading it (truncated or corrupt)") from exc
    return arrays


def _as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def _check_xy(path: Path, x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> None:
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: {x_name} must be [N, ...] and {y_name} [N]; got {x_name}{x.shape} and {y_name}{y.shape}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{path}: {x_name} must hold numbers, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
        raise DataError(f"{path}: {x_name} holds NaN or infinite values, which would make every gradient NaN")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{path}: labels ({y_name}) must be non-negative integers, got dtype {y.dtype}")


def _read(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            return bytes(handle.read())
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _idx(path: Path, ndim: int) -> np.ndarray:
    data = _read(path)
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: no complete IDX header")
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != ndim:
        raise DataError(f"{path}: wrong IDX magic {data[:4].hex()} (expected unsigned bytes with {ndim} dimensions)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != expected:
        raise DataError(f"{path}: header promises {expected} bytes of data, file has {payload.size}")
    return payload.reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"{directory} has no {stem} (or {stem}.gz)")


def _mnist(directory: Path) -> Dataset:
    parts = []
    for prefix in ("train", "t10k"):
        images = _idx(_idx_file(directory, f"{prefix}-images-idx3-ubyte"), 3)
        labels = _idx(_idx_file(directory, f"{prefix}-labels-idx1-ubyte"), 1)
        if len(images) != len(labels):
            raise DataError(f"{directory}: {prefix} has {len(images)} images but {len(labels)} labels")
        parts += [images[:, None, :, :].astype(np.float32) / 255.0, labels.astype(np.int64)]
    return _dataset(*parts)


_CIFAR_RECORD = 1 + 3 * 32 * 32


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = _read(path)
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DataError(f"{path}: size {len(data)} is not a whole number of {_CIFAR_RECORD}-byte CIFAR-10 records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} out of range 0..9 (is this really CIFAR-10 binary?)")
    images = records[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return images, labels


def _cifar10(directory: Path) -> Dataset:
    train = sorted(directory.glob("data_batch_*.bin"))
    test = directory / "test_batch.bin"
    if not train or not test.exists():
        raise DataError(f"{directory} needs data_batch_*.bin and test_batch.bin (CIFAR-10 binary version)")
    xs, ys = zip(*(_cifar_batch(p) for p in train), strict=True)
    x_test, y_test = _cifar_batch(test)
    return _dataset(np.concatenate(xs), np.concatenate(ys), x_test, y_test)


# --- sampling --------------------------------------------------------------------------------------

def shard_indices(n_train: int, peers: int, peer: int, seed: int) -> np.ndarray:
    """Peer ``peer``'s shard: a seeded permutation of the training set cut into ``peers`` parts."""
    if not 0 <= peer < peers:
        raise ValueError(f"peer {peer} out of range for {peers} peers")
    if n_train < peers:
        raise DataError(f"{n_train} training samples cannot be shared by {peers} peers")
    return np.array_split(np.random.default_rng(seed).permutation(n_train), peers)[peer]


def batch_indices(shard: np.ndarray, round_index: int, batch_size: int, seed: int) -> np.ndarray:
    """The minibatch of round ``round_index``: the shard walked in epochs, reshuffled (seeded) each epoch."""
    size = len(shard)
    out = np.empty(batch_size, dtype=np.int64)
    position = round_index * batch_size
    filled = 0
    while filled < batch_size:
        epoch, offset = divmod(position + filled, size)
        take = min(batch_size - filled, size - offset)
        order = _epoch_order(seed, epoch, size)
        out[filled : filled + take] = shard[order[offset : offset + take]]
        filled += take
    return out


@functools.lru_cache(maxsize=2)  # the epoch a round reads and the next one: a round never pays for a permutation
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(size)
    order.flags.writeable = False  # shared between calls
    return order


def split_micro_batches(indices: np.ndarray, parts: int) -> list[np.ndarray]:
    """Near-equal, non-empty, order-preserving micro-batches (fewer than ``parts`` if too few samples)."""
    return [part for part in np.array_split(indices, min(parts, len(indices))) if len(part)]
