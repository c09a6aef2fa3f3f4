"""The project's VAR network against the official VAR code (``../shared/upstream/VAR``), both
randomly initialised with one state dict: the same logits at every scale, the same tokens and the
same image under the dense plan."""

import pytest
import torch

from sparvar import e2e
from sparvar.checkpoints import load_state
from sparvar.dispatch import StepDispatcher
from sparvar.errors import SparvarError
from sparvar.generation import NextScaleGenerator
from sparvar.reference import Schedule
from sparvar.var_net import VARConfig, VARNet, VQInput
from assertions import assert_close
import upstream

CFG = VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4), num_classes=10, Cvae=8, vocab_size=64)


def official_var(cfg: VARConfig, seed: int = 0):
    upstream.var_modules()  # skips, with the reason, where the official sources are missing
    torch.manual_seed(seed)
    var, vae = e2e.official_var(cfg, "cpu", vae_channels=32)
    # Random weights of a size that makes every layer matter (the official init zeroes the gates).
    for m in (var, vae.quantize):
        for p in m.parameters():
            p.data.normal_(0, 0.2)
    return var, vae


def recorded(fn, into: list):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        into.append(out.clone())
        return out
    return wrapper


def test_var_logits_tokens_and_image_match_the_official_model():
    var, vae = official_var(CFG)
    net = VARNet(CFG).eval()
    load_state(net, var.state_dict(), "the official VAR state dict")
    vq = VQInput.from_vqvae_state(CFG, vae.state_dict()).eval()
    labels = torch.tensor([3, 7])
    theirs, ours = [], []
    var.get_logits = recorded(var.get_logits, theirs)
    image = var.autoregressive_infer_cfg(B=2, label_B=labels, g_seed=11, cfg=1.5, top_k=20, top_p=0.9)
    net.logits = recorded(net.logits, ours)
    schedule = Schedule.from_sides(CFG.patch_nums)
    result = NextScaleGenerator(net, schedule, StepDispatcher(None, schedule), vq).generate(
        labels, seed=11, cfg=1.5, top_k=20, top_p=0.9)
    assert len(ours) == len(theirs) == schedule.num_scales
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(f"logits at scale {step}", a, b, torch.float32)
    assert_close("image", vae.fhat_to_img(result.features).add_(1).mul_(0.5), image, torch.float32)


def test_a_checkpoint_that_does_not_fit_is_named():
    var, _ = official_var(CFG)
    state = var.state_dict()
    state["head.weight"] = state["head.weight"][:, :32]
    del state["pos_start"]
    with pytest.raises(SparvarError, match=r"missing: pos_start; wrong shape: head.weight \(64, 32\) \(expected \(64, 64\)\)"):
        load_state(VARNet(CFG), state, "the checkpoint")
