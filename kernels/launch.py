"""Launchers: allocate outputs, build grids, turn launch failures into clear errors.

Every launch passes keyword arguments; an absent tensor is ``None`` and the kernel derives the
flag that uses it. Entry points (``csla.py``, ``cs4a.py``) keep their launches in a ``PlanCache``
keyed by (schedule, step, parameters, config, shapes, dtypes, devices): device tables, grids and
constants are built and the inputs validated once, so a call with a known signature looks its
plan up and launches (the host cost per call is measured by the attention benchmark).
"""

from __future__ import annotations

import os
import torch
import triton

from .config import DenseBackend, KernelConfig
from .sparse_attn import LOG2E, Epilogue, _column_scores_kernel, _select_topk_kernel, _sparse_attn_fwd_kernel

__all__ = ["KernelLaunchError", "check_kernel_inputs", "check_device", "interpreting", "AttentionLaunch",
           "column_scores_fwd", "select_topk_fwd", "dense_lse_fwd", "dense_backend_for", "signature", "PlanCache",
           "plan_count", "clear_plans"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Tests set this so every output starts as NaN (indices as -1) and an element a kernel never
#: writes fails.
poison_outputs = False


def _empty(*args, **kwargs) -> torch.Tensor:
    t = torch.empty(*args, **kwargs)
    if poison_outputs:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


class KernelLaunchError(RuntimeError):
    """A kernel failed to compile or launch with a given config (e.g. out of shared memory), or a
    library backend the config names cannot run here."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_inputs(*tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` for dtypes, devices and head dims the kernels do not take."""
    q = tensors[0]
    if q.dtype not in _DTYPES:
        raise ValueError(f"kernels take float16, bfloat16 or float32 inputs, got {q.dtype}")
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        raise ValueError(f"head dim must be a power of two in [16, 256], got {D}")
    check_device(q)
    if interpreting() and q.dtype == torch.bfloat16:
        raise ValueError("Triton's interpreter cannot do bfloat16 dots; use float16 or float32 on the CPU")


def check_device(t: torch.Tensor) -> None:
    if interpreting():
        if t.device.type != "cpu":
            raise ValueError(f"TRITON_INTERPRET=1 runs kernels on CPU tensors, got {t.device}")
    elif t.device.type != "cuda":
        raise ValueError(f"kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {t.device}")


def signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> tuple:
    """What may change between calls of one plan and must key it: shapes, dtypes, devices (as
    ``get_device()``'s index, -1 for the CPU: cheaper to read than ``.device``, and as exact)."""
    if v is None:
        return q.shape, k.shape, q.dtype, k.dtype, q.get_device(), k.get_device()
    return q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.get_device(), k.get_device(), v.get_device()


_CACHES: list = []


def plan_count() -> int:
    """Launch plans held by every entry point's cache."""
    return sum(len(c) for c in _CACHES)


def clear_plans() -> None:
    """Drop every cached launch plan (the next call of each signature validates and builds again)."""
    for c in _CACHES:
        c.clear()


class PlanCache:
    """Plans by key, built once by ``build()`` (which validates); bounded so that a long run over
    many shapes does not keep every table alive."""

    def __init__(self, maxsize: int = 256):
        self._plans: dict = {}
        self.maxsize = maxsize
        _CACHES.append(self)

    def get(self, key, build):
        plan = self._plans.get(key)
        if plan is None:
            plan = build()
            if len(self._plans) >= self.maxsize:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return len(self._plans)


def _launch(kernel, grid, name: str, config: KernelConfig, **kwargs):
    """Launch through Triton's own path; returns the compiled kernel (``None`` in the interpreter)."""
    try:
        return kernel[grid](num_warps=config.num_warps, num_stages=config.num_stages, **kwargs)
    except (triton.CompilationError, triton.runtime.errors.OutOfResources) as e:
        raise KernelLaunchError(f"{name} kernel failed with {config}: {type(e).__name__}: {e}") from e


class _Launcher:
    """One kernel with a fixed grid and config. The first launch of each argument
    specialisation goes through Triton (compile, bind, launch); later ones call the compiled
    kernel's runner with the arguments in order, which skips Triton's per-call argument binding
    (most of the host time of a launch with fifty arguments). ``spec`` must capture everything
    Triton specialises on that can change between calls: strides, sizes, pointer alignment.

    A runner takes pointers as plain ints: Triton's launcher asks the driver about every tensor
    it is given (``cuPointerGetAttribute``, one driver call per tensor) but passes an int through,
    and every pointer here was checked when its plan was built (device) or is a plan's own table."""

    def __init__(self, kernel, grid, name: str, config: KernelConfig):
        self.kernel, self.grid, self.name, self.config = kernel, grid, name, config
        self.heuristics = getattr(kernel, "values", {})
        self.names = getattr(kernel, "fn", kernel).arg_names
        self._runners: dict = {}

    def runner(self, spec):
        """The compiled kernel's runner for ``spec`` (arguments in order, pointers as ints), or
        ``None`` before ``first`` has launched that specialisation."""
        return self._runners.get(spec)

    def first(self, spec, args: list) -> None:
        """Launch through Triton, compiling if needed. ``args``: every argument in the kernel's
        order, tensors as tensors, flags the heuristics derive included."""
        kwargs = {n: a for n, a in zip(self.names, args) if n not in self.heuristics}
        compiled = _launch(self.kernel, self.grid, self.name, self.config, **kwargs)
        if compiled is not None and not interpreting():
            # The compiled kernel's runner reads all three grid dimensions.
            self._runners[spec] = compiled[tuple(self.grid) + (1,) * (3 - len(self.grid))]


_NO_STRIDES = (0, 0, 0, 0)


class AttentionLaunch:
    """One configured launch of ``_sparse_attn_fwd_kernel``: tile tables, grid and constants are
    fixed when it is built; a call passes only what changes (inputs, kept sets, residual, scale).

    Tables (all on the inputs' device): ``q_idx [T, BM]``; ``kv_dense`` walks all keys;
    ``kv_idx``/``kv_len``/``kv_bits`` are CSLA key lists and masks; ``tile_src`` with the kept
    sets passed per call; ``tile_band``/``row_band`` CS4A band ranges; ``res_idx``/``res_w`` the
    residual's bilinear taps (``Epilogue.ADD_RESIDUAL``). ``values=False`` computes the
    log-sum-exp alone.

    The arguments are laid out once in the kernel's order (the heuristics' flags included); a
    call fills in the slots that change and launches the compiled kernel directly.
    """

    def __init__(self, *, batch_heads: tuple[int, int], head_dim: int, dtype: torch.dtype, config: KernelConfig,
                 name: str, q_idx: torch.Tensor, kv_dense: bool = False, kv_idx: torch.Tensor | None = None,
                 kv_len: torch.Tensor | None = None, kv_bits: torch.Tensor | None = None,
                 tile_src: torch.Tensor | None = None, tile_band: torch.Tensor | None = None,
                 row_band: torch.Tensor | None = None, epilogue: Epilogue = Epilogue.NONE,
                 res_idx: torch.Tensor | None = None, res_w: torch.Tensor | None = None,
                 store_lse: bool = False, values: bool = True, kept_packed: bool = False):
        B, H = batch_heads
        self.values, self.store_lse, self.has_kept = values, store_lse, tile_src is not None
        self._launcher = _Launcher(_sparse_attn_fwd_kernel, (q_idx.shape[0], B * H), name, config)
        fixed = dict(
            q_idx=q_idx, kv_idx=kv_idx, kv_len=kv_len, kv_bits=kv_bits, tile_src=tile_src, tile_band=tile_band,
            row_band=row_band, res_idx=res_idx, res_w=res_w, H=H,
            NK=kv_idx.shape[1] if kv_idx is not None else 0, NB=row_band.shape[1] if row_band is not None else 0,
            BM=config.block_m, BN=config.block_n, D=head_dim, NWORDS=kv_bits.shape[2] if kv_bits is not None else 1,
            KV_DENSE=kv_dense, EPILOGUE=int(epilogue), IEEE=dtype == torch.float32,
            # What the heuristics derive from absent tensors, fixed for this launch's callers.
            HAS_V=values, STORE_LSE=store_lse, HAS_KEPT=self.has_kept, HAS_LIST=kv_idx is not None,
            TOKEN_MASK=kv_bits is not None, HAS_BANDS=tile_band is not None, KEPT_PACKED=kept_packed)
        names = self._launcher.names
        self._template = [fixed.get(n) for n in names]
        # The same with the tables as ints, for runners (the tables live as long as the plan).
        self._pointers = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in self._template]
        at = names.index
        self._tensors = at("q")  # q, k, v, o, lse, res are consecutive
        self._kept = at("kept")
        self._strides = at("stride_qb")  # q, k, v, o, res strides: 20 consecutive
        self._sizes = at("L"), at("NQ"), at("n_keep"), at("n_src")
        self._scale = at("qk_scale")
        self._fast: dict = {}
        if names[self._tensors:self._tensors + 6] != ["q", "k", "v", "o", "lse", "res"] or \
                names[self._strides + 19] != "stride_rd":
            raise RuntimeError("_sparse_attn_fwd_kernel's argument order changed; update AttentionLaunch")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, scale: float, *,
                 kept: torch.Tensor | None = None, res: torch.Tensor | None = None, n_keep: int = 0):
        """``(out or None, lse or None)``; ``kept`` ``[B*H, n_src_groups, n_keep]`` int32 (with
        ``kept_packed``: ``[B*H, n_src_groups, 2, NKP, D]`` K and V rows of ``n_keep`` kept keys),
        ``res`` ``[B, H, n, D]`` (the residual to up-sample, or the dense output)."""
        B, H, NQ, D = q.shape
        # The hot path: every line here runs at every call (host time is measured in
        # bench/host_breakdown.py), so it allocates, reads pointers and strides, and looks up an
        # argument list made once per specialisation.
        if self.values:
            # Stored token-major ([B, NQ, H, D] in memory, as flash attention stores it), so that
            # the output projection reads it as [B, NQ, H*D] without a copy.
            out = q.new_empty_strided((B, H, NQ, D), (NQ * H * D, D, H * D, 1))
            p_out, p_v, v_strides = out.data_ptr(), v.data_ptr(), v.stride()
        else:
            out = v = p_out = p_v = v_strides = None
        lse = p_lse = None
        if self.store_lse:
            lse = q.new_empty((B, H, NQ), dtype=torch.float32)
            p_lse = lse.data_ptr()
        if poison_outputs:
            for t in (out, lse):
                if t is not None:
                    t.fill_(float("nan"))
        p_q, p_k = q.data_ptr(), k.data_ptr()
        # Triton specialises each pointer on whether it is 16-byte aligned: one bit per pointer
        # that is not a fresh output (the allocator aligns those).
        align = (p_q & 15 == 0) | (p_k & 15 == 0) << 1
        if p_v is not None:
            align |= (p_v & 15 == 0) << 2
        p_res = res_strides = None
        if res is not None:
            p_res, res_strides = res.data_ptr(), res.stride()
            align |= (p_res & 15 == 0) << 3
        p_kept, n_src = None, 1
        if kept is not None:
            p_kept, n_src = kept.data_ptr(), kept.shape[1]
            n_keep = n_keep or kept.shape[2]
            align |= (p_kept & 15 == 0) << 4
        spec = (q.stride(), k.stride(), v_strides, res_strides, k.shape[2], NQ, n_keep, n_src, align)
        fast = self._fast.get(spec)
        if fast is None:
            fast = self._prepare(spec, (q, k, v, out, lse, res), kept, scale * LOG2E)
            if fast is None:  # launched through Triton (the first launch of this specialisation)
                return out, lse
        runner, args = fast
        args = args.copy()
        i = self._tensors
        args[i:i + 6] = p_q, p_k, p_v, p_out, p_lse, p_res
        args[self._kept] = p_kept
        args[self._scale] = scale * LOG2E
        runner(*args)
        return out, lse

    def _prepare(self, spec, tensors, kept, qk_scale: float):
        """``(runner, arguments)`` of ``spec`` with everything but the pointers and the scale
        filled in, made once per specialisation; ``None`` after launching through Triton when
        no runner exists yet (the first launch, which compiles) or in the interpreter."""
        q_strides, k_strides, v_strides, res_strides, L, NQ, n_keep, n_src, _ = spec
        out = tensors[3]
        out_strides = out.stride() if out is not None else _NO_STRIDES
        strides = q_strides + k_strides + (v_strides or _NO_STRIDES) + out_strides + (res_strides or _NO_STRIDES)
        runner = self._launcher.runner(spec)
        args = (self._template if runner is None else self._pointers).copy()
        args[self._strides:self._strides + 20] = strides
        i_l, i_nq, i_keep, i_src = self._sizes
        args[i_l], args[i_nq], args[i_keep], args[i_src] = L, NQ, n_keep, n_src
        if runner is not None:
            self._fast[spec] = runner, args
            return runner, args
        i = self._tensors
        args[i:i + 6] = tensors
        args[self._kept] = kept
        args[self._scale] = qk_scale
        self._launcher.first(spec, args)
        return None


