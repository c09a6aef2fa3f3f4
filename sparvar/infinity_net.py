"""The Infinity architecture (FoundationVision/Infinity ``infinity/models/infinity.py``, ``basic.py``)
at inference, as its inference script builds it: cosine self-attention with the learned per-head
scale and 2-D rotary positions across scales, cross-attention to text embeddings, shared AdaLN,
the FFN, the bit-wise (BSQ) head and the next-scale input path.

Parameter names are the official ones with one documented key map (``from_official_state``):
the official model registers its blocks in chunks (``block_chunks.<c>.module.<j>.``), this one
as ``blocks.<c * chunk + j>.``. Text conditioning is given as the official packed form:
``(kv_compact [N, Ct5], lens, cu_seqlens [B+1], max_len)`` of T5 features.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparvar.kernels.fused import add_norm

from .generation import sample_top_k_top_p
from .layers import FFN, AdaLNBeforeHead, SelfAttention, adaln_modulate, add_pending

__all__ = ["InfinityConfig", "InfinityNet", "TextCondition", "rope_table", "bits_to_codes", "accumulate_codes",
           "token_scales"]


@dataclass(frozen=True)
class InfinityConfig:
    """Shapes and switches of an Infinity model. Presets: Infinity-2B (depth 32, width 2048, 16
    heads) and -8B (depth 40, width 3584, 28 heads), with the inference script's settings:
    shared AdaLN, 8 block chunks, 32-bit BSQ codes predicted bit by bit, T5-XL text features
    (2048 channels), 2-D RoPE with positions scaled to the 1M grid (``rope2d_normalized_by_hw=2``)."""

    depth: int
    embed_dim: int
    num_heads: int
    text_channels: int = 2048
    text_maxlen: int = 512
    codebook_dim: int = 32
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    block_chunks: int = 8
    add_lvl_embeding_only_first_block: bool = True
    rope_base: float = 10000.0

    @classmethod
    def preset(cls, name: str) -> "InfinityConfig":
        shapes = {"infinity-2b": (32, 2048, 16), "infinity-8b": (40, 3584, 28)}
        if name not in shapes:
            raise ValueError(f"Infinity preset must be one of {list(shapes)}, got {name!r}")
        depth, width, heads = shapes[name]
        return cls(depth=depth, embed_dim=width, num_heads=heads)


def rope_table(grids, reference_hw: tuple[int, int], head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """``[2, L, head_dim // 2]`` cos and sin of every token of ``grids`` (raster order, scales
    concatenated): half of each head's pairs rotate with the row, half with the column, where a
    token ``(y, x)`` of an ``h x w`` grid sits at ``round(y * H / h), round(x * W / w)`` on the
    ``reference_hw = (H, W)`` grid (Infinity's last 1M grid: positions of every scale on one
    scale), frequencies ``base ** (-2i / (head_dim / 2))``."""
    half = head_dim // 2
    if half % 2:
        raise ValueError(f"2-D rotary positions need head_dim divisible by 4, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    H, W = reference_hw
    rows = []
    for h, w in grids:
        y = (torch.arange(h) * (H / h)).reshape(h, 1).expand(h, w)
        x = (torch.arange(w) * (W / w)).reshape(1, w).expand(h, w)
        pos = torch.stack([y, x], dim=-1).round().int().reshape(-1, 2).float()
        rows.append(torch.cat([torch.outer(pos[:, 0], inv_freq), torch.outer(pos[:, 1], inv_freq)], dim=-1))
    angles = torch.cat(rows)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of ``t [B, H, L, D]`` by ``table [2, L, D // 2]`` (fp32)."""
    dtype = t.dtype
    pairs = t.float().reshape(*t.shape[:-1], -1, 2)
    cos, sin = table[0], table[1]
    out = torch.stack([cos * pairs[..., 0] - sin * pairs[..., 1], sin * pairs[..., 0] + cos * pairs[..., 1]], dim=-1)
    return out.reshape(t.shape).to(dtype)


