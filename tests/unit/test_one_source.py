"""Values that must agree across files have one source; these tests fail when a copy drifts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

import p2ptrain
from p2ptrain.config import PEER_PORT
from p2ptrain_operator.settings import DEFAULT_IMAGE, Settings

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_version_is_the_distributions_everywhere() -> None:
    version = PROJECT["version"]
    chart = yaml.safe_load((ROOT / "charts/p2ptrain/Chart.yaml").read_text())
    function = tomllib.loads((ROOT / "functions/gradient/pyproject.toml").read_text())["project"]
    assert p2ptrain.__version__ == version
    assert chart["version"] == version and chart["appVersion"] == version
    assert function["version"] == version
    assert DEFAULT_IMAGE.endswith(f":{version}")


def test_torch_is_pinned_to_one_version_everywhere() -> None:
    pins = [d for d in PROJECT["dependencies"] if d.startswith("torch")]
    assert len(pins) == 1 and pins[0].startswith("torch==")
    version = pins[0].removeprefix("torch==")
    for path in ("Makefile", "Dockerfile", "hack/build-image.sh"):
        found = set(re.findall(r"torch==([0-9][0-9.]*[0-9])", (ROOT / path).read_text()))
        assert found == {version}, f"{path} pins torch {sorted(found)}, pyproject.toml {version}"


def test_the_peer_port_is_one_constant() -> None:
    assert f":{PEER_PORT}/status" in Settings().peer_status_url
