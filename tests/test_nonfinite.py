"""MHCCallback(on_nonfinite=...): a non-finite loss, gradient or H_res is caught at the step it happens, then raised,
skipped or warned about; a checkpoint of non-finite weights is refused; bad arguments are refused at construction."""

import csv
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_models import LitLM, ManualLitLM, token_loader, trainer

from lightning_mhc import MHCCallback
from lightning_mhc.nonfinite import NonFiniteError, first_nonfinite_state

BAD_STEP = 5


class NaNLossAt(LitLM):
    """A user's module whose loss turns NaN at the optimizer steps ``bad_steps`` (as a log of 0 would); with
    ``micro_batch``, only in that micro-batch of two (gradient accumulation)."""

    def __init__(self, bad_steps=(BAD_STEP,), micro_batch=None, **kwargs):
        super().__init__(**kwargs)
        self.bad_steps = set(bad_steps)
        self.micro_batch = micro_batch
        self.batch_idx = 0

    def training_step(self, batch, batch_idx):
        self.batch_idx = batch_idx
        return super().training_step(batch, batch_idx)

    def loss(self, batch):
        loss = super().loss(batch)
        bad = self.training and self.global_step in self.bad_steps
        if self.micro_batch is not None:
            bad = bad and self.batch_idx % 2 == self.micro_batch
        return loss * math.nan if bad else loss


class ManualNaNLossAt(ManualLitLM):
    def loss(self, batch):
        loss = super().loss(batch)
        return loss * math.nan if self.training and self.global_step == BAD_STEP else loss


class WeightsAfterEachStep(L.Callback):
    """Copies of the weights after each optimizer step, by global step (the last micro-batch's copy wins)."""

    def __init__(self):
        self.after = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def fit(model, callback, steps=20, ckpt_path=None, **kwargs):
    torch.manual_seed(0)
    run = trainer(max_steps=steps, callbacks=[callback, *kwargs.pop("callbacks", [])], **kwargs)
    run.fit(model, token_loader(samples=64), ckpt_path=ckpt_path)
    return run


def assert_same(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_nan_loss_at_step_5_raises_by_default_naming_the_step_before_the_step_is_applied():
    """The issue's scenario (NaN loss at step 5, MHCCallback(streams=4), 20 steps) used to end silently with NaN
    weights; now the default stops before applying step 5, and the weights are those of step 4."""
    torch.manual_seed(0)
    model = NaNLossAt()
    record = WeightsAfterEachStep()
    with pytest.raises(NonFiniteError, match=rf"Non-finite loss, gradients at global step {BAD_STEP}\.") as error:
        fit(model, MHCCallback(streams=4), callbacks=[record])
    assert "Every layer's H_res was finite" in str(error.value)
    assert "First non-finite gradient (parameter order): 'model.transformer.wte.weight'" in str(error.value)
    assert first_nonfinite_state(model) is None
    assert_same(model.state_dict(), record.after[BAD_STEP])  # global step 5 = 5 steps applied, the 6th refused
    assert all(m.capture is None for m in model.modules() if hasattr(m, "capture"))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_skip_leaves_the_weights_of_the_bad_step_unchanged_and_counts_it(tmp_path, accumulate):
    """With accumulation the NaN is in one micro-batch of step 5 only: the step's flag gathers its micro-batches."""
    torch.manual_seed(0)
    model = NaNLossAt(micro_batch=0 if accumulate > 1 else None)
    record = WeightsAfterEachStep()
    callback = MHCCallback(streams=4, on_nonfinite="skip", log_every_n_steps=4)
    with pytest.warns(UserWarning, match=rf"global step {BAD_STEP}\..*Skipped the step"):
        fit(
            model,
            callback,
            steps=12,
            accumulate_grad_batches=accumulate,
            logger=CSVLogger(tmp_path),
            callbacks=[record],
        )
    assert first_nonfinite_state(model) is None
    assert_same(record.after[BAD_STEP + 1], record.after[BAD_STEP])  # step 5 changed nothing
    assert any(not torch.equal(record.after[BAD_STEP + 2][k], v) for k, v in record.after[BAD_STEP + 1].items())
    assert callback.guard.skipped == 1 and callback.guard.consecutive == 0
    with open(Path(tmp_path) / "lightning_logs" / "version_0" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["mhc/skipped_steps"]) for r in csv.DictReader(f) if r["mhc/skipped_steps"]}
    assert logged == {0: 0.0, 4: 0.0, 8: 1.0}


