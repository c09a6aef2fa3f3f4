"""SparVAR inside the official Infinity and VAR code, training-free, in two strengths.

``patch(model)`` makes the self-attention of an official ``Infinity`` or ``VAR`` model run the
plan at generation time; everything else is the model's own: its q/k normalisation and per-head
scale, its RoPE (its own ``apply_rotary_emb``, with the scale index it is given), its KV cache by
concatenation. The layer index is the block's position in the model; the scale index is read
off the KV cache (how many tokens it held before this call), which every inference path fills,
so it does not depend on ``scale_ind`` reaching the attention. A generation starts when a
layer's cache is empty: its CS4A state is dropped then. Training forwards (a mask, or no cache)
and flash layouts run the original code. ``unpatch(model)`` restores it.

``accelerate(model, vae)`` hands the model's weights (shared, not copied) to the project's own
network and generation path (``sparvar.generation``): one KV cache, CUDA graphs per scale, the
plan's kernels. Its ``generate`` takes the official call's prompts or labels, guidance and
sampling options.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparvar.reference import Schedule, SparsityPlan, default_plan

from .capture import CalibrationWriter, RecordingDispatcher, estimate_bytes
from .configs import find_config
from .dispatch import StepDispatcher
from .errors import SparvarError
from .generation import GenerationResult, NextScaleGenerator
from .infinity_net import InfinityConfig, InfinityNet, TextCondition
from .layers import project_qkv
from .models import MODELS
from .var_net import VARConfig, VARNet, VQInput

__all__ = ["patch", "unpatch", "accelerate", "AcceleratedModel", "capture"]

_PATCH = "_sparvar_patch"


def _family(model) -> str:
    name = type(model).__name__
    if name == "Infinity" and hasattr(model, "unregistered_blocks") and hasattr(model, "rope2d_freqs_grid"):
        return "infinity"
    if name in ("VAR", "VARHF") and hasattr(model, "blocks") and hasattr(model, "patch_nums"):
        return "var"
    raise SparvarError(f"expected an official Infinity model (infinity.models.infinity.Infinity) or VAR model "
                       f"(models.var.VAR) from FoundationVision's code, got {type(model).__module__}.{name}")


def _blocks(model, family: str) -> list:
    return [b.sa for b in model.unregistered_blocks] if family == "infinity" else [b.attn for b in model.blocks]


def _preset_name(family: str, depth: int, heads: int) -> str | None:
    for name, p in MODELS.items():
        if p.family == family and p.depth == depth and p.heads == heads:
            return name
    return None


@dataclass
class _PlanSource:
    """Which plan a patched or accelerated model runs: ``"default"`` (the tuned config of this GPU
    for the matching preset and resolution, else the authors' default plan), ``"dense"``, or a
    ``SparsityPlan``."""

    spec: str | SparsityPlan
    family: str
    depth: int
    heads: int
    writer: CalibrationWriter | None = None

    def dispatcher(self, schedule: Schedule) -> StepDispatcher:
        if self.writer is not None:
            return RecordingDispatcher(None, schedule, writer=self.writer)
        if isinstance(self.spec, SparsityPlan):
            return StepDispatcher(self.spec, schedule)
        if self.spec == "dense":
            return StepDispatcher(None, schedule)
        if self.spec != "default":
            raise SparvarError(f"plan must be 'default', 'dense' or a SparsityPlan, got {self.spec!r}")
        name = _preset_name(self.family, self.depth, self.heads)
        if name is not None:
            h, w = schedule.pixel_hw
            choice = find_config(name, h, w)
            if choice.config is not None and choice.config.plan.num_scales == schedule.num_scales:
                return StepDispatcher(choice.config.plan, schedule, kernels=choice.config.kernels)
        return StepDispatcher(default_plan(schedule, self.depth), schedule)


class _Patched:
    def __init__(self, model, family: str, plan):
        self.family = family
        self.attns = _blocks(model, family)
        self.source = _PlanSource(plan, family, len(self.attns), self.attns[0].num_heads)
        self._dispatchers: dict = {}

    def dispatcher(self, grids: tuple) -> StepDispatcher:
        d = self._dispatchers.get(grids)
        if d is None:
            d = self._dispatchers[grids] = self.source.dispatcher(Schedule(grids))
        return d

    def step_of(self, schedule: Schedule, cached: int) -> int:
        if cached not in schedule.offsets[:-1]:
            raise SparvarError(f"the KV cache holds {cached} tokens, which is no scale boundary of {list(schedule.grids)}")
        return schedule.offsets.index(cached)

    def attend(self, layer: int, grids: tuple, cached_before: int, q, k, v, scale: float) -> torch.Tensor:
        dispatcher = self.dispatcher(grids)
        step = self.step_of(dispatcher.schedule, cached_before)
        if step == 0:
            dispatcher.drop_state(layer)
        dtype = v.dtype
        return dispatcher(layer, step, q.to(dtype), k.to(dtype), v, scale)


def _append_to_cache(attn, k: torch.Tensor, v: torch.Tensor):
    """The official KV cache (concatenation along the tokens): ``(tokens held before, k, v)``."""
    if attn.cached_k is None:
        attn.cached_k, attn.cached_v = k, v
        return 0, k, v
    cached = attn.cached_k.shape[2]
    attn.cached_k = torch.cat((attn.cached_k, k), dim=2)
    attn.cached_v = torch.cat((attn.cached_v, v), dim=2)
    return cached, attn.cached_k, attn.cached_v


def _infinity_forward(sa, layer: int, patch: _Patched, original):
    basic = sys.modules[type(sa).__module__]

    def forward(x, attn_bias_or_two_vector, attn_fn=None, scale_schedule=None, rope2d_freqs_grid=None, scale_ind=0):
        if not sa.caching or attn_bias_or_two_vector is not None or sa.using_flash or scale_schedule is None:
            return original(x, attn_bias_or_two_vector, attn_fn, scale_schedule, rope2d_freqs_grid, scale_ind)
        B, L, C = x.shape
        q, k, v = project_qkv(sa, x)
        if sa.cos_attn:
            scale_mul = sa.scale_mul_1H11.clamp_max(sa.max_scale_mul).exp()
            q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul).contiguous()
            k = F.normalize(k, dim=-1, eps=1e-12).contiguous()
            v = v.contiguous()
        else:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if rope2d_freqs_grid is not None:
            q, k = basic.apply_rotary_emb(q, k, scale_schedule, rope2d_freqs_grid, sa.pad_to_multiplier,
                                          sa.rope2d_normalized_by_hw, scale_ind)
        cached, k, v = _append_to_cache(sa, k, v)
        grids = tuple((h, w) for _, h, w in scale_schedule)
        out = patch.attend(layer, grids, cached, q, k, v, sa.scale)
        return sa.proj_drop(sa.proj(out.transpose(1, 2).reshape(B, L, C)))
    return forward


def _var_forward(attn, layer: int, patch: _Patched, original, patch_nums):
    grids = tuple((p, p) for p in patch_nums)

    def forward(x, attn_bias):
        if not attn.caching or attn_bias is not None or attn.using_flash or attn.using_xform:
            return original(x, attn_bias)
        B, L, C = x.shape
        q, k, v = project_qkv(attn, x)
        if attn.attn_l2_norm:
            scale_mul = attn.scale_mul_1H11.clamp_max(attn.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        cached, k, v = _append_to_cache(attn, k, v)
        out = patch.attend(layer, grids, cached, q, k, v, attn.scale)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, L, C)))
    return forward


def patch(model: nn.Module, plan: str | SparsityPlan = "default") -> nn.Module:
    """Run ``plan`` in the self-attention of an official Infinity or VAR model at generation
    time (module docstring); returns the model. Patching twice replaces the first patch."""
    family = _family(model)
    unpatch(model)
    state = _Patched(model, family, plan)
    for layer, attn in enumerate(state.attns):
        original = attn.forward
        attn.forward = (_infinity_forward(attn, layer, state, original) if family == "infinity"
                        else _var_forward(attn, layer, state, original, model.patch_nums))
    setattr(model, _PATCH, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove ``patch``: every attention runs the model's own code again."""
    state = getattr(model, _PATCH, None)
    if state is not None:
        for attn in state.attns:
            if "forward" in attn.__dict__:
                del attn.forward
        delattr(model, _PATCH)
    return model


class AcceleratedModel:
    """An official model's weights in the project's network and generation path."""

    def __init__(self, family: str, net: nn.Module, vae, plan):
        self.family, self.net, self.vae = family, net, vae
        self.aux = VQInput.from_module(net.cfg, vae.quantize) if family == "var" and vae is not None else None
        self.source = _PlanSource(plan, family, net.cfg.depth, net.cfg.num_heads)
        self._generators: dict = {}

    def _generator(self, grids: tuple, reference_hw=None) -> NextScaleGenerator:
        gen = self._generators.get(grids)
        if gen is None:
            if self.family == "infinity":
                self.net.set_schedule(grids, reference_hw or grids[-1])
            cuda = next(self.net.parameters()).is_cuda
            gen = self._generators[grids] = NextScaleGenerator(
                self.net, Schedule(grids), self.source.dispatcher(Schedule(grids)), self.aux, graphs=cuda)
        elif self.family == "infinity":
            self.net.set_schedule(grids, reference_hw or grids[-1])
        return gen

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        return self._generate_infinity(*args, **kwargs) if self.family == "infinity" else \
            self._generate_var(*args, **kwargs)

    def _generate_infinity(self, label_B_or_BLT, scale_schedule, cfg_list, tau_list, g_seed=None, top_k=0,
                           top_p=0.0, reference_hw=None, skip_last: int = 0) -> GenerationResult:
        """The official ``autoregressive_infer_cfg`` arguments that matter at inference (guidance on
        the logits, bit labels): ``label_B_or_BLT = (kv_compact, lens, cu_seqlens, max_len)``,
        ``scale_schedule`` as ``(1, h, w)``, per-scale ``cfg_list`` and ``tau_list``. Returns the
        tokens and summed codes (``vae.decode(result.features.squeeze(-3))`` gives the image)."""
        kv, lens, cu, max_len = label_B_or_BLT
        grids = tuple((h, w) for _, h, w in scale_schedule)
        gen = self._generator(grids, reference_hw)
        self.net.tau = list(tau_list)
        top_k = min(top_k, 2) if top_k > 0 else 0
        return gen.generate(TextCondition(kv, list(lens), cu, max_len), seed=g_seed, cfg=list(cfg_list), top_k=top_k,
                            top_p=top_p, skip_last=skip_last)

    def _generate_var(self, B: int, label_B, g_seed=None, cfg=1.5, top_k=0, top_p=0.0, skip_last: int = 0):
        """The official ``VAR.autoregressive_infer_cfg(B, label_B, g_seed, cfg, top_k, top_p)``: the
        image in [0, 1] when the VQ-VAE was given, else the generation result."""
        if isinstance(label_B, int):
            label_B = torch.full((B,), self.net.cfg.num_classes if label_B < 0 else label_B,
                                 device=next(self.net.parameters()).device)
        grids = tuple((p, p) for p in self.net.cfg.patch_nums)
        result = self._generator(grids).generate(label_B, seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p,
                                                 skip_last=skip_last)
        if self.vae is None:
            return result
        return self.vae.fhat_to_img(result.features).add_(1).mul_(0.5)


def accelerate(model: nn.Module, vae=None, plan: str | SparsityPlan = "default") -> AcceleratedModel:
    """The project's generation path over an official model's weights (shared with it: nothing is
    copied). ``vae``: VAR's ``VQVAE`` (its codebook and residual convolutions feed the next scale;
    its decoder makes the image); Infinity's bit codes need no VAE parameters."""
    family = _family(model)
    if family == "infinity":
        if not (model.use_bit_label and not model.apply_spatial_patchify and model.rope2d_normalized_by_hw == 2
                and hasattr(model.unregistered_blocks[0], "ada_gss") and model.num_block_chunks > 1):
            raise SparvarError("accelerate supports Infinity as its inference script builds it (bit labels, no "
                               "spatial patchify, rope2d_normalized_by_hw=2, shared AdaLN, block chunks)")
        cfg = InfinityConfig(depth=model.depth, embed_dim=model.C, num_heads=model.num_heads,
                             text_channels=model.Ct5, text_maxlen=model.text_maxlen, codebook_dim=model.codebook_dim,
                             mlp_ratio=model.mlp_ratio, norm_eps=model.norm_eps, block_chunks=model.num_block_chunks,
                             add_lvl_embeding_only_first_block=bool(model.add_lvl_embeding_only_first_block))
        with torch.device("meta"):
            net = InfinityNet(cfg)
        state = InfinityNet.map_official_keys(model.state_dict())
    else:
        if vae is None:
            raise SparvarError("accelerate(VAR model) needs its VQVAE: vae=... (the codebook feeds every next scale)")
        block = model.blocks[0]
        cfg = VARConfig(depth=model.depth, embed_dim=model.C, num_heads=model.num_heads,
                        patch_nums=tuple(model.patch_nums), num_classes=model.num_classes, Cvae=model.Cvae,
                        vocab_size=model.V, attn_l2_norm=block.attn.attn_l2_norm, shared_aln=block.shared_aln,
                        mlp_ratio=block.ffn.fc1.out_features / model.C, norm_eps=block.ln_wo_grad.eps)
        with torch.device("meta"):
            net = VARNet(cfg)
        state = model.state_dict()
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise SparvarError(f"the model's weights do not fit the project's network: missing {missing[:6]}")
    net.load_state_dict({k: state[k] for k in own}, strict=True, assign=True)
    # Inference only: no autograd bookkeeping (the official model's own parameters keep theirs).
    net.eval().requires_grad_(False)
    return AcceleratedModel(family, net, vae, plan)


def capture(model: nn.Module, runs, folder, schedule: Schedule, *, layers=None, steps=None, batch: int = 2,
            model_name: str = "official") -> Path:
    """Calibration data from an official model: ``runs`` are callables, each one generation of
    the model (one sample each); the attention inputs of ``layers`` (default: first, middle, last)
    at ``steps`` (default: the last four scales, what the semantic search reads) are written to
    ``folder`` as they come, under the dense plan. Prints the size it will take first."""
    family = _family(model)
    attns = _blocks(model, family)
    depth = len(attns)
    layers = sorted(set(layers if layers is not None else (0, depth // 2, depth - 1)))
    S = schedule.num_scales
    steps = sorted(steps if steps is not None else range(max(0, S - 4), S))
    runs = list(runs)
    size = estimate_bytes(schedule, layers, steps, len(runs), batch, attns[0].num_heads, attns[0].head_dim)
    print(f"capturing {len(runs)} samples x {len(layers)} layers x {len(steps)} scales: about {size / 2**30:.2f} GiB "
          f"in {folder}", flush=True)
    writer = CalibrationWriter(folder, schedule, layers, steps, scale=float(attns[0].scale), model=model_name,
                               samples=len(runs))
    patch(model, plan="dense")
    state = getattr(model, _PATCH)
    state.source.writer = writer
    try:
        for i, run in enumerate(runs):
            writer.sample = i
            run()
    finally:
        unpatch(model)
    return Path(folder)
