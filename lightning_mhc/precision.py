"""mHC's own parameters stay float32 when a model is cast to half precision.

Under ``precision="bf16-true"`` Lightning casts the whole module to bfloat16. The mHC gates and biases then stop
learning: their Adam updates (~lr) fall below half a bfloat16 ulp of values near 1 (2^-8), so they round away.
The paper keeps these parameters in fp32; the coefficients are computed in fp32 anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


class Float32Parameters(nn.Module):
    """A module whose own floating-point parameters are cast back to float32 after any half-precision cast."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)
        for param in self._parameters.values():
            if param is not None and param.dtype in _HALF:
                param.data = param.data.float()
        return result
