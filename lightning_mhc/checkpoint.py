"""Reload a LightningModule trained with mHC: rebuild it, re-inject from the stored plan, load the weights.

Checkpoints are untrusted input: the file is read with ``torch.load(weights_only=True)`` (tensors and plain
containers only, no code runs), and what it stores for mHC is checked before anything is built from it.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, TypeVar, Union

import lightning as L
import torch

from lightning_mhc.callback import CHECKPOINT_KEY, check_stored_metadata, has_mhc_weights, stored_config
from lightning_mhc.config import MHCConfig, short_repr
from lightning_mhc.inject import apply_mhc, check_plan

ModuleT = TypeVar("ModuleT", bound=L.LightningModule)


def load_from_checkpoint(module_class: type[ModuleT], checkpoint_path: Union[str, Path], **kwargs: Any) -> ModuleT:
    """Load a checkpoint written with :class:`MHCCallback` into a fresh ``module_class`` with mHC re-injected.

    Full and weights-only checkpoints (``ModelCheckpoint(save_weights_only=True)``) both carry the mHC config and
    injection plan, written by the module's ``on_save_checkpoint`` hook that ``MHCCallback`` installs.

    ``kwargs`` go to ``module_class.load_from_checkpoint`` (``map_location``, ``hparams_file``, hyperparameter
    overrides...). The checkpoint is read with ``weights_only=True`` and its mHC config, plan and state dict are
    checked first; a file that is missing, truncated, not a checkpoint, holds pickled objects, or belongs to another
    model raises ``ValueError`` (``FileNotFoundError`` for a missing file) saying what is wrong and what to do.

    Example::

        model = load_from_checkpoint(MyModule, "last.ckpt")
    """
    if not (isinstance(module_class, type) and issubclass(module_class, L.LightningModule)):
        raise ValueError(
            f"module_class={short_repr(module_class)} is not allowed; pass the LightningModule class (not an "
            "instance) the checkpoint was trained with."
        )
    checkpoint = read_checkpoint(checkpoint_path)
    config, plan = _stored_injection(checkpoint, checkpoint_path, module_class.__name__)
    name = module_class.__name__
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*keys that are not in the model state dict.*")
            model = module_class.load_from_checkpoint(checkpoint_path, strict=False, **kwargs)
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(
            f"{checkpoint_path}: building {name} from its stored hyperparameters failed ({error}). Is it a "
            f"checkpoint of {name}? Load it with the class it was trained with."
        ) from error
    try:
        apply_mhc(model, config, plan=plan)
        model.load_state_dict(checkpoint["state_dict"])
    except (ValueError, RuntimeError) as error:
        raise ValueError(
            f"{checkpoint_path}: its mHC plan or weights do not fit {name} built from its hyperparameters ({error}). "
            f"Load it with the class it was trained with, or pass the hyperparameters it was trained with."
        ) from error
    return model


def read_checkpoint(checkpoint_path: Union[str, Path]) -> dict[str, Any]:
    """``torch.load(checkpoint_path, weights_only=True)`` on the CPU, with errors that say what is wrong with the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a torch checkpoint (truncated, another format), holds objects other than tensors
            and plain containers (refused unread: loading them would run code), or is not a dict with a state dict.
    """
    if not isinstance(checkpoint_path, (str, Path)):
        raise ValueError(
            f"checkpoint_path={short_repr(checkpoint_path)} is not allowed; pass a file path (str or Path)."
        )
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"checkpoint_path={str(checkpoint_path)!r} is not a file; pass the .ckpt path.")
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{checkpoint_path} holds objects other than tensors and plain containers, so it was not loaded "
            "(weights_only=True: unpickling them could run arbitrary code). Checkpoints written by MHCCallback hold "
            f"none; this file was changed or written by other code. Only if you trust its source, inspect it with "
            f"torch.load(path, weights_only=False). ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"{checkpoint_path} is not a readable torch checkpoint (truncated, or another file format): "
            f"{str(error).rstrip('.')}. "
            "Pass a complete .ckpt written by Lightning (a copy interrupted mid-write is truncated)."
        ) from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(
            f"{checkpoint_path} is a torch file but not a Lightning checkpoint: a dict with a 'state_dict' was "
            f"expected, got a {type(checkpoint).__name__}"
            f"{' with keys ' + str(list(checkpoint)[:8]) if isinstance(checkpoint, dict) else ''}. Pass a .ckpt "
            "written by Trainer.save_checkpoint or ModelCheckpoint."
        )
    return checkpoint


def _stored_injection(checkpoint: dict[str, Any], path: Union[str, Path], name: str) -> tuple[MHCConfig, dict]:
    """The mHC config and plan a checkpoint stores, checked: plain types of the expected shape, a format we read."""
    stored = checkpoint.get(CHECKPOINT_KEY)
    if stored is None and has_mhc_weights(checkpoint):
        raise ValueError(
            f"{path} holds mHC weights but not the mHC config and injection plan (a weights-only "
            "checkpoint written by lightning_mhc 0.1.0 or older, which left them out). Rebuild the model and inject "
            f"with the settings it was trained with, then load the weights: model = {name}(...); "
            "apply_mhc(model, MHCConfig(...), example_input=...); "
            "model.load_state_dict(torch.load(path)['state_dict'])."
        )
    if stored is None:
        raise ValueError(
            f"{path} has no mHC: it was not written with MHCCallback. Load it with {name}.load_from_checkpoint(...) "
            "instead."
        )
    try:
        check_stored_metadata(stored)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    try:
        config = stored_config(stored)
        check_plan(stored["plan"])
    except ValueError as error:
        raise ValueError(
            f"{path}: its stored mHC config or plan is invalid ({error}). The file was changed or written by "
            "another version; pass a checkpoint written by MHCCallback."
        ) from error
    return config, stored["plan"]
