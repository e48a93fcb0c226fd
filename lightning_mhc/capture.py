"""StreamCapture: what the stability metrics read (``H_res`` per layer, the final stream state's diversity), taken
only while a capture is attached, so steps that are not logged pay nothing but an ``is None`` check. The final
stream state (``n C`` per token) is reduced to its diversity statistics at once, not kept alive through backward.
Forwards that activation checkpointing replays during backward are not recorded again."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mhc.metrics import StreamDiversity, diversity_sums


def in_backward() -> bool:
    """Whether this runs inside a backward pass (a forward re-run by activation checkpointing or recomputation)."""
    return torch._C._current_graph_task_id() != -1


def by_forward(records: list) -> list[list]:
    """Per-call records (``None`` marks the start of a forward) grouped per forward, in call order."""
    groups: list[list] = []
    for record in records:
        if record is None or not groups:
            groups.append([])
        if record is not None:
            groups[-1].append(record)
    return groups


class StreamCapture:
    """Detached ``H_res`` of every hyper-connection, grouped per forward in depth order, and the diversity of the
    stream states the last block reduces (``None`` before any).

    Recording only appends tensors (and ``None`` at each forward's start) to lists, and no torchmetrics object is
    built in the forward, so compiled code records without more graph breaks than the replay check's; the groups and
    the diversity metric are assembled when read."""

    def __init__(self) -> None:
        self.records: list[Tensor | None] = []
        self.diversity_sums: list[tuple[Tensor, Tensor]] = []

    @property
    def forwards(self) -> list[list[Tensor]]:
        """``H_res`` per forward, in depth order."""
        return by_forward(self.records)

    @property
    def diversity(self) -> StreamDiversity | None:
        """The recorded stream states' diversity (``None`` before any)."""
        if not self.diversity_sums:
            return None
        distances, tokens = zip(*self.diversity_sums)
        metric = StreamDiversity().to(distances[0].device)
        metric.merge_state({"distance_sum": torch.stack(distances).sum(), "tokens": torch.stack(tokens).sum()})
        return metric

    def begin_forward(self) -> None:
        if not in_backward():
            self.records.append(None)

    def add_h_res(self, h_res: Tensor) -> None:
        if not in_backward():
            self.records.append(h_res.detach())

    def add_forward(self, h_res: list[Tensor]) -> None:
        """One whole forward's ``H_res`` in depth order (composed elsewhere, e.g. across pipeline stages)."""
        self.records += [None, *h_res]

    def add_final_streams(self, streams: Tensor) -> None:
        if not in_backward():
            self.diversity_sums.append(diversity_sums(streams))
