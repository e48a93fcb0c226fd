"""MoETransformerLM: a DeepSeek-V3-style Mixture-of-Experts language model, small enough to train on a laptop CPU.

The first ``dense_layers`` blocks have a dense feed-forward layer ("leading dense layers"); the others an MoE layer of
``num_experts`` routed experts (``top_k`` active per token) plus an always-on shared expert, built by
:func:`~lightning_mhc.moe.build_moe` (MegaBlocks dMoE on GPU, plain torch elsewhere).
"""

from __future__ import annotations

from torch import nn

from lightning_mhc.config import check_bool, check_choice, check_float, check_int
from lightning_mhc.models.layers import FeedForward, TransformerLM
from lightning_mhc.moe import BACKENDS, BALANCINGS, MLP_TYPES, MoEConfig, build_moe


class MoETransformerLM(TransformerLM):
    """Causal MoE language model: blocks ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))`` with RMSNorm, rotary
    attention, dense FFNs in the first ``dense_layers`` blocks and MoE FFNs after (see :class:`TransformerLM` for the
    training step, the logged metrics and :meth:`~TransformerLM.pipeline_parts`).

    Example::

        model = MoETransformerLM(d_model=64, n_layers=4, num_experts=8, top_k=2)
        trainer = L.Trainer(max_steps=300, callbacks=[MHCCallback(streams=4)])
        trainer.fit(model, datamodule=ByteLMDataModule(seq_len=model.seq_len))

    Args:
        vocab_size: number of token ids (256 for bytes).
        d_model: model width.
        n_layers: number of blocks.
        n_heads: attention heads; ``d_model / n_heads`` must be even (rotary embeddings).
        seq_len: longest input the model accepts.
        dense_layers: leading blocks with a dense FFN instead of MoE, ``0 <= dense_layers <= n_layers``.
        dense_ffn_size: hidden size of those dense FFNs.
        num_experts: routed experts per MoE layer.
        top_k: routed experts active per token.
        expert_ffn_size: hidden size of each routed expert.
        shared_expert_size: hidden size of the always-on shared expert (``s`` shared experts of size ``f`` are one
            of size ``s * f``, as DeepSeek implements them); 0 for none.
        mlp_type: ``"glu"`` (SwiGLU) or ``"mlp"`` (GELU), for experts and dense FFNs alike.
        balancing: ``"aux_loss"`` (MegaBlocks' load-balancing loss added to the training loss), ``"aux_free"``
            (DeepSeek-V3's routing bias) or ``"none"``.
        aux_loss_weight: weight of the load-balancing loss (``balancing="aux_loss"``).
        bias_update_rate: step of the aux-free routing bias per training step (``balancing="aux_free"``).
        normalize_expert_weights: divide the top-k gate weights by their sum.
        moe_backend: ``"auto"``, ``"torch"`` or ``"megablocks"`` (CUDA and bf16 weights only), see ``build_moe``.
        tie_embeddings: share the embedding matrix with the output projection.
        rope_theta: rotary base.
        init_std: standard deviation of the normal init of every weight matrix.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of weight matrices (vectors are not decayed).
        betas: AdamW betas.
        warmup_steps: linear warmup steps; cosine decay to ``min_lr_ratio * lr`` over the rest of the run.
        min_lr_ratio: final learning rate over peak learning rate.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 4,
        n_heads: int = 4,
        seq_len: int = 256,
        dense_layers: int = 1,
        dense_ffn_size: int = 256,
        num_experts: int = 8,
        top_k: int = 2,
        expert_ffn_size: int = 64,
        shared_expert_size: int = 64,
        mlp_type: str = "glu",
        balancing: str = "aux_free",
        aux_loss_weight: float = 0.01,
        bias_update_rate: float = 1e-3,
        normalize_expert_weights: bool = False,
        moe_backend: str = "auto",
        tie_embeddings: bool = False,
        rope_theta: float = 10_000.0,
        init_std: float = 0.02,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        check_int("n_layers", n_layers, 1)
        check_int("dense_layers", dense_layers, 0)
        if dense_layers > n_layers:
            raise ValueError(
                f"dense_layers={dense_layers} is not allowed; pass at most n_layers={n_layers} leading dense blocks."
            )
        check_int("dense_ffn_size", dense_ffn_size, 1)
        check_int("num_experts", num_experts, 1)
        check_int("top_k", top_k, 1)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} is not allowed; pass an integer between 1 and num_experts={num_experts}.")
        check_int("expert_ffn_size", expert_ffn_size, 1)
        check_int("shared_expert_size", shared_expert_size, 0)
        check_choice("mlp_type", mlp_type, MLP_TYPES)
        check_choice("balancing", balancing, BALANCINGS)
        check_float("aux_loss_weight", aux_loss_weight, 0.0)
        check_float("bias_update_rate", bias_update_rate, 0.0)
        check_bool("normalize_expert_weights", normalize_expert_weights)
        check_choice("moe_backend", moe_backend, BACKENDS)

        def ffn(index: int) -> nn.Module:
            """Called by ``TransformerLM.__init__`` once it has checked ``d_model`` and ``init_std``."""
            if index < dense_layers:
                return FeedForward(d_model, dense_ffn_size, mlp_type, init_std)
            config = MoEConfig(
                hidden_size=d_model,
                ffn_hidden_size=expert_ffn_size,
                num_experts=num_experts,
                top_k=top_k,
                mlp_type=mlp_type,
                shared_expert_hidden_size=shared_expert_size,
                balancing=balancing,
                aux_loss_weight=aux_loss_weight,
                bias_update_rate=bias_update_rate,
                normalize_expert_weights=normalize_expert_weights,
                init_std=init_std,
            )
            return build_moe(config, backend=moe_backend)

        super().__init__(
            ffn_factory=ffn,
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            seq_len=seq_len,
            tie_embeddings=tie_embeddings,
            rope_theta=rope_theta,
            init_std=init_std,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
        )
        self.save_hyperparameters()
