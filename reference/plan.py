"""The plan: which attention runs at each (layer, scale), with every parameter (SPEC section 5).

Default (the authors' Infinity setup) for ``S`` scales and depth ``N``: ``d = S - 3``; scales
below ``d`` are dense everywhere; layers ``0..bound_layer`` run ``cs4a_decide`` at ``d`` and
``cs4a_sparse`` after it; deeper layers run ``csla`` at scales ``>= d``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch

from .attention import check_step_inputs, dense_attention
from .cs4a import CS4AParams, CS4AState, cs4a_decide, cs4a_sparse
from .csla import CSLAParams, csla_attention
from .schedule import Schedule

__all__ = ["KINDS", "SparsityPlan", "default_plan", "attention_step"]

KINDS = ("dense", "cs4a_decide", "cs4a_sparse", "csla")

# The authors' Infinity 1024 setting, read relative to the schedule's length.
_DEFAULT_WIN_REL = (7, 5, 3, 1, 1, 0, 0, 0)
_DEFAULT_BAND_REL = (9, 7)
_DEFAULT_SINKS = 5
_DEFAULT_BOUND_LAYER = 10


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
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise ValueError(f"plan field {name!r} must be a list of ints, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its allowed range."""
        S, N = _int_field("num_scales", self.num_scales, 1, None), _int_field("depth", self.depth, 1, None)
        d = _int_field("decision_scale", self.decision_scale, 0, S - 1)
        _int_field("bound_layer", self.bound_layer, -1, N - 1)
        _int_field("sink_scales", self.sink_scales, 0, S)
        _int_field("group_size", self.group_size, 1, None)
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                or not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"plan field 'keep_ratio' must be a number in (0, 1], got {self.keep_ratio!r}")
        if not isinstance(self.residual, bool):
            raise ValueError(f"plan field 'residual' must be true or false, got {self.residual!r}")
        _window_list("win_rel", self.win_rel, S, allow_whole=True)
        _window_list("band_rel", self.band_rel, S - 1 - d, allow_whole=False)

    @property
    def csla(self) -> CSLAParams:
        return CSLAParams(self.sink_scales, self.win_rel)

    @property
    def cs4a(self) -> CS4AParams:
        return CS4AParams(self.decision_scale, self.group_size, float(self.keep_ratio),
                          self.band_rel, self.residual)

    def kind(self, layer: int, step: int) -> str:
        """One of ``KINDS`` for ``(layer, step)``."""
        if not 0 <= layer < self.depth:
            raise ValueError(f"layer must be in [0, {self.depth - 1}], got {layer}")
        if not 0 <= step < self.num_scales:
            raise ValueError(f"step must be in [0, {self.num_scales - 1}], got {step}")
        d = self.decision_scale
        if step < d:
            return "dense"
        if layer <= self.bound_layer:
            return "cs4a_decide" if step == d else "cs4a_sparse"
        return "csla"

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


def _int_field(name: str, v, lo: int, hi: int | None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"plan field {name!r} must be an int, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"plan field {name!r} must be in {rng}, got {v}")
    return v


def _window_list(name: str, windows, max_len: int, allow_whole: bool) -> None:
    if len(windows) > max(max_len, 0):
        raise ValueError(f"plan field {name!r} has {len(windows)} entries, at most {max(max_len, 0)} allowed")
    allowed = "an odd positive int, 0" + (" or -1" if allow_whole else "")
    for t, w in enumerate(windows):
        ok = isinstance(w, int) and not isinstance(w, bool) and (
            w == 0 or (w > 0 and w % 2 == 1) or (allow_whole and w == -1))
        if not ok:
            raise ValueError(f"plan field '{name}[{t}]' must be {allowed}, got {w!r}")


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


def attention_step(plan: SparsityPlan, schedule: Schedule, layer: int, step: int, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, scale: float = 1.0,
                   state: CS4AState | None = None) -> tuple[torch.Tensor, CS4AState | None]:
    """Run one (layer, step) attention as the plan says, with the reference implementations.

    ``q``: ``[B, H, h_k*w_k, D]``; ``k, v``: ``[B, H, L_k, D]``. ``state`` is the layer's CS4A
    state from its decision step (needed by ``cs4a_sparse``). Returns ``(out, state)``: the new
    state after ``cs4a_decide``, else the one passed in.
    """
    plan.check_schedule(schedule)
    check_step_inputs(q, k, v, schedule, step)
    kind = plan.kind(layer, step)
    if kind == "dense":
        return dense_attention(q, k, v, scale), state
    if kind == "csla":
        return csla_attention(q, k, v, schedule, step, plan.csla, scale), state
    if kind == "cs4a_decide":
        return cs4a_decide(q, k, v, schedule, step, plan.cs4a, scale)
    if state is None:
        raise ValueError(f"layer {layer} step {step} is cs4a_sparse and needs the state of its decision step")
    return cs4a_sparse(q, k, v, schedule, step, plan.cs4a, state, scale), state
