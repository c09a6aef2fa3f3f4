"""Kernels against the float64 reference: in Triton's interpreter on the CPU (fp32/fp16), and on
a CUDA GPU (bf16/fp16, ``-m gpu``) at Infinity 1024 shapes."""

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

import sparvar.kernels as K
import sparvar.reference as R
from sparvar.kernels import launch
from assertions import assert_close
from strategies import cs4a_params, csla_params, poison_some, schedules, seeds

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter cannot do bf16 dots.
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setattr(launch, "poison_outputs", True)


# Every value each KernelConfig field accepts (256-slot CSLA tiles need four mask words).
pow2 = st.sampled_from([16, 32, 64, 128, 256])


# On a GPU each new config is a fresh compile of two kernel variants (seconds each): there the
# draws come from a few configs that still span the block sizes, warps and stages.
GPU_CONFIGS = [(64, 64, 4, 3), (128, 32, 8, 2), (256, 128, 8, 1), (16, 256, 4, 2)]


@st.composite
def configs(draw, tiled=False):
    if DEVICE == "cuda":
        bm, bn, warps, stages = draw(st.sampled_from(GPU_CONFIGS))
    else:
        bm, bn, warps, stages = draw(pow2), draw(pow2), draw(st.sampled_from([1, 2, 4, 8, 16])), draw(st.integers(1, 6))
    tw = draw(st.sampled_from([t for t in (1, 2, 4, 8, 16, 32, 64, 128, 256) if t <= bm])) if tiled else 0
    return K.KernelConfig(bm, bn, warps, stages, bm // tw if tiled else 0, tw)


def run_or_refused(fn):
    """``fn()``, or ``None`` when the GPU refuses the config with a named reason (a config too
    large for its shared memory): exact or refused, never silently wrong."""
    try:
        return fn()
    except K.KernelLaunchError as e:
        assert DEVICE == "cuda" and "OutOfResources" in str(e) and "KernelConfig(" in str(e), e
        return None


def make_qkv(schedule, step, B, H, D, dtype, seed, strided=False, device=DEVICE):
    """Inputs in ``dtype`` from the project's one input factory, and their exact float64 copies;
    ``strided`` gives views of [B, L, H, D] storage."""
    out = R.step_inputs(schedule, step, B, H, D, dtype=dtype, seed=seed, token_major=strided)
    out = [t.to(device) for t in out]
    return out, [t.double().cpu() for t in out]


@st.composite
def csla_cases(draw, max_tokens=300):
    s = draw(schedules(max_side=12, max_scales=6, max_tokens=max_tokens))
    return s, draw(st.integers(0, s.num_scales - 1)), draw(csla_params(s.num_scales))


common = dict(bh=st.tuples(st.integers(1, 2), st.integers(1, 2)), D=st.sampled_from([16, 32, 64]),
              dtype=st.sampled_from(DTYPES), seed=seeds, strided=st.booleans())


@given(case=csla_cases(), cfg=configs(tiled=True), **common)
@example(case=(R.Schedule([(1, 1)]), 0, R.CSLAParams(0, ())), cfg=K.KernelConfig(16, 16, 4, 1, 4, 4),
         bh=(1, 1), D=16, dtype=DTYPES[0], seed=0, strided=False)
@example(case=(R.Schedule([(1, 1), (3, 7)]), 1, R.CSLAParams(1, (3,))), cfg=K.KernelConfig(32, 16, 4, 1, 2, 16),
         bh=(2, 1), D=32, dtype=DTYPES[-1], seed=1, strided=True)
@example(case=(R.Schedule([(2, 3), (9, 11)]), 1, R.CSLAParams(1, (5,))), cfg=K.KernelConfig(64, 32, 4, 1, 8, 8),
         bh=(1, 2), D=64, dtype=DTYPES[0], seed=2, strided=False)
# 256 query slots per tile: four mask words per key (slots 128-255 were once read from word 1).
@example(case=(R.Schedule([(1, 1), (4, 4), (16, 16)]), 2, R.CSLAParams(1, (3, 5))),
         cfg=K.KernelConfig(256, 64, 4, 1, 16, 16), bh=(1, 1), D=16, dtype=DTYPES[0], seed=3, strided=False)
def test_csla_kernel_matches_reference(case, cfg, bh, D, dtype, seed, strided):
    s, step, params = case
    (q, k, v), (q64, k64, v64) = make_qkv(s, step, *bh, D, dtype, seed, strided)
    out = run_or_refused(lambda: K.csla_attention(q, k, v, s, step, params, 0.3, config=cfg))
    if out is not None:
        assert_close("csla", out, R.csla_attention(q64, k64, v64, s, step, params, 0.3))


@st.composite
def decision_cases(draw, max_tokens=300):
    s = draw(schedules(max_side=12, max_scales=6, max_tokens=max_tokens))
    return s, draw(cs4a_params(s.num_scales))


def _configs(cfg):
    return {launch: cfg for launch in K.Launch}


@given(case=decision_cases(), cfg=configs(), **common)
def test_column_scores_match_reference(case, cfg, bh, D, dtype, seed, strided):
    s, params = case
    d = params.decision_scale
    (q, k, _), (q64, k64, _) = make_qkv(s, d, *bh, D, dtype, seed, strided)
    got = run_or_refused(lambda: K.column_scores(q, k, 0.4, params.group_size, configs=_configs(cfg)))
    if got is None:
        return
    # Scores sum up to group_size probabilities: compare relative to the group size.
    want = R.column_scores(q64, k64, 0.4, params.group_size)
    assert_close("column scores / group size", got / params.group_size, want / params.group_size, dtype)


@given(case=decision_cases(), cfg=configs(), **common)
@example(case=(R.Schedule([(2, 2), (5, 3)]), R.CS4AParams(0, 3, 0.5, (1,))), cfg=K.KernelConfig(16, 16, 4, 1),
         bh=(1, 1), D=16, dtype=DTYPES[0], seed=3, strided=False)
@example(case=(R.Schedule([(3, 3), (4, 4), (9, 7)]), R.CS4AParams(1, 5, 0.3, (3,))), cfg=K.KernelConfig(32, 16, 4, 1),
         bh=(2, 2), D=32, dtype=DTYPES[-1], seed=4, strided=True)
def test_selected_attention_and_sparse_step_given_reference_state(case, cfg, bh, D, dtype, seed, strided):
    s, params = case
    d = params.decision_scale
    (q, k, v), (q64, k64, v64) = make_qkv(s, d, *bh, D, dtype, seed, strided)
    _, state = R.cs4a_decide(q64, k64, v64, s, d, params, 0.4)
    got = run_or_refused(lambda: K.selected_attention(q, k, v, s, d, params, state.kept.to(DEVICE), 0.4,
                                                      configs=_configs(cfg)))
    if got is None:
        return
    assert_close("O_sel at d", got, R.selected_attention(q64, k64, v64, s, d, params, state.kept, 0.4))
    if state.residual is not None:
        state.residual = state.residual.to(dtype)
    for step in range(d + 1, s.num_scales):
        (q, k, v), (q64, k64, v64) = make_qkv(s, step, *bh, D, dtype, seed + step, strided)
        got = K.cs4a_sparse(q, k, v, s, step, params, K_state(state, DEVICE), 0.4, configs=_configs(cfg))
        ref_state = R.CS4AState(d, state.kept, None if state.residual is None else state.residual.double())
        want = R.cs4a_sparse(q64, k64, v64, s, step, params, ref_state, 0.4)
        assert_close(f"cs4a_sparse step {step}", got, want)
        # The same with the kept rows streamed from a packed copy (made from this step's keys).
        packed = K.pack_kept(k, v, state.kept.to(DEVICE))
        got = K.cs4a_sparse(q, k, v, s, step, params, K_state(state, DEVICE), 0.4, configs=_configs(cfg),
                            packed=packed)
        assert_close(f"cs4a_sparse step {step}, packed", got, want)
        with pytest.raises(ValueError, match="packed must be pack_kept"):
            K.cs4a_sparse(q, k, v, s, step, params, K_state(state, DEVICE), 0.4, packed=packed[:, :, :1])


def K_state(state, device):
    res = None if state.residual is None else state.residual.to(device)
    return R.CS4AState(state.decision_scale, state.kept.to(device), res)


def _score_gap(scores, n_keep):
    top = torch.sort(scores, dim=-1, descending=True).values
    if n_keep == scores.shape[-1]:
        return float("inf")
    return (top[..., n_keep - 1] - top[..., n_keep]).min().item()


@given(case=decision_cases(max_tokens=200), cfg=configs(), bh=common["bh"], D=common["D"], seed=seeds)
def test_whole_cs4a_path_on_well_separated_scores(case, cfg, bh, D, seed):
    s, params = case
    d = params.decision_scale
    dtype = torch.float32
    (q, k, v), (q64, k64, v64) = make_qkv(s, d, *bh, D, dtype, seed)
    n_keep = R.num_keep(k.shape[2], params.keep_ratio)
    assume(_score_gap(R.column_scores(q64, k64, 0.4, params.group_size), n_keep) > 1e-4)
    result = run_or_refused(lambda: K.cs4a_decide(q, k, v, s, d, params, 0.4, configs=_configs(cfg)))
    if result is None:
        return
    out, state = result
    ref_out, ref_state = R.cs4a_decide(q64, k64, v64, s, d, params, 0.4)
    assert_close("O_dense", out, ref_out)
    assert torch.equal(state.kept.long().cpu(), ref_state.kept)
    if params.residual:
        assert_close("R", state.residual, ref_state.residual)
    for step in range(d + 1, s.num_scales):
        (q, k, v), (q64, k64, v64) = make_qkv(s, step, *bh, D, dtype, seed + step)
        got = K.cs4a_sparse(q, k, v, s, step, params, state, 0.4, configs=_configs(cfg))
        assert_close(f"cs4a step {step}", got, R.cs4a_sparse(q64, k64, v64, s, step, params, ref_state, 0.4))


def test_bad_inputs_are_named():
    s = R.Schedule([(1, 1), (2, 2)])
    (q, k, v), _ = make_qkv(s, 1, 1, 1, 16, torch.float32, 0)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        K.csla_attention(q.double(), k.double(), v.double(), s, 1)
    with pytest.raises(ValueError, match="head dim must be a power of two"):
        K.csla_attention(q[..., :12], k[..., :12], v[..., :12], s, 1)
    with pytest.raises(ValueError, match="q has 5 tokens"):
        K.csla_attention(torch.cat([q, q[:, :, :1]], 2), k, v, s, 1)
    with pytest.raises(ValueError, match="share a dtype"):
        K.csla_attention(q.half(), k, v, s, 1)
    with pytest.raises(ValueError, match="tile_h \\* tile_w == block_m"):
        K.KernelConfig(64, 64, 4, 2, 4, 4)
    with pytest.raises(ValueError, match="'block_n' must be a power of two"):
        K.KernelConfig(64, 48)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="cannot do bfloat16"):
            K.csla_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), s, 1)


