import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from sparvar.reference import (CS4AParams, CSLAParams, Schedule, default_plan, step_inputs, centre, csla_attention, csla_mask, csla_pairs,
                               dense_attention, infinity_schedule, key_windows, masked_attention)
from strategies import batch_heads, csla_params, head_dims, schedules, seeds
from assertions import assert_close


def _qkv(schedule, step, bh, d, seed):
    """float64 inputs from the project's one input factory."""
    return step_inputs(schedule, step, *bh, d, dtype=torch.float64, seed=seed)


@st.composite
def cases(draw, max_tokens=1500):
    s = draw(schedules(max_tokens=max_tokens))
    step = draw(st.integers(0, s.num_scales - 1))
    return s, step


@given(cases(), batch_heads, head_dims, seeds, st.integers(0, 13))
@example((Schedule([(1, 1)]), 0), (1, 1), 16, 0, 0)
@example((Schedule([(1, 1), (3, 5)]), 1), (1, 2), 16, 1, 1)
def test_whole_windows_or_all_sinks_equal_dense(case, bh, d, seed, sinks):
    s, step = case
    q, k, v = _qkv(s, step, bh, d, seed)
    dense = dense_attention(q, k, v, 0.3)
    all_whole = CSLAParams(0, (-1,) * s.num_scales)
    assert_close("csla(all -1)", csla_attention(q, k, v, s, step, all_whole, 0.3), dense)
    all_sinks = CSLAParams(s.num_scales + sinks, ())
    assert_close("csla(all sinks)", csla_attention(q, k, v, s, step, all_sinks, 0.3), dense)


@given(cases(), st.data())
def test_enlarging_a_window_never_removes_a_key(case, data):
    s, step = case
    params = data.draw(csla_params(s.num_scales))
    assume(params.win_rel)
    t = data.draw(st.integers(0, len(params.win_rel) - 1))
    w = params.win_rel[t]
    bigger = data.draw(st.sampled_from([-1] + [x for x in range(1, 30, 2) if w >= 0 and x > w]))
    grown = CSLAParams(params.sink_scales, params.win_rel[:t] + (bigger,) + params.win_rel[t + 1:])
    before, after = csla_mask(s, step, params), csla_mask(s, step, grown)
    assert not (before & ~after).any()


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 5).map(lambda x: 2 * x + 1), st.data())
def test_interior_query_sees_exactly_w_squared_keys_of_its_own_scale(h, w, win, data):
    half = win // 2
    assume(h > 2 * half and w > 2 * half)
    s = Schedule([(2, 2), (h, w)])
    i = data.draw(st.integers(half, h - 1 - half))
    j = data.draw(st.integers(half, w - 1 - half))
    mask = csla_mask(s, 1, CSLAParams(0, (win,)))
    own = mask[i * w + j, 4:].reshape(h, w)
    assert int(own.sum()) == win * win
    assert own[i - half:i + half + 1, j - half:j + half + 1].all()


@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 5).map(lambda x: 2 * x + 1))
def test_windows_are_clipped_at_borders_not_shifted(h, w, win):
    s = Schedule([(h, w)])
    mask = csla_mask(s, 0, CSLAParams(0, (win,))).reshape(h, w, h, w)
    half = win // 2
    for i, j in [(0, 0), (h - 1, w - 1), (0, w - 1)]:
        rows = min(h - 1, i + half) - max(0, i - half) + 1
        cols = min(w - 1, j + half) - max(0, j - half) + 1
        assert int(mask[i, j].sum()) == rows * cols
        assert mask[i, j, i, j]


@given(st.integers(1, 40), st.integers(1, 40))
def test_centre_is_identity_on_the_same_grid_and_monotone(n_src, n_dst):
    i = torch.arange(n_src)
    assert torch.equal(centre(i, n_src, n_src), i)
    c = centre(i, n_src, n_dst)
    assert (c[1:] >= c[:-1]).all() and c.min() >= 0 and c.max() <= n_dst - 1


def test_infinity_default_windows_match_spec():
    wins = key_windows(13, CSLAParams())
    assert wins == [-1] * 5 + [0, 0, 0, 1, 1, 3, 5, 7]


@given(cases(max_tokens=1200), st.data())
def test_pair_count_matches_the_mask(case, data):
    s, step = case
    params = data.draw(csla_params(s.num_scales))
    assert csla_pairs(s, step, params) == int(csla_mask(s, step, params).sum())


def test_infinity_1024_last_scale_density_is_about_1_9_percent():
    s = infinity_schedule()
    density = csla_pairs(s, 12, CSLAParams()) / (s.num_queries(12) * s.num_keys(12))
    assert 0.018 < density < 0.020


@given(cases(max_tokens=600), batch_heads, seeds)
def test_empty_allowed_sets_give_zeros_not_nan(case, bh, seed):
    s, step = case
    q, k, v = _qkv(s, step, bh, 16, seed)
    out = csla_attention(q, k, v, s, step, CSLAParams(0, ()), 1.0)
    assert torch.equal(out, torch.zeros_like(out))
    _, lse = masked_attention(q, k, v, torch.zeros(q.shape[2], k.shape[2], dtype=torch.bool), 1.0)
    assert torch.isneginf(lse).all()


def test_bad_inputs_name_the_problem():
    s = Schedule([(1, 1), (2, 2)])
    q, k, v = _qkv(s, 1, (1, 1), 16, 0)
    with pytest.raises(ValueError, match="q has 3 tokens"):
        csla_attention(q[:, :, :3], k, v, s, 1)
    with pytest.raises(ValueError, match="k has 4 tokens"):
        csla_attention(q, k[:, :, :4], v[:, :, :4], s, 1)
    with pytest.raises(ValueError, match="must be \\[B, H, L, D\\]"):
        csla_attention(q[0], k, v, s, 1)
    with pytest.raises(ValueError, match="'win_rel\\[1\\]' must be an odd"):
        CSLAParams(1, (3, 4))


@pytest.mark.parametrize("make, message", [
    (lambda: CSLAParams(5, (3.7,)), r"'win_rel\[0\]' must be an odd positive int, 0 or -1, got 3.7"),
    (lambda: CSLAParams(2.0, (3,)), r"'sink_scales' must be an int, got 2.0"),
    (lambda: CS4AParams(band_rel=(9.9,)), r"'band_rel\[0\]' must be an odd positive int, 0, got 9.9"),
    (lambda: CS4AParams(group_size=192.0), r"'group_size' must be an int, got 192.0"),
    (lambda: default_plan(infinity_schedule(), 32).kind(2.0, 11), r"'layer' must be an int, got 2.0"),
    (lambda: default_plan(infinity_schedule(), 32).kind(2, True), r"'step' must be an int, got True"),
])
def test_integer_parameters_refuse_non_integers(make, message):
    with pytest.raises(ValueError, match=message):
        make()
