"""Kernels behind the ``ligerfx::`` custom ops.

One folder per op (fla's layout): ``naive.py`` is the plain-PyTorch reference (fp32 accumulation, the ground truth);
the Triton kernels that plug in behind the same ops live beside it.
"""
