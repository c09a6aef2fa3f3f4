"""Triton kernels computing exactly what ``sparvar.reference`` defines (SPEC section 6).

Without a CUDA device, kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` is set here
before any kernel is defined, unless the caller set it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .config import STEP_KINDS, KernelConfig, default_config  # noqa: E402
from .cs4a import column_scores, cs4a_decide, cs4a_sparse, select_keys, selected_attention  # noqa: E402
from .csla import csla_attention  # noqa: E402
from .launch import KernelLaunchError, interpreting  # noqa: E402

__all__ = ["STEP_KINDS", "KernelConfig", "default_config", "column_scores", "cs4a_decide", "cs4a_sparse",
           "select_keys", "selected_attention", "csla_attention", "KernelLaunchError", "interpreting"]
