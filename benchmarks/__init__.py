"""Benchmarks of pyattn (installed as pyattn.benchmarks): harness + one file per op; `pyattn bench` runs them."""
