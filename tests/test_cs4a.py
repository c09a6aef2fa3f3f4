import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from sparvar.reference import (CS4AParams, CS4AState, Schedule, band_ranges, column_scores,
                               cs4a_decide, cs4a_mask, cs4a_pairs, cs4a_sparse, dense_attention,
                               num_groups, num_keep, select_keys, source_groups, upsample_residual)
from strategies import batch_heads, cs4a_params, head_dims, schedules, seeds
from assertions import assert_close
from test_csla import _qkv


@st.composite
def decision_cases(draw, max_tokens=1500):
    s = draw(schedules(max_tokens=max_tokens))
    params = draw(cs4a_params(s.num_scales))
    return s, params


@given(decision_cases(), batch_heads, head_dims, seeds, st.integers(1, 50))
@example((Schedule([(1, 1)]), CS4AParams(0, 1, 1.0, ())), (1, 1), 16, 0, 1)
@example((Schedule([(3, 5), (7, 2)]), CS4AParams(1, 4, 1.0, ())), (2, 1), 16, 3, 4)
def test_keep_all_equals_dense_and_residual_is_zero(case, bh, d, seed, g):
    s, params = case
    params = CS4AParams(params.decision_scale, g, 1.0, params.band_rel, True)
    q, k, v = _qkv(s, params.decision_scale, bh, d, seed)
    out, state = cs4a_decide(q, k, v, s, params.decision_scale, params, 0.5)
    assert_close("O_dense", out, dense_attention(q, k, v, 0.5))
    assert_close("R with every key kept", state.residual, torch.zeros_like(state.residual))
    assert state.kept.shape[-1] == k.shape[2]


@given(decision_cases(), batch_heads, seeds)
def test_column_scores_sum_to_group_sizes(case, bh, seed):
    s, params = case
    step = params.decision_scale
    q, k, _ = _qkv(s, step, bh, 16, seed)
    scores = column_scores(q, k, 0.7, params.group_size)
    nq = q.shape[2]
    sizes = torch.tensor([min(params.group_size, nq - g * params.group_size)
                          for g in range(num_groups(nq, params.group_size))], dtype=torch.float64)
    assert torch.allclose(scores.sum(-1), sizes.expand_as(scores.sum(-1)))


def test_ties_go_to_the_lower_key_index():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 1.0]])
    assert select_keys(scores, 2).tolist() == [[1, 2]]
    assert select_keys(scores, 4).tolist() == [[0, 1, 2, 4]]
    assert select_keys(torch.zeros(1, 5), 3).tolist() == [[0, 1, 2]]


@given(st.integers(1, 10000), st.floats(0.0001, 1.0))
def test_num_keep_rounds_half_up_and_stays_in_range(L, rho):
    n = num_keep(L, rho)
    assert 1 <= n <= L
    assert n == min(L, max(1, int(rho * L + 0.5)))


@given(st.integers(1, 60), st.integers(1, 200))
def test_group_mapping_is_monotone_and_covers_the_decision_groups(n_d, n_k):
    src = source_groups(n_d, n_k)
    assert src.shape == (n_k,)
    assert (src[1:] >= src[:-1]).all()
    assert src.min() >= 0 and src.max() <= n_d - 1
    if n_k >= n_d:
        assert set(src.tolist()) == set(range(n_d))
    else:
        assert src[0] <= n_d // n_k and src[-1] >= n_d - 1 - n_d // n_k


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 13), st.integers(1, 13), batch_heads, seeds)
def test_residual_upsampling_matches_interpolate(hd, wd, hk, wk, bh, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(*bh, hd, wd, 8, generator=g, dtype=torch.float64)
    up = upsample_residual(r, (hk, wk))
    ref = torch.nn.functional.interpolate(
        r.permute(0, 1, 4, 2, 3).flatten(0, 1), size=(hk, wk), mode="bilinear", align_corners=False)
    ref = ref.reshape(*bh, 8, hk * wk).transpose(-1, -2)
    assert_close("up(R)", up, ref)


@given(schedules(min_scales=2, max_tokens=1500), st.data())
def test_bands_are_contiguous_ranges_inside_their_scale(s, data):
    params = data.draw(cs4a_params(s.num_scales, data.draw(st.integers(0, s.num_scales - 2))))
    step = data.draw(st.integers(params.decision_scale + 1, s.num_scales - 1))
    ranges = band_ranges(s, step, params)
    assert ranges.shape == (num_groups(s.sizes[step], params.group_size), s.num_scales, 2)
    for m in range(s.num_scales):
        lo, hi = ranges[:, m, 0], ranges[:, m, 1]
        has = hi >= lo
        if m <= params.decision_scale or m > step:
            assert not has.any()
        assert (lo[has] >= s.offsets[m]).all() and (hi[has] < s.offsets[m + 1]).all()


@given(decision_cases(max_tokens=1200), batch_heads, seeds)
def test_sparse_mask_contains_kept_keys_and_pair_count_matches(case, bh, seed):
    s, params = case
    d = params.decision_scale
    q, k, v = _qkv(s, d, bh, 16, seed)
    _, state = cs4a_decide(q, k, v, s, d, params, 1.0)
    for step in range(d, s.num_scales):
        mask = cs4a_mask(s, step, params, state.kept)
        assert int(mask[0, 0].sum()) == cs4a_pairs(s, step, params)
        assert mask[..., : s.num_keys(d)].sum(-1).eq(state.kept.shape[-1]).all()


def test_sparse_step_checks_its_state():
    s = Schedule([(1, 1), (2, 2), (4, 4)])
    params = CS4AParams(1, 2, 0.5, (3,))
    q, k, v = _qkv(s, 1, (1, 2), 16, 0)
    _, state = cs4a_decide(q, k, v, s, 1, params)
    q2, k2, v2 = _qkv(s, 2, (1, 2), 16, 1)
    cs4a_sparse(q2, k2, v2, s, 2, params, state)
    with pytest.raises(ValueError, match="state.kept has shape"):
        cs4a_sparse(q2[:, :1], k2[:, :1], v2[:, :1], s, 2, params, state)
    with pytest.raises(ValueError, match="CS4AState"):
        cs4a_sparse(q2, k2, v2, s, 2, params, None)
    with pytest.raises(ValueError, match="after the decision scale"):
        cs4a_sparse(q, k, v, s, 1, params, state)
    with pytest.raises(ValueError, match="residual has shape"):
        cs4a_sparse(q2, k2, v2, s, 2, params, CS4AState(1, state.kept, None))
    with pytest.raises(ValueError, match="keep_ratio"):
        CS4AParams(1, 2, 0.0)
    with pytest.raises(ValueError, match="group_size"):
        CS4AParams(1, 0)
