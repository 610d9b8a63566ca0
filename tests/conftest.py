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

from fastalign.bench.memory import map_large_blocks_directly  # noqa: E402

# The CPU memory tests bound resident memory: blocks of 1 MiB and more are mapped and unmapped
# with their tensors, so that a bound does not depend on the heaps the earlier tests left.
map_large_blocks_directly()

# `make test` runs the "ci" profile: 2000 examples for each property test of
# tests/ops/test_ops_properties.py and tests/losses/test_losses_properties.py (a tenth for the
# Triton-interpreter ones, which scale their count from max_examples), derandomized so that CI
# runs the same examples every time.
# HYPOTHESIS_PROFILE=thorough runs ten times as many, from fresh random seeds, for local use.
settings.register_profile("ci", max_examples=2000, deadline=None, derandomize=True,
                          print_blob=True)
settings.register_profile("thorough", max_examples=20000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
