"""Building blocks of the bundled language models and their shared LightningModule base, :class:`TransformerLM`.

Every block is an ordinary pre-norm residual block, ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``, that takes and
returns the hidden tensor ``(batch, time, d_model)``: exactly the shape :class:`~lightning_mhc.MHCCallback` splits into
two residual branches. Nothing here knows about mHC.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mhc.config import check_bool, check_choice, check_float, check_int
from lightning_mhc.metrics import ExpertLoad
from lightning_mhc.moe import MLP_TYPES, activation_fn, iter_moe_layers, moe_aux_loss

NORM_EPS = 1e-6


def rotary_tables(length: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of the rotary angles, each ``(length, head_dim)``, in float32.

    Computed per call (a few thousand elements) so the model holds no position buffers: it builds on the meta device
    and splits into pipeline stages without re-initialising any state.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x (..., time, head_dim)`` by the rotary angles (rotate-half convention)."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _init_linear(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    return layer


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings and ``F.scaled_dot_product_attention``."""

    def __init__(self, d_model: int, n_heads: int, rope_theta: float = 10_000.0, init_std: float = 0.02) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.qkv = _init_linear(nn.Linear(d_model, 3 * d_model, bias=False), init_std)
        self.proj = _init_linear(nn.Linear(d_model, d_model, bias=False), init_std)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, time, d_model) -> (batch, time, d_model)``, each position attending to itself and the past."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rotary_tables(t, self.head_dim, self.rope_theta, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """Dense feed-forward layer in the MoE experts' conventions: ``mlp_type="mlp"`` is ``down(gelu(up(x)))``,
    ``"glu"`` is SwiGLU ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, ffn_size: int, mlp_type: str = "glu", init_std: float = 0.02) -> None:
        super().__init__()
        check_choice("mlp_type", mlp_type, MLP_TYPES)
        self.act = activation_fn("silu" if mlp_type == "glu" else "gelu")
        self.up_proj = _init_linear(nn.Linear(d_model, ffn_size, bias=False), init_std)
        self.down_proj = _init_linear(nn.Linear(ffn_size, d_model, bias=False), init_std)
        self.gate_proj = _init_linear(nn.Linear(d_model, ffn_size, bias=False), init_std) if mlp_type == "glu" else None

    def forward(self, x: Tensor) -> Tensor:
        """``(..., d_model) -> (..., d_model)``."""
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``; ``ffn`` is dense or MoE."""

    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, rope_theta: float, init_std: float) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.attn = CausalSelfAttention(d_model, n_heads, rope_theta, init_std)
        self.norm2 = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.ffn = ffn

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, time, d_model) -> (batch, time, d_model)``."""
        x = x + self.attn(self.norm1(x))
        x = x + self.ffn(self.norm2(x))
        return x


