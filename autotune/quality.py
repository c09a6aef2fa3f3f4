"""Semantic search (windows, sinks, decision scale, keep ratio) under a measured quality bound."""

from __future__ import annotations

from sparvar.errors import SparvarError


def check_quality_options(opts) -> None:
    if (opts.calibration is None) != (opts.max_rel_error is None):
        raise SparvarError("--calibration and --max-rel-error go together: the semantic search needs both")
    if not opts.max_rel_error > 0:
        raise SparvarError(f"--max-rel-error must be > 0, got {opts.max_rel_error}")
