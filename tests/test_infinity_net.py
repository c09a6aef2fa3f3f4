"""The project's Infinity network against the official Infinity code
(``../shared/upstream/Infinity``), both randomly initialised with one state dict, on the official
inference path (fused AdaLN norms, which carry the scale index to RoPE; guidance on the logits):
the same logits at every scale and the same bits (the summed codes the decoder gets) under the
dense plan."""

import importlib
from types import SimpleNamespace

import pytest
import torch

from sparvar.checkpoints import load_state
from sparvar.dispatch import StepDispatcher
from sparvar.generation import NextScaleGenerator
from sparvar.infinity_net import InfinityConfig, InfinityNet, TextCondition
from sparvar.reference import infinity_schedule
from assertions import assert_close
from test_var_net import recorded
import upstream

D_BITS = 8


def official_infinity(cfg: InfinityConfig, seed: int = 0):
    inf_mod, _, bsq = upstream.infinity_modules()
    # The inference script's fused norms, run as plain PyTorch: torch.compile would only add
    # minutes of compilation on the CPU.
    fused_op = importlib.import_module("infinity.models.fused_op")
    inf_mod.fused_ada_layer_norm = fused_op.fused_ada_layer_norm._torchdynamo_orig_callable
    torch.manual_seed(seed)
    quantizer = bsq.MultiScaleBSQ(dim=cfg.codebook_dim, codebook_size=2 ** cfg.codebook_dim)
    model = inf_mod.Infinity(
        vae_local=SimpleNamespace(embed_dim=cfg.codebook_dim, quantizer=quantizer), text_channels=cfg.text_channels,
        text_maxlen=cfg.text_maxlen, shared_aln=True, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, block_chunks=cfg.block_chunks, fused_norm=True,
        customized_flash_attn=False, add_lvl_embeding_only_first_block=int(cfg.add_lvl_embeding_only_first_block),
        use_bit_label=1, rope2d_each_sa_layer=1, rope2d_normalized_by_hw=2, pn="0.06M", inference_mode=True,
        train_h_div_w_list=[1.0], cos_attn=True)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    model.rng = torch.Generator(device="cpu")
    return model.eval(), quantizer


@pytest.mark.parametrize("lvl_first_only", [True, False])
def test_infinity_logits_and_bits_match_the_official_model(lvl_first_only):
    cfg = InfinityConfig(depth=4, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=16,
                         codebook_dim=D_BITS, block_chunks=2, add_lvl_embeding_only_first_block=lvl_first_only)
    model, quantizer = official_infinity(cfg)
    net = InfinityNet(cfg).eval()
    load_state(net, InfinityNet.map_official_keys(model.state_dict()), "the official Infinity state dict")
    schedule = infinity_schedule("1.000", "0.06M")
    g = torch.Generator().manual_seed(1)
    text = TextCondition.from_features([torch.randn(n, cfg.text_channels, generator=g) for n in (5, 9)])
    theirs, ours, decoded = [], [], []
    model.get_logits = recorded(model.get_logits, theirs)
    vae = SimpleNamespace(quantizer=quantizer, decode=lambda z: (decoded.append(z.clone()), z[:, :3])[1])
    S = schedule.num_scales
    model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=[(1, h, w) for h, w in schedule.grids], label_B_or_BLT=text.as_tuple(), B=2,
        g_seed=5, cfg_list=[3.0] * S, tau_list=[1.0] * S, top_k=900, top_p=0.97, returns_vemb=1,
        cfg_insertion_layer=[0], vae_type=1, ret_img=True, inference_mode=True)
    net.set_schedule(schedule.grids, infinity_schedule("1.000", "1M").grids[-1])
    net.logits = recorded(net.logits, ours)
    result = NextScaleGenerator(net, schedule, StepDispatcher(None, schedule)).generate(
        text, seed=5, cfg=3.0, top_k=900, top_p=0.97)
    assert len(ours) == len(theirs) == S
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert_close(f"logits at scale {step}", a, b, torch.float32)
    assert_close("summed codes", result.features.squeeze(-3), decoded[0], torch.float32)
