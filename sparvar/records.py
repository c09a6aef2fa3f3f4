"""Typed records of a tuned config's ``measured`` and ``quality`` blocks: one definition that the
autotuner writes and every reader validates (names the field that is wrong)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

__all__ = ["UnitTiming", "DenseStepTiming", "Measured", "Quality"]

_NUMBER = (int, float)


def _check(owner: str, data, spec: dict) -> dict:
    """``data`` as a dict whose keys in ``spec`` have the types given there (a tuple of types);
    unknown keys are refused unless ``spec`` lists them as derived (type ``None``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{owner} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(spec))
    if unknown:
        raise ValueError(f"{owner} has unknown field(s) {unknown}")
    out = {}
    for name, types in spec.items():
        if types is None:
            continue
        if name not in data:
            raise ValueError(f"{owner} is missing field {name!r}")
        v = data[name]
        if isinstance(v, bool) or not isinstance(v, types):
            raise ValueError(f"{owner} field {name!r} must be {' or '.join(t.__name__ for t in types)}, got {v!r}")
        out[name] = v
    return out


@dataclass
class UnitTiming:
    """One sparse step (``unit`` is ``"<kind>@<step>"``) run by ``layers`` layers: the best
    config's time (from study trial ``trial``, or ``"default"``), the default's and dense's."""

    unit: str
    layers: int
    trial: int | str
    best_ms: float
    default_ms: float
    dense_ms: float

    @classmethod
    def from_dict(cls, data, owner: str) -> "UnitTiming":
        return cls(**_check(owner, data, {"unit": (str,), "layers": (int,), "trial": (int, str),
                                          "best_ms": _NUMBER, "default_ms": _NUMBER, "dense_ms": _NUMBER}))


@dataclass
class DenseStepTiming:
    step: int
    layers: int
    dense_ms: float

    @classmethod
    def from_dict(cls, data, owner: str) -> "DenseStepTiming":
        return cls(**_check(owner, data, {"step": (int,), "layers": (int,), "dense_ms": _NUMBER}))


# Written by schema version 1 for readers; recomputed from the units here.
_DERIVED = ("sparse_steps_ms", "speedup_sparse_steps_vs_default", "speedup_sparse_steps_vs_dense",
            "generation_attention_ms", "speedup_generation_attention_vs_dense")
#: How schema version 1 timed (its files do not say).
V1_TIMING = "eager, triton.testing.do_bench median"


@dataclass
class Measured:
    """What ``sparvar autotune`` measured in one process: per sparse step the best, default and
    dense times, dense steps' times, and the study's trial states. ``timing`` says how."""

    device: str
    timing: str
    units: list[UnitTiming] = field(default_factory=list)
    dense_steps: list[DenseStepTiming] = field(default_factory=list)
    trials: dict[str, int] = field(default_factory=dict)

    def _total(self, attr: str) -> float:
        return sum(u.layers * getattr(u, attr) for u in self.units)

    @property
    def dense_steps_ms(self) -> float:
        return sum(d.layers * d.dense_ms for d in self.dense_steps)

    @property
    def speedup_vs_default(self) -> float:
        return self._total("default_ms") / self._total("best_ms")

    @property
    def speedup_vs_dense(self) -> float:
        return self._total("dense_ms") / self._total("best_ms")

    @property
    def generation_speedup_vs_dense(self) -> float:
        """Attention of a whole generation (sparse and dense steps) against dense everywhere."""
        return (self._total("dense_ms") + self.dense_steps_ms) / (self._total("best_ms") + self.dense_steps_ms)

    def to_dict(self) -> dict:
        out = asdict(self)
        best, default, dense = (self._total(a) for a in ("best_ms", "default_ms", "dense_ms"))
        out.update(sparse_steps_ms={"best": best, "default": default, "dense": dense},
                   speedup_sparse_steps_vs_default=self.speedup_vs_default,
                   speedup_sparse_steps_vs_dense=self.speedup_vs_dense,
                   generation_attention_ms={"best": best + self.dense_steps_ms, "dense": dense + self.dense_steps_ms},
                   speedup_generation_attention_vs_dense=self.generation_speedup_vs_dense)
        return out

    @classmethod
    def from_dict(cls, data, schema_version: int) -> "Measured":
        owner = "field 'measured'"
        if schema_version == 1 and isinstance(data, dict):
            data = {"timing": V1_TIMING, **data}
        spec = {"device": (str,), "timing": (str,), "units": (list,), "dense_steps": (list,), "trials": (dict,),
                **{name: None for name in _DERIVED}}
        d = _check(owner, data, spec)
        units = [UnitTiming.from_dict(u, f"{owner}.units[{i}]") for i, u in enumerate(d["units"])]
        if not units:
            raise ValueError(f"{owner}.units must list at least one sparse step")
        dense = [DenseStepTiming.from_dict(x, f"{owner}.dense_steps[{i}]") for i, x in enumerate(d["dense_steps"])]
        for name, n in d["trials"].items():
            if isinstance(n, bool) or not isinstance(n, int):
                raise ValueError(f"{owner}.trials[{name!r}] must be an int, got {n!r}")
        return cls(d["device"], d["timing"], units, dense, dict(d["trials"]))


@dataclass
class Quality:
    """The semantic search's result: the plan's largest relative error of attention outputs
    against dense (``measured``) on ``calibration``, under ``bound``, from study trial ``trial``."""

    metric: str
    bound: float
    measured: float
    calibration: str
    trial: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data) -> "Quality":
        return cls(**_check("field 'quality'", data, {f.name: {"metric": (str,), "calibration": (str,),
                                                               "trial": (int,)}.get(f.name, _NUMBER)
                                                      for f in fields(cls)}))