def bits_to_codes(bits: torch.Tensor, codebook_dim: int) -> torch.Tensor:
    """BSQ bits ``[..., d]`` -> codes ``(2 * bit - 1) / sqrt(d)``, L2-normalised (as the VAE's
    quantizer computes them)."""
    scale = 1 / math.sqrt(codebook_dim)
    return F.normalize(bits * scale * 2 - scale, dim=-1)


@dataclass
class TextCondition:
    """T5 features in the official packed form: rows of all prompts ``[N, Ct5]``, each prompt's
    length, ``cu_seqlens [B+1]`` (int32) and the longest length."""

    kv_compact: torch.Tensor
    lens: list[int]
    cu_seqlens: torch.Tensor
    max_len: int

    @classmethod
    def from_features(cls, features: list[torch.Tensor]) -> "TextCondition":
        lens = [f.shape[0] for f in features]
        cu = F.pad(torch.tensor(lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
        return cls(torch.cat(features), lens, cu.to(features[0].device), max(lens))

    def as_tuple(self):
        return self.kv_compact, self.lens, self.cu_seqlens, self.max_len


class _CrossAttention(nn.Module):
    """Queries against the keys and values of their own prompt's text rows. ``for_attn_pool``:
    one learned query per prompt (``mat_q`` a parameter), giving the start token. Like the
    official code (whose flash-attention kernel needs half precision) it computes in bf16 and
    returns fp32 when given fp32 (``attend_in_bf16``)."""

    #: fp32 inputs attend in bf16, as in the official code. bf16 attention kernels round
    #: differently with the batch layout (one call per prompt here, one padded call in
    #: ``attend_text``), so tests that compare the two paths exactly turn this off.
    attend_in_bf16 = True

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.for_attn_pool = num_heads, embed_dim // num_heads, for_attn_pool
        self.scale = 1 / math.sqrt(self.head_dim)
        if for_attn_pool:
            q = torch.empty(1, num_heads, self.head_dim)
            nn.init.trunc_normal_(q, mean=0, std=math.sqrt(1 / embed_dim / 3))
            self.mat_q = nn.Parameter(q)
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, embed_dim * 2, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor | None, kv_compact: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
        """``bounds``: the prompts' row offsets in ``kv_compact`` (``cu_seqlens`` on the host, so
        that nothing here waits for the GPU and a CUDA graph can capture it)."""
        H, D = self.num_heads, self.head_dim
        kv = self._project_text(kv_compact)
        if self.for_attn_pool:
            B, Lq = len(bounds) - 1, 1
            q = self.mat_q.repeat(B, 1, 1).to(kv.dtype)
        else:
            B, Lq = x.shape[:2]
            q = self.mat_q(x).view(-1, H, D)
        cast = q.dtype == torch.float32 and self.attend_in_bf16
        if cast:
            q, kv = q.to(torch.bfloat16), kv.to(torch.bfloat16)
        out = []
        for b in range(B):
            qs = q[b * Lq:(b + 1) * Lq].transpose(0, 1)
            k, v = kv[bounds[b]:bounds[b + 1]].unbind(1)
            out.append(F.scaled_dot_product_attention(qs, k.transpose(0, 1), v.transpose(0, 1),
                                                      scale=self.scale).transpose(0, 1))
        o = torch.cat(out).reshape(B, Lq, -1)
        return self.proj(o.float() if cast else o)

    def _project_text(self, kv_compact: torch.Tensor) -> torch.Tensor:
        """Text rows ``[N, C_kv]`` -> keys and values ``[N, 2, H, D]`` (the key bias is zero)."""
        return F.linear(kv_compact, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias))).view(
            kv_compact.shape[0], 2, self.num_heads, self.head_dim)

    def text_kv(self, kv_compact: torch.Tensor, bounds: tuple[int, ...]):
        """Keys and values of every prompt, computed once per generation for the fused path:
        ``k, v [B, H, max_len, D]`` (prompts padded to the longest) and a key mask
        ``[B, 1, 1, max_len]`` (``None`` when all prompts have the same length, as with guidance
        for one prompt)."""
        H, D = self.num_heads, self.head_dim
        kv = self._project_text(kv_compact)
        lens = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]
        B, n = len(lens), max(lens)
        if min(lens) == n:
            k, v = kv.view(B, n, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
            return k, v, None
        padded = kv.new_zeros(B, n, 2, H, D)
        mask = torch.zeros(B, 1, 1, n, dtype=torch.bool, device=kv.device)
        for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            padded[b, :hi - lo] = kv[lo:hi]
            mask[b, ..., :hi - lo] = True
        k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v, mask

    def attend_text(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """The fused path's cross-attention: all prompts in one call over ``text_kv``'s keys."""
        B, Lq, C = h.shape
        q = self.mat_q(h).view(B, Lq, self.num_heads, self.head_dim).transpose(1, 2)
        cast = q.dtype == torch.float32 and self.attend_in_bf16
        if cast:
            q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale).transpose(1, 2)
        return self.proj(o.reshape(B, Lq, C).float() if cast else o.reshape(B, Lq, C))


class _RMSNorm(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(C))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True).add_(self.eps)) * self.weight).to(x.dtype)


