"""Hypothesis strategies with the domain's constraints built in."""

from hypothesis import strategies as st

from sparvar.reference import CS4AParams, CSLAParams, Schedule


def grids(max_side: int = 24, min_scales: int = 1, max_scales: int = 13, square: bool | None = None):
    side = st.integers(1, max_side)
    grid = st.tuples(side, side) if square is not True else side.map(lambda s: (s, s))
    if square is None:
        grid = st.one_of(grid, side.map(lambda s: (s, s)))
    return st.lists(grid, min_size=min_scales, max_size=max_scales)


@st.composite
def schedules(draw, max_side: int = 24, min_scales: int = 1, max_scales: int = 13, max_tokens: int = 3000):
    """Random schedules, bounded in total tokens so the float64 reference stays quick."""
    g = draw(grids(max_side, min_scales, max_scales))
    while len(g) > 1 and sum(h * w for h, w in g) > max_tokens:
        g = g[:-1]
    if sum(h * w for h, w in g) > max_tokens:
        g = [(min(g[0][0], 32), min(g[0][1], 32))]
    return Schedule(g)


windows = st.one_of(st.just(-1), st.just(0), st.integers(0, 6).map(lambda x: 2 * x + 1))
bands = st.one_of(st.just(0), st.integers(0, 6).map(lambda x: 2 * x + 1))


@st.composite
def csla_params(draw, num_scales: int):
    sinks = draw(st.integers(0, num_scales))
    win_rel = draw(st.lists(windows, max_size=num_scales))
    return CSLAParams(sinks, tuple(win_rel))


@st.composite
def cs4a_params(draw, num_scales: int, decision_scale: int | None = None):
    d = draw(st.integers(0, num_scales - 1)) if decision_scale is None else decision_scale
    return CS4AParams(
        decision_scale=d,
        group_size=draw(st.integers(1, 40)),
        keep_ratio=draw(st.floats(0.01, 1.0)),
        band_rel=tuple(draw(st.lists(bands, max_size=num_scales - 1 - d))),
        residual=draw(st.booleans()),
    )


head_dims = st.sampled_from([16, 32, 64])
batch_heads = st.tuples(st.integers(1, 2), st.integers(1, 3))
seeds = st.integers(0, 2**31 - 1)


nonfinite_values = st.sampled_from([float("nan"), float("inf"), float("-inf")])


def poison_some(data, tensors, max_count: int = 3) -> list[tuple[int, int, float]]:
    """Write NaN or an infinity into up to ``max_count`` drawn elements of the drawn tensors (in
    place); returns ``(tensor index, flat index, value)`` for the failure message."""
    done = []
    for _ in range(data.draw(st.integers(1, max_count))):
        which = data.draw(st.integers(0, len(tensors) - 1))
        t = tensors[which]
        i = data.draw(st.integers(0, t.numel() - 1))
        value = data.draw(nonfinite_values)
        t.view(-1)[i] = value
        done.append((which, i, value))
    return done