def test_skip_raises_after_too_many_skips_in_a_row():
    model = NaNLossAt(bad_steps=range(BAD_STEP, 100))
    callback = MHCCallback(streams=4, on_nonfinite="skip", max_consecutive_skips=3)
    with pytest.warns(UserWarning), pytest.raises(NonFiniteError, match="4 non-finite steps in a row"):
        fit(model, callback)
    assert callback.guard.skipped == 4
    assert first_nonfinite_state(model) is None


def test_warn_applies_the_step_and_a_checkpoint_of_its_nan_weights_is_refused(tmp_path):
    """'warn' goes on (the weights turn NaN); the next checkpoint is refused with an error instead of replacing the
    good one written at step 4."""
    model = NaNLossAt()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True, save_top_k=-1)
    with (
        pytest.warns(UserWarning, match=rf"global step {BAD_STEP}\..*Applying the step anyway"),
        pytest.raises(NonFiniteError, match=r"Refusing to write a checkpoint: 'model\.transformer\.wte\.weight'"),
    ):
        fit(model, MHCCallback(streams=4, on_nonfinite="warn"), callbacks=[checkpoints], enable_checkpointing=True)
    assert first_nonfinite_state(model) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def test_nonfinite_h_res_names_the_first_layer_whose_coefficients_broke():
    """A layer whose mHC gate logits turn NaN: its H_res, and every later one, is NaN; the first is named."""

    class BreakLayer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.get_submodule("model.transformer.h.1.hyper.0").bias[-1] = math.nan

    with pytest.raises(NonFiniteError, match="at global step 3") as error:
        fit(LitLM(), MHCCallback(streams=4), callbacks=[BreakLayer()])
    assert "H_res" in str(error.value)
    assert "First layer with a non-finite H_res (depth order): 'model.transformer.h.1.hyper.0'" in str(error.value)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_manual_optimization(on_nonfinite):
    torch.manual_seed(0)
    model = ManualNaNLossAt(example=True)
    record = WeightsAfterEachStep()
    callback = MHCCallback(streams=4, on_nonfinite=on_nonfinite)
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteError, match=rf"at global step {BAD_STEP}\."):
            fit(model, callback, callbacks=[record])
        assert_same(model.state_dict(), record.after[BAD_STEP])
    else:
        with pytest.warns(UserWarning, match="Skipped the step"):
            fit(model, callback, steps=8, callbacks=[record])
        assert_same(record.after[BAD_STEP + 1], record.after[BAD_STEP])
        assert callback.guard.skipped == 1
    assert first_nonfinite_state(model) is None


@pytest.mark.parametrize(
    ("kwargs", "field", "allowed"),
    [
        ({"on_nonfinite": "ignore"}, "on_nonfinite)='ignore'", "one of 'raise', 'skip', 'warn'"),
        ({"on_nonfinite": None}, "on_nonfinite)=None", "one of 'raise', 'skip', 'warn'"),
        ({"max_consecutive_skips": 0}, "max_consecutive_skips)=0", "an integer >= 1"),
        ({"max_consecutive_skips": 2.5}, "max_consecutive_skips)=2.5", "an integer >= 1"),
        ({"max_consecutive_skips": True}, "max_consecutive_skips)=True", "an integer >= 1"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, field, allowed):
    with pytest.raises(ValueError, match=rf"^MHCCallback\({re.escape(field)} is not allowed; pass {allowed}\.$"):
        MHCCallback(streams=4, **kwargs)
