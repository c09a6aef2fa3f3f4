"""The generation path's fused block kernels (``sparvar.kernels.fused``) against their eager twins
(Triton's interpreter, fp32, outputs poisoned with NaN so an element never written fails), and the
fused Infinity blocks against the unfused ones in whole generations."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sparvar.infinity_net import rope_table
from sparvar.kernels import launch
from sparvar.kernels.fused import add_norm, add_norm_reference, qkv_heads, qkv_heads_reference
from sparvar.pipeline import build_pipeline


# The kernels run on the GPU where there is one, else in Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(launch, "poison_outputs", True)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@given(B=st.integers(1, 3), L=st.integers(1, 9), C=st.sampled_from([16, 48, 100, 128]),
       parts=st.sampled_from(["norm", "add", "add_gate", "affine", "add_gate_modulate", "all"]),
       seed=st.integers(0, 2**31 - 1))
@example(B=2, L=3, C=100, parts="all", seed=0)  # channels not a power of two: the padded lanes stay out
def test_add_norm_matches_its_twin(B, L, C, parts, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(B, L, C, generator=g) * 3, torch.randn(B, L, C, generator=g)
    gss = torch.randn(B, 1, 6, C, generator=g)  # strided per-sample vectors, as the blocks pass them
    x, y, gss = x.to(DEVICE), y.to(DEVICE), gss.to(DEVICE)
    kw = {}
    if parts != "norm" and parts != "affine":
        kw["y"] = y
    if "gate" in parts or parts == "all":
        kw["gamma"] = gss[:, 0, 1]
    if parts in ("affine", "all"):
        kw.update(weight=torch.randn(C, generator=g).to(DEVICE), bias=torch.randn(C, generator=g).to(DEVICE))
    if "modulate" in parts or parts == "all":
        kw.update(scale=gss[:, 0, 2], shift=gss[:, 0, 4])
    x_before = x.clone()
    got = add_norm(x, **kw, eps=1e-6, out_dtype=torch.float32)
    want = add_norm_reference(x, **kw, eps=1e-6, out_dtype=torch.float32)
    _close(got[0], want[0])
    _close(got[1], want[1])
    if "y" in kw:
        assert torch.equal(x, x_before), "x is an input: the sum goes to a new tensor"


@given(B=st.integers(1, 2), L=st.integers(1, 7), H=st.integers(1, 5), D=st.sampled_from([16, 32]),
       cos=st.booleans(), rope=st.booleans(), lo=st.integers(0, 5), seed=st.integers(0, 2**31 - 1))
@example(B=2, L=6, H=3, D=16, cos=True, rope=True, lo=3, seed=1)  # heads not a power of two, slots mid-cache
def test_qkv_heads_matches_its_twin_and_writes_only_its_slots(B, L, H, D, cos, rope, lo, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3 * H * D, generator=g).to(DEVICE)
    q_bias, v_bias, scale_mul = (torch.randn(n, generator=g).to(DEVICE) for n in (H * D, H * D, H))
    scale_mul[0] = 9.0  # above the clamp
    total = lo + L + 2
    table = rope_table([(1, 1), (total - 1, 1)], (total, 1), D).to(DEVICE) if rope else None
    kw = dict(scale_mul=scale_mul if cos else None, max_log_scale=math.log(100), rope=table, rope_row0=lo)
    caches = [torch.full((2, B, H, total, D), 7.0, device=DEVICE) for _ in range(2)]
    got = qkv_heads(qkv, q_bias, v_bias, caches[0][0, :, :, lo:lo + L], caches[0][1, :, :, lo:lo + L], **kw)
    want = qkv_heads_reference(qkv, q_bias, v_bias, caches[1][0, :, :, lo:lo + L], caches[1][1, :, :, lo:lo + L],
                               **kw)
    _close(got, want)
    _close(caches[0], caches[1])  # the slots hold k and v; every other row is still 7
    assert (caches[0][:, :, :, :lo] == 7).all() and (caches[0][:, :, :, lo + L:] == 7).all()


def test_fused_inputs_are_checked_with_one_line():
    x = torch.randn(2, 3, 16, device=DEVICE)
    with pytest.raises(ValueError, match="gamma must hold one row of 16 channels per sample"):
        add_norm(x, x.clone(), torch.randn(3, 16, device=DEVICE), eps=1e-6, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="x must be a contiguous float32"):
        add_norm(x.double(), eps=1e-6, out_dtype=torch.float32)
    with pytest.raises(ValueError, match="weight and bias come together"):
        add_norm(x, weight=torch.ones(16, device=DEVICE), eps=1e-6, out_dtype=torch.float32)
    k, z = torch.zeros(2, 1, 3, 16, device=DEVICE), torch.zeros(16, device=DEVICE)
    with pytest.raises(ValueError, match=r"qkv must be a contiguous \[2, 3, 48\] tensor"):
        qkv_heads(torch.zeros(2, 3, 40, device=DEVICE), z, z, k, k.clone())
    with pytest.raises(ValueError, match="rope must be a contiguous fp32"):
        qkv_heads(torch.zeros(2, 3, 48, device=DEVICE), z, z, k, k.clone(), rope=torch.zeros(2, 2, 8, device=DEVICE))


@pytest.fixture
def fp32_cross_attention(monkeypatch):
    """Both paths attend to the text in fp32 (by default fp32 inputs attend in bf16, whose kernels
    round differently for the per-prompt and the padded batch layouts)."""
    from sparvar.infinity_net import _CrossAttention

    monkeypatch.setattr(_CrossAttention, "attend_in_bf16", False)


def _randomized(pipe):
    """Weights of a size that makes every layer matter (the default init leaves some small)."""
    torch.manual_seed(0)
    for p in pipe.net.parameters():
        p.data.normal_(0, 0.2)
    return pipe


@pytest.mark.parametrize("plan", ["dense", "default"])
def test_fused_blocks_generate_what_the_unfused_blocks_do(plan, fp32_cross_attention):
    """Same seed, same weights: the fused blocks give the unfused blocks' logits at every scale and
    sample the same tokens (fp32), under the dense and the default sparse plan."""
    runs = []
    for fused in (False, True):
        pipe = _randomized(build_pipeline("tiny", plan=plan, seed=4, device=DEVICE, dtype=torch.float32,
                                          graphs=False))
        pipe.net.fused, logits = fused, []
        real = pipe.net.logits
        pipe.net.logits = lambda x, state, real=real: logits.append(real(x, state)) or logits[-1]
        result = pipe.generator.generate(pipe.condition(4), seed=4, cfg=3.0, top_k=900, top_p=0.97)
        runs.append((logits, result))
    for a, b in zip(runs[0][0], runs[1][0]):
        _close(b, a)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].tokens, runs[1][1].tokens))
    torch.testing.assert_close(runs[1][1].features, runs[0][1].features, rtol=1e-5, atol=1e-5)


def test_fused_cross_attention_pads_prompts_of_different_lengths(fp32_cross_attention):
    """Prompts of different lengths: one call over padded keys with a mask gives the per-prompt
    attention of ``forward``."""
    from sparvar.infinity_net import TextCondition

    pipe = _randomized(build_pipeline("tiny", plan="dense", seed=2, device=DEVICE, dtype=torch.float32,
                                      graphs=False))
    pipe.net.fused = True
    g = torch.Generator().manual_seed(0)
    text = TextCondition.from_features([torch.randn(n, pipe.net.cfg.text_channels, generator=g).to(DEVICE)
                                        for n in (5, 9)])
    _, state = pipe.net.begin(text)
    assert state["ca_mask"] is not None
    h = torch.randn(4, 6, pipe.net.cfg.embed_dim, generator=g).to(DEVICE)
    for layer, block in enumerate(pipe.net.blocks):
        want = block.ca(h, state["text"], state["bounds"])
        got = block.ca.attend_text(h, state["ca_k"][layer], state["ca_v"][layer], state["ca_mask"])
        _close(got, want)


@pytest.mark.parametrize("l2_norm, shared_aln", [(True, False), (False, True)])
def test_fused_var_blocks_give_the_unfused_logits_and_tokens(l2_norm, shared_aln):
    """A small VAR network (cosine or plain attention, own or shared AdaLN): the fused blocks give
    the unfused blocks' logits at every scale and the same tokens (fp32, dense plan)."""
    from sparvar.dispatch import StepDispatcher
    from sparvar.generation import NextScaleGenerator
    from sparvar.reference import Schedule
    from sparvar.var_net import VARConfig, VARNet, VQInput

    cfg = VARConfig(depth=2, embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4), num_classes=10, Cvae=8,
                    vocab_size=64, attn_l2_norm=l2_norm, shared_aln=shared_aln)
    torch.manual_seed(0)
    net, vq = VARNet(cfg).eval().to(DEVICE), VQInput(cfg).eval().to(DEVICE)
    for p in net.parameters():  # weights of a size that makes every layer matter
        p.data.normal_(0, 0.2)
    schedule = Schedule.from_sides(cfg.patch_nums)
    runs = []
    for fused in (False, True):
        net.fused, logits = fused, []
        real = net.logits
        net.logits = lambda x, state, real=real: logits.append(real(x, state)) or logits[-1]
        result = NextScaleGenerator(net, schedule, StepDispatcher(None, schedule), vq).generate(
            torch.tensor([3, 7], device=DEVICE), seed=11, cfg=1.5, top_k=20, top_p=0.9)
        del net.logits
        runs.append((logits, result))
    for a, b in zip(runs[0][0], runs[1][0]):
        _close(b, a)
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].tokens, runs[1][1].tokens))


def test_a_schedule_keeps_its_rope_table():
    """CUDA graphs captured for a schedule read its RoPE table's memory: setting the schedule again
    (``accelerate`` does it at every call) must give the same table, never an equal new one."""
    pipe = build_pipeline("tiny", plan="dense", seed=0, device="cpu", dtype=torch.float32, graphs=False)
    net, grids = pipe.net, pipe.schedule.grids
    first = net.rope
    net.set_schedule(grids[:-1], grids[-2])
    assert net.rope is not first
    net.set_schedule(grids, grids[-1])
    assert net.rope is first
