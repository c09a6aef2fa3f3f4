"""The plan: which attention runs at each (layer, scale), with every parameter (SPEC section 5).

Default (the authors' Infinity setup) for ``S`` scales and depth ``N``: ``d = S - 3``; scales
below ``d`` are dense everywhere; layers ``0..bound_layer`` run ``cs4a_decide`` at ``d`` and
``cs4a_sparse`` after it; deeper layers run ``csla`` at scales ``>= d``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from functools import cached_property

from .cs4a import CS4AParams
from .csla import CSLAParams
from .schedule import Schedule
from .validate import int_field, window_list

__all__ = ["StepKind", "SparsityPlan", "default_plan"]


class StepKind(str, Enum):
    """What attention a plan runs at one (layer, step). The values are the names config files,
    tables and the SPEC use; a ``StepKind`` compares equal to its value."""

    DENSE = "dense"
    CS4A_DECIDE = "cs4a_decide"
    CS4A_SPARSE = "cs4a_sparse"
    CSLA = "csla"

    def __str__(self) -> str:
        return self.value


# The authors' Infinity 1024 setting, read relative to the schedule's length.
_DEFAULT_WIN_REL = (7, 5, 3, 1, 1, 0, 0, 0)
_DEFAULT_BAND_REL = (9, 7)
_DEFAULT_SINKS = 5
_DEFAULT_BOUND_LAYER = 10
_OWNER = "plan field"


@dataclass(frozen=True)
class SparsityPlan:
    """Every parameter that decides what attention computes, for one schedule and depth.

    Fields (allowed ranges are checked by ``validate``): ``num_scales`` S >= 1, ``depth`` N >= 1,
    ``decision_scale`` in [0, S-1], ``bound_layer`` in [-1, N-1] (-1: no CS4A layer),
    ``sink_scales`` in [0, S], ``win_rel`` (CSLA windows from the finest scale backwards, at most
    S entries, odd > 0 / 0 / -1), ``group_size`` >= 1, ``keep_ratio`` in (0, 1], ``band_rel``
    (at most S-1-d entries, odd > 0 / 0), ``residual`` (bool).
    """

    num_scales: int
    depth: int
    decision_scale: int
    bound_layer: int = _DEFAULT_BOUND_LAYER
    sink_scales: int = _DEFAULT_SINKS
    win_rel: tuple[int, ...] = _DEFAULT_WIN_REL
    group_size: int = 192
    keep_ratio: float = 0.2
    band_rel: tuple[int, ...] = _DEFAULT_BAND_REL
    residual: bool = True
    version: int = field(default=1, repr=False)

    def __post_init__(self):
        for name in ("win_rel", "band_rel"):
            v = getattr(self, name)
            if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
                raise ValueError(f"{_OWNER} {name!r} must be a list of ints, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its allowed range."""
        S = int_field(_OWNER, "num_scales", self.num_scales, 1)
        N = int_field(_OWNER, "depth", self.depth, 1)
        d = int_field(_OWNER, "decision_scale", self.decision_scale, 0, S - 1)
        int_field(_OWNER, "bound_layer", self.bound_layer, -1, N - 1)
        int_field(_OWNER, "sink_scales", self.sink_scales, 0, S)
        int_field(_OWNER, "group_size", self.group_size, 1)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                or not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"{_OWNER} 'keep_ratio' must be a number in (0, 1], got {self.keep_ratio!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"{_OWNER} 'residual' must be true or false, got {self.residual!r}")
        window_list(_OWNER, "win_rel", self.win_rel, S, allow_whole=True)
        window_list(_OWNER, "band_rel", self.band_rel, S - 1 - d, allow_whole=False)

    # Built once per plan (the plan is frozen): callers ask for them at every attention call.
    @cached_property
    def csla(self) -> CSLAParams:
        return CSLAParams(self.sink_scales, self.win_rel)

    @cached_property
    def cs4a(self) -> CS4AParams:
        return CS4AParams(self.decision_scale, self.group_size, float(self.keep_ratio),
                          self.band_rel, self.residual)

    def kind(self, layer: int, step: int) -> StepKind:
        """The ``StepKind`` at ``(layer, step)``; ``ValueError`` for a layer or step out of range."""
        # Plain ints in range skip the full check (this runs at every attention call).
        if not (type(layer) is int and 0 <= layer < self.depth):
            int_field("plan", "layer", layer, 0, self.depth - 1)
        if not (type(step) is int and 0 <= step < self.num_scales):
            int_field("plan", "step", step, 0, self.num_scales - 1)
        d = self.decision_scale
        if step < d:
            return StepKind.DENSE
        if layer <= self.bound_layer:
            return StepKind.CS4A_DECIDE if step == d else StepKind.CS4A_SPARSE
        return StepKind.CSLA

    def check_schedule(self, schedule: Schedule) -> None:
        if schedule.num_scales != self.num_scales:
            raise ValueError(f"the plan is for {self.num_scales} scales, the schedule has {schedule.num_scales}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["win_rel"], out["band_rel"] = list(self.win_rel), list(self.band_rel)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "SparsityPlan":
        if not isinstance(data, dict):
            raise ValueError(f"a plan must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown plan field(s) {unknown}; known: {sorted(known)}")
        missing = sorted({"num_scales", "depth", "decision_scale"} - set(data))
        if missing:
            raise ValueError(f"plan is missing field(s) {missing}")
        if data.get("version", 1) != 1:
            raise ValueError(f"plan field 'version' must be 1, got {data['version']!r}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "SparsityPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from None
        return cls.from_dict(data)


def default_plan(schedule: Schedule, depth: int) -> SparsityPlan:
    """The authors' Infinity defaults, fitted to ``schedule`` and ``depth``.

    ``d = max(0, S - 3)``, ``bound_layer = min(10, N - 1)``, ``sink_scales = min(5, d)``, CSLA
    windows ``[7, 5, 3, 1, 1, 0, 0, 0]`` cut to the non-sink scales, bands ``[9, 7]`` cut to the
    scales after ``d``. For Infinity 1024 (13 scales) this is exactly the paper's setting.
    """
    S = schedule.num_scales
    d = max(0, S - 3)
    sinks = min(_DEFAULT_SINKS, d)
    return SparsityPlan(
        num_scales=S, depth=depth, decision_scale=d, bound_layer=min(_DEFAULT_BOUND_LAYER, depth - 1),
        sink_scales=sinks, win_rel=_DEFAULT_WIN_REL[: S - sinks],
        band_rel=_DEFAULT_BAND_REL[: S - 1 - d])
