"""Triton kernels of fastalign, installed as ``fastalign.kernels``.

One op family per module (forward kernel, backward kernel, launcher). Set ``TRITON_INTERPRET=1``
before importing these modules to run them on CPU tensors through the Triton interpreter.
"""
