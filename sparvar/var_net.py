"""The VAR architecture (FoundationVision/VAR ``models/var.py``, ``basic_var.py``): class-conditional
AdaLN, absolute position and level embeddings, and the VQ-VAE codebook input path.

Parameter names are the official ones: ``VARNet.load_state_dict`` takes a ``VAR`` checkpoint as
it is, and ``VQInput`` the ``quantize.*`` part of a ``VQVAE`` checkpoint (``from_vqvae_state``).
The network computes one scale at a time; ``sparvar.generation`` runs the loop, owns the KV cache
and sends every attention through the plan's dispatcher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sparvar.kernels.fused import add_norm

from .generation import sample_top_k_top_p
from .layers import FFN, AdaLNBeforeHead, SelfAttention, adaln_modulate, add_pending

__all__ = ["VARConfig", "VARNet", "VQInput", "Phi"]


@dataclass(frozen=True)
class VARConfig:
    """Shapes of a VAR model. ``var_dXX`` presets follow the official ``build_vae_var``: heads =
    depth, width = 64 * depth, cosine attention (``attn_l2_norm``), non-shared AdaLN, a VQ-VAE
    with 4096 codes of 32 channels and 4 partially shared residual convolutions."""

    depth: int
    embed_dim: int
    num_heads: int
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    num_classes: int = 1000
    Cvae: int = 32
    vocab_size: int = 4096
    attn_l2_norm: bool = True
    shared_aln: bool = False
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    share_quant_resi: int = 4
    quant_resi: float = 0.5

    @classmethod
    def preset(cls, depth: int, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) -> "VARConfig":
        return cls(depth=depth, embed_dim=64 * depth, num_heads=depth, patch_nums=tuple(patch_nums))


class VARBlock(nn.Module):
    """``AdaLNSelfAttn`` at inference: AdaLN, attention, AdaLN, FFN, each gated by ``gamma``."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C = C
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm, plain_scale=0.25 / math.sqrt(C // cfg.num_heads))
        self.ffn = FFN(C, round(C * cfg.mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(C, elementwise_affine=False, eps=cfg.norm_eps)
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attend) -> torch.Tensor:
        """``attend(q, k, v, scale) -> o`` runs the layer's attention (cache and plan included)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_vectors(cond).unbind(2)
        q, k, v = self.attn.qkv(adaln_modulate(self.ln_wo_grad, x, scale1, shift1))
        x = x + self.attn.out(attend(q, k, v, self.attn.scale)).mul_(gamma1)
        return x + self.ffn(adaln_modulate(self.ln_wo_grad, x, scale2, shift2)).mul(gamma2)

    def ada_vectors(self, cond: torch.Tensor) -> torch.Tensor:
        """``[B, 1, 6, C]``: gamma1, gamma2, scale1, scale2, shift1, shift2 for ``cond`` (the shared
        AdaLN's output, or the class embedding)."""
        if hasattr(self, "ada_gss"):
            return self.ada_gss + cond
        return self.ada_lin(cond).view(-1, 1, 6, self.C)

    def forward_fused(self, x: torch.Tensor, pending, gss: torch.Tensor, attn):
        """``forward`` with the elementwise chains fused (``sparvar.kernels.fused``): ``x``
        ``[B, L, C]`` fp32 contiguous; ``pending`` the previous block's gated FFN output
        ``(y, gamma)`` or ``None``; ``gss`` this block's ``ada_vectors``; ``attn`` the layer's
        ``LayerAttention``. Returns ``(x, pending)`` for the next block."""
        g = gss[:, 0]
        eps, dtype, sa = self.ln_wo_grad.eps, self.attn.mat_qkv.weight.dtype, self.attn
        y, gy = pending if pending is not None else (None, None)
        x, h = add_norm(x, y, gy, scale=g[:, 2], shift=g[:, 4], eps=eps, out_dtype=dtype)
        x, h = add_norm(x, sa.out(attn.attend(sa.fused_q(h, attn), sa.scale)), g[:, 0], scale=g[:, 3],
                        shift=g[:, 5], eps=eps, out_dtype=dtype)
        return x, (self.ffn(h), g[:, 1])


class VARNet(nn.Module):
    """The VAR transformer. Buffers ``lvl_1L`` and ``attn_bias_for_masking`` are kept because the
    official checkpoints hold them (the latter is the training mask; generation never uses it)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, pn = cfg.embed_dim, cfg.patch_nums
        self.first_l = pn[0] ** 2
        L = sum(p * p for p in pn)
        init_std = math.sqrt(1 / C / 3)
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)
        for p in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=init_std)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), _SharedAdaLin(C, 6 * C)) if cfg.shared_aln
                               else nn.Identity())
        self.blocks = nn.ModuleList([VARBlock(cfg) for _ in range(cfg.depth)])
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pn)]).view(1, L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking",
                             torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, L, L))
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        #: Run the blocks' elementwise chains as fused kernels (``VARBlock.forward_fused``):
        #: ``None`` (default) does where the weights are on a GPU.
        self.fused: bool | None = None

    @property
    def use_fused(self) -> bool:
        return self.fused if self.fused is not None else self.pos_start.is_cuda

    # The generation loop's steps (sparvar.generation.NextScaleGenerator).
    def begin(self, labels: torch.Tensor):
        """Class labels ``[B]`` (``num_classes`` is the unconditional class) -> the first scale's
        input ``[2B, first_l, C]`` (conditional rows, then unconditional) and the conditioning."""
        B = labels.shape[0]
        cond = self.class_emb(torch.cat((labels, torch.full_like(labels, self.cfg.num_classes))))
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = cond.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start.expand(2 * B, self.first_l, -1) \
            + lvl_pos[:, : self.first_l]
        state = {"cond": cond, "lvl_pos": lvl_pos}
        if self.use_fused:
            # Every block's AdaLN vectors depend only on the classes: made once here.
            shared = self.shared_ada_lin(cond)
            state["gss_layers"] = torch.stack([b.ada_vectors(shared).float() for b in self.blocks])
        return x, state

    def block_cond(self, state: dict, step: int) -> torch.Tensor:
        return state["gss_layers"] if self.use_fused else self.shared_ada_lin(state["cond"])

    def run_blocks(self, x: torch.Tensor, cond: torch.Tensor, attend_for) -> torch.Tensor:
        if self.use_fused:
            x, pending = x.float().contiguous(), None
            for i, block in enumerate(self.blocks):
                x, pending = block.forward_fused(x, pending, cond[i], attend_for(i))
            return add_pending(x, pending)
        for i, block in enumerate(self.blocks):
            x = block(x, cond, attend_for(i))
        return x

    def logits(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.head(self.head_nm(x.float(), state["cond"]).float()).float()

    def guide(self, logits: torch.Tensor, step: int, cfg: float) -> torch.Tensor:
        """VAR's guidance grows with the scale: ``t = cfg * step / (S - 1)``."""
        B = logits.shape[0] // 2
        t = cfg * step / (len(self.cfg.patch_nums) - 1)
        return (1 + t) * logits[:B] - t * logits[B:]

    def sample(self, logits: torch.Tensor, generator, top_k: int, top_p: float) -> torch.Tensor:
        return sample_top_k_top_p(logits, generator, top_k, top_p)

    def next_input(self, step: int, tokens: torch.Tensor, vq: "VQInput", carry):
        """Tokens ``[B, pn*pn]`` of ``step`` -> ``(next scale's input [2B, l, C] or None, carry)``;
        ``carry`` is ``f_hat [B, Cvae, pn_last, pn_last]`` (``None`` before the first scale)."""
        pn = self.cfg.patch_nums
        B = tokens.shape[0]
        if carry is None:
            carry = tokens.new_zeros(B, self.cfg.Cvae, pn[-1], pn[-1], dtype=vq.embedding.weight.dtype)
        h = vq.embedding(tokens).transpose(1, 2).reshape(B, self.cfg.Cvae, pn[step], pn[step])
        f_hat, nxt = vq.next_autoregressive_input(step, carry, h)
        if step == len(pn) - 1:
            return None, f_hat
        off = sum(p * p for p in pn[: step + 1])
        lvl_pos = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        x = self.word_embed(nxt.reshape(B, self.cfg.Cvae, -1).transpose(1, 2)) + lvl_pos[:, off: off + pn[step + 1] ** 2]
        return x.repeat(2, 1, 1), f_hat


class _SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.weight.shape[0] // 6)


class Phi(nn.Conv2d):
    """The VQ-VAE's residual convolution: ``h * (1 - r) + conv3x3(h) * r``."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class _PhiTicks(nn.Module):
    """Picks the convolution nearest to a position ``at`` in [0, 1] along the schedule: ``K``
    convolutions sit at ``linspace(1/(3K), 1 - 1/(3K), K)`` for ``K == 4``, else at
    ``linspace(1/(2K), 1 - 1/(2K), K)`` (the official rule)."""

    def ticks(self, K: int) -> torch.Tensor:
        edge = 1 / 3 / K if K == 4 else 1 / 2 / K
        return torch.linspace(edge, 1 - edge, K, dtype=torch.float64)

    def pick(self, at: float, K: int) -> int:
        return int(torch.argmin((self.ticks(K) - at).abs()))


class _PhiPartiallyShared(_PhiTicks):
    def __init__(self, convs: nn.ModuleList):
        super().__init__()
        self.qresi_ls = convs

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi_ls[self.pick(at, len(self.qresi_ls))]


class _PhiShared(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.qresi = conv

    def __getitem__(self, at: float) -> nn.Module:
        return self.qresi


class _PhiNonShared(nn.ModuleList, _PhiTicks):
    def __getitem__(self, at: float) -> nn.Module:
        return nn.ModuleList.__getitem__(self, self.pick(at, len(self)))


class VQInput(nn.Module):
    """What generation needs of the VQ-VAE: the codebook ``embedding`` and the residual
    convolutions ``quant_resi`` (the official ``VectorQuantizer2``'s names)."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.patch_nums = cfg.patch_nums
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.Cvae)

        def phi():
            return Phi(cfg.Cvae, cfg.quant_resi) if abs(cfg.quant_resi) > 1e-6 else nn.Identity()
        if cfg.share_quant_resi == 0:
            self.quant_resi = _PhiNonShared([phi() for _ in cfg.patch_nums])
        elif cfg.share_quant_resi == 1:
            self.quant_resi = _PhiShared(phi())
        else:
            self.quant_resi = _PhiPartiallyShared(nn.ModuleList([phi() for _ in range(cfg.share_quant_resi)]))

    @classmethod
    def from_module(cls, cfg: VARConfig, quantize: nn.Module) -> "VQInput":
        """Sharing the parameters of an official ``VectorQuantizer2`` (nothing is copied); its
        residual convolutions' sharing and ratio are read off it."""
        resi = quantize.quant_resi
        convs = resi.qresi_ls if hasattr(resi, "qresi_ls") else [resi.qresi] if hasattr(resi, "qresi") else list(resi)
        share = len(resi.qresi_ls) if hasattr(resi, "qresi_ls") else 1 if hasattr(resi, "qresi") else 0
        ratio = getattr(convs[0], "resi_ratio", 0.0)
        with torch.device("meta"):
            vq = cls(replace(cfg, share_quant_resi=share, quant_resi=ratio))
        state = {k: v for k, v in quantize.state_dict().items() if not k.endswith("ema_vocab_hit_SV")}
        vq.load_state_dict(state, strict=True, assign=True)
        return vq

    @classmethod
    def from_vqvae_state(cls, cfg: VARConfig, state: dict) -> "VQInput":
        """Built from a ``VQVAE`` state dict (its ``quantize.*`` entries; the rest is the decoder)."""
        vq = cls(cfg)
        vq.load_state_dict({k[len("quantize."):]: v for k, v in state.items()
                            if k.startswith("quantize.") and not k.endswith("ema_vocab_hit_SV")})
        return vq

    def next_autoregressive_input(self, step: int, f_hat: torch.Tensor, h: torch.Tensor):
        """Add scale ``step``'s embedded tokens ``h [B, Cvae, pn, pn]`` to ``f_hat`` (bicubic up to
        the last scale, then the residual convolution); return ``f_hat`` and the next scale's
        input (area down-sampling of ``f_hat``), or ``f_hat`` twice after the last scale."""
        pn, S = self.patch_nums, len(self.patch_nums)
        at = step / (S - 1) if S > 1 else 0.0
        if step != S - 1:
            f_hat = f_hat + self.quant_resi[at](F.interpolate(h, size=(pn[-1], pn[-1]), mode="bicubic"))
            return f_hat, F.interpolate(f_hat, size=(pn[step + 1], pn[step + 1]), mode="area")
        f_hat = f_hat + self.quant_resi[at](h)
        return f_hat, f_hat
