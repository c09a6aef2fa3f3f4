"""Readable reference semantics of SparVAR's sparse attention (SPEC.md, sections 1-6).

Pure PyTorch, float64-capable, no Triton: this package is the oracle the kernels are tested
against.

Readings of points the SPEC leaves open (each also stated where it is implemented):
- Sink scales are seen whole whatever ``win_rel`` says; ``win_rel`` entries that reach into the
  sinks are ignored (``key_windows``).
- ``band_rel`` may not reach scales ``<= d`` (plan validation allows at most ``S-1-d`` entries;
  ``band_windows`` ignores such entries when given ``CS4AParams`` directly); ``-1`` is not a band.
- With ``residual`` off the decision step does not compute ``O_sel`` (nothing would use it) and
  the state carries ``residual=None``.
- ``default_plan`` for schedules other than Infinity 1024 keeps the authors' rule relative to
  the schedule's length: ``d = max(0, S-3)``, ``sink_scales = min(5, d)``, windows and bands cut
  to the scales they can reach, ``bound_layer = min(10, depth-1)``.
- Log-sum-exp is in natural log of the scaled scores; an empty allowed set gives ``-inf``.
- Non-finite inputs (``attention.py``): a NaN or +inf score, or a non-finite value row, among a
  query's allowed keys makes its output row all-NaN; a -inf score counts as an excluded key;
  keys outside the allowed set never matter. Selection ranks NaN above every number
  (``select_keys``), so a group whose scores are all NaN keeps its first ``n_keep`` keys.
- Ranks are exact: scores and counts use integer arithmetic for centres and band ranges; the
  top-``n_keep`` tie rule is implemented with a stable sort.
"""

from .attention import check_step_inputs, dense_attention, masked_attention
from .cs4a import (CS4AParams, CS4AState, band_ranges, band_windows, check_decision, check_state, column_scores,
                   cs4a_decide, cs4a_mask, cs4a_sparse, kept_mask, num_groups, num_keep, select_keys,
                   selected_attention, source_groups, upsample_residual)
from .csla import CSLAParams, centre, csla_allows, csla_attention, csla_mask, key_windows
from .density import StepDensity, cs4a_pairs, csla_pairs, generation_density, plan_densities
from .plan import SparsityPlan, StepKind, default_plan
from .schedule import (INFINITY_RATIOS, INFINITY_RESOLUTIONS, Schedule, infinity_schedule,
                       preset_schedules, schedule_for_pixels, var_schedule)
from .testing import relative_error, step_inputs

__all__ = [
    "check_step_inputs", "dense_attention", "masked_attention",
    "CS4AParams", "CS4AState", "band_ranges", "band_windows", "check_decision", "check_state", "column_scores",
    "cs4a_decide",
    "cs4a_mask", "cs4a_sparse", "kept_mask", "num_groups", "num_keep", "select_keys",
    "selected_attention", "source_groups", "upsample_residual",
    "CSLAParams", "centre", "csla_allows", "csla_attention", "csla_mask", "key_windows",
    "StepDensity", "cs4a_pairs", "csla_pairs", "generation_density", "plan_densities",
    "SparsityPlan", "StepKind", "default_plan", "relative_error", "step_inputs",
    "INFINITY_RATIOS", "INFINITY_RESOLUTIONS", "Schedule", "infinity_schedule",
    "preset_schedules", "schedule_for_pixels", "var_schedule",
]
