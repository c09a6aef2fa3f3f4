"""What GPU this is, in the words config files and benchmark results use."""

from __future__ import annotations

import re

import torch

__all__ = ["gpu_name", "sanitize", "compute_capability", "software_versions"]


def gpu_name(device: int | None = None) -> str:
    """The CUDA device's name, or ``"cpu"`` without one."""
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def sanitize(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"NVIDIA_H100_80GB_HBM3"`` (safe as a folder name)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_") or "unknown"


def compute_capability(device: int | None = None) -> str:
    """``"9.0"`` style, or ``"cpu"``."""
    if not torch.cuda.is_available():
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def software_versions() -> dict:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda or "none"}
