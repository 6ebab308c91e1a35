"""Triton kernels of empssl (installed as ``empssl.kernels``). Importing this package does not import triton."""
