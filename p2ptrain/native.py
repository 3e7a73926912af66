"""Locating (and building) the p2ptrain Redis module.

The module is optional: without it, accumulation runs as a Redis Lua function.
"""

from __future__ import annotations

import os
from pathlib import Path


def module_path(build: bool = True) -> Path | None:
    """The compiled module, from ``$P2PTRAIN_REDIS_MODULE``; None when there is none."""
    prebuilt = os.environ.get("P2PTRAIN_REDIS_MODULE")
    if prebuilt and Path(prebuilt).is_file():
        return Path(prebuilt)
    return None
