"""Optuna search over kernel speed parameters (and, under a quality bound, semantic ones)."""
