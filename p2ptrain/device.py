"""Where the gradient function computes: ``function.device`` (auto | cpu | cuda) against what the pod has.

``auto`` takes a CUDA GPU when torch sees one, else the CPU; ``cuda`` insists on one, so a function
scheduled without a GPU refuses to start (and is never ready) with a message saying what is missing.
"""

from __future__ import annotations

import torch

from p2ptrain.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")


def pick_device(requested: str, *, cuda_available: bool | None = None) -> torch.device:
    """The torch device for ``function.device=requested``; ConfigError when ``cuda`` cannot be had."""
    if requested not in DEVICES:
        raise ConfigError(f"function.device must be one of {', '.join(DEVICES)}, got {requested!r}")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if requested == "cuda" and not available:
        raise ConfigError(
            "function.device=cuda but torch sees no CUDA device in this pod: check that "
            "function.resources.limits has nvidia.com/gpu, that the node has an NVIDIA GPU and driver, and "
            "that the image's torch is a CUDA build (torch.version.cuda is "
            f"{torch.version.cuda!r}); or set function.device to auto or cpu"
        )
    return torch.device("cuda" if requested != "cpu" and available else "cpu")
