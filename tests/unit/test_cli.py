"""The command line: every bad manifest, model or data set is exit code 2 with one exact line, from both
`validate` and `run`, before anything is started; help, version and dispatch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

import p2ptrain.local
from p2ptrain import __version__
from p2ptrain.cli import build_parser, main


def _job(**spec: object) -> dict:
    base: dict = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "peers": 2, "rounds": 1}
    base.update(spec)
    return {"apiVersion": "p2ptrain.dev/v1alpha1", "kind": "P2PTrainingJob", "metadata": {"name": "job"}, "spec": base}


def _write(tmp_path: Path, content: str | bytes | dict) -> Path:
    path = tmp_path / "job.yaml"
    if isinstance(content, dict):
        content = yaml.safe_dump(content)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


@pytest.fixture(autouse=True)
def _nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` must refuse before the local runner starts anything; and sys.path is restored after each test."""

    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError("run_job was called for a job that can never run")

    monkeypatch.setattr(p2ptrain.local, "run_job", refuse)
    monkeypatch.setattr(sys, "path", list(sys.path))


def _npz_random(tmp_path: Path) -> str:
    path = tmp_path / "data.npz"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    return str(path)


def _npz_truncated(tmp_path: Path) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, x=np.ones((50, 4)), y=np.arange(50) % 2)
    path.write_bytes(path.read_bytes()[:300])
    return str(path)


def _factory_module(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    return f"{name}:build"


BAD_JOBS = {
    "non-utf8": (lambda tmp: "apiVersion: p2ptrain.dev/v1alpha1\nmetadata: {name: caf\xe9}\n".encode("latin-1"),
                 r"job.yaml is not UTF-8 text \(byte 0xe9 at offset \d+\): save the manifest as UTF-8"),
    "duplicate-key": (lambda tmp: yaml.safe_dump(_job()) + "kind: P2PTrainingJob\n",
                      r"duplicate key 'kind' \(first given on line \d+\)"),
    "nested-duplicate-key": (lambda tmp: yaml.safe_dump(_job()).replace("  peers: 2\n", "  peers: 2\n  peers: 3\n"),
                             "duplicate key 'peers'"),
    "wrong-kind": (lambda tmp: {**_job(), "kind": "P2PTrainingjob"},
                   "kind: expected 'P2PTrainingJob', got 'P2PTrainingjob'"),
    "no-job-among-documents": (lambda tmp: yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Namespace"},
                                                               {"apiVersion": "batch/v1", "kind": "Job"}]),
                               "must contain one document of kind P2PTrainingJob .* found kind 'Namespace', kind 'Job'"),
    "job-name": (lambda tmp: {**_job(), "metadata": {"name": "my.job"}}, 'metadata.name "my.job" is not a DNS-1035 label'),
    "learning-rate-nan": (lambda tmp: yaml.safe_dump(_job()).replace("spec:\n", "spec:\n  optimizer: {learningRate: .nan}\n"),
                          "spec.optimizer.learningRate: expected a finite number, got nan"),
    "learning-rate-inf": (lambda tmp: yaml.safe_dump(_job()).replace("spec:\n", "spec:\n  optimizer: {learningRate: .inf}\n"),
                          "spec.optimizer.learningRate: expected a finite number, got inf"),
    "metrics-port": (lambda tmp: _job(metrics={"port": 8080}), "spec.metrics.port: metrics.port 8080 is already the HTTP port"),
    "npz-random-bytes": (lambda tmp: _job(dataset={"name": "path", "path": _npz_random(tmp)}),
                         r"data.npz is not a valid .npz file: no zip archive found"),
    "npz-truncated": (lambda tmp: _job(dataset={"name": "path", "path": _npz_truncated(tmp)}),
                      r"data.npz is not a valid .npz file"),
    "dataset-missing": (lambda tmp: _job(dataset={"name": "path", "path": str(tmp / "nowhere.npz")}),
                        "spec.dataset: dataset path .*nowhere.npz does not exist"),
    "unknown-model": (lambda tmp: _job(model={"name": "resnet"}), "unknown model 'resnet'; built-in: cnn, logreg, mlp"),
    "bad-model-args": (lambda tmp: _job(model={"name": "mlp", "args": {"width": 3}}),
                       r"model mlp does not take arguments \{'width': 3\}"),
    "bad-model-arg-value": (lambda tmp: _job(model={"name": "mlp", "args": {"hidden": "wide"}}),
                            "mlp hidden must be a positive int"),
    "cnn-on-flat-data": (lambda tmp: _job(model={"name": "cnn"}, dataset={"name": "synthetic"}),
                         r"spec.model: cnn needs image inputs shaped \(C, H, W\) or \(H, W\), got \(20,\) "
                         r"\(the data set 'synthetic' has inputs of shape \(20,\) and 4 classes\)"),
    "model-module-missing": (lambda tmp: _job(model={"name": "no_such_models:build"}),
                             "cannot import model module 'no_such_models'"),
    "model-forward-fails": (lambda tmp: _job(model={"name": _factory_module(tmp, "narrow_model", """
                                import torch
                                def build(input_shape, num_classes):
                                    return torch.nn.Linear(3, num_classes)  # ignores the 8x8 images
                                """)}),
                            r"model narrow_model:build cannot take the data set's inputs of shape \(1, 8, 8\)"),
    "model-output-shape": (lambda tmp: _job(model={"name": _factory_module(tmp, "one_logit", """
                               import torch
                               def build(input_shape, num_classes):
                                   return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))
                               """)}),
                           r"must return logits shaped \[batch, 10\] .* got \(2, 1\)"),
    "too-few-samples-for-peers": (lambda tmp: _job(peers=64, dataset={"name": "synthetic", "args": {"samples": 40}}),
                                  "training samples cannot be shared by 64 peers"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_manifests_and_data_exit_2_with_one_exact_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, case: str
) -> None:
    monkeypatch.chdir(tmp_path)  # where `module:factory` code lives, as for a user running p2ptrain there
    make, message = BAD_JOBS[case]
    path = _write(tmp_path, make(tmp_path))
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert "allow_pickle" not in err and "Traceback" not in err


