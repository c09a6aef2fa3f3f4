"""The search space: kernel speed parameters per sparse step, and the rules that prune it.

A *unit* is one sparse step of the plan, timed on its own: a ``StepKind`` at a query scale
(``csla@12``, ``cs4a_decide@10`` with its three launches, ``cs4a_sparse@12``). Each launch has
its own parameters; Optuna names a parameter ``<launch>@<scale>.<name>`` (``LaunchKey`` then the
field). Speed parameters never change results (SPEC section 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from sparvar.kernels import LAUNCHES, DenseBackend, KernelConfig, Launch, LaunchKey, default_config
from sparvar.reference import SparsityPlan, StepKind

__all__ = ["Unit", "plan_units", "available_space", "SPACE", "CPU_SPACE", "PRUNING_RULES", "param_name",
           "suggest_unit", "default_params", "configs_from_params"]

# Choices per launch kind on a GPU. Block sizes are powers of two (tl.arange); CSLA tiles are
# 2-D query patches tile_h x tile_w with tile_h = block_m / tile_w.
SPACE = {
    Launch.CSLA: {
        "block_m": [32, 64, 128],    # queries per tile (a 2-D patch of the query grid)
        "tile_w": [4, 8, 16],        # patch width; narrower patches fit windows of tall grids
        "block_n": [32, 64, 128],    # keys per block of the tile's key list
        "num_warps": [4, 8],
        "num_stages": [2, 3, 4],
    },
    Launch.CS4A_DENSE: {
        "backend": ["cudnn", "flash", "triton"],  # library kernels return the LSE too
        "block_m": [64, 128],        # only for the triton backend
        "block_n": [32, 64, 128],
        "num_warps": [4, 8],
        "num_stages": [2, 3, 4],
    },
    Launch.CS4A_SCORES: {
        "block_m": [32, 64, 128],    # queries per sub-tile of a group
        "block_n": [64, 128, 256],   # keys per program: the M side of the transposed product
        "num_warps": [4, 8],
        "num_stages": [2, 3, 4],
    },
    Launch.CS4A_SELECT: {
        "block_m": [32, 64, 128],
        "block_n": [32, 64, 128],
        "num_warps": [4, 8],
        "num_stages": [2, 3, 4],
    },
    Launch.CS4A_SPARSE: {
        "block_m": [64, 128],        # queries per tile (tiles run across groups of one source)
        "block_n": [32, 64, 128],
        "num_warps": [4, 8],
        "num_stages": [2, 3, 4],
    },
}

# Triton's interpreter (no GPU): the same pipeline over a small space; warps and stages do not
# matter there, block sizes still change the work.
# The defaults' values are included so the default config can be enqueued here too.
CPU_SPACE = {
    Launch.CSLA: {"block_m": [16, 64], "tile_w": [4, 8], "block_n": [16, 64], "num_warps": [4], "num_stages": [3]},
    Launch.CS4A_DENSE: {"backend": ["triton"], "block_m": [16, 128], "block_n": [16, 64], "num_warps": [8],
                        "num_stages": [3]},
    Launch.CS4A_SCORES: {"block_m": [16, 64], "block_n": [16, 256], "num_warps": [8], "num_stages": [3]},
    Launch.CS4A_SELECT: {"block_m": [16, 64], "block_n": [16, 64], "num_warps": [4], "num_stages": [3]},
    Launch.CS4A_SPARSE: {"block_m": [16, 64], "block_n": [16, 64], "num_warps": [4], "num_stages": [3]},
}


@dataclass(frozen=True)
class Unit:
    """One sparse step: ``kind`` at query scale ``step``, run by ``count`` layers of one generation."""

    kind: StepKind
    step: int
    count: int

    @property
    def key(self) -> str:
        return f"{self.kind}@{self.step}"

    @property
    def launches(self) -> tuple[Launch, ...]:
        return LAUNCHES[self.kind]


def plan_units(plan: SparsityPlan) -> list[Unit]:
    """The plan's sparse steps with how many layers run each."""
    counts: dict[tuple[StepKind, int], int] = {}
    for layer in range(plan.depth):
        for step in range(plan.num_scales):
            kind = plan.kind(layer, step)
            if kind != StepKind.DENSE:
                counts[(kind, step)] = counts.get((kind, step), 0) + 1
    return [Unit(kind, step, n) for (kind, step), n in sorted(counts.items(), key=lambda x: (x[0][1], x[0][0]))]


