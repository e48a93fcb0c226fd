"""Reload a LightningModule trained with mHC: rebuild it, re-inject from the stored plan, load the weights."""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

import lightning as L
import torch

from lightning_mhc.callback import CHECKPOINT_KEY, has_mhc_weights, stored_config
from lightning_mhc.inject import apply_mhc

ModuleT = TypeVar("ModuleT", bound=L.LightningModule)


def load_from_checkpoint(module_class: type[ModuleT], checkpoint_path: str, **kwargs: Any) -> ModuleT:
    """Load a checkpoint written with :class:`MHCCallback` into a fresh ``module_class`` with mHC re-injected.

    Full and weights-only checkpoints (``ModelCheckpoint(save_weights_only=True)``) both carry the mHC config and
    injection plan, written by the module's ``on_save_checkpoint`` hook that ``MHCCallback`` installs.

    ``kwargs`` go to ``module_class.load_from_checkpoint`` (``map_location``, ``hparams_file``, hyperparameter
    overrides...). The checkpoint is read with ``weights_only=True``.

    Example::

        model = load_from_checkpoint(MyModule, "last.ckpt")
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    stored = checkpoint.get(CHECKPOINT_KEY)
    if stored is None and has_mhc_weights(checkpoint):
        raise ValueError(
            f"{checkpoint_path} holds mHC weights but not the mHC config and injection plan (a weights-only "
            "checkpoint written by lightning_mhc 0.1.0 or older, which left them out). Rebuild the model and inject "
            f"with the settings it was trained with, then load the weights: model = {module_class.__name__}(...); "
            "apply_mhc(model, MHCConfig(...), example_input=...); "
            "model.load_state_dict(torch.load(path)['state_dict'])."
        )
    if stored is None:
        raise ValueError(
            f"{checkpoint_path} has no mHC: it was not written with MHCCallback. "
            f"Load it with {module_class.__name__}.load_from_checkpoint(...) instead."
        )
    config = stored_config(stored)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*keys that are not in the model state dict.*")
        model = module_class.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    apply_mhc(model, config, plan=stored["plan"])
    model.load_state_dict(checkpoint["state_dict"])
    return model
