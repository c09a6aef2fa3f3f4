"""patch / unpatch / accelerate on official Infinity and VAR models (``../shared/upstream``),
small and randomly initialised: the same tokens as the unpatched model under the dense plan, the
reference's attention at the plan's sparse steps, shared weights, clear refusals."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from sparvar import integrations
from sparvar.dispatch import Backend, StepDispatcher, run_step
from sparvar.errors import SparvarError
from sparvar.infinity_net import InfinityConfig, TextCondition
from sparvar.reference import CS4AState, StepKind, default_plan, infinity_schedule
from assertions import assert_close
from test_infinity_net import official_infinity
from test_var_net import CFG as VAR_CFG, official_var, recorded

INF = InfinityConfig(depth=4, embed_dim=64, num_heads=2, text_channels=128, text_maxlen=16, codebook_dim=8,
                     block_chunks=2)
SCHEDULE = infinity_schedule("1.000", "0.06M")


def infinity_run(model, quantizer, text, logits):
    decoded = []
    vae = SimpleNamespace(quantizer=quantizer, decode=lambda z: (decoded.append(z.clone()), z[:, :3])[1])
    model.get_logits = recorded(type(model).get_logits.__get__(model), logits)
    S = SCHEDULE.num_scales
    model.autoregressive_infer_cfg(
        vae=vae, scale_schedule=[(1, h, w) for h, w in SCHEDULE.grids], label_B_or_BLT=text.as_tuple(), B=2,
        g_seed=5, cfg_list=[3.0] * S, tau_list=[1.0] * S, top_k=900, top_p=0.97, returns_vemb=1,
        cfg_insertion_layer=[0], vae_type=1, ret_img=True, inference_mode=True)
    return decoded[0]


def text_condition():
    g = torch.Generator().manual_seed(1)
    return TextCondition.from_features([torch.randn(n, INF.text_channels, generator=g) for n in (5, 9)])


def test_patched_infinity_with_the_dense_plan_generates_the_same_tokens():
    model, quantizer = official_infinity(INF)
    text = text_condition()
    plain, patched = [], []
    codes = infinity_run(model, quantizer, text, plain)
    integrations.patch(model, plan="dense")
    assert infinity_run(model, quantizer, text, patched).equal(codes)
    assert all(a.equal(b) for a, b in zip(plain, patched))
    integrations.unpatch(model)
    assert all("forward" not in b.sa.__dict__ for b in model.unregistered_blocks)


def test_patched_infinity_runs_the_reference_semantics_at_sparse_steps():
    model, quantizer = official_infinity(INF)
    # Layers 0-1 run CS4A, layers 2-3 CSLA.
    plan = replace(default_plan(SCHEDULE, INF.depth), bound_layer=1)
    integrations.patch(model, plan=plan)
    calls = []
    original = StepDispatcher.__call__

    def spy(self, layer, step, q, k, v, scale=1.0):
        out = original(self, layer, step, q, k, v, scale)
        calls.append((layer, step, q, k, v, out, self.state(layer)))
        return out
    StepDispatcher.__call__ = spy
    try:
        infinity_run(model, quantizer, text_condition(), [])
    finally:
        StepDispatcher.__call__ = original
    kinds = {plan.kind(layer, step) for layer, step, *_ in calls}
    assert {StepKind.CSLA, StepKind.CS4A_DECIDE, StepKind.CS4A_SPARSE} <= kinds
    for layer, step, q, k, v, out, state in calls:
        kind = plan.kind(layer, step)
        if kind == StepKind.DENSE:
            continue
        ref_state = None if kind != StepKind.CS4A_SPARSE else CS4AState(
            state.decision_scale, state.kept.long(), state.residual.double())
        want = run_step(kind, q.double(), k.double(), v.double(), SCHEDULE, step, plan, 1.0, ref_state,
                        backend=Backend.REFERENCE)[0]
        assert_close(f"layer {layer} step {step} ({kind})", out, want, torch.float32)


def test_accelerated_infinity_equals_the_official_model_and_shares_its_weights():
    model, quantizer = official_infinity(INF)
    text = text_condition()
    logits = []
    codes = infinity_run(model, quantizer, text, logits)
    fast = integrations.accelerate(model, plan="dense")
    assert fast.net.head.weight.data_ptr() == model.head.weight.data_ptr()
    assert fast.net.blocks[3].sa.mat_qkv.weight.data_ptr() == model.block_chunks[1].module[1].sa.mat_qkv.weight.data_ptr()
    ours = []
    fast.net.logits = recorded(fast.net.logits, ours)
    S = SCHEDULE.num_scales
    result = fast.generate(text.as_tuple(), [(1, h, w) for h, w in SCHEDULE.grids], [3.0] * S, [1.0] * S, g_seed=5,
                           top_k=900, top_p=0.97, reference_hw=infinity_schedule("1.000", "1M").grids[-1])
    for step, (a, b) in enumerate(zip(ours, logits)):
        assert_close(f"logits at scale {step}", a, b, torch.float32)
    assert_close("summed codes", result.features.squeeze(-3), codes, torch.float32)


@pytest.mark.gpu
def test_gpu_accelerated_infinity_with_bf16_blocks_repeats_under_graphs():
    """Set up as the inference script does (bf16 blocks, the rest fp32): the CUDA graphs the
    first generation captures replay every later one exactly. Autocast's cast cache once freed
    the bf16 copies of fp32 weights those graphs read: NaN from the second generation on."""
    model, _ = official_infinity(INF)
    model.cuda()
    for block in model.unregistered_blocks:
        block.bfloat16()
    fast = integrations.accelerate(model, plan="dense")
    kv, lens, cu, max_len = text_condition().as_tuple()
    S = SCHEDULE.num_scales
    runs = [fast.generate((kv.cuda(), lens, cu.cuda(), max_len), [(1, h, w) for h, w in SCHEDULE.grids], [3.0] * S,
                          [1.0] * S, g_seed=5, top_k=900, top_p=0.97,
                          reference_hw=infinity_schedule("1.000", "1M").grids[-1]) for _ in range(3)]
    gen = next(iter(fast._generators.values()))
    assert gen.graphs and gen._graphs and not gen.capture_failures
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run.tokens, runs[0].tokens))
        assert torch.equal(run.features, runs[0].features)
    assert torch.isfinite(runs[0].features).all()


def test_var_patch_and_accelerate_match_the_official_model():
    var, vae = official_var(VAR_CFG)
    labels = torch.tensor([3, 7])
    image = var.autoregressive_infer_cfg(B=2, label_B=labels, g_seed=11, cfg=1.5, top_k=20, top_p=0.9)
    integrations.patch(var, plan="dense")
    assert torch.equal(var.autoregressive_infer_cfg(B=2, label_B=labels, g_seed=11, cfg=1.5, top_k=20, top_p=0.9),
                       image)
    integrations.unpatch(var)
    fast = integrations.accelerate(var, vae, plan="dense")
    assert fast.net.head.weight.data_ptr() == var.head.weight.data_ptr()
    assert_close("image", fast.generate(2, labels, g_seed=11, cfg=1.5, top_k=20, top_p=0.9), image, torch.float32)


def test_unsupported_models_are_refused_with_one_line():
    with pytest.raises(SparvarError, match="expected an official Infinity model .* got torch.nn.modules.linear.Linear"):
        integrations.patch(torch.nn.Linear(2, 2))
    var, _ = official_var(VAR_CFG)
    with pytest.raises(SparvarError, match="needs its VQVAE"):
        integrations.accelerate(var)


def test_captured_calibration_is_read_by_the_autotuner(tmp_path):
    from sparvar.autotune.quality import load_calibration
    from sparvar.cli import main

    folder = tmp_path / "calib"
    assert main(["capture", "--model", "tiny", "--out", str(folder), "--samples", "2"]) == 0
    from sparvar.models import get_model, resolve_schedule
    preset = get_model("tiny")
    data = load_calibration(folder, resolve_schedule(preset, 128, 128), preset.depth)
    assert sorted(data["layers"]) == [0, 2, 3]
    q = data["layers"][0][5]["q"]
    assert q.dtype == torch.bfloat16 and q.shape == (4, 2, 64, 16)  # 2 samples x CFG 2
    assert main(["capture", "--model", "tiny", "--out", str(folder)]) == 2  # an existing folder is not overwritten


def test_capture_from_an_official_model(tmp_path):
    from sparvar.autotune.quality import load_calibration

    model, quantizer = official_infinity(INF)
    text = text_condition()
    folder = integrations.capture(model, [lambda: infinity_run(model, quantizer, text, [])] * 2, tmp_path / "c",
                                  SCHEDULE, layers=[1, 3])
    data = load_calibration(folder, SCHEDULE, INF.depth)
    assert sorted(data["layers"]) == [1, 3] and data["layers"][3][6]["k"].shape[2] == SCHEDULE.num_keys(6)
    assert "forward" not in model.unregistered_blocks[0].sa.__dict__
