"""Fused kernels for the transformer blocks of the generation path (twins of the eager code in
``sparvar.layers``: ``add_norm_reference`` and ``qkv_heads_reference``).

A block's own work besides attention and its matrix products is a chain of small elementwise
steps (residual adds with a gate, layer norms, AdaLN modulation, the q/k normalisation with the
per-head scale, 2-D RoPE, the KV-cache write). Eagerly each step is a kernel that reads and
writes the whole activation: measured on an H200 (Infinity-2B, 1024x1024), 95 kernels per
(layer, scale), more GPU time in elementwise kernels than in attention, and at the small scales
the launches alone set the time. These two kernels do each chain in one pass, one program per
token row:

- ``add_norm``: ``x' = x + gamma * y`` (optional), then ``LayerNorm(x')`` with an optional
  affine and an optional AdaLN modulation ``* (1 + scale) + shift``, stored in the matmul dtype;
- ``qkv_heads``: the fused q/k/v projection's output -> biases, cosine normalisation of q and k
  with q scaled by ``exp(min(scale_mul, max_log_scale))``, RoPE on channel pairs, q stored as
  ``[B, H, L, D]`` and k, v written straight into their KV-cache slots.

Arithmetic is fp32 throughout, rounded once at the store (the eager code rounds some
intermediate products to the matmul dtype, so bf16 results may differ in the last bit).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import _empty, check_device

__all__ = ["add_norm", "qkv_heads", "add_norm_reference", "qkv_heads_reference"]


@triton.jit
def _add_norm_kernel(x, y, gamma, weight, bias, scale, shift, x_out, h_out, rows_per_batch, C, eps,
                     stride_gamma, stride_scale, stride_shift, BC: tl.constexpr, HAS_Y: tl.constexpr,
                     HAS_GAMMA: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // rows_per_batch
    o = tl.arange(0, BC)
    m = o < C
    xr = tl.load(x + row * C + o, mask=m, other=0.0).to(tl.float32)
    if HAS_Y:
        yr = tl.load(y + row * C + o, mask=m, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            yr = yr * tl.load(gamma + b * stride_gamma + o, mask=m, other=0.0).to(tl.float32)
        xr = xr + yr
        tl.store(x_out + row * C + o, xr, mask=m)
    mean = tl.sum(xr, 0) / C
    xc = tl.where(m, xr - mean, 0.0)
    var = tl.sum(xc * xc, 0) / C
    h = xc / tl.sqrt(var + eps)
    if AFFINE:
        h = h * tl.load(weight + o, mask=m, other=0.0).to(tl.float32) + tl.load(bias + o, mask=m, other=0.0).to(
            tl.float32)
    if MODULATE:
        s = tl.load(scale + b * stride_scale + o, mask=m, other=0.0).to(tl.float32)
        h = h * (1.0 + s) + tl.load(shift + b * stride_shift + o, mask=m, other=0.0).to(tl.float32)
    tl.store(h_out + row * C + o, h.to(h_out.dtype.element_ty), mask=m)


@triton.jit
def _qkv_heads_kernel(qkv, q_bias, v_bias, scale_mul, rope, q_out, k_out, v_out, rows_per_batch, H, rope_row0,
                      rope_half, max_log_scale, eps, stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
                      stride_vb, stride_vh, stride_vl, BH: tl.constexpr, D: tl.constexpr, COS: tl.constexpr,
                      ROPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // rows_per_batch
    l = row % rows_per_batch
    o_h = tl.arange(0, BH)
    o_i = tl.arange(0, D // 2)
    m_h = o_h < H
    m = m_h[:, None]
    C = H * D
    # Channel pairs (2i, 2i + 1) as two [BH, D/2] halves: RoPE rotates each pair.
    ch = o_h[:, None] * D + 2 * o_i[None, :]
    src = qkv + row * 3 * C + ch
    qe = tl.load(src, mask=m, other=0.0).to(tl.float32) + tl.load(q_bias + ch, mask=m, other=0.0).to(tl.float32)
    qo = tl.load(src + 1, mask=m, other=0.0).to(tl.float32) + tl.load(q_bias + ch + 1, mask=m, other=0.0).to(
        tl.float32)
    ke = tl.load(src + C, mask=m, other=0.0).to(tl.float32)
    ko = tl.load(src + C + 1, mask=m, other=0.0).to(tl.float32)
    ve = tl.load(src + 2 * C, mask=m, other=0.0).to(tl.float32) + tl.load(v_bias + ch, mask=m, other=0.0).to(
        tl.float32)
    vo = tl.load(src + 2 * C + 1, mask=m, other=0.0).to(tl.float32) + tl.load(v_bias + ch + 1, mask=m,
                                                                              other=0.0).to(tl.float32)
    if COS:
        s = tl.exp(tl.minimum(tl.load(scale_mul + o_h, mask=m_h, other=0.0).to(tl.float32), max_log_scale))
        fq = s / tl.maximum(tl.sqrt(tl.sum(qe * qe + qo * qo, 1)), eps)
        fk = 1.0 / tl.maximum(tl.sqrt(tl.sum(ke * ke + ko * ko, 1)), eps)
        qe, qo = qe * fq[:, None], qo * fq[:, None]
        ke, ko = ke * fk[:, None], ko * fk[:, None]
    if ROPE:
        p = rope + (rope_row0 + l) * (D // 2) + o_i
        cos = tl.load(p)[None, :]
        sin = tl.load(p + rope_half)[None, :]
        qe, qo = cos * qe - sin * qo, sin * qe + cos * qo
        ke, ko = cos * ke - sin * ko, sin * ke + cos * ko
    dq = q_out + b * stride_qb + l * stride_ql + o_h[:, None] * stride_qh + 2 * o_i[None, :]
    dk = k_out + b * stride_kb + l * stride_kl + o_h[:, None] * stride_kh + 2 * o_i[None, :]
    dv = v_out + b * stride_vb + l * stride_vl + o_h[:, None] * stride_vh + 2 * o_i[None, :]
    tl.store(dq, qe.to(q_out.dtype.element_ty), mask=m)
    tl.store(dq + 1, qo.to(q_out.dtype.element_ty), mask=m)
    tl.store(dk, ke.to(k_out.dtype.element_ty), mask=m)
    tl.store(dk + 1, ko.to(k_out.dtype.element_ty), mask=m)
    tl.store(dv, ve.to(v_out.dtype.element_ty), mask=m)
    tl.store(dv + 1, vo.to(v_out.dtype.element_ty), mask=m)


def _per_batch(t: torch.Tensor | None, name: str, B: int, C: int) -> tuple[torch.Tensor | None, int]:
    """A per-sample vector (``[B, C]``, ``[B, 1, C]`` or a strided view of such) and its batch stride."""
    if t is None:
        return None, 0
    if t.shape[0] != B or t.shape[-1] != C or t.numel() != B * C or t.stride(-1) != 1:
        raise ValueError(f"{name} must hold one row of {C} channels per sample ({B} samples, unit channel stride), "
                         f"got shape {tuple(t.shape)} with strides {t.stride()}")
    return t, t.stride(0)


def add_norm(x: torch.Tensor, y: torch.Tensor | None = None, gamma: torch.Tensor | None = None, *,
             weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
             shift: torch.Tensor | None = None, eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """``(x', h)``: ``x' = x + gamma * y`` (``x`` itself without ``y``; ``gamma`` absent: 1) in
    fp32, and ``h = LayerNorm(x')`` (``eps``; times ``weight`` plus ``bias`` when given; then
    ``* (1 + scale) + shift`` when given) in ``out_dtype``.

    ``x``: ``[B, L, C]`` fp32 contiguous; ``y``: ``[B, L, C]`` contiguous, any float dtype;
    ``gamma``, ``scale``, ``shift``: one ``C``-vector per sample; ``weight``, ``bias``: ``[C]``.
    Twin of ``add_norm_reference``.
    """
    check_device(x)
    B, L, C = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous float32 [B, L, C] tensor, got {x.dtype} {tuple(x.shape)}")
    if y is not None and (y.shape != x.shape or not y.is_contiguous()):
        raise ValueError(f"y must be contiguous with x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    if (weight is None) != (bias is None) or (scale is None) != (shift is None):
        raise ValueError("weight and bias come together, and so do scale and shift")
    gamma, sg = _per_batch(gamma, "gamma", B, C)
    scale, ss = _per_batch(scale, "scale", B, C)
    shift, sh = _per_batch(shift, "shift", B, C)
    x_out = _empty(x.shape, device=x.device, dtype=x.dtype) if y is not None else x
    h = _empty(B, L, C, device=x.device, dtype=out_dtype)
    BC = triton.next_power_of_2(C)
    _add_norm_kernel[(B * L,)](x, y, gamma, weight, bias, scale, shift, x_out, h, L, C, eps, sg, ss, sh, BC=BC,
                               HAS_Y=y is not None, HAS_GAMMA=gamma is not None, AFFINE=weight is not None,
                               MODULATE=scale is not None, num_warps=max(1, min(16, BC // 256)))
    return x_out, h


def add_norm_reference(x, y=None, gamma=None, *, weight=None, bias=None, scale=None, shift=None, eps: float,
                       out_dtype: torch.dtype):
    """The eager twin of ``add_norm`` (the blocks' unfused code, in fp32)."""
    B, L, C = x.shape

    def per_batch(t):
        return t.reshape(B, 1, C).float()
    if y is not None:
        x = x + (y.float() * per_batch(gamma) if gamma is not None else y.float())
    h = torch.nn.functional.layer_norm(x, (C,), weight.float() if weight is not None else None,
                                       bias.float() if bias is not None else None, eps)
    if scale is not None:
        h = h * (1 + per_batch(scale)) + per_batch(shift)
    return x, h.to(out_dtype)


def qkv_heads(qkv: torch.Tensor, q_bias: torch.Tensor, v_bias: torch.Tensor, k_dst: torch.Tensor,
              v_dst: torch.Tensor, *, scale_mul: torch.Tensor | None = None, max_log_scale: float = 0.0,
              rope: torch.Tensor | None = None, rope_row0: int = 0, eps: float = 1e-12) -> torch.Tensor:
    """The fused projection's output ``qkv [B, L, 3*H*D]`` (no bias) -> ``q [B, H, L, D]`` (a
    view of token-major memory) in ``k_dst``'s dtype; ``k`` and ``v`` are written into ``k_dst``, ``v_dst`` (``[B, H, L, D]``
    views, e.g. a KV cache's slots for this scale).

    With ``scale_mul`` (``[H]`` values, Infinity's ``scale_mul_1H11``): q and k are
    L2-normalised (``eps``) and q scaled by ``exp(min(scale_mul, max_log_scale))``. With
    ``rope`` (``[2, L_total, D/2]`` cos, sin, fp32 contiguous): rows ``rope_row0 ..
    rope_row0 + L`` rotate channel pairs ``(2i, 2i+1)`` of q and k. Twin of ``qkv_heads_reference``.
    """
    check_device(qkv)
    B, L, H, D = k_dst.shape[0], k_dst.shape[2], k_dst.shape[1], k_dst.shape[3]
    if qkv.shape != (B, L, 3 * H * D) or not qkv.is_contiguous():
        raise ValueError(f"qkv must be a contiguous [{B}, {L}, {3 * H * D}] tensor, got {tuple(qkv.shape)}")
    if v_dst.shape != k_dst.shape or k_dst.stride(-1) != 1 or v_dst.stride(-1) != 1:
        raise ValueError(f"k_dst and v_dst must be [B, H, L, D] views with unit channel stride, got "
                         f"{tuple(k_dst.shape)} and {tuple(v_dst.shape)}")
    if rope is not None and (rope.dtype != torch.float32 or not rope.is_contiguous() or rope.shape[0] != 2
                             or rope.shape[2] != D // 2 or rope_row0 + L > rope.shape[1]):
        raise ValueError(f"rope must be a contiguous fp32 [2, >= {rope_row0 + L}, {D // 2}] table, got "
                         f"{tuple(rope.shape)} {rope.dtype}")
    # Token-major in memory ([B, L, H, D]), like the projection's output: attention libraries
    # then store their output the same way, and the output projection reads it without a copy.
    q = _empty(B, L, H, D, device=qkv.device, dtype=k_dst.dtype).transpose(1, 2)
    _qkv_heads_kernel[(B * L,)](
        qkv, q_bias, v_bias, scale_mul, rope, q, k_dst, v_dst, L, H, rope_row0,
        rope.shape[1] * (D // 2) if rope is not None else 0, max_log_scale, eps,
        *q.stride()[:3], *k_dst.stride()[:3], *v_dst.stride()[:3],
        BH=triton.next_power_of_2(H), D=D, COS=scale_mul is not None, ROPE=rope is not None, num_warps=4)
    return q


def qkv_heads_reference(qkv, q_bias, v_bias, k_dst, v_dst, *, scale_mul=None, max_log_scale: float = 0.0,
                        rope=None, rope_row0: int = 0, eps: float = 1e-12):
    """The eager twin of ``qkv_heads`` (the blocks' unfused code, in fp32)."""
    B, H, L, D = k_dst.shape
    q, k, v = (qkv.float().view(B, L, 3, H, D) + torch.cat((q_bias, torch.zeros_like(q_bias), v_bias)).float().view(
        3, H, D)).permute(2, 0, 3, 1, 4).unbind(0)
    if scale_mul is not None:
        q = torch.nn.functional.normalize(q, dim=-1, eps=eps) * scale_mul.float().reshape(1, H, 1, 1).clamp_max(
            max_log_scale).exp()
        k = torch.nn.functional.normalize(k, dim=-1, eps=eps)
    if rope is not None:
        cos, sin = rope[0, rope_row0:rope_row0 + L], rope[1, rope_row0:rope_row0 + L]

        def rot(t):
            e, o = t[..., 0::2], t[..., 1::2]
            return torch.stack((cos * e - sin * o, sin * e + cos * o), dim=-1).reshape(t.shape)
        q, k = rot(q), rot(k)
    k_dst.copy_(k)
    v_dst.copy_(v)
    return q.to(k_dst.dtype)
