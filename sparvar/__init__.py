"""SparVAR: sparse attention for visual autoregressive models."""
