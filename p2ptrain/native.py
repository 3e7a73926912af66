"""Building and locating the p2ptrain Redis module (``P2P.ACCUM`` / ``P2P.MEAN`` / ``P2P.SGD`` / ``P2P.ADAM``).

The C source ships inside the package (``p2ptrain/csrc``). The container image builds it once and
points ``$P2PTRAIN_REDIS_MODULE`` at the result; elsewhere it is compiled with the system's C compiler
on first use into a cache directory. Without a compiler, accumulation falls back to a Lua function.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

MODULE_ENV = "P2PTRAIN_REDIS_MODULE"
CACHE_ENV = "P2PTRAIN_CACHE"
SOURCES = ("p2ptrain_redis.c", "redismodule_min.h")
# -fno-math-errno: sqrtf in the Adam loop may then vectorise (errno is never read here).
CFLAGS = ("-O3", "-fno-math-errno", "-fPIC", "-shared", "-std=c11", "-Wall", "-Wextra", "-Werror")
# Kernels built for AVX2 and for the baseline CPU, picked at load time (see the C source); tried first,
# left out where the toolchain has no ifunc support (musl, for one).
CLONES = ("-DP2PTRAIN_CLONES",)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "p2ptrain")


def module_path(build: bool = True) -> Path | None:
    """The compiled module: ``$P2PTRAIN_REDIS_MODULE``, else a cached build, else a fresh one."""
    prebuilt = os.environ.get(MODULE_ENV)
    if prebuilt:
        if Path(prebuilt).is_file():
            return Path(prebuilt)
        log.warning("%s=%s does not exist; building the module instead", MODULE_ENV, prebuilt)
    return _build(str(cache_dir())) if build else None


@functools.cache
def _build(cache: str) -> Path | None:
    source_dir = resources.files("p2ptrain").joinpath("csrc")
    texts = {name: source_dir.joinpath(name).read_bytes() for name in SOURCES}
    digest = hashlib.sha256(b"".join(texts[n] for n in SOURCES) + " ".join(CFLAGS + CLONES).encode()).hexdigest()[:16]
    target = Path(cache) / f"p2ptrain_redis-{digest}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the p2ptrain Redis module cannot be built, using the Lua fallback")
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in texts.items():
            (Path(tmp) / name).write_bytes(text)
        output = Path(tmp) / target.name
        for flags in (CFLAGS + CLONES, CFLAGS):
            result = subprocess.run(
                [compiler, *flags, "-o", str(output), str(Path(tmp) / "p2ptrain_redis.c"), "-lm"],
                capture_output=True, text=True, check=False,
            )
            if result.returncode == 0:
                break
            log.debug("building the p2ptrain Redis module with %s failed:\n%s", " ".join(flags), result.stderr)
        if result.returncode != 0:
            log.warning("building the p2ptrain Redis module failed, using the Lua fallback:\n%s", result.stderr)
            return None
        os.replace(output, target)  # atomic: concurrent builders never see a half-written file
    return target
