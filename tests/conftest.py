"""Shared test setup: without a GPU, Triton kernels run in its interpreter, chosen before any kernel is imported.

With a GPU the compiled kernels are tested instead (the interpreter would hide compilation problems).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