def test_a_non_utf8_manifest_is_one_line_at_the_process_level_too(tmp_path: Path) -> None:
    path = _write(tmp_path, "metadata: {name: caf\xe9}\n".encode("latin-1"))
    result = subprocess.run([sys.executable, "-m", "p2ptrain", "validate", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "is not UTF-8 text" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_prints_the_resolved_spec_and_what_it_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = _write(tmp_path, _job(model={"name": "cnn"}))
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["model"]["name"] == "cnn"
    assert "shape (1, 8, 8), 10 classes; model:" in err


def test_validate_notes_data_it_cannot_see_on_a_claim_but_still_resolves_the_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    on_claim = {"name": "path", "path": "/data/mnist", "claimName": "datasets"}
    assert main(["validate", str(_write(tmp_path, _job(dataset=on_claim)))]) == 0
    assert "is on PersistentVolumeClaim datasets in the cluster" in capsys.readouterr().err
    assert main(["validate", str(_write(tmp_path, _job(dataset=on_claim, model={"name": "resnet"})))]) == 2
    assert "unknown model 'resnet'" in capsys.readouterr().err


# --- help, version, dispatch -------------------------------------------------------------------------------

def test_function_help_shows_usage_and_environment(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["function", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: p2ptrain function")
    for name in ("P2PTRAIN_CONFIG", "P2PTRAIN_REDIS_PASSWORD", "P2PTRAIN_SIGNING_KEY", "LISTEN_ADDRESS", "/health/readiness"):
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"p2ptrain {__version__}\n"


@pytest.mark.parametrize("columns", [80, 60])
@pytest.mark.parametrize("command", ["run", "validate", "function", "peer", "export"])
def test_help_fits_the_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                columns: int, command: str) -> None:
    monkeypatch.setenv("COLUMNS", str(columns))
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    too_long = [line for line in out.splitlines() if len(line) > columns]
    assert not too_long, too_long
    if command == "run":  # the epilog is wrapped, not dropped
        assert "runPolicy.backoffLimit" in out and "130 interrupted" in out


@pytest.mark.parametrize(
    "argv,handler",
    [
        (["run", "job.yaml"], "_run"),
        (["validate", "job.yaml"], "_validate"),
        (["peer", "--config", "job.json"], "_peer"),
        (["export", "--config", "job.json", "--output", "m.safetensors"], "_export"),
        (["function"], "_function"),
        (["operator"], "_operator"),
        (["redis-module"], "_redis_module"),
    ],
)
def test_each_command_is_dispatched_by_its_parser(argv: list[str], handler: str) -> None:
    args = build_parser().parse_args(argv)
    assert args.func.__name__ == handler


def test_the_check_does_not_keep_the_data_set_in_the_long_running_cli_process() -> None:
    from p2ptrain import data
    from p2ptrain.preflight import check_job
    from p2ptrain.spec import parse_manifest

    resolved = check_job(parse_manifest(_job()), local=True)
    assert resolved.train_samples == 1438
    assert data._load.cache_info().currsize == 0
