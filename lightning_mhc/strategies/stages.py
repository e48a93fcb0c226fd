"""Cutting an mHC-injected LightningModule into pipeline stages.

The pipeline protocol (what :class:`~lightning_mhc.strategies.MHCPipelineStrategy` asks of a LightningModule):

* ``pipeline_parts() -> (embedding, blocks, head)`` (required): ``embedding`` maps the model input to the hidden
  state, ``blocks`` is the ``nn.ModuleList`` of residual blocks (the stack mHC is injected into), ``head`` maps the
  last hidden state to the output, so that ``head(blocks[-1](...blocks[0](embedding(x))))`` is the model's forward.
* ``pipeline_loss(output, target) -> Tensor`` (required): the mean loss of one (micro)batch.
* ``pipeline_batch(batch) -> (input, target)`` (optional): default ``(batch[0], batch[1])``.

Across a stage boundary the full ``(..., n, C)`` stream state travels (not the hidden state), so the first stage runs
the embedding and expands into n streams (the first injected block), the last stage applies the readout (the last
injected block) and the head.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_mhc.capture import StreamCapture, in_backward
from lightning_mhc.carry import carried_streams, hidden_carrying
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.mhc_block import MHCBlock
from lightning_mhc.moe import iter_moe_layers, moe_aux_loss

PROTOCOL_EXAMPLE = """\
    class MyModule(L.LightningModule):
        def pipeline_parts(self):
            # input -> hidden, the residual block stack (nn.ModuleList), hidden -> output
            return self.embedding, self.layers, self.head

        def pipeline_loss(self, output, target):
            return F.cross_entropy(output.flatten(0, -2), target.flatten())

        def pipeline_batch(self, batch):  # optional, default (batch[0], batch[1])
            return batch["input_ids"], batch["labels"]"""


def check_protocol(module: nn.Module) -> None:
    """Raise ``TypeError`` explaining the pipeline protocol unless ``module`` implements it."""
    missing = [name for name in ("pipeline_parts", "pipeline_loss") if not callable(getattr(module, name, None))]
    if missing:
        raise TypeError(
            f"MHCPipelineStrategy needs {type(module).__name__} to say how it splits into pipeline stages, but it has "
            f"no {' or '.join(missing)}. Implement the pipeline protocol on your LightningModule:\n{PROTOCOL_EXAMPLE}\n"
            "The bundled models (lightning_mhc.models) implement it."
        )


def pipeline_parts(module: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
    """The module's ``(embedding, blocks, head)``, checked."""
    check_protocol(module)
    parts = module.pipeline_parts()
    if not (isinstance(parts, (tuple, list)) and len(parts) == 3 and all(isinstance(p, nn.Module) for p in parts)):
        raise TypeError(
            f"{type(module).__name__}.pipeline_parts() must return (embedding, blocks, head), three nn.Modules; got "
            f"{type(parts).__name__}."
        )
    embedding, blocks, head = parts
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise TypeError(
            f"{type(module).__name__}.pipeline_parts()[1] must be the non-empty nn.ModuleList (or nn.Sequential) of "
            f"residual blocks; got {type(blocks).__name__}."
        )
    return embedding, blocks, head


