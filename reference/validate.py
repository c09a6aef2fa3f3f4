"""Checks shared by every parameter type: each error names the field and the allowed range."""

from __future__ import annotations

__all__ = ["int_field", "window_list"]


def int_field(owner: str, name: str, v, lo: int, hi: int | None = None) -> int:
    """``v`` as an int in ``[lo, hi]`` (``hi=None``: no upper bound); bools and floats are refused
    (``2.0`` is not a layer, ``3.7`` is not a window)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{owner} {name!r} must be an int, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{owner} {name!r} must be in {rng}, got {v}")
    return v


def window_list(owner: str, name: str, windows, max_len: int | None, allow_whole: bool) -> tuple[int, ...]:
    """A list of window sides: each an odd positive int or 0 (excluded), or -1 (whole scale) when
    ``allow_whole``; at most ``max_len`` entries."""
    if isinstance(windows, (str, bytes, dict)) or not hasattr(windows, "__iter__"):
        raise ValueError(f"{owner} {name!r} must be a list of ints, got {windows!r}")
    windows = tuple(windows)
    if max_len is not None and len(windows) > max(max_len, 0):
        raise ValueError(f"{owner} {name!r} has {len(windows)} entries, at most {max(max_len, 0)} allowed")
    allowed = "an odd positive int, 0" + (" or -1" if allow_whole else "")
    for t, w in enumerate(windows):
        ok = isinstance(w, int) and not isinstance(w, bool) and (
            w == 0 or (w > 0 and w % 2 == 1) or (allow_whole and w == -1))
        if not ok:
            raise ValueError(f"{owner} '{name}[{t}]' must be {allowed}, got {w!r}")
    return windows
