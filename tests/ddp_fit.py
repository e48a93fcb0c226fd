"""Train with MHCCallback under DDP on 2 CPU processes (gloo) and save each rank's weights to argv[1]."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from lit_models import LitLM, token_loader, trainer  # noqa: E402

from lightning_mhc import MHCCallback  # noqa: E402


class SaveInitial(MHCCallback):
    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 0:
            torch.save(pl_module.state_dict(), Path(sys.argv[1]) / "initial.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LitLM()
    run = trainer(max_steps=6, strategy="ddp", devices=2, callbacks=[SaveInitial(streams=4)])
    run.fit(model, token_loader())
    torch.save(model.state_dict(), Path(sys.argv[1]) / f"rank{run.global_rank}.pt")
