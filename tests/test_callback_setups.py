"""MHCCallback combined with the Lightning features people use beside it (issue 9: items 6, 8, 9, 10, 11)."""

import copy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging
from lit_models import LazyLitLM, LitLM, ManualLitLM, token_loader, trainer
from torch.utils.data import DataLoader, Subset

from lightning_mhc import MHCCallback, load_from_checkpoint
from lightning_mhc.callback import CHECKPOINT_KEY
from lightning_mhc.mhc_block import MHCBlock


def _blocks(module):
    return [m for m in module.modules() if isinstance(m, MHCBlock)]


# item 6: ModelCheckpoint(save_weights_only=True)


def _fit_weights_only(tmp_path):
    torch.manual_seed(0)
    model = LitLM("llama", depth=2)
    saver = ModelCheckpoint(dirpath=tmp_path, filename="w", save_weights_only=True, every_n_train_steps=3)
    trainer(max_steps=3, enable_checkpointing=True, callbacks=[MHCCallback(streams=4, readout="learned"), saver]).fit(
        model, token_loader()
    )
    return model, tmp_path / "w.ckpt"


def test_weights_only_checkpoint_reloads_to_the_trained_model(tmp_path):
    model, path = _fit_weights_only(tmp_path)
    assert "optimizer_states" not in torch.load(path, weights_only=True)
    reloaded = load_from_checkpoint(LitLM, str(path))
    tokens = next(iter(token_loader()))[0]
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(tokens), model(tokens), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="load_with__lightning_mhc.load_from_checkpoint"):
        LitLM.load_from_checkpoint(path)
    # a validation run may start from it (no optimizer state needed)
    metrics = trainer(callbacks=[MHCCallback(streams=4, readout="learned")]).validate(
        LitLM("llama", depth=2), token_loader(), ckpt_path=path
    )
    expected = trainer(callbacks=[MHCCallback(streams=4, readout="learned")]).validate(model, token_loader())
    assert metrics[0]["val_loss"] == pytest.approx(expected[0]["val_loss"], abs=1e-6)


def test_trainer_save_checkpoint_weights_only_after_fit_carries_the_plan(tmp_path):
    model = LitLM()
    run = trainer(max_steps=1, callbacks=[MHCCallback(streams=2)])
    run.fit(model, token_loader())
    run.save_checkpoint(tmp_path / "w.ckpt", weights_only=True)
    assert torch.load(tmp_path / "w.ckpt", weights_only=True)[CHECKPOINT_KEY]["plan"] == model.mhc_report.plan()
    assert len(_blocks(load_from_checkpoint(LitLM, str(tmp_path / "w.ckpt")))) == 3


def test_resuming_fit_from_a_weights_only_checkpoint_says_why_and_what_to_do(tmp_path):
    _, path = _fit_weights_only(tmp_path)
    with pytest.raises(ValueError, match=r"save_weights_only=True.*cannot resume.*load_from_checkpoint\(LitLM, path\)"):
        trainer(max_steps=5, callbacks=[MHCCallback(streams=4, readout="learned")]).fit(
            LitLM("llama", depth=2), token_loader(), ckpt_path=path
        )


def test_weights_only_checkpoint_without_the_plan_points_to_apply_mhc(tmp_path):
    """Files written before the fix hold mHC weights but no plan: say so, instead of 'not written with mHC'."""
    _, path = _fit_weights_only(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint[CHECKPOINT_KEY]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"holds mHC weights but not the mHC config.*apply_mhc\(model, MHCConfig"):
        load_from_checkpoint(LitLM, str(tmp_path / "old.ckpt"))
    with pytest.raises(ValueError, match=r"holds mHC weights but not the mHC config.*apply_mhc\(model, MHCConfig"):
        trainer(max_steps=5, callbacks=[MHCCallback(streams=4, readout="learned")]).fit(
            LitLM("llama", depth=2), token_loader(), ckpt_path=tmp_path / "old.ckpt"
        )


# item 9: weight averaging copies the module in its setup, before the injection


class LiveWeightsAtTrainEnd(L.Callback):
    """Listed first, so it sees the live weights before an averaging callback copies its average into the module."""

    def on_train_end(self, trainer, pl_module):
        self.live = copy.deepcopy(pl_module.state_dict())


AVERAGING = {
    "ema": lambda: EMAWeightAveraging(decay=0.8),
    "swa": lambda: StochasticWeightAveraging(swa_lrs=1e-3, swa_epoch_start=1),
}


