"""Everything about a job that can be checked before anything is started.

``p2ptrain validate`` and ``p2ptrain run`` call :func:`check_job` after parsing the manifest, so an
unknown model, bad model arguments, a missing or malformed data set, or a model that cannot take the
data's shape fails in seconds with exit code 2, instead of in every peer after the cold start. It does
what a peer does at start-up (load the data set, build the model with the job's seed) plus one forward
pass on two samples, all on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2ptrain.data import DataError, forget_datasets, load_dataset, shard_indices
from p2ptrain.models import BUILTIN, ModelError, build_model, import_factory
from p2ptrain.spec import JobSpec


@dataclass(frozen=True)
class Resolved:
    """What the checks found; ``None`` for what could not be checked on this machine (see ``notes``)."""

    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    train_samples: int | None = None
    test_samples: int | None = None
    parameters: int | None = None
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.input_shape is None:
            return "; ".join(self.notes)
        text = (
            f"data: {self.train_samples} training and {self.test_samples} test samples of shape "
            f"{self.input_shape}, {self.num_classes} classes; model: {self.parameters} parameters"
        )
        return "; ".join([text, *self.notes])


def check_job(spec: JobSpec, *, local: bool) -> Resolved:
    """Resolve the job's data set and model as its peers will; raise DataError or ModelError if they cannot.

    ``local`` is true for ``p2ptrain run``, which reads ``dataset.path`` on this machine. For
    ``validate`` a path on ``dataset.claimName`` lives in the cluster; when it is not present here only
    the model factory is resolved, and a note says so.
    """
    dataset_spec = spec.dataset
    if (
        not local
        and dataset_spec.name == "path"
        and dataset_spec.claim_name
        and dataset_spec.path is not None
        and not Path(dataset_spec.path).exists()
    ):
        _resolve_factory(spec)
        return Resolved(notes=(
            f"dataset.path {dataset_spec.path} is on PersistentVolumeClaim {dataset_spec.claim_name} in the "
            f"cluster, not on this machine: the data and the model's fit to it were not checked here",
        ))

    try:
        return _check_data_and_model(spec)
    finally:
        forget_datasets()  # `run` goes on for hours in this process; the peers load their own copy


def _check_data_and_model(spec: JobSpec) -> Resolved:
    dataset_spec = spec.dataset
    try:
        data = load_dataset(dataset_spec)
        shard_indices(len(data.y_train), spec.peers, 0, dataset_spec.split_seed)  # enough samples for every peer
    except DataError as exc:
        raise DataError(f"spec.dataset: {exc}") from exc

    import torch

    torch.manual_seed(spec.seed)
    try:
        model = build_model(spec.model, data.input_shape, data.num_classes)
    except ModelError as exc:
        raise ModelError(
            f"spec.model: {exc} (the data set {dataset_spec.name!r} has inputs of shape {data.input_shape} "
            f"and {data.num_classes} classes)"
        ) from exc
    sample = torch.from_numpy(data.x_train[:2])
    try:
        with torch.no_grad():
            output = model(sample)
    except Exception as exc:  # the user's forward(): any failure means it cannot take this data
        raise ModelError(
            f"spec.model: model {spec.model.name} cannot take the data set's inputs of shape {data.input_shape}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[1] < data.num_classes:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ModelError(
            f"spec.model: model {spec.model.name} must return logits shaped [batch, {data.num_classes}] for this data set "
            f"({data.num_classes} classes), got {shape}"
        )
    return Resolved(
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        train_samples=len(data.y_train),
        test_samples=len(data.y_test),
        parameters=sum(p.numel() for p in model.parameters()),
    )


def _resolve_factory(spec: JobSpec) -> None:
    name = spec.model.name
    if ":" in name:
        try:
            import_factory(name)
        except ModelError as exc:
            raise ModelError(f"spec.model: {exc}") from exc
    elif name not in BUILTIN:
        raise ModelError(f"spec.model: unknown model {name!r}; built-in: {', '.join(sorted(BUILTIN))}, or module:factory")


__all__ = ["DataError", "ModelError", "Resolved", "check_job"]
