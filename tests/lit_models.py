"""Plain LightningModules around the block-style models, as a user would write them (no mHC in them)."""

import lightning as L
import torch
import torch.nn.functional as F
from block_styles import VOCAB, LlamaLike, NanoGPT
from torch.utils.data import DataLoader, TensorDataset

MODELS = {"nanogpt": NanoGPT, "llama": LlamaLike}


class LitLM(L.LightningModule):
    def __init__(self, arch: str = "nanogpt", depth: int = 3, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.model = MODELS[arch](depth=depth)
        self.losses = []

    def forward(self, tokens):
        return self.model(tokens)

    def loss(self, batch):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        if self.training:  # MHCCallback's probe runs this step once in eval mode
            self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        (tokens,) = batch
        logits = self(tokens[:, :-1])
        self.log("val_loss", F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class LazyLitLM(LitLM):
    """Builds its layers in configure_model, as large-model code does."""

    def __init__(self, arch: str = "nanogpt", depth: int = 3, lr: float = 3e-3):
        super().__init__(arch, depth, lr)
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = MODELS[self.hparams.arch](depth=self.hparams.depth)


class ManualLitLM(LitLM):
    """Manual optimization: training_step fetches and steps its optimizer itself."""

    def __init__(self, arch: str = "nanogpt", depth: int = 3, lr: float = 3e-3, example: bool = False):
        super().__init__(arch, depth, lr)
        self.automatic_optimization = False
        if example:
            self.example_input_array = torch.zeros(1, 16, dtype=torch.long)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        loss = self.loss(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.losses.append(loss.item())
        return loss


class ShardedLitLM(LitLM):
    """Builds its layers in __init__ and shards each block and the root with FSDP2 in configure_model."""

    def configure_model(self):
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


class BuildAndShardLitLM(ShardedLitLM):
    """Builds its layers in configure_model and shards them there: too late for the callback to inject."""

    def __init__(self, arch: str = "nanogpt", depth: int = 3, lr: float = 3e-3):
        super().__init__(arch, depth, lr)
        self.model = None

    def configure_model(self):
        if self.model is None:
            self.model = MODELS[self.hparams.arch](depth=self.hparams.depth)
        super().configure_model()


class ApplyThenShardLitLM(BuildAndShardLitLM):
    """Builds its layers in configure_model, injects with apply_mhc, then shards: the callback adopts the injection."""

    def configure_model(self):
        from lightning_mhc import MHCConfig, apply_mhc

        if self.model is None:
            self.model = MODELS[self.hparams.arch](depth=self.hparams.depth)
            apply_mhc(self, MHCConfig(streams=4), example_input=torch.zeros(1, 16, dtype=torch.long))
        super().configure_model()


def token_loader(samples=16, batch_size=4, seq=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (samples, seq), generator=g)
    # a learnable pattern: every sequence repeats a short motif
    tokens[:, 8:] = tokens[:, : seq - 8]
    return DataLoader(TensorDataset(tokens), batch_size=batch_size, shuffle=False)


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return L.Trainer(**{**defaults, **kwargs})
