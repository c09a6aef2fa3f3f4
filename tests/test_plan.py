import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparvar.dispatch import Backend, StepDispatcher, run_step
from sparvar.reference import (SparsityPlan, StepKind, csla_attention, cs4a_decide, cs4a_sparse, default_plan,
                               dense_attention, generation_density, infinity_schedule, plan_densities,
                               preset_schedules)
from strategies import bands, schedules, windows
from assertions import assert_close
from test_csla import _qkv


@st.composite
def plans(draw):
    S = draw(st.integers(1, 13))
    N = draw(st.integers(1, 40))
    d = draw(st.integers(0, S - 1))
    return SparsityPlan(
        num_scales=S, depth=N, decision_scale=d, bound_layer=draw(st.integers(-1, N - 1)),
        sink_scales=draw(st.integers(0, S)), win_rel=tuple(draw(st.lists(windows, max_size=S))),
        group_size=draw(st.integers(1, 1000)), keep_ratio=draw(st.floats(1e-4, 1.0)),
        band_rel=tuple(draw(st.lists(bands, max_size=S - 1 - d))), residual=draw(st.booleans()))


@given(plans())
def test_plan_json_round_trip(plan):
    again = SparsityPlan.from_json(plan.to_json())
    assert again == plan
    assert json.loads(again.to_json()) == json.loads(plan.to_json())


def test_infinity_default_is_the_papers_setting():
    plan = default_plan(infinity_schedule(), 32)
    assert (plan.decision_scale, plan.bound_layer, plan.sink_scales) == (10, 10, 5)
    assert plan.win_rel == (7, 5, 3, 1, 1, 0, 0, 0) and plan.band_rel == (9, 7)
    assert (plan.group_size, plan.keep_ratio, plan.residual) == (192, 0.2, True)
    assert plan.kind(0, 9) == "dense" and plan.kind(10, 10) == "cs4a_decide"
    assert plan.kind(10, 12) == "cs4a_sparse" and plan.kind(11, 10) == "csla"


@pytest.mark.parametrize("name", sorted(preset_schedules()))
def test_default_plan_is_valid_for_every_preset(name):
    s = preset_schedules()[name]
    plan = default_plan(s, 16)
    assert {r.kind for r in plan_densities(plan, s)} <= set(StepKind)
    assert 0 < generation_density(plan, s) <= 1


@pytest.mark.parametrize("field, value, match", [
    ("decision_scale", 13, r"'decision_scale' must be in \[0, 12\], got 13"),
    ("bound_layer", 32, r"'bound_layer' must be in \[-1, 31\]"),
    ("sink_scales", -1, r"'sink_scales' must be in \[0, 13\]"),
    ("group_size", 0, r"'group_size' must be in >= 1"),
    ("keep_ratio", 1.5, r"'keep_ratio' must be a number in \(0, 1\]"),
    ("keep_ratio", "0.2", r"'keep_ratio'"),
    ("win_rel", [7, 4], r"'win_rel\[1\]' must be an odd positive int, 0 or -1, got 4"),
    ("band_rel", [9, 7, 5], r"'band_rel' has 3 entries, at most 2"),
    ("band_rel", [-1], r"'band_rel\[0\]' must be an odd positive int, 0, got -1"),
    ("residual", 1, r"'residual' must be true or false"),
    ("depth", "32", r"'depth' must be an int"),
])
def test_validation_names_the_field_and_range(field, value, match):
    data = default_plan(infinity_schedule(), 32).to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=match):
        SparsityPlan.from_dict(data)


def test_malformed_plan_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        SparsityPlan.from_json("{")
    with pytest.raises(ValueError, match="unknown plan field"):
        SparsityPlan.from_json('{"num_scales": 1, "depth": 1, "decision_scale": 0, "x": 1}')
    with pytest.raises(ValueError, match="missing field"):
        SparsityPlan.from_json('{"num_scales": 1}')


@given(schedules(min_scales=3, max_tokens=800), st.integers(1, 4), st.data())
def test_dispatcher_runs_what_the_plan_says(s, depth, data):
    plan = default_plan(s, depth)
    layer = data.draw(st.integers(0, depth - 1))
    attn = StepDispatcher(plan, s, backend=Backend.REFERENCE)
    state = None
    for step in range(s.num_scales):
        q, k, v = _qkv(s, step, (1, 2), 16, step)
        out = attn(layer, step, q, k, v, 0.5)
        kind = plan.kind(layer, step)
        if kind == StepKind.DENSE:
            want = dense_attention(q, k, v, 0.5)
        elif kind == StepKind.CSLA:
            want = csla_attention(q, k, v, s, step, plan.csla, 0.5)
        elif kind == StepKind.CS4A_DECIDE:
            want, state = cs4a_decide(q, k, v, s, step, plan.cs4a, 0.5)
        else:
            want = cs4a_sparse(q, k, v, s, step, plan.cs4a, state, 0.5)
        assert_close(f"{kind} at step {step}", out, want)
    attn.new_image()
    assert attn.state(layer) is None


def test_sparse_step_without_state_is_refused():
    s = infinity_schedule("1.000", "0.06M")
    plan = default_plan(s, 2)
    q, k, v = _qkv(s, 6, (1, 1), 16, 0)
    with pytest.raises(ValueError, match="needs the state of its decision step"):
        run_step(plan.kind(0, 6), q, k, v, s, 6, plan, backend=Backend.REFERENCE)
    with pytest.raises(ValueError, match="has not run since new_image"):
        StepDispatcher(plan, s, backend=Backend.REFERENCE)(0, 6, q, k, v)


def test_step_kinds_are_their_names():
    assert [str(k) for k in StepKind] == ["dense", "cs4a_decide", "cs4a_sparse", "csla"]
    assert StepKind("csla") is StepKind.CSLA and {StepKind.CSLA: 1}["csla"] == 1
