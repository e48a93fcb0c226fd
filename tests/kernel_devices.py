"""Where Triton kernel tests run: the interpreter on CPU (no GPU), the compiled kernels on CUDA."""

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="Triton runs on CPU only interpreted")),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
            pytest.mark.skipif(INTERPRETING, reason="CUDA tests check the compiled kernels, not the interpreter"),
        ],
    ),
]
