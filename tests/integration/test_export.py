"""`p2ptrain export` (what the operator's export Job runs): a peer's model from its real Redis to a
safetensors file users load with plain torch; a clear error when there is nothing to export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from p2ptrain.checkpoint import pack_state
from p2ptrain.config import RedisAddress, RuntimeConfig
from p2ptrain.data import load_dataset
from p2ptrain.models import build_model
from p2ptrain.store import Keys, PeerStore

from .harness import make_spec


def _export(config_path: Path, output: Path, password: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "P2PTRAIN_REDIS_PASSWORD": password, "P2PTRAIN_SIGNING_KEY": "k" * 32}
    return subprocess.run(
        [sys.executable, "-m", "p2ptrain", "export", "--config", str(config_path), "--output", str(output)],
        env=env, capture_output=True, text=True, timeout=120,
    )


def test_export_writes_the_peers_model_and_refuses_when_there_is_none(redis_server, tmp_path: Path) -> None:
    spec = make_spec(name="exported", peers=1, rounds=5)
    config = RuntimeConfig(spec, ("http://127.0.0.1:1",), (RedisAddress(redis_server.host, redis_server.port),), "http://x")
    config_path = tmp_path / "job.json"
    config_path.write_text(config.to_json())
    output = tmp_path / "out" / "model.safetensors"

    missing = _export(config_path, output, redis_server.password)
    assert missing.returncode == 1 and "no checkpoint of job 'exported' peer 0" in missing.stderr
    assert not output.exists()

    data = load_dataset(spec.dataset)
    model = build_model(spec.model, data.input_shape, data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    store = PeerStore(redis_server.client(), Keys(spec.name, 0), key_ttl_seconds=60)
    store.save_checkpoint(4, pack_state(model, optimizer, {"round": 4}), {})

    result = _export(config_path, output, redis_server.password)
    assert result.returncode == 0, result.stderr
    assert "after round 5" in result.stdout
    fresh = build_model(spec.model, data.input_shape, data.num_classes)
    fresh.load_state_dict(safetensors.torch.load_file(output))
    for name, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[name])
    assert not list(output.parent.glob("*.partial"))

    wrong_password = _export(config_path, output, "not-the-password")
    assert wrong_password.returncode == 1 and "cannot export peer 0's model" in wrong_password.stderr
    assert "not-the-password" not in wrong_password.stderr  # never echo a secret
