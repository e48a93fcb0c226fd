"""Train with MHCCallback under ModelParallelStrategy (FSDP2: every block and the root sharded in configure_model)
on 2 CPU processes (gloo), with gradient clipping; rank 0 saves the gathered full weights to argv[1].

Rank r trains on samples r, r + 2, ... in order, so each step's two half batches make the single-process batch of
``tests/test_callback_setups.py``'s reference run.
"""

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).parent))

from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from lit_models import ApplyThenShardLitLM, BuildAndShardLitLM, ShardedLitLM, token_loader, trainer  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lightning_mhc import MHCCallback  # noqa: E402
from lightning_mhc.mhc_block import MHCBlock  # noqa: E402

STEPS, CLIP, BATCH = 3, 0.5, 4


class HalfBatchPerRank(ShardedLitLM):
    def train_dataloader(self):
        samples = token_loader(batch_size=BATCH).dataset
        return DataLoader(Subset(samples, range(self.global_rank, len(samples), 2)), batch_size=BATCH // 2)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = HalfBatchPerRank()
    run = trainer(
        max_steps=STEPS,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2,
        gradient_clip_val=CLIP,
        use_distributed_sampler=False,
        # paper init (random phi): no noise-level gradients, which Adam's first step would turn into +-lr
        callbacks=[MHCCallback(streams=4, init="paper")],
    )
    run.fit(model)
    hyper = [p for b in model.modules() if isinstance(b, MHCBlock) for p in b.hyper.parameters()]
    assert hyper and all(isinstance(p, DTensor) for p in model.parameters()), "mHC parameters are not sharded"
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}
    if run.global_rank == 0:
        torch.save(state, Path(sys.argv[1]) / "fsdp2.pt")

    # A module that builds its blocks in configure_model and shards them there is refused, with advice; following
    # the advice (apply_mhc in configure_model before fully_shard) trains with every parameter sharded.
    for name, module_class in [("refused", BuildAndShardLitLM), ("apply_then_shard", ApplyThenShardLitLM)]:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        late = trainer(max_steps=1, strategy=strategy, devices=2, callbacks=[MHCCallback(streams=4)])
        module = module_class()
        try:
            late.fit(module, token_loader())
            message = "sharded" if all(isinstance(p, DTensor) for p in module.parameters()) else "not sharded"
        except RuntimeError as error:
            message = str(error)
        if late.global_rank == 0:
            (Path(sys.argv[1]) / f"{name}.txt").write_text(message)
