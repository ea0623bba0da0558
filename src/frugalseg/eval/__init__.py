"""Metrics, inference (slice-wise 2-D, sliding-window 3-D), evaluation of a run, plots."""
