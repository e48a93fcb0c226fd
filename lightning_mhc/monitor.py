"""StabilityMonitor: the documented ``mhc/*`` metrics of one logged step, from a :class:`StreamCapture`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mhc.capture import StreamCapture
from lightning_mhc.metrics import AmaxGain, LossSpikes, SinkhornError, StreamDiversity

METRIC_KEYS = (
    "mhc/gain_fwd_composite",
    "mhc/gain_bwd_composite",
    "mhc/gain_fwd_layer_max",
    "mhc/gain_bwd_layer_max",
    "mhc/sinkhorn_err",
    "mhc/stream_diversity",
    "mhc/grad_norm",
    "mhc/loss_spikes",
    "mhc/skipped_steps",  # optimizer steps MHCCallback(on_nonfinite="skip") skipped so far (nonfinite.NonFiniteGuard)
)
DEPTH_KEY = "mhc/composite_{direction}/depth_{depth:03d}"


class StabilityMonitor(nn.Module):
    """Amax gains, Sinkhorn error and stream diversity of captured steps; loss spikes over every step.

    ``layers`` is the number of ``H_res`` one forward produces (0 for the plain residual, which has none).
    All metrics sync across DDP ranks when computed, so every rank must call :meth:`compute` together.
    """

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = layers
        self.gains = AmaxGain(num_layers=layers) if layers else None
        self.sinkhorn = SinkhornError()
        self.diversity = StreamDiversity()
        self.spikes = LossSpikes()

    def observe_loss(self, loss: Tensor) -> None:
        self.spikes.update(loss.detach())

    def update(self, capture: StreamCapture) -> None:
        for h_res in capture.forwards:
            if h_res and self.gains is not None:
                self.gains.update(h_res)
                self.sinkhorn.update(h_res)
        if capture.diversity is not None:
            self.diversity.merge_state(capture.diversity)

    def compute(self, grad_norm: float) -> dict[str, float]:
        """The step's metrics as floats (gain keys only when there are ``H_res``); resets all but the spikes."""
        metrics = {
            "mhc/stream_diversity": float(self.diversity.compute()),
            "mhc/grad_norm": grad_norm,
            "mhc/loss_spikes": float(self.spikes.compute()),
        }
        if self.gains is not None:
            gains = self.gains.compute()
            metrics["mhc/gain_fwd_composite"] = float(gains["fwd_composite"])
            metrics["mhc/gain_bwd_composite"] = float(gains["bwd_composite"])
            metrics["mhc/gain_fwd_layer_max"] = float(gains["fwd_layer_max"])
            metrics["mhc/gain_bwd_layer_max"] = float(gains["bwd_layer_max"])
            metrics["mhc/sinkhorn_err"] = float(self.sinkhorn.compute()["max"])
            for direction in ("fwd", "bwd"):
                for depth, value in enumerate(gains[f"{direction}_composite_per_depth"].tolist()):
                    metrics[DEPTH_KEY.format(direction=direction, depth=depth)] = value
            self.gains.reset()
            self.sinkhorn.reset()
        self.diversity.reset()
        return metrics


def total_grad_norm(module: nn.Module) -> float:
    """L2 norm of all gradients of ``module`` together (0 when none exist yet)."""
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
