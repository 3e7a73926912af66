"""What can be checked of the image without building it: its stages, base, user, pins and entry points.

The image itself is built and checked from the inside by ``hack/build-image.sh`` (``make image``, in CI).
"""

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


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, arg in _instructions():
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, arg))
    return stages


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_two_stages_and_a_non_root_runtime() -> None:
    instructions = _instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert len(froms) == 2 and froms[0].endswith("AS build")
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] == "10001"
    assert any(op == "RUN" and "useradd --uid 10001" in arg for op, arg in _stages()[1])
    assert ("ENTRYPOINT", '["p2ptrain"]') in instructions


def test_both_stages_build_on_one_base_argument_that_defaults_to_the_official_python_image() -> None:
    instructions = _instructions()
    assert instructions[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm"), "BASE_IMAGE must be declared first"
    froms = [arg for op, arg in instructions if op == "FROM"]
    # One base for both: the runtime copies the build stage's virtualenv, whose interpreter links
    # point into the base's Python.
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE}"]


def test_the_runtime_runs_from_a_virtualenv_on_path() -> None:
    build, runtime = _stages()
    assert any(op == "RUN" and "python3 -m venv /opt/p2ptrain" in arg for op, arg in build)
    assert ("COPY", "--from=build /opt/p2ptrain /opt/p2ptrain") in runtime
    env = " ".join(arg for op, arg in runtime if op == "ENV")
    assert "PATH=/opt/p2ptrain/bin:$PATH" in env


def test_torch_pin_matches_the_project_and_comes_from_the_cpu_index_or_a_local_wheel() -> None:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in dependencies if d.startswith("torch"))
    assert pinned == "torch==2.13.0"
    assert ("ARG", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") in _stages()[0]
    assert '--no-deps torch==2.13.0 --index-url "${TORCH_INDEX_URL}"' in DOCKERFILE
    assert "--no-deps --no-index --find-links wheels torch==2.13.0" in DOCKERFILE
    # Whichever source, the build refuses anything but the pinned version: the CPU build unless the
    # build is told (TORCH_VARIANT=pypi) that only PyPI's CUDA build can be reached.
    assert ("ARG", "TORCH_VARIANT=cpu") in _stages()[0]
    assert "expected=2.13.0+cpu" in DOCKERFILE
    assert 'torch.__version__ == sys.argv[1], torch.__version__\' "$expected"' in DOCKERFILE


def test_the_local_wheels_directory_is_in_the_build_context_and_empty_in_the_repository() -> None:
    assert ("COPY", "wheels ./wheels") in _stages()[0]
    assert not any(entry.strip("/").startswith("wheels") for entry in _dockerignore())
    tracked = subprocess.run(["git", "ls-files", "wheels"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert tracked.stdout.split() == ["wheels/README.md"]


def test_build_outputs_stay_out_of_the_build_context() -> None:
    # build/ holds the exported image archive (over a GB): in the context it would be sent into every build.
    ignored = _dockerignore()
    for entry in (".git", ".venv", ".tools", "build"):
        assert entry in ignored, f".dockerignore must exclude {entry}"


def test_module_is_built_from_the_packaged_source_where_redis_expects_it() -> None:
    assert (ROOT / "p2ptrain" / "csrc" / "p2ptrain_redis.c").is_file()
    assert "p2ptrain/csrc/p2ptrain_redis.c" in DOCKERFILE
    assert "P2PTRAIN_REDIS_MODULE=/usr/local/lib/p2ptrain/p2ptrain_redis.so" in DOCKERFILE
    assert "COPY --from=build /out/p2ptrain_redis.so /usr/local/lib/p2ptrain/p2ptrain_redis.so" in DOCKERFILE
    assert any(op == "RUN" and "redis-server" in arg for op, arg in _stages()[1])


def test_module_is_built_with_the_flags_of_a_local_build() -> None:
    # The image and `p2ptrain run` must run the same arithmetic: same optimisation, the AVX2 clones.
    from p2ptrain import native

    build = next(arg for op, arg in _instructions() if op == "RUN" and "p2ptrain_redis.c" in arg)
    command = build[build.index("gcc "):].split()
    missing = [flag for flag in (*native.CFLAGS, *native.CLONES) if flag not in command]
    assert not missing, f"the Dockerfile builds the module without {missing}"


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


def test_ci_builds_and_checks_the_image_after_the_tests() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line.strip() for line in ci if line.strip() and not line.lstrip().startswith("#")]
    assert "make test" in commands and "make image" in commands
    assert commands.index("make test") < commands.index("make image")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^image:.*\n\tbash hack/build-image\.sh$", makefile, re.MULTILINE)
