"""Shared test setup: without a GPU, Triton kernels run in its interpreter, chosen before any kernel is imported.

With a GPU the compiled kernels are tested instead (the interpreter would hide compilation problems).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_environment():
    """Every test leaves the environment as it found it. Lightning strategies run in-process set MASTER_PORT,
    LOCAL_RANK and the like; a later test that launches processes would pass them on, and its first process would
    take itself for a launched worker and wait for peers that never come."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
