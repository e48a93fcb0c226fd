"""How the n-stream state travels from one injected block to the next: on the hidden state the block returns.

Every injected block returns an ordinary hidden state of the original shape (the readout of its streams), so code
that looks at per-block outputs (forward hooks, ``output_hidden_states``, intermediate-feature APIs, code in the
model's own loop) sees a hidden state equal to the original model's at ``gate_init=0``. The full ``(..., n, C)``
stream state rides on that tensor as an attribute, and the next injected block takes it from there. Wrappers that
hand a block an alias of that tensor instead of the tensor itself (FSDP2's input hooks, ``view_as``) are followed
through ``_base``; a hidden state changed in place between blocks is refused, since its streams no longer match it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_mhc.branches import tensor_version

STREAMS_ATTRIBUTE = "_mhc_streams"


class Carried(NamedTuple):
    """The stream state a block returned, the version of the returned hidden state then, and its layout."""

    streams: Tensor
    version: int
    layout: tuple


def _layout(tensor: Tensor) -> tuple:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset(), tensor.dtype


def attach_streams(hidden: Tensor, streams: Tensor) -> Tensor:
    """Put ``streams`` on ``hidden`` (the tensor a block returns) for the next injected block to take; also on the
    tensor ``hidden`` is a view of, where views of it (aliases handed over by wrappers) will look for them."""
    carried = Carried(streams, tensor_version(hidden), () if torch.compiler.is_compiling() else _layout(hidden))
    setattr(hidden, STREAMS_ATTRIBUTE, carried)
    if not torch.compiler.is_compiling() and hidden._base is not None:
        setattr(hidden._base, STREAMS_ATTRIBUTE, carried)
    return hidden


class _TieToAlias(torch.autograd.Function):
    """Returns the carried streams unchanged; in backward also hands the hidden state they came with a zero
    gradient, so hooks that a wrapper registered on it (FSDP2's gathers before and reduce-scatters after a sharded
    block's backward) fire at the right time."""

    @staticmethod
    def forward(ctx, streams: Tensor, alias: Tensor) -> Tensor:
        ctx.alias_meta = (alias.shape, alias.dtype, alias.device)
        return streams.view_as(streams)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        shape, dtype, device = ctx.alias_meta
        return grad, torch.zeros((), dtype=dtype, device=device).expand(shape)


def carried_streams(hidden: Tensor, block_name: str) -> Tensor | None:
    """The stream state the previous injected block attached to ``hidden`` (or to an alias of it: a view of the
    same data with the same layout), else ``None``. Raises when ``hidden`` was modified in place after the block
    returned it."""
    carried = getattr(hidden, STREAMS_ATTRIBUTE, None)
    aliased = False
    if carried is None and not torch.compiler.is_compiling() and hidden._base is not None:
        carried = getattr(hidden._base, STREAMS_ATTRIBUTE, None)
        if carried is None or carried.layout != _layout(hidden):
            return None
        aliased = True
    if carried is None:
        return None
    if tensor_version(hidden) != carried.version:
        raise RuntimeError(
            f"The hidden state reaching {block_name} was modified in place after the previous injected block "
            "returned it, so it no longer matches the mHC stream state. Replace the in-place operation between "
            "the blocks (e.g. `h *= s`) by an out-of-place one inside a block, or inject with blocks= naming a "
            "stack whose blocks run back to back."
        )
    if hidden.requires_grad and (aliased or _has_backward_hooks(hidden)):
        return _TieToAlias.apply(carried.streams, hidden)
    return carried.streams


def _has_backward_hooks(tensor: Tensor) -> bool:
    """Whether a wrapper registered gradient hooks on ``tensor`` (FSDP2 does on a sharded module's outputs, to
    gather its parameters before their backward), which must fire although its gradient flows via the streams."""
    return not torch.compiler.is_compiling() and bool(tensor._backward_hooks)


def hidden_carrying(streams: Tensor, reduce: str = "mean") -> Tensor:
    """A hidden state that carries ``streams`` ``(..., n, C)``: their mean (or sum) over the stream axis, with the
    streams attached, as an injected block would have returned it. For code that moves the stream state on its own
    (a pipeline stage receiving it from the previous stage) and hands it to the next injected block."""
    hidden = streams.sum(-2) if reduce == "sum" else streams.mean(-2)
    return attach_streams(hidden, streams)
