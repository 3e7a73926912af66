"""What can be checked of the image without a Docker engine: its stages, user, pins and entry points."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_two_stages_and_a_non_root_runtime() -> None:
    instructions = _instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build")
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    assert ("ENTRYPOINT", '["p2ptrain"]') in instructions


def test_torch_pin_matches_the_project() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in dependencies if d.startswith("torch"))
    assert pinned == "torch==2.13.0"
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in DOCKERFILE


def test_module_is_built_from_the_packaged_source_where_redis_expects_it() -> None:
    assert (ROOT / "p2ptrain" / "csrc" / "p2ptrain_redis.c").is_file()
    assert "p2ptrain/csrc/p2ptrain_redis.c" in DOCKERFILE
    assert "P2PTRAIN_REDIS_MODULE=/usr/local/lib/p2ptrain/p2ptrain_redis.so" in DOCKERFILE
    assert "COPY --from=build /out/p2ptrain_redis.so /usr/local/lib/p2ptrain/p2ptrain_redis.so" in DOCKERFILE


def test_every_copied_path_exists() -> None:
    for op, arg in _instructions():
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"


def test_the_entry_points_the_cluster_uses_exist() -> None:
    result = subprocess.run([sys.executable, "-m", "p2ptrain", "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "peer", "function", "operator", "redis-module"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), f"p2ptrain {command} is missing"
    result = subprocess.run([sys.executable, "-m", "p2ptrain", "operator", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "P2PTRAIN_OPERATOR_" in result.stdout
