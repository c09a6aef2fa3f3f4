"""The project's trained model (preset ``small``): an Infinity-style transformer (depth 12, width
384, 3 heads of 128 channels, an FFN of 768, bit-wise codes of 16 bits) over ``sparvar.tokenizer.PatchTokenizer``
(4x4 pixel patches), generating 256x256 images on Infinity's 1024x1024 token schedule (13 scales,
the last 64x64, 10521 tokens), so that attention at the last scales is as long as Infinity's and
sparsity matters. Conditioned on pseudo-classes (one per source photograph of the training set),
each a fixed 4-row text feature. ``training/train_small.py`` trains it; the weights ship in the
package (``sparvar/weights/small.safetensors``).

Why width 384 and not 512: the weights must stay under 50 MB. Each block's cross-attention holds
4 C^2 weights besides self-attention's 4 C^2 and the FFN's; at width 512 and depth 12 that is 75
MB in bf16 even with an FFN of twice the width; at width 384 with Infinity's FFN ratio 51 MB,
with an FFN of twice the width (768) 46 MB.

The file holds ``net.*`` (the network, bf16), ``tokenizer.*`` (fp32), ``classes`` (the
pseudo-classes' text features ``[K, 4, 128]``) and metadata: the format, the class names and how
it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import SparvarError
from .infinity_net import InfinityConfig, InfinityNet
from .tokenizer import PatchTokenizer

__all__ = ["SMALL_CONFIG", "PATCH", "DEFAULT_WEIGHTS", "SmallModel", "load_small", "save_small"]

SMALL_CONFIG = InfinityConfig(depth=12, embed_dim=384, num_heads=3, text_channels=128, text_maxlen=4,
                              codebook_dim=16, mlp_ratio=2.0, block_chunks=4)
PATCH = 4
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "small.safetensors"
FORMAT = "sparvar-small-1"


class SmallModel:
    """What a small-model file holds: ``net``, ``tokenizer``, ``classes`` ``[K, T, Ct5]`` and
    ``meta`` (the file's metadata, JSON-decoded)."""

    def __init__(self, net: InfinityNet, tokenizer: PatchTokenizer, classes: torch.Tensor, meta: dict):
        self.net, self.tokenizer, self.classes, self.meta = net, tokenizer, classes, meta


def save_small(path: str | Path, model: SmallModel) -> None:
    """Write ``model`` to ``path`` (safetensors; the network in bf16), through a temporary file
    renamed into place."""
    from safetensors.torch import save_file

    state = {f"net.{k}": v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.net.state_dict().items()
             if k != "rope"}
    state.update({f"tokenizer.{k}": v.detach().contiguous().cpu() for k, v in model.tokenizer.state_dict().items()})
    state["classes"] = model.classes.detach().float().contiguous().cpu()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": FORMAT, "meta": json.dumps(model.meta)})
    tmp.replace(path)


def load_small(path: str | Path | None = None) -> SmallModel:
    """Read a small-model file (default: the shipped weights) into CPU modules (fp32 network)."""
    from safetensors import safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        hint = " (the shipped weights are missing: reinstall, or train them with training/train_small.py)" \
            if path == DEFAULT_WEIGHTS else ""
        raise SparvarError(f"small-model weights {path}: no such file{hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SparvarError(f"small-model weights {path} cannot be read: {type(e).__name__}: {e}") from None
    if meta.get("format") != FORMAT:
        raise SparvarError(f"{path} is not a small-model file (format {meta.get('format')!r}, expected {FORMAT!r})")
    from .checkpoints import load_state

    net = InfinityNet(SMALL_CONFIG)
    load_state(net, {k[4:]: v.float() for k, v in state.items() if k.startswith("net.")}, str(path))
    tokenizer = PatchTokenizer(PATCH, SMALL_CONFIG.codebook_dim)
    load_state(tokenizer, {k[10:]: v for k, v in state.items() if k.startswith("tokenizer.")}, str(path))
    return SmallModel(net, tokenizer, state["classes"], json.loads(meta.get("meta", "{}")))