# GPU: Infinity 1024 shapes (scales 10-12, H = 16 and 28, D = 128), bf16 and fp16. The float64
# reference runs head by head on the GPU with each token mask built once.
def _by_head(fn, *tensors):
    return torch.cat([fn(*(t[:, h:h + 1].double() for t in tensors), h) for h in range(tensors[0].shape[1])], 1)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 28])
@pytest.mark.parametrize("step", [10, 11, 12])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_csla_at_infinity_1024(step, heads, dtype):
    s = R.infinity_schedule()
    (q, k, v), _ = make_qkv(s, step, 2, heads, 128, dtype, step, device="cuda")
    out = K.csla_attention(q, k, v, s, step)
    mask = R.csla_mask(s, step, R.CSLAParams()).cuda()
    assert_close("csla", out, _by_head(lambda a, b, c, h: R.masked_attention(a, b, c, mask, 1.0)[0], q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [16, 28])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cs4a_at_infinity_1024(heads, dtype):
    s, params = R.infinity_schedule(), R.CS4AParams()
    (q, k, v), _ = make_qkv(s, 10, 2, heads, 128, dtype, 1, device="cuda")
    q[0, 0, 5, 3] = float("nan")  # one query poisoned: its group's scores are all NaN
    scores = K.column_scores(q, k, 1.0, params.group_size)
    want = _by_head(lambda a, b, h: R.column_scores(a, b, 1.0, params.group_size), q, k)
    assert_close("column scores / group size", scores / 192, want / 192, dtype)
    out, state = K.cs4a_decide(q, k, v, s, 10, params)
    dense = _by_head(lambda a, b, c, h: R.dense_attention(a, b, c, 1.0), q, k, v)
    assert_close("O_dense", out, dense)
    kept = state.kept.long()
    sel = K.selected_attention(q, k, v, s, 10, params, kept)
    want_sel = _by_head(lambda a, b, c, h: R.selected_attention(a, b, c, s, 10, params, kept[:, h:h + 1]), q, k, v)
    assert_close("O_sel", sel, want_sel)
    assert_close("R", state.residual.reshape_as(out), dense - want_sel, dtype)
    for step in (11, 12):
        (q, k, v), _ = make_qkv(s, step, 2, heads, 128, dtype, step, device="cuda")
        got = K.cs4a_sparse(q, k, v, s, step, params, state)
        want = _by_head(lambda a, b, c, h: R.cs4a_sparse(
            a, b, c, s, step, params, R.CS4AState(10, kept[:, h:h + 1], state.residual[:, h:h + 1].double())), q, k, v)
        assert_close(f"cs4a_sparse step {step}", got, want)


@given(rows=st.integers(1, 4), L=st.integers(1, 300), data=st.data())
@example(rows=1, L=8, data=None)
def test_topk_selection_matches_reference_including_ties(rows, L, data):
    if data is None:
        # NaN above +inf, -0.0 tied with 0.0, -inf last: torch.sort's order.
        scores = torch.tensor([[1.0, float("nan"), float("inf"), -0.0, 0.0, float("nan"), -float("inf"), -2.0]])
        n_keep = 5
    else:
        # Few distinct values force many ties at the threshold; specials mix in.
        levels = data.draw(st.sampled_from([2, 5, 1000]))
        specials = [float("nan"), float("inf"), -float("inf"), -0.0, -1.0]
        values = data.draw(st.lists(st.one_of(st.integers(0, levels).map(lambda x: x / levels),
                                              st.sampled_from(specials)), min_size=rows * L, max_size=rows * L))
        scores = torch.tensor(values, dtype=torch.float32).reshape(rows, L)
        n_keep = data.draw(st.integers(1, L))
    got = K.select_keys(scores.to(DEVICE), n_keep)
    assert got.dtype == torch.int32
    assert_kept_sets_valid(got, n_keep, scores.shape[-1])
    assert torch.equal(got.long().cpu(), R.select_keys(scores.double(), n_keep))


def assert_kept_sets_valid(kept: torch.Tensor, n_keep: int, num_keys: int) -> None:
    """Every row: exactly ``n_keep`` indices, each in ``[0, num_keys)``, strictly ascending (so unique)."""
    kept = kept.long().cpu()
    assert kept.shape[-1] == n_keep, kept.shape
    assert (kept >= 0).all() and (kept < num_keys).all(), kept
    assert (kept[..., 1:] > kept[..., :-1]).all(), kept


@given(case=decision_cases(max_tokens=200), bh=common["bh"], D=st.sampled_from([16, 32]),
       dtype=st.sampled_from(DTYPES), seed=seeds, data=st.data())
@example(case=(R.Schedule([(1, 1), (2, 2), (3, 3), (4, 4)]), R.CS4AParams(3, 192, 0.2, ())), bh=(1, 1), D=16,
         dtype=DTYPES[0], seed=0, data=None)
def test_nonfinite_inputs_match_reference(case, bh, D, dtype, seed, data):
    """NaN and infinities anywhere in q, k or v: the kernels keep the reference's keys, put NaN
    where it does and write nothing out of range (the decision step once corrupted memory here)."""
    s, params = case
    d = params.decision_scale
    (q, k, v), _ = make_qkv(s, d, *bh, D, dtype, seed)
    if data is None:
        q[0, 0, 0, 0] = float("nan")
    else:
        poison_some(data, [q, k, v])
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    out, state = K.cs4a_decide(q, k, v, s, d, params, 0.4)
    ref_out, ref_state = R.cs4a_decide(q64, k64, v64, s, d, params, 0.4)
    n_keep = R.num_keep(k.shape[2], params.keep_ratio)
    assert_kept_sets_valid(state.kept, n_keep, k.shape[2])
    scores = R.column_scores(q64, k64, 0.4, params.group_size)
    # Finite near-ties may rank apart in float32; NaN scores and well separated ones may not.
    if _score_gap(scores.nan_to_num(nan=float("inf")), n_keep) > 1e-4:
        assert torch.equal(state.kept.long().cpu(), ref_state.kept)
    assert_close("O_dense", out, ref_out)
    csla = R.CSLAParams(min(1, s.num_scales), (3,) * s.num_scales)
    (q, k, v), _ = make_qkv(s, s.num_scales - 1, *bh, D, dtype, seed + 1)
    if data is not None:
        poison_some(data, [q, k, v])
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    step = s.num_scales - 1
    assert_close("csla", K.csla_attention(q, k, v, s, step, csla, 0.4),
                 R.csla_attention(q64, k64, v64, s, step, csla, 0.4))
    if step > d:
        ref_state = R.CS4AState(d, state.kept.long().cpu(),
                                None if state.residual is None else state.residual.double().cpu())
        assert_close("cs4a_sparse", K.cs4a_sparse(q, k, v, s, step, params, state, 0.4),
                     R.cs4a_sparse(q64, k64, v64, s, step, params, ref_state, 0.4))


def test_state_on_another_device_or_dtype_is_named():
    s, params = R.Schedule([(1, 1), (2, 2), (4, 4)]), R.CS4AParams(1, 2, 0.5, (3,))
    (q, k, v), _ = make_qkv(s, 1, 1, 1, 16, torch.float32, 0)
    _, state = K.cs4a_decide(q, k, v, s, 1, params)
    (q2, k2, v2), _ = make_qkv(s, 2, 1, 1, 16, torch.float32, 1)
    with pytest.raises(ValueError, match="kept key indices must be int32 or int64"):
        K.cs4a_sparse(q2, k2, v2, s, 2, params, R.CS4AState(1, state.kept.float(), state.residual))
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="state.residual is on cpu"):
            K.cs4a_sparse(q2, k2, v2, s, 2, params, R.CS4AState(1, state.kept, state.residual.cpu()))


