"""Building a generation pipeline for a model preset: its network (seeded random weights, or a
checkpoint), its schedule, the plan's dispatcher with the tuned config of this GPU, and the
conditioning (``sparvar generate`` and ``sparvar bench e2e`` use it).

Without a text encoder or published weights on the machine, prompts are stood in for by seeded
random T5-shaped features (Infinity) and classes by labels (VAR); the transformer's work, which is
what SparVAR changes, is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sparvar.reference import Schedule, SparsityPlan, infinity_schedule

from .checkpoints import load_state
from .configs import find_config, load_config_file
from .dispatch import StepDispatcher
from .errors import SparvarError
from .generation import NextScaleGenerator
from .infinity_net import InfinityConfig, InfinityNet, TextCondition
from .models import ModelPreset, get_model, model_plan, parse_resolution, resolve_schedule
from .small import load_small
from .var_net import VARConfig, VARNet, VQInput

__all__ = ["Pipeline", "build_pipeline", "resolve_plan", "infinity_reference_grid", "TINY_INFINITY"]

#: The CPU preset's network: an Infinity-style stack with the tiny model's shapes (depth 4,
#: 2 heads of 16 channels, an FFN of 256), 8-bit codes and 128-channel text features.
TINY_INFINITY = InfinityConfig(depth=4, embed_dim=32, num_heads=2, text_channels=128, text_maxlen=32,
                               codebook_dim=8, block_chunks=2, mlp_ratio=8.0)


@dataclass
class Pipeline:
    preset: ModelPreset
    schedule: Schedule
    net: torch.nn.Module
    generator: NextScaleGenerator
    plan: SparsityPlan | None
    plan_source: str
    #: Summed codes -> images in [0, 1], for a model with a decoder (``small``).
    decoder: Callable | None = None
    #: A model with pseudo-classes (``small``): their text features ``[K, T, Ct5]``.
    classes: torch.Tensor | None = None

    def condition(self, seed: int, batch: int = 1):
        """Seeded conditioning: ``batch`` seeded pseudo-classes (``small``), else stand-ins:
        prompts of 16-32 random T5-shaped rows (Infinity) or class labels (VAR)."""
        g = torch.Generator().manual_seed(seed)
        device = next(self.net.parameters()).device
        if self.classes is not None:
            labels = torch.randint(0, self.classes.shape[0], (batch,), generator=g)
            return TextCondition.from_features([self.classes[c].to(device, self.net.pos_start.dtype) for c in labels])
        if isinstance(self.net, VARNet):
            return torch.randint(0, self.net.cfg.num_classes, (batch,), generator=g).to(device)
        dtype = next(self.net.parameters()).dtype
        feats = [torch.randn(int(torch.randint(16, 33, (1,), generator=g)), self.net.cfg.text_channels, generator=g)
                 for _ in range(batch)]
        return TextCondition.from_features([f.to(device, dtype) for f in feats])


def resolve_plan(spec: str, preset: ModelPreset, height: int, width: int, schedule: Schedule):
    """``dense`` (no sparse step), ``default`` (the tuned config of this GPU, else the authors'
    defaults) or a file: a tuned config or a plan JSON. Returns ``(plan or None, kernels, source)``."""
    if spec == "dense":
        return None, {}, "dense attention at every step"
    if spec == "default":
        choice = find_config(preset.name, height, width)
        if choice.config is not None:
            return choice.config.plan, choice.config.kernels, choice.reason
        return model_plan(preset, schedule), {}, "the authors' default plan, kernels' default configs"
    path = Path(spec)
    if not path.is_file():
        raise SparvarError(f"--plan must be dense, default or a plan/config file; {spec} is not a file")
    text = path.read_text()
    if '"schema_version"' in text:
        config = load_config_file(path)
        return config.plan, config.kernels, f"tuned config {path}"
    try:
        plan = SparsityPlan.from_json(text)
    except ValueError as e:
        raise SparvarError(f"{path}: {e}") from None
    if plan.num_scales != schedule.num_scales or plan.depth != preset.depth:
        raise SparvarError(f"{path}: the plan is for {plan.num_scales} scales and depth {plan.depth}; "
                           f"{preset.name} at {height}x{width} has {schedule.num_scales} and {preset.depth}")
    return plan, {}, f"plan file {path}"


def infinity_reference_grid(height: int, width: int) -> tuple[int, int]:
    """The grid Infinity's RoPE positions are scaled to: the last 1M grid of the image's aspect ratio."""
    return infinity_schedule(f"{height / width:.3f}", "1M").grids[-1]


def _net(preset: ModelPreset, schedule: Schedule, resolution: tuple[int, int]):
    if preset.family == "var":
        cfg = VARConfig.preset(preset.depth, patch_nums=[h for h, _ in schedule.grids])
        return VARNet(cfg), VQInput(cfg)
    cfg = TINY_INFINITY if preset.family == "tiny" else InfinityConfig.preset(preset.name)
    net = InfinityNet(cfg)
    if preset.family == "tiny":
        reference = schedule.grids[-1]
    else:
        reference = infinity_reference_grid(*resolution)
    net.set_schedule(schedule.grids, reference)
    return net, None


def _load_weights(net: torch.nn.Module, path: str) -> None:
    p = Path(path)
    if not p.is_file():
        raise SparvarError(f"--weights {path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise SparvarError(f"--weights {path} cannot be read: {type(e).__name__}: {e}") from None
    if isinstance(net, InfinityNet):
        state = InfinityNet.map_official_keys(state)
    load_state(net, state, f"--weights {path}")


def build_pipeline(model: str, resolution: str | None = None, *, plan: str = "default", weights: str | None = None,
                   seed: int = 0, device: str | None = None, dtype: torch.dtype | None = None,
                   graphs: bool | None = None) -> Pipeline:
    """Network, schedule and dispatcher for ``model`` at ``resolution``; weights from ``weights``
    or seeded random; bf16 with CUDA graphs on a GPU, fp32 in the interpreter on the CPU."""
    preset = get_model(model)
    h, w = parse_resolution(resolution, preset)
    schedule = resolve_schedule(preset, h, w)
    the_plan, kernels, source = resolve_plan(plan, preset, h, w, schedule)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(seed)
    decoder = classes = None
    if preset.family == "small":
        # Trained weights (the shipped file unless --weights names another), never random.
        small = load_small(weights)
        net, aux, decoder, classes = small.net, None, small.tokenizer.to(device).decode, small.classes
        net.set_schedule(schedule.grids, schedule.grids[-1])
    else:
        # Initialised on the device itself: an 8B network's random init on the CPU takes minutes.
        with torch.device(device):
            net, aux = _net(preset, schedule, (h, w))
        if weights is not None:
            _load_weights(net, weights)
    net = net.to(device, dtype).eval()
    if isinstance(net, InfinityNet):
        net.rope = net.rope.to(device)
    if aux is not None:
        aux = aux.to(device, dtype).eval()
    dispatcher = StepDispatcher(the_plan, schedule, kernels=kernels)
    gen = NextScaleGenerator(net, schedule, dispatcher, aux, graphs=device == "cuda" if graphs is None else graphs)
    return Pipeline(preset, schedule, net, gen, the_plan, source, decoder, classes)
