"""The reference against a deliberately naive loop implementation, on small random cases."""

from hypothesis import given, settings
from hypothesis import strategies as st

from sparvar.reference import cs4a_decide, cs4a_sparse, csla_attention
from strategies import batch_heads, cs4a_params, csla_params, poison_some, schedules, seeds
from assertions import assert_close
from test_csla import _qkv
import naive

small = schedules(max_side=5, max_scales=4, max_tokens=60)


# ``poisoned``: NaN and infinities written into q, k or v (the reference's rule for non-finite
# inputs, written a second time as loops).
@settings(max_examples=15)
@given(small, st.data(), batch_heads, seeds, st.booleans())
def test_csla_matches_naive_loops(s, data, bh, seed, poisoned):
    step = data.draw(st.integers(0, s.num_scales - 1))
    params = data.draw(csla_params(s.num_scales))
    q, k, v = _qkv(s, step, bh, 8, seed)
    if poisoned:
        poison_some(data, [q, k, v])
    want = naive.csla(q, k, v, list(s.grids), step, params.sink_scales, params.win_rel, 0.6)
    assert_close("csla", csla_attention(q, k, v, s, step, params, 0.6), want)


@settings(max_examples=15)
@given(small, st.data(), batch_heads, seeds, st.booleans())
def test_cs4a_matches_naive_loops(s, data, bh, seed, poisoned):
    params = data.draw(cs4a_params(s.num_scales))
    d = params.decision_scale
    grids = list(s.grids)
    q, k, v = _qkv(s, d, bh, 8, seed)
    if poisoned:
        poison_some(data, [q, k, v])
    out, state = cs4a_decide(q, k, v, s, d, params, 0.8)
    want, kept, res = naive.cs4a_decide(q, k, v, grids, d, params.group_size, params.keep_ratio, 0.8)
    assert_close("O_dense", out, want)
    assert state.kept.tolist() == kept
    if params.residual:
        assert_close("R", state.residual, res)
    for step in range(d + 1, s.num_scales):
        q, k, v = _qkv(s, step, bh, 8, seed + step)
        if poisoned:
            poison_some(data, [q, k, v])
        got = cs4a_sparse(q, k, v, s, step, params, state, 0.8)
        want = naive.cs4a_sparse(q, k, v, grids, d, step, params.group_size, params.band_rel,
                                 params.residual, kept, res, 0.8)
        assert_close(f"cs4a step {step}", got, want)

