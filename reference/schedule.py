"""Scale schedules and token layout (SPEC section 1).

A schedule is a list of grids ``[(h_0, w_0), ..., (h_{S-1}, w_{S-1})]``, coarse to fine. Tokens of
scale ``s`` are laid out in raster order (index ``y * w_s + x``) from offset
``off_s = sum_{t<s} h_t * w_t``; at step ``k`` the queries are scale ``k``'s tokens and the keys are
the ``L_k = off_{k+1}`` tokens of scales ``0..k``. Every grid is ``(h, w)``, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

__all__ = [
    "Schedule",
    "INFINITY_RATIOS",
    "INFINITY_RESOLUTIONS",
    "infinity_schedule",
    "var_schedule",
    "preset_schedules",
    "schedule_for_pixels",
]

# Grids of Infinity's non-square aspect ratios (h/w > 1), SPEC section 1. The transposed ratio
# (w/h > 1) uses the transposed grids.
_INFINITY_TALL = {
    "1.250": [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24),
              (35, 28), (45, 36), (55, 44), (70, 56)],
    "1.333": [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21),
              (36, 27), (48, 36), (60, 45), (72, 54)],
    "1.500": [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22),
              (39, 26), (48, 32), (63, 42), (78, 52)],
    "1.750": [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20),
              (42, 24), (56, 32), (70, 40), (84, 48)],
    "2.000": [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19),
              (46, 23), (60, 30), (74, 37), (90, 45)],
    "2.500": [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16),
              (50, 20), (65, 26), (80, 32), (100, 40)],
    "3.000": [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15),
              (54, 18), (72, 24), (90, 30), (111, 37)],
}
_INFINITY_SQUARE = [(s, s) for s in (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)]
_TRANSPOSED_NAME = {
    "1.250": "0.800", "1.333": "0.750", "1.500": "0.667", "1.750": "0.571",
    "2.000": "0.500", "2.500": "0.400", "3.000": "0.333",
}

#: Aspect ratios h/w of Infinity's presets, as the strings that name them.
INFINITY_RATIOS = ("1.000", *_INFINITY_TALL, *_TRANSPOSED_NAME.values())
#: Infinity's resolution names and how many of the 13 grids each uses.
INFINITY_RESOLUTIONS = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
_VAR_SIDES = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
}
# Both model families decode one token per 16x16 pixel patch.
PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class Schedule:
    """A validated list of scale grids ``(h, w)``, coarse to fine (SPEC section 1).

    ``Schedule([(1, 1), (2, 3)])`` or ``Schedule.from_sides([1, 2, 4])`` for square grids.
    Raises ``ValueError`` for an empty list, a grid that is not a pair of positive ints, or a
    value of the wrong type.
    """

    grids: tuple[tuple[int, int], ...]
    name: str = "custom"

    def __init__(self, grids, name: str = "custom"):
        object.__setattr__(self, "grids", _validate_grids(grids))
        object.__setattr__(self, "name", str(name))

    def __hash__(self) -> int:
        # Cached: a schedule keys the kernels' launch plans, looked up at every call.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.grids, self.name))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict:
        # A string's hash differs between processes: the cached hash never travels.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    @classmethod
    def from_sides(cls, sides, name: str = "custom") -> "Schedule":
        """Square grids ``(s, s)`` from a list of sides."""
        if isinstance(sides, (str, bytes)) or not hasattr(sides, "__iter__"):
            raise ValueError(f"schedule sides must be a list of positive ints, got {sides!r}")
        return cls([(s, s) for s in sides], name=name)

    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Tokens per scale, ``h_s * w_s``."""
        return tuple(h * w for h, w in self.grids)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """``off_s`` for ``s = 0..S``; ``offsets[S]`` is the total token count."""
        out = [0]
        for n in self.sizes:
            out.append(out[-1] + n)
        return tuple(out)

    def num_keys(self, step: int) -> int:
        """``L_k``: keys visible at step ``k`` (all tokens of scales ``0..k``)."""
        self.check_step(step)
        return self.offsets[step + 1]

    def num_queries(self, step: int) -> int:
        self.check_step(step)
        return self.sizes[step]

    def check_step(self, step: int) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < self.num_scales:
            raise ValueError(
                f"step must be an int in [0, {self.num_scales - 1}] for this {self.num_scales}-scale "
                f"schedule, got {step!r}")

    @property
    def pixel_hw(self) -> tuple[int, int]:
        """Image size in pixels, ``16 * (h, w)`` of the last grid."""
        h, w = self.grids[-1]
        return h * PIXELS_PER_TOKEN, w * PIXELS_PER_TOKEN

    def prefix(self, num_scales: int) -> "Schedule":
        """The first ``num_scales`` grids."""
        if not 1 <= num_scales <= self.num_scales:
            raise ValueError(f"prefix length must be in [1, {self.num_scales}], got {num_scales}")
        return Schedule(self.grids[:num_scales], name=f"{self.name}[:{num_scales}]")

    def to_json(self) -> list[list[int]]:
        return [list(g) for g in self.grids]

    def __repr__(self) -> str:
        return f"Schedule({self.name!r}, {list(self.grids)})"


