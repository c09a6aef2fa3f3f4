"""Speed parameters of the kernels (SPEC section 6: they never change results beyond rounding)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

__all__ = ["KernelConfig", "STEP_KINDS", "default_config"]

#: Dense attention with log-sum-exp for the CS4A decision step may come from a library
#: (cuDNN or flash SDPA, CUDA and fp16/bf16 only) or from the Triton kernel.
BACKENDS = ("triton", "cudnn", "flash")
#: The kernel launches a plan can use; each has its own config.
STEP_KINDS = ("csla", "cs4a_dense", "cs4a_scores", "cs4a_select", "cs4a_sparse")


@dataclass(frozen=True)
class KernelConfig:
    """``block_m`` queries and ``block_n`` keys per block (powers of two, 16..256), ``num_warps``
    (1, 2, 4, 8, 16), ``num_stages`` (1..6). CSLA tiles are ``tile_h x tile_w`` query patches
    with ``tile_h * tile_w == block_m``; other kinds leave both 0. ``backend`` (``cs4a_dense``
    only): ``triton``, ``cudnn`` or ``flash``."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    tile_h: int = 0
    tile_w: int = 0
    backend: str = "triton"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"kernel config field 'backend' must be one of {list(BACKENDS)}, got {self.backend!r}")
        for f in fields(self):
            if f.name == "backend":
                continue
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"kernel config field {f.name!r} must be an int, got {v!r}")
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v < 16 or v > 256 or v & (v - 1):
                raise ValueError(f"kernel config field {name!r} must be a power of two in [16, 256], got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"kernel config field 'num_warps' must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 6:
            raise ValueError(f"kernel config field 'num_stages' must be in [1, 6], got {self.num_stages}")
        if (self.tile_h or self.tile_w) and (self.tile_h < 1 or self.tile_w < 1
                                             or self.tile_h * self.tile_w != self.block_m):
            raise ValueError(f"kernel config tile {self.tile_h}x{self.tile_w} must have "
                             f"tile_h * tile_w == block_m ({self.block_m})")

    def for_grid(self, h: int, w: int) -> "KernelConfig":
        """A CSLA config with a tile shape: the given one, else the squarest that fits the grid."""
        if self.tile_h:
            return self
        tw = 1
        while tw * tw < self.block_m:
            tw *= 2
        tw = min(tw, _pow2_at_least(w), self.block_m)
        return replace(self, tile_h=self.block_m // tw, tile_w=tw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KernelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a kernel config must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown kernel config field(s) {unknown}")
        return cls(**data)


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


# Defaults: the fastest of bench/sweep.py's grid on an H200 at Infinity-2B 1024 shapes (bf16,
# D=128); `sparvar autotune` finds better ones per GPU and model.
_DEFAULTS = {
    "csla": KernelConfig(64, 64, 4, 3, 8, 8),
    "cs4a_dense": KernelConfig(128, 64, 8, 3, backend="cudnn"),
    "cs4a_scores": KernelConfig(64, 128, 8, 3),
    "cs4a_select": KernelConfig(64, 32, 4, 3),
    "cs4a_sparse": KernelConfig(64, 64, 4, 3),
}


def default_config(kind: str) -> KernelConfig:
    if kind not in _DEFAULTS:
        raise ValueError(f"kernel kind must be one of {list(_DEFAULTS)}, got {kind!r}")
    return _DEFAULTS[kind]
