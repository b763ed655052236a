"""Sweeps: search spaces, Tune wiring, results and reports."""
