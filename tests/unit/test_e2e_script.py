"""hack/e2e-kind.sh, checked without a cluster.

The script needs docker, kind and a Kubernetes cluster, none of which can run here. It is run for
real by bash with stand-ins for docker, kind, kubectl and helm on PATH that only record their
arguments (a fake, because no real one can run here); the tests then check what the script asked of
them: the image it builds is the one it loads and installs, Knative will not try to resolve that
image in a registry, it waits for Kourier and Knative's webhook, and it switches on only the Knative
flags the job needs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "hack" / "e2e-kind.sh"
# Knative Serving config/core/configmaps/deployment.yaml, registries-skipping-tag-resolving (the same
# at knative-v1.16.0 and main): images from these registries are not resolved to a digest.
KNATIVE_SKIPS_TAG_RESOLVING = ("kind.local", "ko.local", "dev.local")
STUB = """#!/usr/bin/env bash
printf '%s' "$(basename "$0")" >> "$CALLS"
for arg in "$@"; do printf ' %q' "$arg" >> "$CALLS"; done
printf '\\n' >> "$CALLS"
if [[ "$(basename "$0") $1" == "kind get" ]]; then echo "$CLUSTER"; fi
"""


def test_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _run(tmp_path: Path, **env: str) -> list[list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "kind", "kubectl", "helm"):
        (bin_dir / tool).write_text(STUB)
        (bin_dir / tool).chmod(0o755)
    calls = tmp_path / "calls"
    run_env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "CALLS": str(calls), "CLUSTER": "p2ptrain", "HOME": str(tmp_path),
               **env}
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=run_env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [shlex.split(line) for line in calls.read_text().splitlines()]


def _find(calls: list[list[str]], *prefix: str) -> list[list[str]]:
    return [c for c in calls if c[: len(prefix)] == list(prefix)]


def _set_values(call: list[str]) -> dict[str, str]:
    pairs = [call[i + 1] for i, arg in enumerate(call) if arg == "--set"]
    return dict(pair.split("=", 1) for pair in pairs)


def test_the_image_built_is_loaded_into_kind_and_installed_and_knative_skips_its_tag(tmp_path: Path) -> None:
    calls = _run(tmp_path)
    ((build,),) = [[c[c.index("-t") + 1]] for c in _find(calls, "docker", "build")]
    (load,) = _find(calls, "kind", "load", "docker-image")
    assert load[3] == build
    (install,) = [c for c in _find(calls, "helm", "upgrade") if "p2ptrain" in c[3]]
    values = _set_values(install)
    assert f"{values['image.repository']}:{values['image.tag']}" == build
    assert build.split("/")[0] in KNATIVE_SKIPS_TAG_RESOLVING


def test_a_registry_image_with_a_port_is_passed_whole(tmp_path: Path) -> None:
    calls = _run(tmp_path, IMAGE="dev.local:5000/team/p2ptrain:e2e")
    (install,) = [c for c in _find(calls, "helm", "upgrade") if "p2ptrain" in c[3]]
    values = _set_values(install)
    assert (values["image.repository"], values["image.tag"]) == ("dev.local:5000/team/p2ptrain", "e2e")


def test_it_waits_for_kourier_and_the_webhook_before_installing(tmp_path: Path) -> None:
    calls = _run(tmp_path)
    kourier = next(i for i, c in enumerate(calls) if c[:2] == ["kubectl", "wait"] and "kourier-system" in c)
    webhook = next(i for i, c in enumerate(calls) if c[:3] == ["kubectl", "rollout", "status"]
                   and "deployment/webhook" in c and "knative-serving" in c)
    job = next(i for i, c in enumerate(calls) if c[:2] == ["kubectl", "apply"] and str(ROOT / "examples" / "digits.yaml") in c)
    assert kourier < job and webhook < job


@pytest.mark.parametrize(("job", "flags"), [
    ("examples/digits.yaml", []),
    ("examples/cnn-pvc.yaml", ["kubernetes.podspec-persistent-volume-claim"]),
])
def test_only_the_flags_the_job_needs_are_switched_on(tmp_path: Path, job: str, flags: list[str]) -> None:
    calls = _run(tmp_path, JOB=str(ROOT / job))
    patches = " ".join(" ".join(c) for c in _find(calls, "kubectl", "patch"))
    for flag in ("kubernetes.podspec-securitycontext", "kubernetes.podspec-volumes-emptydir",
                 "kubernetes.podspec-persistent-volume-write", "allow-zero-initial-scale"):
        assert flag not in patches
    assert ("kubernetes.podspec-persistent-volume-claim" in patches) == bool(flags)
    name = "cifar10-cnn" if "cnn" in job else "digits"
    assert any(f"p2pjob/{name}" in c for c in _find(calls, "kubectl", "wait"))


def test_it_stops_when_a_tool_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(["/bin/bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                            env={"PATH": str(empty), "HOME": os.fspath(tmp_path)})
    assert result.returncode == 1 and "error: docker is required" in result.stderr