@pytest.mark.parametrize("module_class", [LitLM, LazyLitLM])
@pytest.mark.parametrize("mhc_first", [True, False], ids=["mhc_first", "averaging_first"])
@pytest.mark.parametrize("averaging", sorted(AVERAGING))
def test_weight_averaging_averages_the_injected_model(averaging, mhc_first, module_class):
    torch.manual_seed(0)
    model = module_class()
    average, live = AVERAGING[averaging](), LiveWeightsAtTrainEnd()
    mhc = MHCCallback(streams=4)
    run = trainer(max_epochs=3, callbacks=[live, *([mhc, average] if mhc_first else [average, mhc])])
    run.fit(model, token_loader(), val_dataloaders=token_loader(samples=4))  # validation swaps EMA weights in/out
    averaged = average._average_model
    averaged = averaged.module if averaging == "ema" else averaged
    assert len(_blocks(averaged)) == 3
    assert averaging == "ema" or average.n_averaged.item() > 1
    # the module now holds the average (copied at train end), which differs from the live weights, mHC included
    final = model.state_dict()
    for name, value in averaged.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=0, atol=0, msg=name)
    hyper = [k for k in final if ".hyper." in k and final[k].is_floating_point()]
    assert hyper and any(not torch.equal(final[k], live.live[k]) for k in hyper)
    model.eval()
    assert torch.isfinite(model(next(iter(token_loader()))[0][:, :-1])).all()


def test_ema_checkpoint_reloads_the_average_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = LitLM()
    run = trainer(max_steps=5, callbacks=[MHCCallback(streams=4), EMAWeightAveraging(decay=0.8)])
    run.fit(model, token_loader())
    run.save_checkpoint(tmp_path / "ema.ckpt")
    reloaded = load_from_checkpoint(LitLM, str(tmp_path / "ema.ckpt"))
    tokens = next(iter(token_loader()))[0][:, :-1]
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(tokens), model(tokens), rtol=0, atol=0)
    trainer(max_steps=7, callbacks=[EMAWeightAveraging(decay=0.8), MHCCallback(streams=4)]).fit(
        LitLM(), token_loader(), ckpt_path=tmp_path / "ema.ckpt"
    )


# item 11: manual optimization


def test_manual_optimization_probes_with_forward_when_example_input_array_is_set():
    torch.manual_seed(0)
    model = ManualLitLM(example=True)
    trainer(max_steps=12, callbacks=[MHCCallback(streams=4)]).fit(model, token_loader())
    assert len(_blocks(model)) == 3 and len(model.losses) == 12
    assert sum(model.losses[-4:]) < sum(model.losses[:4])


def test_manual_optimization_without_example_input_array_is_refused_with_what_to_set():
    with pytest.raises(ValueError, match=r"manual optimization.*Set self\.example_input_array"):
        trainer(max_steps=1, callbacks=[MHCCallback(streams=4)]).fit(ManualLitLM(), token_loader())


# item 10: the probe runs the way training will (precision, device)


def _model_dtypes(module):
    """Dtypes of the model's own parameters (mHC keeps its few parameters in float32 under bf16-true)."""
    return {p.dtype for n, p in module.named_parameters() if ".hyper." not in n and "readout" not in n}


class Bf16Only(LitLM):
    """Refuses to run unless converted to bf16 and called under the bf16-true forward context, as training does."""

    def __init__(self, example: bool = False):
        super().__init__()
        if example:
            self.example_input_array = torch.zeros(1, 16, dtype=torch.long)

    def forward(self, tokens):
        dtypes = _model_dtypes(self)
        if dtypes != {torch.bfloat16} or torch.get_default_dtype() != torch.bfloat16:
            raise RuntimeError(f"not run as bf16-true trains: weights {dtypes}, default {torch.get_default_dtype()}")
        return super().forward(tokens)


@pytest.mark.parametrize("example", [False, True], ids=["training_step_probe", "forward_probe"])
def test_probe_runs_in_the_training_precision(example):
    torch.manual_seed(0)
    model = Bf16Only(example)
    trainer(max_steps=2, precision="bf16-true", callbacks=[MHCCallback(streams=4)]).fit(model, token_loader())
    assert len(_blocks(model)) == 3
    assert _model_dtypes(model) == {torch.bfloat16}
    assert all(torch.isfinite(torch.tensor(model.losses)))