def _validate_grids(grids) -> tuple[tuple[int, int], ...]:
    if isinstance(grids, (str, bytes, dict)) or not hasattr(grids, "__iter__"):
        raise ValueError(f"a schedule must be a list of (h, w) grids, got {type(grids).__name__}")
    out = []
    for s, grid in enumerate(grids):
        if isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__") or len(grid) != 2:
            raise ValueError(f"scale {s}: a grid must be a pair (h, w), got {grid!r}")
        for name, v in zip("hw", grid):
            if isinstance(v, bool) or not isinstance(v, int) and not _is_integral(v):
                raise ValueError(f"scale {s}: {name} must be an int, got {v!r}")
            if int(v) <= 0:
                raise ValueError(f"scale {s}: {name} must be positive, got {v}")
        out.append((int(grid[0]), int(grid[1])))
    if not out:
        raise ValueError("a schedule needs at least one scale, got an empty list")
    return tuple(out)


def _is_integral(v) -> bool:
    # Accept numpy / torch integer scalars, not floats.
    return hasattr(v, "__index__")


def infinity_schedule(h_div_w: str | float = "1.000", resolution: str = "1M") -> Schedule:
    """Infinity's schedule for an aspect ratio ``h/w`` and a resolution (SPEC section 1).

    ``h_div_w``: one of ``INFINITY_RATIOS`` (string or float, matched to 3 decimals).
    ``resolution``: ``"0.06M"``, ``"0.25M"``, ``"0.60M"`` or ``"1M"`` (first 7, 10, 12, 13 grids).
    """
    key = _ratio_key(h_div_w)
    if resolution not in INFINITY_RESOLUTIONS:
        raise ValueError(f"resolution must be one of {list(INFINITY_RESOLUTIONS)}, got {resolution!r}")
    if key == "1.000":
        grids = _INFINITY_SQUARE
    elif key in _INFINITY_TALL:
        grids = _INFINITY_TALL[key]
    else:
        tall = next(t for t, w in _TRANSPOSED_NAME.items() if w == key)
        grids = [(w, h) for h, w in _INFINITY_TALL[tall]]
    n = INFINITY_RESOLUTIONS[resolution]
    return Schedule(grids[:n], name=f"infinity-{key}-{resolution}")


def _ratio_key(h_div_w) -> str:
    try:
        key = f"{float(h_div_w):.3f}"
    except (TypeError, ValueError):
        raise ValueError(f"h_div_w must be one of {list(INFINITY_RATIOS)}, got {h_div_w!r}") from None
    if key not in INFINITY_RATIOS:
        raise ValueError(f"h_div_w must be one of {list(INFINITY_RATIOS)}, got {h_div_w!r}")
    return key


def var_schedule(resolution: int = 256) -> Schedule:
    """VAR's square schedule at 256 or 512 pixels (SPEC section 1)."""
    if resolution not in _VAR_SIDES:
        raise ValueError(f"VAR resolution must be 256 or 512, got {resolution!r}")
    return Schedule.from_sides(_VAR_SIDES[resolution], name=f"var-{resolution}")


def preset_schedules() -> dict[str, Schedule]:
    """Every named preset: all Infinity ratios and resolutions, and VAR 256 / 512."""
    out = {}
    for ratio in INFINITY_RATIOS:
        for res in INFINITY_RESOLUTIONS:
            s = infinity_schedule(ratio, res)
            out[s.name] = s
    for res in _VAR_SIDES:
        s = var_schedule(res)
        out[s.name] = s
    return out


def schedule_for_pixels(family: str, height: int, width: int) -> Schedule:
    """The preset of ``family`` (``"infinity"`` or ``"var"``) whose image is ``height x width``."""
    matches = [s for name, s in preset_schedules().items()
               if name.startswith(family + "-") and s.pixel_hw == (height, width)]
    if not matches:
        sizes = sorted({"%dx%d" % s.pixel_hw for n, s in preset_schedules().items()
                        if n.startswith(family + "-")})
        raise ValueError(f"no {family} schedule makes a {height}x{width} image; known: {sizes}")
    return matches[0]
