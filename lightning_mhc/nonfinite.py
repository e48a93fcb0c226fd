"""Non-finite training state: find a non-finite loss, gradient or ``H_res`` cheaply, then raise, skip the step or warn.

Detection adds no host synchronisation per micro-batch or per layer: every backward's loss and every layer's ``H_res``
are folded into device-side sums (a sum is finite exactly when all its terms are), and the gradients' total norm is
computed on the device at the optimizer step. Once per optimizer step, where the decision to step must be made anyway,
one small vector of flags is read on the host, after a max all-reduce under multi-process strategies so that every
rank takes the same decision (a NaN on one rank makes every rank raise or skip together).

Only when a step is found non-finite does it look further (host-side, off the hot path): the first layer, in depth
order, whose ``H_res`` was non-finite, else the first parameter whose value or gradient is.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_mhc.capture import StreamCapture, in_backward

ON_NONFINITE = ("raise", "skip", "warn")


class NonFiniteError(RuntimeError):
    """Training reached a non-finite loss, gradient, ``H_res`` or weight (``MHCCallback(on_nonfinite=...)``).

    ``step`` is the global step whose update was refused (``None`` for a refused checkpoint)."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class FiniteWatch:
    """Sits in the blocks' capture slot (``mhc_block.attach_capture``) on every training step: adds up each layer's
    ``H_res`` on the device, and passes everything on to ``inner`` (the stability metrics' capture on logged steps).

    ``layer_sums[i]`` is the sum of layer ``i``'s ``H_res`` (depth order) over the forwards since the last
    :meth:`reset`; recomputation and checkpoint replays during backward are not counted again.
    """

    def __init__(self) -> None:
        self.inner: StreamCapture | None = None
        self.layer_sums: list[Tensor] = []
        self._layer = 0

    def begin_forward(self) -> None:
        if not in_backward():
            self._layer = 0
        if self.inner is not None:
            self.inner.begin_forward()

    def add_h_res(self, h_res: Tensor) -> None:
        if not in_backward():
            total = h_res.detach().sum(dtype=torch.float32)
            if self._layer < len(self.layer_sums):
                self.layer_sums[self._layer] = self.layer_sums[self._layer] + total
            else:
                self.layer_sums.append(total)
            self._layer += 1
        if self.inner is not None:
            self.inner.add_h_res(h_res)

    def add_final_streams(self, streams: Tensor) -> None:
        if self.inner is not None:
            self.inner.add_final_streams(streams)

    def reset(self) -> None:
        self.layer_sums = []
        self._layer = 0


