"""Choose between the torch reference and the Triton kernels, importing Triton only when it is chosen.

``import lightning_mhc`` must work where Triton is absent (macOS, CPU-only wheels), so nothing here imports
it at module level: ``resolve_backend`` tries the import only when Triton could be chosen, and
``get_ops("triton")`` imports the kernels on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from lightning_mhc.kernels import reference
from lightning_mhc.kernels.reference import Coefficients

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class KernelOps:
    """The mHC steps of one backend, with ``reference``'s signatures and dtypes."""

    mhc_logits: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    sinkhorn: Callable[[Tensor, int], Tensor]
    pre_mix: Callable[[Tensor, Tensor], Tensor]
    merge: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    mhc_coefficients: Callable[[Tensor, Tensor, Tensor, Tensor, int], Coefficients]


@cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(kernels: str, device: torch.device | str) -> str:
    """Map a ``kernels`` setting to ``"triton"`` or ``"torch"`` for tensors on ``device``.

    ``"auto"``: Triton on CUDA when it is installed, torch elsewhere. ``"triton"``: Triton, which needs a CUDA
    device or the Triton interpreter (``TRITON_INTERPRET=1`` set before ``lightning_mhc`` imports its kernels).
    ``"torch"``: the pure-torch reference.
    """
    if kernels not in BACKENDS:
        raise ValueError(f"kernels={kernels!r} is not a kernel backend; pass one of {BACKENDS}.")
    device = torch.device(device)
    if kernels == "torch":
        return "torch"
    if kernels == "auto":
        return "triton" if device.type == "cuda" and _triton_installed() else "torch"
    if not _triton_installed():
        raise RuntimeError('kernels="triton" needs the triton package, which is not installed; pass kernels="torch".')
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f'kernels="triton" needs a CUDA device, but the tensors are on {device}. Pass kernels="torch" (or '
            '"auto"), or set the environment variable TRITON_INTERPRET=1 before importing lightning_mhc to run '
            "the Triton kernels in the (slow) interpreter."
        )
    return "triton"


def _reference_coefficients(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int) -> Coefficients:
    logits = reference.mhc_logits(x, phi, alpha, bias)
    return reference.coefficients_from_logits(logits, x.shape[-2], "mhc", iters)


@cache
def get_ops(backend: str) -> KernelOps:
    """The functions of a resolved backend (``"torch"`` or ``"triton"``); imports Triton for the latter."""
    if backend == "torch":
        return KernelOps(
            reference.mhc_logits, reference.sinkhorn, reference.pre_mix, reference.merge, _reference_coefficients
        )
    if backend == "triton":
        from lightning_mhc.kernels import ops

        return KernelOps(ops.mhc_logits, ops.sinkhorn, ops.pre_mix, ops.merge, ops.mhc_coefficients)
    raise ValueError(f"backend={backend!r} is not resolved; pass 'torch' or 'triton' (see resolve_backend).")