# item 8 (callback part): ModelParallelStrategy / FSDP2 sharding in configure_model


class ConfigureModelSeesBlocks(LitLM):
    """Builds its layers in __init__; configure_model (where sharding would happen) records what it finds."""

    def configure_model(self):
        self.blocks_seen = [type(b).__name__ for b in self.model.transformer.h]


def test_injects_before_configure_model_when_the_blocks_exist():
    model = ConfigureModelSeesBlocks()
    trainer(max_steps=1, callbacks=[MHCCallback(streams=2)]).fit(model, token_loader())
    assert model.blocks_seen == ["MHCBlock"] * 3
    assert "configure_model" not in vars(model) and "setup" not in vars(model)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_fsdp2_shards_mhc_with_its_blocks_and_equals_one_process(tmp_path):
    """Blocks built in __init__ and fully_shard-ed in configure_model: mHC is injected before configure_model, so its
    parameters are sharded with their blocks (gradients reduced, clipping over DTensors only); the result equals one
    process accumulating the same two half batches. Building the blocks in configure_model and sharding them there
    is refused with advice, and that advice (apply_mhc before fully_shard) works."""
    import fsdp2_fit

    script = Path(fsdp2_fit.__file__)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sharded = torch.load(tmp_path / "fsdp2.pt")

    torch.manual_seed(0)
    model = LitLM()
    samples = token_loader().dataset
    half, order = fsdp2_fit.BATCH // 2, []
    for start in range(0, len(samples), fsdp2_fit.BATCH):  # rank 0's half batch, then rank 1's
        order += [start + 2 * i for i in range(half)] + [start + 2 * i + 1 for i in range(half)]
    run = trainer(
        max_steps=fsdp2_fit.STEPS,
        accumulate_grad_batches=2,
        gradient_clip_val=fsdp2_fit.CLIP,
        callbacks=[MHCCallback(streams=4, init="paper")],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank does: the same reduction order in every matmul
    try:
        run.fit(model, DataLoader(Subset(samples, order), batch_size=half))
    finally:
        torch.set_num_threads(threads)
    reference = model.state_dict()
    assert sharded.keys() == reference.keys() and any(".hyper." in k for k in reference)
    for name, value in reference.items():
        torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-6, msg=name)

    refused = (tmp_path / "refused.txt").read_text()
    assert "is already sharded (fully_shard)" in refused, refused
    assert "Build the layers in __init__" in refused and "apply_mhc" in refused
    assert (tmp_path / "apply_then_shard.txt").read_text() == "sharded"


def test_fsdp2_under_half_true_precision_is_refused_at_setup_with_the_fsdp2_way():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    run = trainer(max_steps=1, strategy=strategy, precision="bf16-true", callbacks=[MHCCallback(streams=2)])
    try:
        with pytest.raises(ValueError, match="MixedPrecisionPolicy"):
            run.fit(LitLM(), token_loader())
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["hc", "mhc"])
def test_hc_checkpoints_of_the_transposed_format_are_refused_mhc_ones_load(tmp_path, mode):
    """lightning_mhc 0.1.0 stored no format and built HC's H_res transposed; its mHC checkpoints mean the same."""
    torch.manual_seed(0)
    model = LitLM(depth=2)
    run = trainer(max_steps=1, callbacks=[MHCCallback(streams=2, mode=mode)])
    run.fit(model, token_loader())
    run.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert checkpoint[CHECKPOINT_KEY]["format"] == 2
    del checkpoint[CHECKPOINT_KEY]["format"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    if mode == "mhc":
        reloaded = load_from_checkpoint(LitLM, str(tmp_path / "old.ckpt"))
        tokens = next(iter(token_loader()))[0][:, :-1]
        torch.testing.assert_close(reloaded.eval()(tokens), model.eval()(tokens))
        return
    with pytest.raises(ValueError, match="HC mode by lightning_mhc 0.1.0.*transpose"):
        load_from_checkpoint(LitLM, str(tmp_path / "old.ckpt"))
    with pytest.raises(ValueError, match="HC mode by lightning_mhc 0.1.0.*transpose"):
        trainer(max_steps=2, callbacks=[MHCCallback(streams=2, mode="hc")]).fit(
            LitLM(depth=2), token_loader(), ckpt_path=tmp_path / "old.ckpt"
        )
