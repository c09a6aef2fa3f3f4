"""Layers shared by the project's Infinity and VAR networks. Parameter and buffer names are the
official ones (FoundationVision's ``basic.py`` / ``basic_var.py``), so the official checkpoints'
state dicts load unchanged; the computations follow those modules at inference.

Self-attention does not attend by itself: ``SelfAttention.qkv`` gives ``q, k, v`` as
``[B, H, L, D]`` and the caller (``sparvar.generation``) writes ``k, v`` into its KV cache and runs
the plan's attention through the dispatcher; ``SelfAttention.out`` projects the result.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sparvar.kernels.fused import qkv_heads

__all__ = ["SelfAttention", "FFN", "AdaLNBeforeHead", "adaln_modulate", "add_pending", "project_qkv"]


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, L, C]`` -> ``q, k, v [B, H, L, D]`` through ``mat_qkv`` with the zero key bias: the
    projection of this module and of the official modules it mirrors (same attribute names)."""
    B, L, _ = x.shape
    bias = torch.cat((attn.q_bias, attn.zero_k_bias, attn.v_bias))
    return F.linear(x, attn.mat_qkv.weight, bias).view(B, L, 3, attn.num_heads, attn.head_dim).permute(
        2, 0, 3, 1, 4).unbind(0)


class SelfAttention(nn.Module):
    """``mat_qkv`` (no bias), ``q_bias``/``v_bias`` (the key bias is zero), ``proj``. With
    ``cos_attn`` (Infinity, and VAR's ``attn_l2_norm``), ``q`` and ``k`` are L2-normalised and
    ``q`` scaled by ``exp(min(scale_mul_1H11, ln 100))`` per head, and the softmax scale is 1;
    otherwise the scale is ``plain_scale``."""

    def __init__(self, embed_dim: int, num_heads: int, cos_attn: bool, plain_scale: float | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.num_heads, self.head_dim, self.cos_attn = num_heads, embed_dim // num_heads, cos_attn
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(embed_dim)), nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        if cos_attn:
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
            self.scale = 1.0
        else:
            self.scale = plain_scale if plain_scale is not None else self.head_dim ** -0.5
        self.proj = nn.Linear(embed_dim, embed_dim)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, L, C]`` -> ``q, k, v [B, H, L, D]`` (normalised and scaled for cosine attention)."""
        q, k, v = project_qkv(self, x)
        if self.cos_attn:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul)
            k = F.normalize(k, dim=-1, eps=1e-12)
        return q, k, v

    def fused_q(self, h: torch.Tensor, attn, rope: torch.Tensor | None = None) -> torch.Tensor:
        """``qkv`` fused (``sparvar.kernels.fused.qkv_heads``): ``h [B, L, C]`` -> ``q [B, H, L, D]``,
        with ``k, v`` written into ``attn``'s KV-cache slots (``sparvar.generation.LayerAttention``)
        and, given ``rope`` (the whole schedule's table), rotated from the slots' first row."""
        k_dst, v_dst = attn.slots()
        return qkv_heads(F.linear(h, self.mat_qkv.weight), self.q_bias, self.v_bias, k_dst, v_dst,
                         scale_mul=self.scale_mul_1H11.view(-1) if self.cos_attn else None,
                         max_log_scale=self.max_scale_mul if self.cos_attn else 0.0, rope=rope, rope_row0=attn.lo)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """``o [B, H, L, D]`` -> ``[B, L, C]`` through ``proj``."""
        B, H, L, D = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, L, H * D))


class FFN(nn.Module):
    """``fc2(gelu_tanh(fc1(x)))``."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def add_pending(x: torch.Tensor, pending) -> torch.Tensor:
    """``x + gamma * y`` for a fused block's deferred gated branch ``pending = (y, gamma)``
    (``gamma`` one vector per sample), or ``x`` when nothing is pending."""
    return x if pending is None else x + pending[0] * pending[1].unsqueeze(1)


def adaln_modulate(ln: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``ln(x) * (1 + scale) + shift``, the AdaLN both families use before attention and FFN."""
    return ln(x).mul(scale.add(1)).add_(shift)


class AdaLNBeforeHead(nn.Module):
    """The head's AdaLN: ``ada_lin = (SiLU, Linear(D, 2C))`` gives scale and shift."""

    def __init__(self, C: int, D: int, norm_eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, elementwise_affine=False, eps=norm_eps)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return adaln_modulate(self.ln_wo_grad, x, scale, shift)
