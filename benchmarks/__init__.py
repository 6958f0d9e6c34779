"""Benchmarks for gce_jax (see benchmarks/README.md); run all: ``python -m benchmarks``."""
