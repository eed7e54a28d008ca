"""Reproducible measurement scripts; run each as ``python -m benchmarks.<name>`` (see README.md)."""
