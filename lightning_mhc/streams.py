"""Into and out of the n-stream residual: copy the hidden state into n streams, reduce them back."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_mhc.config import READOUTS
from lightning_mhc.precision import Float32Parameters


def expand_streams(hidden: Tensor, streams: int) -> Tensor:
    """``(..., C)`` to ``(..., n, C)``: every stream starts as a copy of the hidden state."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], streams, hidden.shape[-1])


class StreamReadout(Float32Parameters):
    """Reduce ``(..., n, C)`` streams to ``(..., C)``.

    ``mean`` keeps the original model's function when streams are identical; ``sum`` is the HC paper's;
    ``learned`` is a sigmoid-gated weighted sum whose gates start at ``1/n`` (so it starts as ``mean``).
    """

    def __init__(self, streams: int, readout: str = "mean") -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r} is not allowed; pass one of {READOUTS}.")
        self.streams = streams
        self.readout = readout
        if readout == "learned":
            start = 1.0 / streams
            logit = math.log(start / (1 - start)) if streams > 1 else 10.0
            self.gate_logits = nn.Parameter(torch.full((streams,), logit))

    def forward(self, x: Tensor) -> Tensor:
        if self.readout == "mean":
            return x.mean(-2)
        if self.readout == "sum":
            return x.sum(-2)
        gates = torch.sigmoid(self.gate_logits.float()).to(x.dtype)
        return torch.einsum("n,...nc->...c", gates, x)

    def extra_repr(self) -> str:
        return f"streams={self.streams}, readout={self.readout!r}"
