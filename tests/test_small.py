"""The trained model's pieces: teacher forcing (training's forward) against the generation loop,
the tokenizer's quantisation against the network's code sums, and the shipped weights file."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparvar.dispatch import StepDispatcher
from sparvar.errors import SparvarError
from sparvar.generation import NextScaleGenerator
from sparvar.infinity_net import InfinityConfig, InfinityNet, TextCondition, accumulate_codes
from sparvar.small import DEFAULT_WEIGHTS, SMALL_CONFIG, SmallModel, load_small, save_small
from sparvar.tokenizer import PatchTokenizer
from sparvar.reference import Schedule
from assertions import assert_close
from test_var_net import recorded

CFG = InfinityConfig(depth=4, embed_dim=32, num_heads=2, text_channels=128, text_maxlen=6, codebook_dim=8,
                     block_chunks=2, mlp_ratio=8.0)
SCHEDULE = Schedule([(1, 1), (2, 2), (3, 3), (5, 5)], name="test")


def _net(seed=0, lvl_first_only=True):
    torch.manual_seed(seed)
    cfg = InfinityConfig(**{**CFG.__dict__, "add_lvl_embeding_only_first_block": lvl_first_only})
    net = InfinityNet(cfg).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.3)
    net.set_schedule(SCHEDULE.grids, SCHEDULE.grids[-1])
    for block in net.blocks:
        block.ca.attend_in_bf16 = False  # exact comparison of two fp32 paths
    net.text_proj_for_sos.ca.attend_in_bf16 = False
    return net


@pytest.mark.parametrize("lvl_first_only", [True, False])
def test_teacher_forcing_gives_the_generation_loops_logits(lvl_first_only):
    """``InfinityNet.forward`` on the generated bits gives, at every scale, the logits the KV-cached
    loop computed for the conditional rows (and, with the unconditional prompt, for those rows):
    training optimises exactly what generation runs."""
    net = _net(lvl_first_only=lvl_first_only)
    g = torch.Generator().manual_seed(1)
    text = TextCondition.from_features([torch.randn(n, CFG.text_channels, generator=g) for n in (3, 6)])
    logits = []
    net.logits = recorded(net.logits, logits)
    result = NextScaleGenerator(net, SCHEDULE, StepDispatcher(None, SCHEDULE)).generate(text, seed=2, cfg=2.0)
    del net.logits
    full = torch.cat(logits, dim=1)  # [2B, L, 2d]
    with torch.no_grad():
        cond = net(text, result.tokens)
        uncond = net(TextCondition.from_features([net.cfg_uncond[:n] for n in text.lens]), result.tokens)
    assert_close("teacher-forced logits, conditional rows", cond, full[:2], torch.float32)
    assert_close("teacher-forced logits, unconditional rows", uncond, full[2:], torch.float32)


def test_teacher_forcing_checks_its_inputs():
    net = _net()
    text = TextCondition.from_features([torch.randn(2, CFG.text_channels)])
    with pytest.raises(ValueError, match="one tensor per scale"):
        net(text, [torch.zeros(1, 1, CFG.codebook_dim)])


def _images(seed, n=2, side=20):
    g = torch.Generator().manual_seed(seed)
    # Smooth images (sums of low-frequency waves) with a little noise: like photographs, most of
    # their variance lies in a few patch components.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    imgs = []
    for _ in range(n):
        c = torch.rand(3, 4, generator=g)
        img = torch.stack([0.5 + 0.25 * torch.sin(6 * c[i, 0] * xx + 5 * c[i, 1] * yy + 6 * c[i, 2]) for i in range(3)])
        imgs.append(img + 0.02 * torch.randn(3, side, side, generator=g))
    return torch.stack(imgs).clamp(0, 1)


GRIDS = [(1, 1), (2, 2), (3, 3), (5, 5)]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2 ** 16), d=st.sampled_from([4, 8, 12]))
def test_tokenizer_codes_sum_like_the_network(seed, d):
    """Encoding gives per scale 0/1 bits of the grid's size; summing their codes the network's
    way (``accumulate_codes``) and decoding is ``reconstruct``; the fitted components are
    orthonormal, and ``fit`` keeps the scale whose reconstruction it measured best."""
    images = _images(seed)
    tok, tried = PatchTokenizer.fit(images, 4, d, GRIDS, scales=(0.5, 1.0, 2.0))
    assert torch.allclose(tok.basis.T @ tok.basis, torch.eye(d), atol=1e-4)
    bits = tok.encode(images, GRIDS)
    carry = None
    for (h, w), b in zip(GRIDS, bits):
        assert b.shape == (2, h * w, d) and set(b.unique().tolist()) <= {0.0, 1.0}
        carry = accumulate_codes(carry, b, (h, w), GRIDS[-1], d)
    rec = tok.decode(carry)
    assert rec.shape == images.shape and 0 <= rec.min() and rec.max() <= 1
    assert torch.equal(rec, tok.reconstruct(images, GRIDS))
    psnr = 10 * math.log10(1 / (rec - images).pow(2).mean().item())
    assert psnr == pytest.approx(max(tried.values()), abs=1e-3)


def test_tokenizer_reconstructs_better_than_its_mean():
    """On smooth images the quantised reconstruction is far closer than the mean colour (a
    tokenizer that dropped its codes would not be)."""
    images = _images(7, n=4)
    tok, tried = PatchTokenizer.fit(images, 4, 8, GRIDS)
    mean_only = (images - images.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean().item()
    rec = (tok.reconstruct(images, GRIDS) - images).pow(2).mean().item()
    assert rec < mean_only / 4


def test_tokenizer_refuses_wrong_shapes():
    tok = PatchTokenizer(4, 8)
    with pytest.raises(ValueError, match="multiples of the patch 4"):
        tok.features(torch.zeros(1, 3, 18, 20))
    with pytest.raises(ValueError, match="last grid"):
        tok.encode(torch.zeros(1, 3, 20, 20), [(1, 1), (4, 4)])
    with pytest.raises(ValueError, match="codebook_dim must be in"):
        PatchTokenizer(2, 13)


def test_small_file_round_trip_and_errors(tmp_path):
    """A saved small model loads back equal (network in bf16); a file of another kind, or none,
    is one clear error."""
    torch.manual_seed(0)
    net = InfinityNet(SMALL_CONFIG)
    tok = PatchTokenizer(4, SMALL_CONFIG.codebook_dim)
    classes = torch.randn(3, SMALL_CONFIG.text_maxlen, SMALL_CONFIG.text_channels)
    path = tmp_path / "m.safetensors"
    save_small(path, SmallModel(net, tok, classes, {"classes": ["a", "b", "c"]}))
    back = load_small(path)
    assert back.meta == {"classes": ["a", "b", "c"]} and torch.equal(back.classes, classes)
    for (n, a), (_, b) in zip(net.state_dict().items(), back.net.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), n
    with pytest.raises(SparvarError, match="no such file"):
        load_small(tmp_path / "none.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SparvarError, match="is not a small-model file"):
        load_small(tmp_path / "other.safetensors")


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="the shipped small-model weights are not in this checkout")
def test_shipped_weights_load_and_are_small_enough():
    assert DEFAULT_WEIGHTS.stat().st_size <= 50e6
    model = load_small()
    assert len(model.meta["classes"]) == model.classes.shape[0]
    assert model.meta["training"]["steps"] > 0


def test_small_generates_an_image_on_the_cpu(tmp_path, capsys):
    """``sparvar generate --model small`` decodes to a PNG of the model's resolution."""
    import matplotlib.image

    from sparvar.cli import main

    out = tmp_path / "img.png"
    assert main(["generate", "--model", "small", "--plan", "dense", "--skip-last", "2", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert "small 256x256" in capsys.readouterr().out
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (256, 256) and img[..., :3].std() > 0.01


def test_builtin_calibration_is_the_small_models_own(tmp_path):
    """``--calibration builtin``: the small model's recorded attention, valid for the semantic
    search of ``small`` (shapes checked by ``load_calibration``); another model is told to capture
    its own."""
    from sparvar.autotune.quality import BUILTIN, first_calibration_step, load_calibration
    from sparvar.models import get_model, resolve_schedule

    with pytest.raises(SparvarError, match="capture its own"):
        load_calibration(BUILTIN, resolve_schedule(get_model("tiny"), 128, 128), 4, "tiny")
    schedule = resolve_schedule(get_model("small"), 256, 256)
    cal = load_calibration(BUILTIN, schedule, 12, "small")
    assert sorted(cal["layers"]) == [0, 6, 11] and cal["scale"] == 1.0
    S = schedule.num_scales
    assert sorted(cal["layers"][11]) == list(range(first_calibration_step(S), S))
    q = cal["layers"][11][S - 1]["q"]
    assert q.shape == (2, 3, 64 * 64, 128) and torch.isfinite(q).all()


def test_training_script_runs_and_writes_a_model(tmp_path):
    """``training/train_small.py`` end to end on the CPU: a 2-layer stand-in, two steps on crops of
    two synthetic photographs; the loss is finite and the file is written."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    spec = importlib.util.spec_from_file_location(
        "train_small", Path(__file__).parent.parent / "training" / "train_small.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    g = np.random.default_rng(0)
    sources = tmp_path / "sources.npz"
    np.savez(sources, astronaut=g.integers(0, 255, (300, 320, 3), dtype=np.uint8),
             camera=g.integers(0, 255, (280, 300), dtype=np.uint8))
    out = tmp_path / "m.safetensors"
    train.main(["--sources", str(sources), "--tiny", "--max-steps", "2", "--batch", "1", "--fit-images", "4",
                "--out", str(out)])
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    import json
    training = json.loads(meta["meta"])["training"]
    assert json.loads(meta["meta"])["classes"] == ["astronaut", "camera"] and training["steps"] == 2
    assert math.isfinite(training["log"][0]["loss"])
