"""Choose between the torch reference and the Triton kernels, importing Triton only when it is chosen.

``import lightning_mhc`` must work where Triton is absent (macOS, CPU-only wheels), so nothing here imports
it at module level: ``resolve_backend`` tries the import only when Triton could be chosen, and
``get_ops("triton")`` imports the kernels on first use.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_mhc.kernels import fast, reference
from lightning_mhc.kernels.reference import Coefficients

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class KernelOps:
    """The mHC steps of one backend, with ``reference``'s signatures and dtypes; ``mhc_read`` is
    ``mhc_coefficients`` followed by ``pre_mix`` (the branch input and the coefficients), fused where it can be."""

    mhc_logits: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    sinkhorn: Callable[[Tensor, int], Tensor]
    pre_mix: Callable[[Tensor, Tensor], Tensor]
    merge: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
    mhc_coefficients: Callable[[Tensor, Tensor, Tensor, Tensor, int], Coefficients]
    mhc_read: Callable[[Tensor, Tensor, Tensor, Tensor, int], tuple[Tensor, Coefficients]]


# Memos in plain dicts rather than functools.cache, which torch.compile warns about and traces through.
_TRITON_INSTALLED: dict[str, bool] = {}
_OPS: dict[str, KernelOps] = {}


def _triton_installed() -> bool:
    if "triton" not in _TRITON_INSTALLED:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_INSTALLED["triton"] = False
        else:
            _TRITON_INSTALLED["triton"] = True
    return _TRITON_INSTALLED["triton"]


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


def _triton_read(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int) -> tuple[Tensor, Coefficients]:
    from lightning_mhc.kernels import ops

    coeffs = ops.mhc_coefficients(x, phi, alpha, bias, iters)
    return ops.pre_mix(x, coeffs.h_pre), coeffs


def get_ops(backend: str) -> KernelOps:
    """The functions of a resolved backend (``"torch"``: the fast torch path of ``fast.py``, checked against
    ``reference``; ``"triton"``); imports Triton for the latter."""
    if backend not in _OPS:
        _OPS[backend] = _load_ops(backend)
    return _OPS[backend]


def _load_ops(backend: str) -> KernelOps:
    if backend == "torch":
        return KernelOps(
            reference.mhc_logits, fast.sinkhorn, reference.pre_mix, fast.merge, fast.coefficients, fast.read
        )
    if backend == "triton":
        from lightning_mhc.kernels import ops

        return KernelOps(ops.mhc_logits, ops.sinkhorn, ops.pre_mix, ops.merge, ops.mhc_coefficients, _triton_read)
    raise ValueError(f"backend={backend!r} is not resolved; pass 'torch' or 'triton' (see resolve_backend).")
