"""``lightning-mhc``: train, validate, test and predict the bundled models from YAML configs (LightningCLI), and
``lightning-mhc report LOGDIR... [--out DIR]`` to summarise runs.

Configs are read in ``omegaconf+`` mode: ``${...}`` interpolations resolve after command-line overrides, so
``--data.init_args.seq_len 64`` also reaches a ``seq_len: ${data.init_args.seq_len}`` elsewhere. mHC is switched on
by listing the callback under ``trainer.callbacks``::

    trainer:
      callbacks:
        - class_path: lightning_mhc.MHCCallback
          init_args: {streams: 4, mode: mhc}

Example::

    lightning-mhc fit --config examples/configs/tiny_moe_mhc.yaml
    lightning-mhc validate --config examples/configs/tiny_moe_mhc.yaml --ckpt_path runs/.../last.ckpt
    lightning-mhc report runs/tiny_moe_mhc runs/tiny_moe_baseline --out report/
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Optional

import jsonargparse
import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.models import MoETransformerLM, TransformerLM

DESCRIPTION = (
    "Train and evaluate language models with Manifold-Constrained Hyper-Connections (mHC). Subcommands: fit, "
    "validate, test, predict (LightningCLI; see `lightning-mhc fit --help`) and report "
    "(`lightning-mhc report LOGDIR... [--out DIR]`, plots and tables of finished runs)."
)


class MHCLightningCLI(LightningCLI):
    """LightningCLI whose model defaults to :class:`MoETransformerLM` and data to :class:`ByteLMDataModule`.

    Any :class:`~lightning_mhc.models.TransformerLM` subclass (e.g. ``DenseTransformerLM``) and any
    ``LightningDataModule`` can be chosen by ``class_path``.
    """

    def add_arguments_to_parser(self, parser: jsonargparse.ArgumentParser) -> None:
        """Default ``model`` and ``data`` classes, so a config may give only ``init_args`` or nothing at all."""
        parser.set_defaults(
            {
                "model": {"class_path": f"{MoETransformerLM.__module__}.{MoETransformerLM.__name__}"},
                "data": {"class_path": f"{ByteLMDataModule.__module__}.{ByteLMDataModule.__name__}"},
            }
        )

    def instantiate_classes(self) -> None:
        """Build model, data, callbacks and trainer; a value their constructors reject ends the command with that
        message (``error: ...``, exit status 2) instead of a traceback through jsonargparse."""
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as error:
            while isinstance(error.__cause__, (ValueError, MisconfigurationException)):
                error = error.__cause__
            self.parser.error(f"invalid configuration: {error}")


def fit_summary(trainer: L.Trainer, datamodule: Optional[L.LightningDataModule], log_dir: Optional[str]) -> str:
    """What a finished ``fit`` achieved and where it left things: last validation loss against the data's unigram
    entropy (the loss of a model that learned only byte frequencies), the checkpoint and the log folder."""
    lines = [f"lightning-mhc fit: {trainer.global_step} optimizer steps."]
    val_loss = trainer.callback_metrics.get("val_loss")
    if val_loss is None:
        lines.append("  validation loss   (no validation ran; set trainer.val_check_interval or limit_val_batches)")
    else:
        lines.append(f"  validation loss   {float(val_loss):.4f} nats/token (last validation)")
    if isinstance(datamodule, ByteLMDataModule):
        entropy = datamodule.unigram_entropy("val")
        lines.append(f"  unigram entropy   {entropy:.4f} nats/token (validation split; the loss of byte frequencies)")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None:
        path = getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
        lines.append(f"  checkpoint        {path or '(none written)'}")
    lines.append(f"  logs              {log_dir}")
    return "\n".join(lines)


def main(args: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lightning-mhc`` (and ``python -m lightning_mhc.cli``); ``args`` defaults to ``sys.argv[1:]``.

    Returns the exit status: 0 after a LightningCLI subcommand, ``lightning_mhc.report.main``'s for ``report``.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "report":
        from lightning_mhc import report

        return report.main(argv[1:]) or 0
    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    cli = MHCLightningCLI(
        model_class=TransformerLM,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+", "description": DESCRIPTION, "prog": "lightning-mhc"},
        save_config_kwargs={"overwrite": True},
        args=None if args is None else argv,
    )
    if cli.subcommand == "fit":
        log_dir = cli.trainer.log_dir  # a broadcast under multi-process strategies: every rank must ask
        if cli.trainer.is_global_zero:
            print(fit_summary(cli.trainer, cli.datamodule, log_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
