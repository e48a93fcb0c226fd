"""StreamCapture: what the stability metrics read (``H_res`` per layer, the final stream state's diversity), taken
only while a capture is attached, so steps that are not logged pay nothing but an ``is None`` check. The final
stream state (``n C`` per token) is reduced to its diversity statistics at once, not kept alive through backward.
Forwards that activation checkpointing replays during backward are not recorded again."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mhc.metrics import StreamDiversity


def in_backward() -> bool:
    """Whether this runs inside a backward pass (a forward re-run by activation checkpointing or recomputation)."""
    return torch._C._current_graph_task_id() != -1


class StreamCapture:
    """Detached ``H_res`` of every hyper-connection, grouped per forward in depth order, and the diversity of the
    stream states the last block reduces (``None`` before any)."""

    def __init__(self) -> None:
        self.forwards: list[list[Tensor]] = []
        self.diversity: StreamDiversity | None = None

    def begin_forward(self) -> None:
        if not in_backward():
            self.forwards.append([])

    def add_h_res(self, h_res: Tensor) -> None:
        if in_backward():
            return
        if not self.forwards:
            self.begin_forward()
        self.forwards[-1].append(h_res.detach())

    def add_final_streams(self, streams: Tensor) -> None:
        if in_backward():
            return
        if self.diversity is None:
            self.diversity = StreamDiversity().to(streams.device)
        self.diversity.update(streams)
