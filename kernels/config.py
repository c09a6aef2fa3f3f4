"""The kernels' vocabulary: launches, the key of a launch at a step, and their speed parameters
(SPEC section 6: speed parameters never change results beyond rounding)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from enum import Enum

from sparvar.reference import StepKind

__all__ = ["Launch", "LaunchKey", "KernelConfig", "DenseBackend", "LAUNCHES", "default_config"]


class Launch(str, Enum):
    """One kernel launch of a plan step. Each has its own ``KernelConfig``."""

    CSLA = "csla"                # CSLA attention
    CS4A_DENSE = "cs4a_dense"    # decision step: dense attention with log-sum-exp
    CS4A_SCORES = "cs4a_scores"  # decision step: column scores per group
    CS4A_SELECT = "cs4a_select"  # decision step: selected attention, writes R = O_dense - O_sel
    CS4A_SPARSE = "cs4a_sparse"  # later steps: kept keys + bands + up-sampled residual

    def __str__(self) -> str:
        return self.value


#: The launches each sparse step kind runs, in order (dense steps run PyTorch's SDPA).
LAUNCHES: dict[StepKind, tuple[Launch, ...]] = {
    StepKind.CSLA: (Launch.CSLA,),
    StepKind.CS4A_DECIDE: (Launch.CS4A_DENSE, Launch.CS4A_SCORES, Launch.CS4A_SELECT),
    StepKind.CS4A_SPARSE: (Launch.CS4A_SPARSE,),
}


@dataclass(frozen=True, order=True)
class LaunchKey:
    """A launch at one query scale, written ``"<launch>@<step>"`` in config files; ``str()`` and
    ``parse`` are the only places that format and read that string."""

    launch: Launch
    step: int

    def __post_init__(self):
        object.__setattr__(self, "launch", Launch(self.launch))
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"a launch key's step must be an int >= 0, got {self.step!r}")

    def __str__(self) -> str:
        return f"{self.launch.value}@{self.step}"

    @classmethod
    def parse(cls, text: str, num_scales: int | None = None) -> "LaunchKey":
        """``"csla@12"`` -> ``LaunchKey(Launch.CSLA, 12)``; ``ValueError`` says what a key looks like."""
        launch, sep, step = str(text).partition("@")
        names = [x.value for x in Launch]
        bound = f" and step < {num_scales}" if num_scales is not None else ""
        if not sep or launch not in names or not step.isdigit() or (
                num_scales is not None and int(step) >= num_scales):
            raise ValueError(f"launch key {text!r} must be <launch>@<step> with launch in {names}{bound}")
        return cls(Launch(launch), int(step))


class DenseBackend(str, Enum):
    """Who computes the decision step's dense attention and log-sum-exp: a library kernel
    (cuDNN or flash SDPA: CUDA, fp16/bf16) or the project's Triton kernel."""

    TRITON = "triton"
    CUDNN = "cudnn"
    FLASH = "flash"

    def __str__(self) -> str:
        return self.value


# Query and key block sizes: powers of two (tl.arange) from 16 to 256; a CSLA tile's per-key
# mask holds one bit per query slot in 64-bit words, so 256 slots take 4 words.
_BLOCKS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class KernelConfig:
    """``block_m`` queries and ``block_n`` keys per block (powers of two, 16..256), ``num_warps``
    (1, 2, 4, 8, 16), ``num_stages`` (1..6). CSLA tiles are ``tile_h x tile_w`` query patches
    with ``tile_h * tile_w == block_m``; other launches leave both 0. ``backend``
    (``cs4a_dense`` only): ``triton``, ``cudnn`` or ``flash``."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    tile_h: int = 0
    tile_w: int = 0
    backend: str = "triton"

    def __post_init__(self):
        names = [b.value for b in DenseBackend]
        if self.backend not in names:
            raise ValueError(f"kernel config field 'backend' must be one of {names}, got {self.backend!r}")
        object.__setattr__(self, "backend", DenseBackend(self.backend).value)
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "backend" and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"kernel config field {f.name!r} must be an int, got {v!r}")
        for name in ("block_m", "block_n"):
            v = getattr(self, name)
            if v not in _BLOCKS:
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
    Launch.CSLA: KernelConfig(64, 64, 4, 3, 8, 8),
    Launch.CS4A_DENSE: KernelConfig(128, 64, 8, 3, backend="cudnn"),
    # Measured on an H200 (bench/cs4a_profile.py): 256-key blocks 13% faster than 128 for the
    # scores, 64-key blocks 17% faster than 32 for the selection.
    Launch.CS4A_SCORES: KernelConfig(64, 256, 8, 3),
    Launch.CS4A_SELECT: KernelConfig(64, 64, 4, 3),
    Launch.CS4A_SPARSE: KernelConfig(64, 64, 4, 3),
}


def default_config(launch: Launch | str) -> KernelConfig:
    # A Launch member or its value (Launch is a str enum) is found without converting it: this
    # runs at every kernel call.
    config = _DEFAULTS.get(launch) if isinstance(launch, str) else None
    if config is not None:
        return config
    try:
        return _DEFAULTS[Launch(launch)]
    except ValueError:
        raise ValueError(f"launch must be one of {[x.value for x in Launch]}, got {launch!r}") from None
