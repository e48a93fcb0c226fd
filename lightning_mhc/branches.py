"""Find and replace the residual additions inside a block's own ``forward``, without tracing.

A block's residual branches end at additions whose one operand *is* the current residual tensor
(``x = x + attn(ln(x))``, ``h = residual + h``, ``x = x + drop_path(ls(mlp(norm(x))))``). A
``TorchFunctionMode`` watches the block's forward for those additions, so control flow, keyword arguments
and tuple returns need no special care: the block runs its own code, we only change what the additions return.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_ADDITIONS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__}


def is_alias(tensor: Tensor, of: Tensor) -> bool:
    """``tensor`` is ``of`` or a view of the same data laid out the same way (same base, shape, strides and offset),
    as the inputs FSDP2's hooks hand a sharded module are (not followed under torch.compile)."""
    if tensor is of:
        return True
    if torch.compiler.is_compiling() or tensor._base is None:
        return False
    return (
        tensor._base is (of if of._base is None else of._base)
        and tensor.shape == of.shape
        and tensor.stride() == of.stride()
        and tensor.storage_offset() == of.storage_offset()
        and tensor.dtype == of.dtype
    )


def _branch_output(residual: Tensor | None, func: Any, args: tuple, kwargs: dict) -> Tensor | None:
    """``F`` when ``func(*args)`` is ``residual + F`` (either order), else ``None``."""
    if residual is None or func not in _ADDITIONS or len(args) != 2:
        return None
    first, second = args
    if not (isinstance(first, Tensor) and isinstance(second, Tensor)):
        return None
    if is_alias(first, residual):
        alpha = kwargs.get("alpha", 1)
        return second if alpha == 1 else second * alpha
    if is_alias(second, residual) and "alpha" not in kwargs:
        return first
    return None


def tensor_version(tensor: Tensor) -> int:
    """In-place version counter of ``tensor``; -1 where it cannot be read (inference tensors, under torch.compile)."""
    if torch.compiler.is_compiling() or tensor.is_inference():
        return -1
    return tensor._version


def plain_sum(residual: Tensor, branch_out: Tensor) -> Tensor:
    """``end_branch`` that leaves the block unchanged: used to count branches at injection time."""
    return residual + branch_out


class ResidualWatcher(TorchFunctionMode):
    """Calls ``end_branch(residual, F)`` at every ``residual + F`` and hands its result back as the sum.

    What ``end_branch`` returns becomes the next residual, so the block's next branch reads it.
    """

    def __init__(self, residual: Tensor, end_branch: Callable[[Tensor, Tensor], Tensor] = plain_sum) -> None:
        super().__init__()
        self.residual: Tensor | None = residual
        self.end_branch = end_branch
        self.branches = 0
        self.last_sum: Tensor | None = None
        self.last_sum_version = -1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        branch_out = _branch_output(self.residual, func, args, kwargs)
        if branch_out is None:
            return func(*args, **kwargs)
        self.branches += 1
        new_residual = self.end_branch(self.residual, branch_out)
        self.residual = new_residual
        self.last_sum = new_residual
        self.last_sum_version = tensor_version(new_residual)
        return new_residual


def returns_last_sum(watcher: ResidualWatcher, block_hidden: Tensor) -> bool:
    """True when the block returned its last residual sum unchanged (the same tensor, not modified in place, as
    by ``x += shortcut; x = relu_(x)``), the condition for splitting it."""
    return (
        watcher.branches > 0
        and block_hidden is watcher.last_sum
        and tensor_version(block_hidden) == watcher.last_sum_version
    )
