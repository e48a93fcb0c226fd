"""A short mHC training run that checkpoints every epoch (4 steps), for the interrupted-run test.

``python resume_fit.py OUT``: trains ``EPOCHS`` epochs on one thread, writing ``OUT/last.ckpt`` and one checkpoint per
epoch; each step then sleeps ``SLOW_S`` so that the test can kill it (SIGKILL) mid-run, after a checkpoint is on disk.
The test runs :func:`fit` in its own process too: for the uninterrupted reference and for the resumed run.
"""

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))

from lit_models import LitLM, token_loader, trainer  # noqa: E402

from lightning_mhc import MHCCallback  # noqa: E402

EPOCHS = 6
SLOW_S = 0.1


class Slow(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(SLOW_S)


def fit(out: Path, ckpt_path: Path | None = None, slow: bool = False) -> LitLM:
    """Train (or resume from ``ckpt_path``) to the end of ``EPOCHS`` epochs, one thread, seed 0; return the model."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LitLM()
    checkpoints = ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1, save_last=True)
    callbacks = [MHCCallback(streams=4, init="paper"), checkpoints, *([Slow()] if slow else [])]
    run = trainer(max_epochs=EPOCHS, enable_checkpointing=True, callbacks=callbacks)
    run.fit(model, token_loader(), ckpt_path=ckpt_path)
    return model


if __name__ == "__main__":
    fit(Path(sys.argv[1]), slow=True)
