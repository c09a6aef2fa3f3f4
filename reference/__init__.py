"""Readable reference semantics of SparVAR's sparse attention (SPEC.md, sections 1-6).

Pure PyTorch, float64-capable, no Triton: this package is the oracle the kernels are tested
against.
"""

from .attention import check_step_inputs, dense_attention, masked_attention
from .cs4a import (CS4AParams, CS4AState, band_ranges, band_windows, column_scores, cs4a_decide,
                   cs4a_mask, cs4a_sparse, kept_mask, num_groups, num_keep, select_keys,
                   selected_attention, source_groups, upsample_residual)
from .csla import CSLAParams, centre, csla_allows, csla_attention, csla_mask, key_windows
from .density import StepDensity, cs4a_pairs, csla_pairs, generation_density, plan_densities
from .plan import KINDS, SparsityPlan, attention_step, default_plan
from .schedule import (INFINITY_RATIOS, INFINITY_RESOLUTIONS, Schedule, infinity_schedule,
                       preset_schedules, schedule_for_pixels, var_schedule)

__all__ = [
    "check_step_inputs", "dense_attention", "masked_attention",
    "CS4AParams", "CS4AState", "band_ranges", "band_windows", "column_scores", "cs4a_decide",
    "cs4a_mask", "cs4a_sparse", "kept_mask", "num_groups", "num_keep", "select_keys",
    "selected_attention", "source_groups", "upsample_residual",
    "CSLAParams", "centre", "csla_allows", "csla_attention", "csla_mask", "key_windows",
    "StepDensity", "cs4a_pairs", "csla_pairs", "generation_density", "plan_densities",
    "KINDS", "SparsityPlan", "attention_step", "default_plan",
    "INFINITY_RATIOS", "INFINITY_RESOLUTIONS", "Schedule", "infinity_schedule",
    "preset_schedules", "schedule_for_pixels", "var_schedule",
]