def column_scores_fwd(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, group_size: int,
                      config: KernelConfig) -> torch.Tensor:
    """``[B, H, n_groups, L]`` fp32 column scores normalised by ``lse`` ``[B, H, Lq]`` (natural
    log): one program per (key block, group, batch*head), queries of the group in sub-tiles of
    ``config.block_m``."""
    B, H, NQ, D = q.shape
    L = k.shape[2]
    n_groups = -(-NQ // group_size)
    scores = _empty(B, H, n_groups, L, device=q.device, dtype=torch.float32)
    _launch(_column_scores_kernel, (triton.cdiv(L, config.block_n), n_groups, B * H), "cs4a_scores", config,
            q=q, k=k, lse=lse, scores=scores,
            **dict(zip(("stride_qb", "stride_qh", "stride_ql", "stride_qd"), q.stride())),
            **dict(zip(("stride_kb", "stride_kh", "stride_kl", "stride_kd"), k.stride())),
            H=H, L=L, NQ=NQ, group_size=group_size, n_groups=n_groups, qk_scale=scale * LOG2E,
            BM=config.block_m, BN=config.block_n, D=D, IEEE=q.dtype == torch.float32)
    return scores


# Rows longer than this fall back to a stable sort (the radix select keeps a row in registers).
_TOPK_MAX_LEN = 32768
_TOPK_CONFIG = KernelConfig(16, 16, 8, 1)


def select_topk_fwd(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """``[..., L]`` fp32 scores -> ``[..., n_keep]`` int32 indices, ascending, ties to the lower
    index, NaN above every number (SPEC section 4, step 3, and the reference's reading)."""
    L = scores.shape[-1]
    if L > _TOPK_MAX_LEN:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
        return torch.sort(order, dim=-1).values.to(torch.int32)
    rows = scores.reshape(-1, L).contiguous()
    kept = _empty(*scores.shape[:-1], n_keep, device=scores.device, dtype=torch.int32)
    _launch(_select_topk_kernel, (rows.shape[0],), "cs4a_topk", _TOPK_CONFIG,
            scores=rows, kept=kept, L=L, n_keep=n_keep, BL=triton.next_power_of_2(L))
    return kept


def dense_backend_for(config: KernelConfig, q: torch.Tensor) -> tuple[DenseBackend, str]:
    """The dense backend that runs for ``config`` on inputs like ``q``, and why: a library
    backend needs CUDA (not the interpreter), fp16/bf16, a head dim it supports and the library
    enabled in PyTorch; otherwise the Triton kernel runs. Deterministic, so a trial can record it."""
    want = DenseBackend(config.backend)
    if want is DenseBackend.TRITON:
        return want, "asked for"
    if interpreting() or q.device.type != "cuda":
        return DenseBackend.TRITON, f"{want} needs a CUDA device"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return DenseBackend.TRITON, f"{want} takes float16 or bfloat16, got {q.dtype}"
    if want is DenseBackend.CUDNN:
        ok = torch.backends.cudnn.is_available() and torch.backends.cuda.cudnn_sdp_enabled() and q.shape[-1] <= 128
        return (want, "available") if ok else (DenseBackend.TRITON, "cuDNN attention is not available here")
    ok = torch.backends.cuda.flash_sdp_enabled() and q.shape[-1] <= 256
    return (want, "available") if ok else (DenseBackend.TRITON, "flash attention is not available here")


def dense_lse_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: DenseBackend,
                  triton_launch: AttentionLaunch | None):
    """Dense attention and its log-sum-exp ``[B, H, Lq]`` (fp32, natural log) from ``backend``
    (``dense_backend_for`` decides it; a library failure is an error, never a silent switch);
    ``triton_launch`` is the dense ``AttentionLaunch`` the Triton backend runs.

    Library outputs follow PyTorch's handling of non-finite values; the caller makes rows with
    a non-finite value all-NaN (the decision step's selection epilogue does it in place), and a
    +inf log-sum-exp (a +inf score) becomes NaN here, as the reference's rule says.
    """
    if backend is DenseBackend.TRITON:
        return triton_launch(q, k, v, scale)
    try:
        if backend is DenseBackend.CUDNN:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    except RuntimeError as e:
        raise KernelLaunchError(f"cs4a_dense with backend {backend} failed: {str(e).splitlines()[0]}") from e
    lse = lse.reshape(q.shape[:3]).float().nan_to_num(nan=float("nan"), posinf=float("nan"), neginf=float("-inf"))
    return out, lse
