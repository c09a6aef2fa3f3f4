import pytest
import torch
from hypothesis import given

from sparvar.reference import (INFINITY_RATIOS, Schedule, infinity_schedule, preset_schedules,
                               schedule_for_pixels, var_schedule)
from strategies import grids


def test_infinity_1024_token_counts():
    s = infinity_schedule("1.000", "1M")
    assert s.offsets[-1] == 10521
    assert s.prefix(10).offsets[-1] == 2521 == infinity_schedule(1.0, "0.25M").offsets[-1]
    assert s.num_keys(12) == 10521 and s.num_queries(12) == 4096 and s.num_keys(10) == 4121


def test_var_token_counts():
    assert var_schedule(256).offsets[-1] == 680
    assert var_schedule(512).offsets[-1] == 2240


@pytest.mark.parametrize("ratio", INFINITY_RATIOS)
def test_every_infinity_ratio_has_13_grids_with_its_aspect(ratio):
    s = infinity_schedule(ratio, "1M")
    assert s.num_scales == 13
    h, w = s.grids[-1]
    assert abs(h / w - float(ratio)) < 0.02
    for res, n in (("0.06M", 7), ("0.25M", 10), ("0.60M", 12)):
        assert infinity_schedule(ratio, res).grids == s.grids[:n]


def test_transposed_ratio_uses_transposed_grids():
    tall, wide = infinity_schedule("1.333"), infinity_schedule("0.750")
    assert wide.grids == tuple((w, h) for h, w in tall.grids)


def test_presets_resolve_by_pixels():
    assert schedule_for_pixels("infinity", 1024, 1024).name == "infinity-1.000-1M"
    assert schedule_for_pixels("infinity", 1152, 864).grids[-1] == (72, 54)
    assert schedule_for_pixels("var", 512, 512).offsets[-1] == 2240
    assert len(preset_schedules()) == 15 * 4 + 2
    with pytest.raises(ValueError, match="no infinity schedule makes a 100x100"):
        schedule_for_pixels("infinity", 100, 100)


@given(grids())
def test_offsets_are_prefix_sums(g):
    s = Schedule(g)
    assert s.offsets[0] == 0
    for i, (h, w) in enumerate(g):
        assert s.offsets[i + 1] - s.offsets[i] == h * w
    assert s.num_keys(len(g) - 1) == sum(h * w for h, w in g)


@pytest.mark.parametrize("bad, match", [
    ([], "at least one scale"),
    ([(0, 2)], "h must be positive"),
    ([(2, -1)], "w must be positive"),
    ([(2, 2.5)], "w must be an int"),
    ([(2,)], "pair"),
    ("1,2", "list of"),
    ([(True, 2)], "h must be an int"),
    (None, "list of"),
])
def test_bad_schedules_raise_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        Schedule(bad)


def test_numpy_and_torch_ints_are_accepted():
    import numpy as np
    assert Schedule([(np.int64(2), torch.tensor(3).item())]).grids == ((2, 3),)


def test_bad_presets_and_steps():
    with pytest.raises(ValueError, match="h_div_w"):
        infinity_schedule("1.1")
    with pytest.raises(ValueError, match="resolution"):
        infinity_schedule("1.000", "2M")
    with pytest.raises(ValueError, match="256 or 512"):
        var_schedule(1024)
    with pytest.raises(ValueError, match="step must be an int in"):
        var_schedule(256).num_keys(10)
