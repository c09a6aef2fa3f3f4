"""Importing the official Infinity and VAR sources, unmodified, from a folder of their own
(``SPARVAR_UPSTREAM``, else ``../shared/upstream`` beside the project's checkout), for the tests
and benchmarks that run the real thing beside the project's networks.

Packages the official code imports but generation does not use get stand-ins, registered only
where the real package cannot be imported: ``flash_attn`` (its variable-length packed attention
is given as a loop over samples with SDPA, which is what it computes; its fused ops are left
absent, so the official code takes its plain PyTorch paths), ``timm`` (only ``register_model``,
``DropPath`` and a loss class are imported; at inference DropPath is the identity), and
``huggingface_hub`` (VAR's hub mixin).
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import SparvarError

__all__ = ["upstream_root", "var_modules", "infinity_modules", "OfficialSourcesMissing"]


class OfficialSourcesMissing(SparvarError):
    """The official sources, or a package they need, are not on this machine."""


def upstream_root() -> Path:
    return Path(os.environ.get("SPARVAR_UPSTREAM", Path(__file__).resolve().parents[2] / "shared" / "upstream"))


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, **_):
    """Per sample: its queries attend to its own keys and values (``kv``: ``[N, 2, H, D]``)."""
    out = []
    for b in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[b]:cu_seqlens_q[b + 1]].transpose(0, 1)
        k, v = kv[cu_seqlens_k[b]:cu_seqlens_k[b + 1]].unbind(1)
        out.append(F.scaled_dot_product_attention(qs, k.transpose(0, 1), v.transpose(0, 1),
                                                  scale=softmax_scale).transpose(0, 1))
    return torch.cat(out)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **_):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          scale=softmax_scale).transpose(1, 2)


class _DropPath(torch.nn.Module):
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.training and self.drop_prob > 0:
            raise NotImplementedError("the timm stand-in is for inference only")
        return x


def _stand_ins() -> None:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        _module("flash_attn", flash_attn_func=flash_attn_func,
                flash_attn_varlen_kvpacked_func=flash_attn_varlen_kvpacked_func)
    try:
        import timm.models.layers  # noqa: F401
    except Exception:  # noqa: BLE001 - timm without a working torchvision fails in many ways
        timm = _module("timm")
        timm.models = _module("timm.models", register_model=lambda f: f)
        timm.models.layers = _module("timm.models.layers", DropPath=_DropPath, drop_path=lambda x, *a, **k: x)
        timm.loss = _module("timm.loss", SoftTargetCrossEntropy=type("SoftTargetCrossEntropy", (torch.nn.Module,), {}))
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        _module("huggingface_hub", PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {}))


def _require(folder: str) -> Path:
    path = upstream_root() / folder
    if not path.is_dir():
        raise OfficialSourcesMissing(f"the official {folder} sources are not at {path} (set SPARVAR_UPSTREAM)")
    for pkg in ("einops", "PIL", "pytz"):
        if importlib.util.find_spec(pkg) is None:
            raise OfficialSourcesMissing(f"the official {folder} code needs the package {pkg!r}")
    _stand_ins()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path


def var_modules():
    """``(models.var, models.vqvae)`` of the official VAR."""
    _require("VAR")
    return importlib.import_module("models.var"), importlib.import_module("models.vqvae")


def infinity_modules():
    """``(infinity.models.infinity, infinity.models.basic, infinity.models.bsq_vae.multiscale_bsq)``."""
    _require("Infinity")
    return (importlib.import_module("infinity.models.infinity"), importlib.import_module("infinity.models.basic"),
            importlib.import_module("infinity.models.bsq_vae.multiscale_bsq"))