class _TextAttentivePool(nn.Module):
    def __init__(self, Ct5: int, D: int):
        super().__init__()
        head_dim = 64 if D > 4096 else 128
        self.ca = _CrossAttention(D, Ct5, Ct5 // head_dim, for_attn_pool=True)

    def forward(self, kv_compact: torch.Tensor, bounds: tuple[int, ...]) -> torch.Tensor:
        return self.ca(None, kv_compact, bounds).squeeze(1)


class _SharedAdaLin(nn.Linear):
    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).reshape(-1, 1, 6, self.weight.shape[0] // 6)


class InfinityBlock(nn.Module):
    """``CrossAttnBlock`` at inference (the fused-norm path the inference script takes)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.sa = SelfAttention(C, cfg.num_heads, cos_attn=True)
        self.ca = _CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio / 256) * 256)
        self.ln_wo_grad = nn.LayerNorm(C, elementwise_affine=False, eps=cfg.norm_eps)
        self.ca_norm = nn.LayerNorm(C, elementwise_affine=True, eps=cfg.norm_eps)
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, C) / C ** 0.5)

    def forward(self, x: torch.Tensor, cond: dict, attend) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + cond["gss"]).unbind(2)
        q, k, v = self.sa.qkv(adaln_modulate(self.ln_wo_grad, x.float(), scale1, shift1))
        q, k = apply_rope(q, cond["rope"]), apply_rope(k, cond["rope"])
        x = x + self.sa.out(attend(q, k, v, self.sa.scale)).mul_(gamma1)
        x = x + self.ca(self.ca_norm(x), cond["text"], cond["bounds"]).float()
        return x + self.ffn(adaln_modulate(self.ln_wo_grad, x.float(), scale2, shift2)).mul(gamma2)

    def forward_fused(self, x: torch.Tensor, pending, cond: dict, attn, layer: int):
        """``forward`` with the elementwise chains fused (``sparvar.kernels.fused``): ``x``
        ``[B, L, C]`` fp32 contiguous; ``pending`` the previous block's gated FFN output
        ``(y, gamma)`` (added here, in this block's first pass) or ``None``; ``attn`` the
        layer's ``LayerAttention``. Returns ``(x, pending)`` for the next block."""
        g = cond["gss_layers"][layer][:, 0]  # [B, 6, C]: gamma1, gamma2, scale1, scale2, shift1, shift2
        eps, dtype = self.ln_wo_grad.eps, self.sa.mat_qkv.weight.dtype
        y, gy = pending if pending is not None else (None, None)
        x, h = add_norm(x, y, gy, scale=g[:, 2], shift=g[:, 4], eps=eps, out_dtype=dtype)
        q = self.sa.fused_q(h, attn, rope=cond["rope_all"])
        x, h = add_norm(x, self.sa.out(attn.attend(q, self.sa.scale)), g[:, 0], weight=self.ca_norm.weight,
                        bias=self.ca_norm.bias, eps=self.ca_norm.eps, out_dtype=dtype)
        ca_k, ca_v, ca_mask = cond["ca_k"][layer], cond["ca_v"][layer], cond.get("ca_mask")
        x, h = add_norm(x, self.ca.attend_text(h, ca_k, ca_v, ca_mask), None, scale=g[:, 3], shift=g[:, 5], eps=eps,
                        out_dtype=dtype)
        return x, (self.ffn(h), g[:, 1])


class InfinityNet(nn.Module):
    """The Infinity transformer for one schedule family. ``reference_hw`` is the grid RoPE
    positions are scaled to (the last grid of the aspect ratio's 1M schedule)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        if cfg.depth % cfg.block_chunks:
            raise ValueError(f"depth {cfg.depth} is not a multiple of block_chunks {cfg.block_chunks}")
        self.cfg = cfg
        C, Ct5, d = cfg.embed_dim, cfg.text_channels, cfg.codebook_dim
        init_std = math.sqrt(1 / C / 3)
        g = torch.Generator().manual_seed(0)
        # Drawn on the CPU from a fixed seed (the official initial value), whatever the device.
        uncond = torch.empty(cfg.text_maxlen, Ct5, device="cpu")
        nn.init.trunc_normal_(uncond, std=1.2, generator=g)
        self.cfg_uncond = nn.Parameter(uncond / Ct5 ** 0.5)
        self.text_norm = _RMSNorm(Ct5, cfg.norm_eps)
        self.text_proj_for_sos = _TextAttentivePool(Ct5, C)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.pos_start = nn.Parameter(torch.empty(1, 1, C))
        self.lvl_embed = nn.Embedding(15, C)
        for p in (self.pos_start, self.lvl_embed.weight):
            nn.init.trunc_normal_(p.data, mean=0, std=init_std)
        self.word_embed = nn.Linear(d, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), _SharedAdaLin(C, 6 * C))
        self.blocks = nn.ModuleList([InfinityBlock(cfg) for _ in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * d)
        self.rope: torch.Tensor | None = None
        self._rope_tables: dict = {}
        self.grids: tuple = ()
        self.tau = 1.0
        #: Run the blocks' elementwise chains as fused kernels (``InfinityBlock.forward_fused``):
        #: ``None`` (default) does where the weights are on a GPU (on the CPU the interpreter would
        #: only make them slow). The official modules' equivalence is checked on the unfused path,
        #: and the fused path against it.
        self.fused: bool | None = None

    @property
    def use_fused(self) -> bool:
        return self.fused if self.fused is not None else self.pos_start.is_cuda

    @classmethod
    def map_official_keys(cls, state: dict) -> dict:
        """The official chunked block names -> ``blocks.<i>.`` (the one key map), other names as
        they are."""
        chunks = {int(m.group(1)) for k in state if (m := re.match(r"block_chunks\.(\d+)\.module\.", k))}
        per = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"block_chunks\.\d+\.module\.(\d+)\.", k))),
                      default=-1)
        out = {}
        for k, v in state.items():
            m = re.match(r"block_chunks\.(\d+)\.module\.(\d+)\.(.*)", k)
            out[f"blocks.{int(m.group(1)) * per + int(m.group(2))}.{m.group(3)}" if m and chunks else k] = v
        return out

    def set_schedule(self, grids, reference_hw: tuple[int, int]) -> None:
        """The schedule to generate (RoPE positions of every token). Each schedule's table is made
        once and kept: CUDA graphs captured for a schedule read its table's memory, so a table
        is never replaced by an equal new one (whose old memory another tensor would then reuse)."""
        self.grids = tuple(tuple(g) for g in grids)
        key = (self.grids, tuple(reference_hw), self.pos_start.device)
        table = self._rope_tables.get(key)
        if table is None:
            table = self._rope_tables[key] = rope_table(
                self.grids, reference_hw, self.cfg.embed_dim // self.cfg.num_heads,
                self.cfg.rope_base).to(self.pos_start.device)
        self.rope = table

    # The generation loop's steps (sparvar.generation.NextScaleGenerator).
    def begin(self, text: TextCondition):
        """Prompts -> the first scale's input ``[2B, 1, C]`` (conditional rows, then unconditional)
        and the conditioning; the unconditional prompt is ``cfg_uncond`` cut to each length."""
        if self.rope is None:
            raise ValueError("call set_schedule(grids, reference_hw) before generating")
        uncond = torch.cat([self.cfg_uncond[:n] for n in text.lens]).to(text.kv_compact.dtype)
        x, state = self.condition(torch.cat((text.kv_compact, uncond)), list(text.lens) * 2)
        if self.use_fused:
            # What the fused blocks read at every scale but depends only on the prompts: each
            # block's AdaLN vectors and cross-attention keys and values, made once here.
            state["gss_layers"] = torch.stack([(b.ada_gss + state["gss"]).float() for b in self.blocks])
            k, v, mask = zip(*(b.ca.text_kv(state["text"], state["bounds"]) for b in self.blocks))
            state.update(ca_k=torch.stack(k), ca_v=torch.stack(v), ca_mask=mask[0])
        return x, state

    def condition(self, kv_compact: torch.Tensor, lens: list[int]):
        """Text rows of ``len(lens)`` prompts -> their start tokens ``[B, 1, C]`` and the
        conditioning the blocks read (pooled text, AdaLN vectors, projected text rows and their
        bounds). ``begin`` calls it with the unconditional prompts appended; training without them."""
        kv = self.text_norm(kv_compact)
        bounds = tuple(sum(lens[:i]) for i in range(len(lens) + 1))
        cond = self.text_proj_for_sos(kv, bounds)
        x = cond.unsqueeze(1) + self.pos_start
        gss = self.shared_ada_lin(cond.float()).float().contiguous()
        return x, {"cond": cond, "gss": gss, "text": self.text_proj_for_ca(kv), "bounds": bounds}

    def block_cond(self, state: dict, step: int) -> dict:
        lo = sum(h * w for h, w in self.grids[:step])
        return {**state, "rope": self.rope[:, lo: lo + self.grids[step][0] * self.grids[step][1]], "rope_all": self.rope,
                "step": step}

    def _add_level(self, x: torch.Tensor, step: int) -> torch.Tensor:
        return x + self.lvl_embed.weight[step]

    def run_blocks(self, x: torch.Tensor, cond: dict, attend_for) -> torch.Tensor:
        """The blocks in their chunks: the level embedding is added before every chunk (or only
        the first, ``add_lvl_embeding_only_first_block``), as the official loop does."""
        per = self.cfg.depth // self.cfg.block_chunks
        pending = None  # the fused blocks' deferred gated FFN branch
        if self.use_fused:
            x = x.float().contiguous()
        for i, block in enumerate(self.blocks):
            if i % per == 0 and (i == 0 or not self.cfg.add_lvl_embeding_only_first_block):
                x, pending = self._add_level(add_pending(x, pending), cond["step"]), None
            if self.use_fused:
                x, pending = block.forward_fused(x, pending, cond, attend_for(i), i)
            else:
                x = block(x, cond, attend_for(i))
        return add_pending(x, pending)

    def logits(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.head(self.head_nm(x.float(), state["cond"].float()))

    def guide(self, logits: torch.Tensor, step: int, cfg: float) -> torch.Tensor:
        """Guidance on the logits (the inference script's ``cfg_insertion_layer=0``) after the
        temperature ``tau`` (one value, or one per scale): ``cfg * cond + (1 - cfg) * uncond``."""
        logits = logits.mul(1 / (self.tau[step] if isinstance(self.tau, (list, tuple)) else self.tau))
        B = logits.shape[0] // 2
        return cfg * logits[:B] + (1 - cfg) * logits[B:]

    def sample(self, logits: torch.Tensor, generator, top_k: int, top_p: float) -> torch.Tensor:
        """Each bit of each token is a two-way choice: ``[B, l, 2d]`` -> bits ``[B, l, d]``."""
        B, l, _ = logits.shape
        return sample_top_k_top_p(logits.reshape(B, -1, 2), generator, top_k, top_p).reshape(B, l, -1)

    def next_input(self, step: int, bits: torch.Tensor, aux, carry):
        """Bits of ``step`` -> ``(next scale's input [2B, l, C] or None, summed codes)``: codes are
        summed on the last grid (trilinear), and the sum, resampled to the next grid, is the input."""
        nxt, carry = self.next_features(step, bits, carry)
        return (None if nxt is None else self.word_embed(nxt).repeat(2, 1, 1)), carry

    def next_features(self, step: int, bits: torch.Tensor, carry):
        """``next_input`` before the embedding: ``(next scale's features [B, l, d] or None, carry)``."""
        carry = accumulate_codes(carry, bits, self.grids[step], self.grids[-1], self.cfg.codebook_dim)
        if step == len(self.grids) - 1:
            return None, carry
        B, d = bits.shape[0], self.cfg.codebook_dim
        nxt = F.interpolate(carry, size=(1, *self.grids[step + 1]), mode="trilinear").squeeze(-3)
        return nxt.reshape(B, d, -1).permute(0, 2, 1), carry

    def forward(self, text: TextCondition, bits: list[torch.Tensor], attend=None) -> torch.Tensor:
        """Teacher forcing (training, and the oracle of the generation loop): the logits
        ``[B, L, 2d]`` of every scale of the schedule given the bits ``[B, h*w, d]`` of every scale
        (the last scale's bits are not read), all scales in one pass with each scale attending to
        itself and the scales before it. ``attend(q, k, v, scale)`` defaults to SDPA with that
        block-causal mask; the training script passes a faster one with the same mask."""
        if self.rope is None:
            raise ValueError("call set_schedule(grids, reference_hw) before running the network")
        if len(bits) != len(self.grids):
            raise ValueError(f"bits: expected one tensor per scale ({len(self.grids)}), got {len(bits)}")
        x, state = self.condition(text.kv_compact, list(text.lens))
        inputs, carry = [x], None
        for step in range(len(self.grids) - 1):
            nxt, carry = self.next_features(step, bits[step], carry)
            inputs.append(self.word_embed(nxt))
        x = torch.cat(inputs, dim=1)
        level = token_scales(self.grids, x.device)
        if attend is None:
            mask = level[:, None] >= level[None, :]

            def attend(q, k, v, scale):
                return F.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask, scale=scale)
        cond = {**state, "rope": self.rope}
        per = self.cfg.depth // self.cfg.block_chunks
        for i, block in enumerate(self.blocks):
            if i % per == 0 and (i == 0 or not self.cfg.add_lvl_embeding_only_first_block):
                x = x + self.lvl_embed(level)
            x = block(x, cond, attend)
        return self.logits(x, state)


def token_scales(grids, device=None) -> torch.Tensor:
    """The scale index of every token of ``grids`` (raster order, scales concatenated), ``[L]``:
    teacher forcing's block-causal rule is ``scales[query] >= scales[key]``."""
    sizes = torch.tensor([h * w for h, w in grids], device=device)
    return torch.repeat_interleave(torch.arange(len(grids), device=device), sizes)


def accumulate_codes(carry: torch.Tensor | None, bits: torch.Tensor, hw: tuple[int, int], last_hw: tuple[int, int],
                     codebook_dim: int) -> torch.Tensor:
    """``carry + `` the codes of ``bits [B, h*w, d]`` on the ``hw`` grid resampled to the last grid
    (trilinear, as the official VAE sums them): the summed codes ``[B, d, 1, H, W]``. A scale on
    the last grid is added as it is."""
    (h, w), (H, W) = hw, last_hw
    B = bits.shape[0]
    codes = bits_to_codes(bits.reshape(B, h, w, codebook_dim).unsqueeze(1).unsqueeze(-2), codebook_dim).squeeze(-2)
    codes = codes.permute(0, 4, 1, 2, 3)  # [B, d, 1, h, w]
    if (h, w) != (H, W):
        codes = F.interpolate(codes, size=(1, H, W), mode="trilinear")
    return codes if carry is None else carry + codes
