"""DenseTransformerLM: the same language model as :class:`~lightning_mhc.models.MoETransformerLM` without experts."""

from __future__ import annotations

from lightning_mhc.config import check_choice, check_int
from lightning_mhc.models.layers import FeedForward, TransformerLM
from lightning_mhc.moe import MLP_TYPES


class DenseTransformerLM(TransformerLM):
    """Causal language model whose blocks all have a dense feed-forward layer (a baseline for the MoE model).

    Example::

        model = DenseTransformerLM(d_model=64, n_layers=4)
        L.Trainer(max_steps=300, callbacks=[MHCCallback(streams=4)]).fit(model, datamodule=ByteLMDataModule())

    Args:
        ffn_size: hidden size of every block's feed-forward layer.
        mlp_type: ``"glu"`` (SwiGLU) or ``"mlp"`` (GELU).

    The other arguments are those of :class:`~lightning_mhc.models.MoETransformerLM`.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        d_model: int = 64,
        n_layers: int = 4,
        n_heads: int = 4,
        seq_len: int = 256,
        ffn_size: int = 256,
        mlp_type: str = "glu",
        tie_embeddings: bool = False,
        rope_theta: float = 10_000.0,
        init_std: float = 0.02,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 50,
        min_lr_ratio: float = 0.1,
    ) -> None:
        check_int("ffn_size", ffn_size, 1)
        check_choice("mlp_type", mlp_type, MLP_TYPES)
        super().__init__(
            ffn_factory=lambda index: FeedForward(d_model, ffn_size, mlp_type, init_std),
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
