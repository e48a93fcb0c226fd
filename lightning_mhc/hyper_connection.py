"""HyperConnection: the n-stream residual around one residual branch F.

``x_{l+1} = H_res · x_l + H_post^T · F(H_pre · x_l)`` with ``x_l`` of shape ``(..., n, C)``. The module owns the
learned maps (``phi``/``theta``, ``alpha``, ``b``) and exposes the two halves separately (``read`` gives F's
input, ``write`` merges F's output) because injected blocks run F inside their own ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lightning_mhc.capture import StreamCapture
from lightning_mhc.config import MHCConfig
from lightning_mhc.kernels import reference
from lightning_mhc.kernels.dispatch import KernelOps, get_ops, resolve_backend
from lightning_mhc.kernels.reference import Coefficients
from lightning_mhc.precision import Float32Parameters

ONEHOT_OTHERS = 0.02  # H_pre mass the onehot preset leaves to the streams a sublayer does not read


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _input_gate_logits(streams: int, init: str, sublayer: int) -> Tensor:
    """``b_pre``: ``H_pre = 1/n`` on every stream, or for ``onehot`` 0.98 on stream ``sublayer mod n`` and 0.02
    spread over the others (summing to 1, so identical streams still give the original branch input)."""
    if init != "onehot":
        return torch.full((streams,), _logit(1.0 / streams))
    logits = torch.full((streams,), _logit(ONEHOT_OTHERS / (streams - 1)))
    logits[sublayer % streams] = _logit(1.0 - ONEHOT_OTHERS)
    return logits


class HyperConnection(Float32Parameters):
    """Learned pre/post/res maps for one residual branch of width ``dim``.

    Initialised to preserve the wrapped function (``MHCConfig.init`` names the presets): ``H_pre`` summing to 1,
    ``H_post = 1`` and a (doubly) stochastic ``H_res``, so identical streams stay identical and the mean readout
    equals the plain residual when the dynamic part is off (``gate_init = 0``, or ``phi = 0`` in the ``symmetric``
    and ``onehot`` presets). ``sublayer`` (its index in the stack) picks the stream ``onehot`` reads.
    With one stream (or ``mode="residual"``) it is exactly the plain residual and has no parameters. Its
    parameters stay float32 when the model is cast to half precision (``bf16-true``), as the paper keeps them.
    """

    def __init__(self, dim: int, config: MHCConfig, sublayer: int = 0) -> None:
        super().__init__()
        n = config.stream_count
        self.dim = dim
        self.streams = n
        self.mode = config.mode if n > 1 else "residual"
        self.sinkhorn_iters = config.sinkhorn_iters
        self.kernels = config.kernels
        self.capture: StreamCapture | None = None
        if self.mode == "residual":
            return
        self.alpha = nn.Parameter(torch.full((3,), config.initial_gate))
        eye = torch.eye(n)
        if self.mode == "mhc":
            phi = torch.randn(n * dim, n * n + 2 * n) / math.sqrt(n * dim)
            self.phi = nn.Parameter(phi if config.init_preset == "paper" else torch.zeros_like(phi))
            res = config.initial_res_logit * eye.flatten()
            bias = [_input_gate_logits(n, config.init_preset, sublayer), torch.zeros(n), res]
        else:
            self.theta = nn.Parameter(torch.randn(dim, n + 2) / math.sqrt(dim))
            bias = [torch.full((n,), 1.0 / n), torch.ones(n), eye.flatten()]
        self.bias = nn.Parameter(torch.cat(bias))

    def _ops(self, x: Tensor) -> KernelOps:
        return get_ops(resolve_backend(self.kernels, x.device))

    def coefficients(self, x: Tensor, capture: bool = True) -> Coefficients:
        """fp32 ``H_pre``, ``H_post``, ``H_res`` for streams ``x`` of shape ``(..., n, C)``, autocast off.

        ``capture=False`` keeps ``H_res`` out of an attached capture (recomputation in backward must not repeat it).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.mode == "mhc":
                coeffs = self._ops(x).mhc_coefficients(x, self.phi, self.alpha, self.bias, self.sinkhorn_iters)
            else:
                logits = reference.hc_logits(x, self.theta, self.alpha, self.bias)
                coeffs = reference.coefficients_from_logits(logits, self.streams, self.mode, self.sinkhorn_iters)
        if capture and self.capture is not None:
            self.capture.add_h_res(coeffs.h_res)
        return coeffs

    def read(self, x: Tensor, capture: bool = True) -> tuple[Tensor, Coefficients | None]:
        """Branch input ``H_pre · x`` and the coefficients ``write`` needs (``capture`` as in ``coefficients``); for
        mHC one fused step of the backend (``KernelOps.mhc_read``: coefficients and pre-mix in one pass)."""
        if self.mode == "residual":
            return x.squeeze(-2), None
        if self.mode == "hc":
            coeffs = self.coefficients(x, capture)
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._ops(x).pre_mix(x, coeffs.h_pre), coeffs
        with torch.autocast(device_type=x.device.type, enabled=False):
            mixed, coeffs = self._ops(x).mhc_read(x, self.phi, self.alpha, self.bias, self.sinkhorn_iters)
        if capture and self.capture is not None:
            self.capture.add_h_res(coeffs.h_res)
        return mixed, coeffs

    def write(self, x: Tensor, branch_out: Tensor, coeffs: Coefficients | None) -> Tensor:
        """New streams ``H_res · x + H_post^T · F``, in the dtype of ``x`` (autocast off: the stream is never
        rounded to autocast's lower precision, only F is)."""
        if self.mode == "residual":
            return x + branch_out.unsqueeze(-2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._ops(x).merge(x, branch_out, coeffs.h_res, coeffs.h_post)

    def forward(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        h, coeffs = self.read(x)
        return self.write(x, branch(h), coeffs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, streams={self.streams}, mode={self.mode!r}"
