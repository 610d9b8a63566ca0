"""Test configuration shared by every test module.

Without a CUDA device the Triton kernels run on CPU tensors through the Triton interpreter, which
is enabled by TRITON_INTERPRET=1. Triton reads it when a kernel is decorated, so it must be set
before ``fastalign.kernels`` is imported: here, before anything else.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# `make test` runs the "ci" profile; HYPOTHESIS_PROFILE=thorough explores more examples locally.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
