"""Bundled example LightningModules: a DeepSeek-V3-style MoE language model and its dense counterpart."""

from lightning_mhc.models.dense_lm import DenseTransformerLM
from lightning_mhc.models.layers import TransformerLM
from lightning_mhc.models.moe_lm import MoETransformerLM

__all__ = ["DenseTransformerLM", "MoETransformerLM", "TransformerLM"]
