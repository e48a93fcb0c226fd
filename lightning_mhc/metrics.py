"""Training-health metrics for mHC as ``torchmetrics.Metric``s: Amax gains, Sinkhorn error, stream diversity,
MoE expert load and loss spikes.

Every metric works standalone (``update`` / ``compute`` / ``reset``) and keeps its state in reducible tensors,
so ``compute()`` under ``torch.distributed`` returns the value over the union of all ranks' data. Conventions
follow ``lightning_mhc.kernels.reference``: stream state ``(..., n, C)``, ``H_res`` ``(..., n, n)`` per token.

Example::

    gains = AmaxGain(num_layers=len(h_res_layers))
    gains.update(h_res_layers)          # per-token H_res of every layer, in depth order
    gains.compute()["fwd_composite"]    # ~1 for mHC, grows with depth for unconstrained HC
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from lightning_mhc.config import check_float, check_int
from lightning_mhc.kernels.reference import at_least_fp32

__all__ = ["AmaxGain", "ExpertLoad", "LossSpikes", "SinkhornError", "StreamDiversity", "amax_gains"]


def amax_gains(m: Tensor) -> tuple[Tensor, Tensor]:
    """Forward and backward Amax gain of each matrix in ``(..., n, n)``: max absolute row sum (how much
    ``m @ x`` can grow a signal) and max absolute column sum (the same for the gradient ``m^T @ g``)."""
    a = m.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


def _check_square(t: Any, what: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (..., n, n); got {type(t).__name__}.")
    if t.ndim < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] == 0:
        raise ValueError(f"{what} must have shape (..., n, n) with n >= 1; got {tuple(t.shape)}.")


def _size_states(metric: Metric, names: Sequence[str], size: int) -> None:
    """Give lazily sized sum states the shape ``(size,)``; ``reset()`` keeps that shape from now on."""
    for name in names:
        metric.add_state(name, torch.zeros(size, device=metric.device), dist_reduce_fx="sum")


class AmaxGain(Metric):
    """Amax gains of each layer's ``H_res`` and of their composite products, averaged over tokens.

    ``update(h_res_layers)`` takes the per-token ``H_res`` of every layer in depth order (a sequence of
    ``(..., n, n)`` tensors with the same shape, or one tensor stacked on dim 0). Since
    ``x_{l+1} = H_res_l x_l``, the composite at depth ``l`` is ``H_res_l @ ... @ H_res_0``, per token.
    Gains are per token (``amax_gains``), then averaged over every token seen (on every rank).

    ``compute()`` returns a dict of tensors:

    - ``fwd_composite`` / ``bwd_composite``: gain of the composite over the whole stack (the last depth);
    - ``fwd_layer_max`` / ``bwd_layer_max``: max over layers of the token-averaged gain of one layer;
    - ``fwd_composite_per_depth`` / ``bwd_composite_per_depth`` / ``fwd_layer`` / ``bwd_layer``: shape ``[L]``.

    Args:
        num_layers: number of ``H_res`` per update. ``None`` fixes it at the first update; under DDP either pass
            it or make sure every rank has updated at least once before ``compute()`` (the states of a rank that
            never updated have no layer dimension, and the ranks' states cannot be combined).

    States (all summed across ranks): ``fwd_layer_sum``, ``bwd_layer_sum``, ``fwd_composite_sum``,
    ``bwd_composite_sum`` (``[L]``, sums of per-token gains) and ``tokens`` (how many tokens were summed).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    _SUMS = ("fwd_layer_sum", "bwd_layer_sum", "fwd_composite_sum", "bwd_composite_sum")

    def __init__(self, num_layers: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_layers is not None:  # None: sized at the first update
            check_int("AmaxGain.num_layers", num_layers, 1)
        self.num_layers = num_layers
        for name in self._SUMS:
            self.add_state(name, torch.zeros(num_layers if num_layers else ()), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, h_res_layers: Union[Sequence[Tensor], Tensor]) -> None:
        """Add the per-token gains of one batch: ``h_res_layers[l]`` is layer ``l``'s ``H_res``, ``(..., n, n)``."""
        layers = list(h_res_layers.unbind(0) if isinstance(h_res_layers, Tensor) else h_res_layers)
        if not layers:
            raise ValueError("AmaxGain.update expects one H_res tensor per layer; got an empty sequence.")
        if self.num_layers is None:
            self.num_layers = len(layers)
            _size_states(self, self._SUMS, self.num_layers)
        elif len(layers) != self.num_layers:
            raise ValueError(
                f"AmaxGain.update expects {self.num_layers} H_res tensors (one per layer, fixed by num_layers or the "
                f"first update); got {len(layers)}."
            )
        for i, h in enumerate(layers):
            _check_square(h, f"h_res_layers[{i}]")
            if h.shape != layers[0].shape:
                raise ValueError(
                    f"Every H_res must have the shape of h_res_layers[0], {tuple(layers[0].shape)}; "
                    f"h_res_layers[{i}] has {tuple(h.shape)}."
                )
        n = layers[0].shape[-1]
        composite: Optional[Tensor] = None
        per_layer: list[tuple[Tensor, ...]] = []
        for h in layers:
            h = at_least_fp32(h.detach()).reshape(-1, n, n)
            composite = h if composite is None else h @ composite
            per_layer.append((*amax_gains(h), *amax_gains(composite)))
        sums = torch.stack([torch.stack(gains) for gains in per_layer], dim=1).sum(-1)  # (4, L)
        for name, total in zip(self._SUMS, sums):
            setattr(self, name, getattr(self, name) + total.to(getattr(self, name).dtype))
        self.tokens += layers[0].numel() // (n * n)

    def compute(self) -> dict[str, Tensor]:
        """Token-averaged gains; NaN where no token was seen."""
        if self.num_layers is None:
            raise RuntimeError("AmaxGain.compute() needs num_layers: pass it at construction or update() first.")
        fwd_layer, bwd_layer, fwd_comp, bwd_comp = (getattr(self, name) / self.tokens for name in self._SUMS)
        return {
            "fwd_composite": fwd_comp[-1],
            "bwd_composite": bwd_comp[-1],
            "fwd_layer_max": fwd_layer.max(),
            "bwd_layer_max": bwd_layer.max(),
            "fwd_composite_per_depth": fwd_comp,
            "bwd_composite_per_depth": bwd_comp,
            "fwd_layer": fwd_layer,
            "bwd_layer": bwd_layer,
        }


class SinkhornError(Metric):
    """How far ``H_res`` is from doubly stochastic: max ``|row sum - 1|`` and max ``|column sum - 1|``.

    ``update`` takes one ``(..., n, n)`` tensor or a sequence of them (e.g. every layer's). ``compute()``
    returns ``{"row", "col", "max"}`` (``max`` of the two). Sinkhorn normalises rows last, so ``row`` sits at
    rounding level and ``col`` shows whether ``sinkhorn_iters`` is enough.

    States (max-reduced across ranks): ``row``, ``col``, the worst errors seen.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("row", torch.zeros(()), dist_reduce_fx="max")
        self.add_state("col", torch.zeros(()), dist_reduce_fx="max")

    def update(self, h_res: Union[Tensor, Sequence[Tensor]]) -> None:
        """Fold in the worst row and column errors of ``h_res``: ``(..., n, n)`` or a sequence of such tensors."""
        matrices = [h_res] if isinstance(h_res, Tensor) else list(h_res)
        if not matrices:
            raise ValueError("SinkhornError.update expects a (..., n, n) tensor or a non-empty sequence of them.")
        for i, h in enumerate(matrices):
            _check_square(h, f"h_res[{i}]" if len(matrices) > 1 else "h_res")
            if h.numel() == 0:
                continue
            h = at_least_fp32(h.detach())
            self.row = torch.maximum(self.row, (h.sum(-1) - 1).abs().amax().to(self.row.dtype))
            self.col = torch.maximum(self.col, (h.sum(-2) - 1).abs().amax().to(self.col.dtype))

    def compute(self) -> dict[str, Tensor]:
        """Worst row, column and overall deviation from sum 1 (NaN if an ``H_res`` held NaN)."""
        return {"row": self.row, "col": self.col, "max": torch.maximum(self.row, self.col)}


class StreamDiversity(Metric):
    """Mean pairwise cosine distance ``1 - cos(x_i, x_j)`` between the ``n`` streams of each token.

    Averaged over the ``n(n-1)/2`` pairs of a token, then over tokens. 0 means the streams collapsed into one
    (identical directions), 1 orthogonal, 2 opposite. With ``n == 1`` there is no pair and each token counts
    as 0 (one stream is maximally collapsed). A stream that is exactly zero has cosine 0 with every other.

    States (summed across ranks): ``distance_sum`` (sum of per-token mean distances) and ``tokens``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("distance_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, streams: Tensor) -> None:
        """Add the per-token diversity of a stream state ``(..., n, C)``."""
        if not isinstance(streams, Tensor) or streams.ndim < 2:
            shape = tuple(streams.shape) if isinstance(streams, Tensor) else type(streams).__name__
            raise ValueError(f"StreamDiversity.update expects streams of shape (..., n, C); got {shape}.")
        n, c = streams.shape[-2:]
        x = at_least_fp32(streams.detach()).reshape(-1, n, c)
        if n > 1:
            u = F.normalize(x, dim=-1)
            i, j = torch.triu_indices(n, n, offset=1, device=x.device)
            cos = (u @ u.mT)[:, i, j]
            self.distance_sum += (1 - cos).mean(-1).sum().to(self.distance_sum.dtype)
        self.tokens += x.shape[0]

    def compute(self) -> Tensor:
        """Token-averaged pairwise cosine distance in ``[0, 2]`` (NaN before any token)."""
        return self.distance_sum / self.tokens

    def merge_state(self, incoming_state: Union[dict[str, Any], Metric]) -> None:
        """Add another diversity's statistics, counted as an update: torchmetrics' own merge neither counts one (so
        ``compute`` warned that it ran before ``update``) nor drops a cached result."""
        super().merge_state(incoming_state)
        self._update_count += 1
        self._computed = None


class ExpertLoad(Metric):
    """MoE load balance: how unevenly tokens spread over experts, and how sure the router is.

    ``update(tokens_per_expert, router_probs=None)``: ``tokens_per_expert`` is ``[E]`` (e.g. ``bincount`` of
    the routed expert ids, top-k slots included); ``router_probs`` is ``(..., E)``, rows summing to 1.
    ``compute()`` returns:

    - ``max_over_mean``: max / mean of the accumulated counts (1 = perfectly balanced, ``E`` = one expert
      takes everything);
    - ``cv``: coefficient of variation (population std / mean) of the counts (0 = balanced);
    - ``router_entropy``: mean entropy in nats of the router rows (``log E`` = uniform); NaN if no
      ``router_probs`` were given.

    Args:
        num_experts: ``E``. ``None`` fixes it at the first update; under DDP either pass it or make sure every
            rank has updated before ``compute()`` (see ``AmaxGain``).

    States (summed across ranks): ``counts`` (``[E]``, float so fractional loads work), ``entropy_sum`` (sum
    of row entropies) and ``rows`` (router rows seen). The float states are float32 and stay so when the module
    is cast to bf16/fp16 (``bf16-true``, ``module.to(torch.bfloat16)``, ``set_dtype``) or built under a half default
    dtype: a bf16 sum stops growing at 256 when adding ones; float64 (``set_dtype(torch.float64)``) is kept.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_experts: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_experts is not None:  # None: sized at the first update
            check_int("ExpertLoad.num_experts", num_experts, 1)
        self.num_experts = num_experts
        self.add_state("counts", torch.zeros(num_experts or (), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("entropy_sum", torch.zeros((), dtype=torch.float32), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, tokens_per_expert: Tensor, router_probs: Optional[Tensor] = None) -> None:
        """Add one batch's per-expert token counts ``[E]`` and, optionally, its router probabilities ``(..., E)``."""
        if not isinstance(tokens_per_expert, Tensor) or tokens_per_expert.ndim != 1:
            shape = tuple(tokens_per_expert.shape) if isinstance(tokens_per_expert, Tensor) else None
            raise ValueError(f"ExpertLoad.update expects tokens_per_expert of shape [E]; got {shape}.")
        experts = tokens_per_expert.shape[0]
        if self.num_experts is None:
            self.num_experts = experts
            counts = torch.zeros(experts, dtype=self.counts.dtype, device=self.counts.device)
            self.add_state("counts", counts, dist_reduce_fx="sum")
        elif experts != self.num_experts:
            raise ValueError(
                f"ExpertLoad.update expects tokens_per_expert of shape [{self.num_experts}] (num_experts, fixed at "
                f"construction or by the first update); got [{experts}]."
            )
        self.counts += tokens_per_expert.detach().to(self.counts.dtype)
        if router_probs is None:
            return
        if not isinstance(router_probs, Tensor) or router_probs.ndim < 1 or router_probs.shape[-1] != experts:
            shape = tuple(router_probs.shape) if isinstance(router_probs, Tensor) else type(router_probs).__name__
            raise ValueError(f"ExpertLoad.update expects router_probs of shape (..., {experts}); got {shape}.")
        p = at_least_fp32(router_probs.detach()).reshape(-1, experts)
        self.entropy_sum += -torch.xlogy(p, p).sum().to(self.entropy_sum.dtype)
        self.rows += p.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``max_over_mean``, ``cv`` and ``router_entropy`` over everything accumulated."""
        if self.num_experts is None:
            raise RuntimeError("ExpertLoad.compute() needs num_experts: pass it at construction or update() first.")
        mean = self.counts.mean()
        return {
            "max_over_mean": self.counts.max() / mean,
            "cv": self.counts.std(correction=0) / mean,
            "router_entropy": self.entropy_sum / self.rows,
        }

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Move and cast like any metric, then put float states (and their reset values) below 32 bits back to
        float32."""
        this = super()._apply(fn, *args, **kwargs)
        for name in ("counts", "entropy_sum"):
            default, value = this._defaults[name], getattr(this, name)
            if default.is_floating_point() and default.element_size() < 4:
                this._defaults[name] = default.float()
            if value.is_floating_point() and value.element_size() < 4:
                setattr(this, name, value.float())
        return this


class LossSpikes(Metric):
    """Counts training steps whose loss exceeds ``threshold`` times the median of the previous ``window`` losses.

    Feed one scalar loss per step to ``update`` (or call the metric, which also returns whether this step was a
    spike). No step counts until ``min_history`` finite losses are in the window (early training falls fast and
    the median is noisy). A non-finite loss always counts as a spike and never enters the history. The median
    is ``torch.nanmedian`` (the lower of the two middle values for an even count); losses are assumed
    non-negative, as for cross-entropy. Everything stays on the loss's device: no host sync per step.

    ``reset()`` clears the count only: the loss history stays, so the median does not warm up again after each
    logging interval. The history is per process and not part of the checkpoint.

    Under DDP each rank judges its own loss; ``spikes`` is max-reduced. If the loss is all-reduced (the same on
    every rank) a sum would count each spike once per rank, while the max counts it once; with per-rank losses
    the max is the spike count of the worst rank.

    Args:
        threshold: ``k`` in ``loss > k * median``; must be > 1.
        window: how many previous losses the median looks at.
        min_history: finite losses needed in the window before a step can count, ``1 <= min_history <= window``.

    States: ``spikes`` (max-reduced). Buffers (not synced): ``history`` (the last ``window`` losses, NaN where
    empty) and ``steps`` (losses seen since construction).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, threshold: float = 1.5, window: int = 100, min_history: int = 20, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_float("LossSpikes.threshold", threshold, 1.0, low_open=True)
        check_int("LossSpikes.window", window, 1)
        if isinstance(min_history, bool) or not isinstance(min_history, int) or not 1 <= min_history <= window:
            raise ValueError(
                f"LossSpikes.min_history={min_history!r} is not allowed; pass an integer in [1, window={window}]."
            )
        self.threshold = float(threshold)
        self.window = window
        self.min_history = min_history
        self.add_state("spikes", torch.zeros((), dtype=torch.long), dist_reduce_fx="max")
        self.register_buffer("history", torch.full((window,), math.nan), persistent=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long), persistent=False)

    def update(self, loss: Union[Tensor, float]) -> None:
        """Judge one step's scalar ``loss`` against the history, count it if it spikes, then add it to the history."""
        loss = torch.as_tensor(loss, device=self.history.device).detach()
        if loss.numel() != 1:
            raise ValueError(f"LossSpikes.update expects one scalar loss per step; got shape {tuple(loss.shape)}.")
        loss = loss.reshape(()).to(self.history.dtype)
        finite = torch.isfinite(loss)
        ready = (~torch.isnan(self.history)).sum() >= self.min_history
        spike = ~finite | (ready & (loss > self.threshold * torch.nanmedian(self.history)))
        self.spikes += spike.long()
        slot = (self.steps % self.window).reshape(1)
        self.history.index_copy_(0, slot, torch.where(finite, loss, math.nan).reshape(1))
        self.steps += 1

    def forward(self, loss: Union[Tensor, float]) -> Tensor:
        """Update with one step's loss and return whether that step was a spike (a 0-d bool tensor)."""
        before = self.spikes.clone()
        self.update(loss)
        return self.spikes > before

    def compute(self) -> Tensor:
        """Number of spikes since the last ``reset()`` (max over ranks)."""
        return self.spikes
