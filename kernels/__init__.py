"""Triton kernels computing exactly what ``sparvar.reference`` defines (SPEC section 6).

Without a CUDA device, kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` is set here
before any kernel is defined, unless the caller set it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .config import LAUNCHES, DenseBackend, KernelConfig, Launch, LaunchKey, default_config  # noqa: E402
from .cs4a import (LaunchConfigs, column_scores, cs4a_decide, cs4a_sparse, dense_with_lse, kept_table, pack_kept,  # noqa: E402
                   launch_config, scores_from_lse, select_keys, selected_attention, selected_residual)
from .csla import csla_attention  # noqa: E402
from .launch import KernelLaunchError, clear_plans, dense_backend_for, interpreting, plan_count  # noqa: E402

__all__ = ["LAUNCHES", "DenseBackend", "KernelConfig", "Launch", "LaunchKey", "default_config", "LaunchConfigs",
           "launch_config", "column_scores", "cs4a_decide", "cs4a_sparse", "dense_with_lse", "kept_table", "pack_kept",
           "scores_from_lse", "select_keys", "selected_attention", "selected_residual", "csla_attention",
           "KernelLaunchError", "dense_backend_for", "interpreting", "plan_count", "clear_plans"]