def test_plan_cache_matches_a_fresh_build_and_follows_every_change():
    """A cached launch plan gives what a fresh build gives; a new shape, dtype, config or
    parameter set builds a new plan (a stale one would be wrong); a malformed call is refused
    with the same message whether or not a plan exists."""
    s = R.Schedule([(1, 1), (2, 3), (5, 6)])
    params = R.CSLAParams(1, (3, 1))
    (q, k, v), (q64, k64, v64) = make_qkv(s, 2, 1, 2, 16, DTYPES[0], 0)
    K.clear_plans()
    first = K.csla_attention(q, k, v, s, 2, params, 0.5)
    assert K.plan_count() == 1
    again = K.csla_attention(q, k, v, s, 2, params, 0.5)
    assert K.plan_count() == 1 and torch.equal(first, again)
    K.clear_plans()
    assert torch.equal(K.csla_attention(q, k, v, s, 2, params, 0.5), first)
    variants = [
        ("batch", make_qkv(s, 2, 2, 2, 16, DTYPES[0], 1), params, None),
        ("dtype", make_qkv(s, 2, 1, 2, 16, DTYPES[-1], 2), params, None),
        ("head dim", make_qkv(s, 2, 1, 2, 32, DTYPES[0], 3), params, None),
        ("config", make_qkv(s, 2, 1, 2, 16, DTYPES[0], 4), params, K.KernelConfig(16, 16, 4, 1, 2, 8)),
        ("parameters", make_qkv(s, 2, 1, 2, 16, DTYPES[0], 5), R.CSLAParams(0, (5, 3, 1)), None),
    ]
    for n, ((q, k, v), (q64, k64, v64)), p, cfg in variants:
        before = K.plan_count()
        out = K.csla_attention(q, k, v, s, 2, p, 0.5, config=cfg)
        assert K.plan_count() == before + 1, n
        assert_close(f"csla after a change of {n}", out, R.csla_attention(q64, k64, v64, s, 2, p, 0.5))
    with pytest.raises(ValueError, match="q has 31 tokens but scale 2"):
        K.csla_attention(torch.cat([q, q[:, :, :1]], 2), k, v, s, 2, params, 0.5)


