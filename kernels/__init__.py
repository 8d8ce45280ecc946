"""Triton kernels of pyattn, one file per op (installed as pyattn.kernels). Importing needs triton."""
