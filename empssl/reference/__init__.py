"""Plain PyTorch implementations that follow docs/method.md line by line: the specification in code.

Every fast path (Triton, CUDA, CPU C++) is tested against these on the same inputs.
"""