def test_fast_launch_arguments_are_the_first_launchs_with_pointers_as_ints(monkeypatch):
    """The launch path after the first (a GPU's; the interpreter never takes it) passes the
    arguments the first launch passed Triton, each tensor replaced by its ``data_ptr()``: the
    same inputs, plan tables and sizes, the new outputs. Checked here by recording both."""
    s, params = R.Schedule([(1, 1), (2, 2), (4, 4), (6, 6)]), R.CS4AParams(1, 4, 0.5, (3, 3))
    (qd, kd, vd), _ = make_qkv(s, 1, 1, 2, 16, torch.float32, 0)
    _, state = K.cs4a_decide(qd, kd, vd, s, 1, params)
    (q, k, v), _ = make_qkv(s, 3, 1, 2, 16, torch.float32, 1, strided=True)
    first_args, fast_args = [], []
    first = launch._Launcher.first

    def record_first(self, spec, args):
        first_args.append((self.names, list(args)))
        first(self, spec, args)
    monkeypatch.setattr(launch._Launcher, "first", record_first)
    monkeypatch.setattr(launch._Launcher, "runner",
                        lambda self, spec: (lambda *a: fast_args.append(list(a))) if first_args else None)
    for call in (lambda: K.csla_attention(q, k, v, s, 3), lambda: K.cs4a_sparse(q, k, v, s, 3, params, state)):
        K.clear_plans()
        first_args.clear()
        fast_args.clear()
        call()
        call()
        (names, want), got = first_args[0], fast_args[0]
        assert len(got) == len(want) == len(names)
        for name, a, b in zip(names, want, got):
            if name in ("o", "lse"):  # each call's own new output
                assert (a is None) == (b is None) and (b is None or isinstance(b, int)), name
            elif isinstance(a, torch.Tensor):
                assert b == a.data_ptr(), name
            else:
                assert b == a, name


