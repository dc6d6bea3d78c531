"""Triton kernels, one family a file: each holds the kernels, the ``torch.autograd.Function``, the naive
PyTorch reference beside it, and its launch heuristic."""
