"""Tuned kernel configs shipped with SparVAR: ``<sanitised GPU name>/<model>_<h>x<w>.json``."""