class NonFiniteGuard:
    """Decides, once per optimizer step, whether what the step is about to apply is finite, and acts on it.

    Args:
        on_nonfinite: ``"raise"`` (:class:`NonFiniteError` before the step is applied), ``"skip"`` (the step is not
            applied: gradients set to ``None``, which PyTorch optimizers skip), or ``"warn"`` (rank-zero warning, the
            step is applied).
        max_consecutive_skips: with ``"skip"``, raise once more than this many steps in a row were skipped.

    ``skipped`` counts the steps this guard (its callback) skipped, over all its fits. It is not checkpointed: a
    stateful callback would make Lightning refuse a second MHCCallback on one Trainer before ours can say why.
    """

    def __init__(self, on_nonfinite: str, max_consecutive_skips: int) -> None:
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.watch = FiniteWatch()
        self.layer_names: list[str] = []
        self.check_gradients = True
        self.skipped = 0
        self.consecutive = 0
        self._loss_sum: Tensor | None = None

    def start(self, layer_names: list[str], check_gradients: bool = True) -> bool:
        """Begin a fit; returns whether to attach :attr:`watch` to the blocks. ``layer_names``: module names of the
        layers whose ``H_res`` the watch would see, in depth order (empty: none to watch). ``check_gradients=False``
        under a gradient scaler (fp16 ``16-mixed``): there inf gradients are routine and the scaler skips those steps
        itself; loss and ``H_res`` are still checked."""
        self.layer_names = layer_names
        self.check_gradients = check_gradients
        self.watch.reset()
        self._loss_sum = None
        return bool(layer_names)

    def observe_loss(self, loss: Tensor) -> None:
        """Fold one backward's loss into the step's sum (device-side, no sync)."""
        total = loss.detach().sum(dtype=torch.float32)
        self._loss_sum = total if self._loss_sum is None else self._loss_sum + total

    def check(self, trainer: Any, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Run at ``on_before_optimizer_step``: one flag read (after an all-reduce across ranks), then act."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        values = [
            self._loss_sum if self._loss_sum is not None else torch.zeros((), device=trainer.strategy.root_device),
            _total_norm(params) if self.check_gradients else torch.zeros((), device=trainer.strategy.root_device),
            *self.watch.layer_sums,
        ]
        device = trainer.strategy.root_device
        bad = (~torch.isfinite(torch.stack([v.to(device) for v in values]))).float()
        if trainer.world_size > 1:
            bad = _layers_padded(bad, len(self.layer_names) + 2)
            bad = trainer.strategy.reduce(bad, reduce_op="max")
        flags = bad.tolist()
        self._loss_sum = None
        self.watch.reset()
        if not any(flags):
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.on_nonfinite == "warn":
            if self.consecutive == 1:  # once per run of non-finite steps: after a bad update, every step is bad
                message = _describe(trainer.global_step, flags, self.layer_names, module)
                rank_zero_warn(
                    f"{message} Applying the step anyway (on_nonfinite='warn'); the following non-finite "
                    "steps in a row are not reported."
                )
            return
        message = _describe(trainer.global_step, flags, self.layer_names, module)
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"{message} The step was not applied. Pass MHCCallback(on_nonfinite='skip') to skip such steps "
                "(counted in mhc/skipped_steps), or 'warn' to go on regardless.",
                step=trainer.global_step,
            )
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        if self.consecutive > self.max_consecutive_skips:
            raise NonFiniteError(
                f"{message} That is {self.consecutive} non-finite steps in a row, more than "
                f"max_consecutive_skips={self.max_consecutive_skips}: the weights or the data are broken, not one "
                "batch. Resume from the last checkpoint with a lower learning rate, or find the layer named above.",
                step=trainer.global_step,
            )
        rank_zero_warn(f"{message} Skipped the step (on_nonfinite='skip', {self.skipped} skipped so far).")


def _total_norm(params: list[nn.Parameter]) -> Tensor:
    """L2 norm of the local gradients of ``params`` (each rank's own shard of a DTensor), on their device."""
    if not params:
        return torch.zeros(())
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in (p.grad.detach() for p in params)]
    return torch.nn.utils.get_total_norm(grads)


def _layers_padded(bad: Tensor, length: int) -> Tensor:
    """Flags of one fixed length on every rank (a rank may have seen no ``H_res`` this step, e.g. no forward)."""
    return torch.cat([bad, bad.new_zeros(length - bad.numel())]) if bad.numel() < length else bad[:length]


def _describe(step: int, flags: list[float], layer_names: list[str], module: nn.Module) -> str:
    """What went non-finite at ``step`` and the first layer where, as far as can be told."""
    loss_bad, grads_bad, *layers_bad = flags
    what = [name for name, bad in (("loss", loss_bad), ("gradients", grads_bad), ("H_res", any(layers_bad))) if bad]
    where = ""
    first_layer = next((i for i, bad in enumerate(layers_bad) if bad), None)
    if first_layer is not None and first_layer < len(layer_names):
        where = f" First layer with a non-finite H_res (depth order): {layer_names[first_layer]!r}."
    else:
        weight = _first_nonfinite(module.named_parameters(), lambda p: p)
        grad = _first_nonfinite(module.named_parameters(), lambda p: p.grad)
        if weight is not None:
            where = f" First non-finite weight: {weight!r}."
        elif grad is not None:
            where = f" First non-finite gradient (parameter order): {grad!r}."
        if layers_bad and not any(layers_bad):
            where += " Every layer's H_res was finite."
    return f"Non-finite {', '.join(what)} at global step {step}.{where}"


def _first_nonfinite(named: Iterable[tuple[str, nn.Parameter]], pick: Any) -> str | None:
    for name, p in named:
        t = pick(p)
        if t is not None:
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def first_nonfinite_state(module: nn.Module) -> str | None:
    """Name of the first parameter or buffer of ``module`` holding a non-finite value (``None``: all finite)."""
    return _first_nonfinite([*module.named_parameters(), *module.named_buffers()], lambda t: t)
