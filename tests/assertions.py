"""One assert helper and one tolerance table for comparing with the float64 reference."""

import torch

# (atol, rtol) per dtype of the tensor under test, against a float64 reference.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype=None) -> None:
    """Fail with max abs error, relative RMS error, mismatch count and first indices.

    NaN / inf in ``actual`` where ``expected`` is finite (or the reverse) are reported apart.
    """
    dtype = dtype or actual.dtype
    atol, rtol = TOLERANCE[dtype]
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad_finite = torch.isfinite(a) != torch.isfinite(e)
    if bad_finite.any():
        idx = bad_finite.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad_finite.sum())} NaN/inf mismatches, first at {idx}: "
                             f"got {[a[tuple(i)].item() for i in idx]}, expected {[e[tuple(i)].item() for i in idx]}")
    both = torch.isfinite(e)
    same_inf = ~both & (a == e)
    err = torch.where(both, (a - e).abs(), torch.zeros_like(a))
    bad = (err > atol + rtol * e.abs().where(both, torch.zeros_like(e))) | (~both & ~same_inf & ~torch.isnan(e))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rms = (err.pow(2).mean().sqrt() / e.where(both, torch.zeros_like(e)).pow(2).mean().sqrt().clamp_min(1e-30)).item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements outside atol={atol} rtol={rtol} ({dtype}); "
            f"max abs err {err.max().item():.3e}, rel RMS err {rms:.3e}; first at {idx}: "
            f"got {[a[tuple(i)].item() for i in idx]}, expected {[e[tuple(i)].item() for i in idx]}")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so an element a kernel never writes fails the comparison."""
    return t.fill_(float("nan"))