def split_batch(module: nn.Module, batch: Any) -> tuple[Any, Any]:
    """``(input, target)`` of a training batch, through ``pipeline_batch`` when the module defines it."""
    if callable(getattr(module, "pipeline_batch", None)):
        return module.pipeline_batch(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"MHCPipelineStrategy cannot take (input, target) from a batch of type {type(batch).__name__}: define "
        "pipeline_batch(batch) -> (input, target) on your LightningModule."
    )


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def balanced_split(sizes: list[int], parts: int) -> list[int]:
    """Block counts of ``parts`` contiguous groups of ``sizes`` (every group non-empty) minimising the largest sum."""
    n = len(sizes)
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][i]: the smallest possible largest sum when the first i items form k groups
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    counts, i = [], n
    for k in range(parts, 0, -1):
        j = cut[k][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def stage_block_counts(blocks: nn.ModuleList, stages: int, stage_split: Optional[list[int]]) -> list[int]:
    """How many blocks each stage runs: ``stage_split`` checked, or balanced by the blocks' parameter counts."""
    if stages > len(blocks):
        raise ValueError(
            f"The pipeline has {stages} stages but the model has only {len(blocks)} blocks; every stage needs at least "
            "one block. Use fewer devices (pipeline_parallel_size), a single-stage-per-rank schedule such as '1F1B' "
            "instead of a multi-stage one, or a deeper model."
        )
    if stage_split is None:
        return balanced_split([_param_count(b) for b in blocks], stages)
    if len(stage_split) != stages or sum(stage_split) != len(blocks):
        raise ValueError(
            f"stage_split={list(stage_split)} does not fit: pass {stages} block counts (one per stage), each >= 1, "
            f"summing to the model's {len(blocks)} blocks."
        )
    return list(stage_split)


class _AuxLossGrad(torch.autograd.Function):
    """Returns a copy of ``x``; in backward also hands ``aux`` the gradient ``scale`` (the MoE balancing loss of a
    stage enters the backward pass here, as if it were added to the loss). A copy, not a view: the zero-bubble
    schedules' split backward detaches the stage's intermediate tensors in place, which views do not allow."""

    @staticmethod
    def forward(ctx, x: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        shape, dtype = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=grad.device), None


class StageModule(nn.Module):
    """One pipeline stage: ``[embedding] -> blocks[start:stop] -> [head]``.

    Between stages the ``(..., n, C)`` stream state travels: a stage that is not the first rebuilds a hidden state
    carrying the received streams; a stage that is not the last sends the streams its last block carried. With
    ``comm_dtype`` the streams travel in that dtype (cast back to the parameters' dtype on arrival).
    """

    def __init__(
        self,
        index: int,
        num_stages: int,
        embedding: Optional[nn.Module],
        blocks: list[nn.Module],
        head: Optional[nn.Module],
        reduce: str = "mean",
        comm_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.index, self.num_stages = index, num_stages
        self.embedding = embedding
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.reduce = reduce
        self.comm_dtype = comm_dtype
        self.aux_scale = 1.0
        self.has_moe = any(True for _ in iter_moe_layers(self.blocks))
        self.captured: list[tuple[list[Tensor], list[Tensor]]] = []
        self._shapes_known = False

    def forward(self, x: Tensor) -> Tensor:
        if self.embedding is not None:
            x = self.embedding(x)
        else:
            dtype = next(self.blocks.parameters()).dtype
            x = hidden_carrying(x.to(dtype) if self.comm_dtype is not None else x, self.reduce)
        capture = getattr(self.blocks[0], "capture", None)
        # the stage's first forward is PipelineStage's shape inference (on uninitialised inputs): not recorded
        local = self._capture_locally(capture)
        # ... nor may it move state (the aux-free MoE bias steps on every training forward)
        buffers = None if self._shapes_known else [(b, b.detach().clone()) for b in self.buffers()]
        # (nor count towards the aux-free loads deferred to the end of the step)
        pending = (
            None if self._shapes_known else [(m, m.__dict__.get("pending_load")) for m in iter_moe_layers(self.blocks)]
        )
        try:
            for block in self.blocks:
                x = block(x)
        finally:
            if local is not None:
                self._restore_capture(capture, local, keep=self._shapes_known)
            for b, saved in buffers or ():
                b.detach().copy_(saved)
            for m, load in pending or ():
                m.pending_load = load
        self._shapes_known = True
        aux = moe_aux_loss(self.blocks) if self.has_moe and self.training and torch.is_grad_enabled() else None
        if self.head is not None:
            return self.head(x if aux is None else _AuxLossGrad.apply(x, aux, self.aux_scale))
        streams = carried_streams(x, type(self.blocks[-1]).__name__)
        if streams is None:
            raise RuntimeError(f"pipeline stage {self.index}: its last block returned no stream state to send on.")
        if aux is not None:
            streams = _AuxLossGrad.apply(streams, aux, self.aux_scale)
        # point-to-point ops send a tensor's storage as laid out: hand them a contiguous one
        return (streams.to(self.comm_dtype) if self.comm_dtype is not None else streams).contiguous()

    def _capture_locally(self, capture: Optional[StreamCapture]) -> Optional[StreamCapture]:
        """While the stability metrics capture, this stage's blocks record into a capture of their own per forward
        (one per microbatch), composed across stages after the step."""
        if capture is None or in_backward():
            return None
        local = StreamCapture()
        local.begin_forward()
        for m in self.blocks.modules():
            if isinstance(m, (HyperConnection, MHCBlock)):
                m.capture = local
        return local

    def _restore_capture(self, capture: StreamCapture, local: StreamCapture, keep: bool) -> None:
        for m in self.blocks.modules():
            if isinstance(m, (HyperConnection, MHCBlock)):
                m.capture = capture
        if keep:
            self.captured.append(([h for f in local.forwards for h in f], local.diversity))