def available_space(space: dict, usable_backends) -> dict:
    """``space`` with the dense backends limited to those that can run here (capability check,
    ``kernels.dense_backend_for``): a trial never records a backend that did not run."""
    out = dict(space)
    dense = dict(out[Launch.CS4A_DENSE])
    dense["backend"] = [b for b in dense["backend"] if b in usable_backends] or [DenseBackend.TRITON.value]
    out[Launch.CS4A_DENSE] = dense
    return out


# Pruning rules: (name, reason, predicate on (launch, params, head dim, smem limit)).
def _smem_bytes(launch: Launch, p: dict, head_dim: int) -> int:
    # Q tile once, K and V blocks per pipeline stage, 2-byte elements.
    kv = 1 if launch == Launch.CS4A_SCORES else 2
    return 2 * head_dim * (p["block_m"] + kv * p["num_stages"] * p["block_n"])


PRUNING_RULES = [
    ("tile_wider_than_block", "a CSLA patch wider than block_m leaves no row for it",
     lambda launch, p, D, smem: launch == Launch.CSLA and p["tile_w"] > p["block_m"]),
    ("shared_memory", "Q tile plus pipelined K/V blocks exceed the GPU's shared memory per block",
     lambda launch, p, D, smem: p.get("backend", "triton") == "triton" and _smem_bytes(launch, p, D) > smem),
    ("accumulator_registers", "the fp32 output tile needs more than 128 registers a thread",
     lambda launch, p, D, smem: p.get("backend", "triton") == "triton" and launch != Launch.CS4A_SCORES
     and p["block_m"] * D // (32 * p["num_warps"]) > 128),
    ("score_tile_registers", "the fp32 [block_n, block_m] score tile needs more than 128 registers a thread",
     lambda launch, p, D, smem: launch == Launch.CS4A_SCORES and p["block_m"] * p["block_n"] // (32 * p["num_warps"])
     > 128),
]


def param_name(launch: Launch, step: int, name: str) -> str:
    """Optuna's name of one parameter: ``<launch>@<step>.<field>``."""
    return f"{LaunchKey(launch, step)}.{name}"


def suggest_unit(trial: optuna.Trial, unit: Unit, space: dict, head_dim: int, smem: int) -> dict[Launch, KernelConfig]:
    """Sample the unit's launch configs; raise ``TrialPruned`` naming the rule that rejects one."""
    out = {}
    for launch in unit.launches:
        params = {}
        for name, choices in space[launch].items():
            if name != "backend" and params.get("backend", "triton") != "triton":
                continue  # library backends have no tile parameters
            params[name] = trial.suggest_categorical(param_name(launch, unit.step, name), choices)
        for rule, reason, rejects in PRUNING_RULES:
            if rejects(launch, _with_defaults(launch, params), head_dim, smem):
                where = LaunchKey(launch, unit.step)
                trial.set_user_attr("pruned_by", f"{where}: {rule} ({reason})")
                raise optuna.TrialPruned(f"{where}: {rule}")
        out[launch] = _config(launch, params)
    return out


def _with_defaults(launch: Launch, params: dict) -> dict:
    return {**default_config(launch).to_dict(), **params}


def _config(launch: Launch, params: dict) -> KernelConfig:
    p = _with_defaults(launch, params)
    tile_w = p.pop("tile_w", 0)
    if launch == Launch.CSLA:
        p["tile_h"], p["tile_w"] = p["block_m"] // tile_w, tile_w
    return KernelConfig(**p)


def default_params(units: list[Unit], space: dict) -> dict:
    """Optuna params of the default configs (enqueued as the first trial), where the space has them."""
    out = {}
    for unit in units:
        for launch in unit.launches:
            cfg = default_config(launch).to_dict()
            if cfg["backend"] not in space[launch].get("backend", [cfg["backend"]]):
                cfg["backend"] = "triton"  # e.g. no cuDNN without a GPU
            for name, choices in space[launch].items():
                value = cfg.get(name)
                if cfg["backend"] != "triton" and name != "backend":
                    continue
                if value in choices:
                    out[param_name(launch, unit.step, name)] = value
    return out


def configs_from_params(unit: Unit, params: dict) -> dict[Launch, KernelConfig]:
    """Rebuild a unit's launch configs from a trial's params."""
    out = {}
    for launch in unit.launches:
        prefix = param_name(launch, unit.step, "")
        out[launch] = _config(launch, {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)})
    return out