class OutputHead(nn.Module):
    """Final RMSNorm and the projection to vocabulary logits."""

    def __init__(self, d_model: int, vocab_size: int, init_std: float) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=NORM_EPS)
        self.proj = _init_linear(nn.Linear(d_model, vocab_size, bias=False), init_std)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, time, d_model) -> (batch, time, vocab_size)``."""
        return self.proj(self.norm(x))


def _lr_factor(step: int, warmup_steps: int, total_steps: float, min_lr_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not math.isfinite(total_steps) or total_steps <= warmup_steps:
        return 1.0
    progress = min((step - warmup_steps) / (total_steps - warmup_steps), 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TransformerLM(L.LightningModule):
    """Causal language model ``head(blocks(embedding(ids)))`` trained with next-token cross-entropy (nats).

    The base of :class:`~lightning_mhc.models.MoETransformerLM` and :class:`~lightning_mhc.models.DenseTransformerLM`,
    which choose each block's feed-forward layer through ``ffn_factory(layer_index)``. Batches are
    ``(input_ids, targets)``, both ``LongTensor [batch, time]`` (as :class:`~lightning_mhc.data.ByteLMDataModule`
    yields). When the blocks hold MoE layers (:func:`~lightning_mhc.moe.build_moe`) their auxiliary balancing loss is
    added to the training loss and their expert load is logged under ``moe/...``.

    Blocks live in ``self.layers`` (an ``nn.ModuleList``), so ``MHCCallback()`` finds them on its own and
    ``MHCCallback(blocks="layers")`` names them.

    Pipeline parts (for a pipeline strategy): :meth:`pipeline_parts` returns ``(embedding, blocks, head)`` such that
    ``logits = head(block_k(...block_0(embedding(input_ids))))`` and ``loss = pipeline_loss(logits, targets)``; each
    block maps a hidden tensor to one of the same shape and keeps no state between calls except the MoE layers'
    per-forward statistics (summed per stage with :func:`~lightning_mhc.moe.moe_aux_loss`). Tied embeddings share one
    weight between the first and last stage, so pipelines want ``tie_embeddings=False``.
    """

    def __init__(
        self,
        *,
        ffn_factory: Callable[[int], nn.Module],
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        seq_len: int,
        tie_embeddings: bool,
        rope_theta: float,
        init_std: float,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        warmup_steps: int,
        min_lr_ratio: float,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, 1)
        check_int("d_model", d_model, 2)
        check_int("n_layers", n_layers, 1)
        check_int("n_heads", n_heads, 1)
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(
                f"d_model={d_model} with n_heads={n_heads} is not allowed; pass n_heads dividing d_model into an even "
                "head size (rotary embeddings rotate pairs of channels)."
            )
        check_int("seq_len", seq_len, 1)
        check_bool("tie_embeddings", tie_embeddings)
        check_float("rope_theta", rope_theta, 1.0)
        check_float("init_std", init_std, 0.0, low_open=True)
        check_float("lr", lr, 0.0, low_open=True)
        check_float("weight_decay", weight_decay, 0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} is not allowed; pass two numbers in [0, 1), e.g. (0.9, 0.95).")
        for i, beta in enumerate(betas):
            check_float(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_int("warmup_steps", warmup_steps, 0)
        check_float("min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.lr, self.weight_decay, self.betas = lr, weight_decay, (float(betas[0]), float(betas[1]))
        self.warmup_steps, self.min_lr_ratio = warmup_steps, min_lr_ratio
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, mean=0.0, std=init_std)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, n_heads, ffn_factory(i), rope_theta, init_std) for i in range(n_layers)
        )
        self.head = OutputHead(d_model, vocab_size, init_std)
        if tie_embeddings:
            self.head.proj.weight = self.embedding.weight
        self.expert_load = nn.ModuleDict(
            {str(i): ExpertLoad(num_experts=layer.config.num_experts) for i, layer in enumerate(self.moe_layers())}
        )

    def moe_layers(self) -> list[nn.Module]:
        """The MoE feed-forward layers in block order (empty for a dense model)."""
        return list(iter_moe_layers(self.layers))

    def pipeline_parts(self) -> tuple[nn.Module, nn.ModuleList, nn.Module]:
        """``(embedding, blocks, head)``: ids to hidden, residual blocks hidden to hidden, hidden to logits."""
        return self.embedding, self.layers, self.head

    def pipeline_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss of one (micro)batch for a pipeline strategy: next-token cross-entropy (the MoE balancing loss is
        added per stage by the strategy)."""
        return self.loss_fn(logits, targets)

    def pipeline_batch(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """``(input_ids, targets)`` of a batch, for a pipeline strategy."""
        return batch[0], batch[1]

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits ``(batch, time, vocab_size)`` for ``input_ids (batch, time)``, ``time <= seq_len``."""
        if input_ids.shape[-1] > self.seq_len:
            raise ValueError(
                f"input of length {input_ids.shape[-1]} exceeds seq_len={self.seq_len}; pass at most seq_len tokens or "
                "build the model with a larger seq_len."
            )
        x = self.embedding(input_ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)

    @staticmethod
    def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats, computed in float32 whatever the logits' dtype."""
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy plus the MoE balancing loss; logs ``train_loss`` and (in training) the ``moe/...`` metrics."""
        input_ids, targets = batch
        loss = self.loss_fn(self(input_ids), targets)
        self.log("train_loss", loss, prog_bar=True)
        aux = moe_aux_loss(self)
        if self.training and self.expert_load:
            self._log_moe(aux)
        return loss if aux is None else loss + aux

    def _log_moe(self, aux: Optional[Tensor]) -> None:
        """Accumulate expert load every step; log the worst layer's max/mean load at the trainer's logging steps."""
        layers = self.moe_layers()
        for metric, layer in zip(self.expert_load.values(), layers):
            metric.update(layer.tokens_per_expert)
        self.log("moe/router_entropy", torch.stack([layer.router_entropy for layer in layers]).mean())
        if aux is not None:
            self.log("moe/aux_loss", aux.detach())
        every = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % every == 0:
            loads = [metric.compute() for metric in self.expert_load.values()]
            self.log("moe/max_over_mean", torch.stack([load["max_over_mean"] for load in loads]).max())
            self.log("moe/cv", torch.stack([load["cv"] for load in loads]).max())
            for metric in self.expert_load.values():
                metric.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` (nats per token), averaged over the validation set."""
        input_ids, targets = batch
        self.log("val_loss", self.loss_fn(self(input_ids), targets), prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test_loss`` (nats per token)."""
        input_ids, targets = batch
        self.log("test_loss", self.loss_fn(self(input_ids), targets))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """The most likely next token at every position, ``(batch, time)``; ``batch`` is ids or ``(ids, targets)``."""
        input_ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(input_ids).argmax(dim=-1)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (weight decay on matrices only) with linear warmup and cosine decay over the run's steps."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas)
        total = float(self.trainer.estimated_stepping_batches)
        warmup, floor = self.warmup_steps, self.min_lr_ratio
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