@pytest.mark.gpu
def test_gpu_fast_launch_matches_the_first_launch():
    """After the first launch of a signature, calls skip Triton's binding: same bits, also when
    only the strides change (a new specialisation)."""
    s, params = R.infinity_schedule("1.000", "0.25M"), R.CS4AParams(7, 192, 0.2, (9, 7))
    for strided in (False, True):
        (q, k, v), _ = make_qkv(s, 9, 2, 4, 64, torch.bfloat16, 0, strided=strided, device="cuda")
        outs = [K.csla_attention(q, k, v, s, 9) for _ in range(3)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        csla_first = outs[0]
        (qd, kd, vd), _ = make_qkv(s, 7, 2, 4, 64, torch.bfloat16, 1, strided=strided, device="cuda")
        _, state = K.cs4a_decide(qd, kd, vd, s, 7, params)
        outs = [K.cs4a_sparse(q, k, v, s, 9, params, state) for _ in range(3)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])
        # Fast launches pass pointers as ints: new tensors must be read, not the first call's.
        q2 = torch.empty_strided(q.shape, q.stride(), dtype=q.dtype, device=q.device).copy_(q.flip(2))
        fast = K.csla_attention(q2, k, v, s, 9), K.cs4a_sparse(q2, k, v, s, 9, params, state)
        K.clear_plans()
        fresh = K.csla_attention(q2, k, v, s, 9), K.cs4a_sparse(q2, k, v, s, 9, params, state)
        assert all(torch.equal(a, b) for a, b in zip(fast, fresh))
        assert not torch.equal(fast[0], csla_first) and not torch.equal(fast[1], outs[0])
