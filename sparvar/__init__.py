"""SparVAR: training-free sparse attention (CS4A, CSLA) for visual autoregressive image models.

    from sparvar import SparseAttention
    attn = SparseAttention.for_model("infinity-2b", "1024x1024")   # tuned config of this GPU
    out = attn(layer, step, q, k, v, scale=1.0)                    # [B, H, h_k*w_k, D]

Subpackages: ``sparvar.reference`` (the semantics), ``sparvar.kernels`` (Triton),
``sparvar.autotune`` (Optuna), ``sparvar.configs`` (tuned-config loader).
"""

from .errors import SparvarError

__all__ = ["SparseAttention", "SparvarError"]


def __getattr__(name):
    # Importing the runtime pulls in Triton; keep `import sparvar.reference` light.
    if name == "SparseAttention":
        from .runtime import SparseAttention

        return SparseAttention
    raise AttributeError(name)
