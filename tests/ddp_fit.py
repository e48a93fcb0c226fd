"""Train with MHCCallback under DDP on 2 CPU processes (gloo) and save each rank's weights to argv[1].

``ddp_fit.py OUT fail WHERE RANK``: the same run, where one rank raises (``WHERE``: ``probe``, in MHCCallback's probe
at setup; ``step``, in a training step) and the other does not.
"""

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


class FailOnOneRank(LitLM):
    """Raises on rank ``rank`` only: in the probe (``training_step`` run once in eval mode at injection) or in the
    training step of global step 2."""

    def __init__(self, where: str, rank: int):
        super().__init__()
        self.where, self.rank = where, rank

    def training_step(self, batch, batch_idx):
        in_probe = not self.training
        if self.global_rank == self.rank and (in_probe if self.where == "probe" else self.global_step == 2):
            raise RuntimeError(f"fault injected on rank {self.rank} in the {self.where}")
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = FailOnOneRank(sys.argv[3], int(sys.argv[4])) if sys.argv[2:3] == ["fail"] else LitLM()
    run = trainer(max_steps=6, strategy="ddp", devices=2, callbacks=[SaveInitial(streams=4)])
    run.fit(model, token_loader())
    torch.save(model.state_dict(), Path(sys.argv[1]) / f"rank{run.global_rank}.pt")
