import csv
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lit_models import LazyLitLM, LitLM, token_loader, trainer

from lightning_mhc import MHCCallback, MHCConfig, load_from_checkpoint
from lightning_mhc.callback import stability_summary
from lightning_mhc.mhc_block import MHCBlock
from lightning_mhc.monitor import METRIC_KEYS


def _blocks(module):
    return [m for m in module.modules() if isinstance(m, MHCBlock)]


@pytest.mark.parametrize("arch", ["nanogpt", "llama"])
def test_callback_injects_into_an_unchanged_module_and_trains(arch):
    torch.manual_seed(0)
    model = LitLM(arch)
    trainer(max_steps=24, callbacks=[MHCCallback(streams=4)]).fit(model, token_loader())
    assert len(_blocks(model)) == 3
    assert all(b.granularity == "sublayer" and len(b.hyper) == 2 for b in _blocks(model))
    assert sum(model.losses[-4:]) < 0.8 * sum(model.losses[:4])


def test_callback_injects_after_configure_model():
    torch.manual_seed(0)
    model = LazyLitLM()
    trainer(max_steps=2, callbacks=[MHCCallback(streams=2)]).fit(model, token_loader())
    assert len(_blocks(model)) == 3
    assert "configure_model" not in vars(model)


def test_callback_never_injects_twice():
    model = LitLM()
    callback = MHCCallback(streams=2)
    loader = token_loader()
    trainer(max_steps=1, callbacks=[callback]).fit(model, loader)
    trainer(max_steps=2, callbacks=[callback]).fit(model, loader)
    trainer(callbacks=[callback]).validate(model, loader)
    assert len(_blocks(model)) == 3
    assert all(not isinstance(m.block, MHCBlock) for m in _blocks(model))
    with pytest.raises(RuntimeError, match="already has mHC injected"):
        trainer(max_steps=3, callbacks=[MHCCallback(streams=4)]).fit(model, loader)


def test_two_callbacks_on_one_trainer_raise():
    with pytest.raises(RuntimeError, match="2 MHCCallbacks on one Trainer"):
        trainer(max_steps=1, callbacks=[MHCCallback(), MHCCallback()]).fit(LitLM(), token_loader())


def test_config_and_fields_are_exclusive_and_unknown_fields_are_named():
    with pytest.raises(ValueError, match="either config"):
        MHCCallback(config=MHCConfig(), streams=2)
    with pytest.raises(TypeError, match="MHCCallback takes the MHCConfig fields"):
        MHCCallback(stream=2)
    with pytest.raises(ValueError, match=r"MHCConfig\.mode='mHC'"):
        MHCCallback(mode="mHC")


def test_wrong_blocks_path_fails_in_setup_listing_candidates():
    with pytest.raises(ValueError, match=r"'model\.transformer\.h'"):
        trainer(max_steps=1, callbacks=[MHCCallback(blocks="model.layers")]).fit(LitLM(), token_loader())


def test_resume_equals_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    whole = LitLM()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer(max_steps=8, enable_checkpointing=True, callbacks=[MHCCallback(streams=4), saver]).fit(
        whole, token_loader()
    )

    torch.manual_seed(123)
    resumed = LitLM()  # logging and kernel settings may change on resumption; the structure may not
    trainer(max_steps=8, callbacks=[MHCCallback(streams=4, log_every_n_steps=3, kernels="torch")]).fit(
        resumed, token_loader(), ckpt_path=tmp_path / "epoch=0-step=4.ckpt"
    )
    torch.testing.assert_close(resumed.losses, whole.losses[4:], rtol=0, atol=1e-6)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_resume_with_a_different_config_says_what_to_pass(tmp_path):
    model = LitLM()
    run = trainer(max_steps=1, callbacks=[MHCCallback(streams=4)])
    run.fit(model, token_loader())
    run.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match=r"'streams': \(4, 2\).*Pass the checkpoint's values to MHCCallback"):
        trainer(max_steps=2, callbacks=[MHCCallback(streams=2)]).fit(
            LitLM(), token_loader(), ckpt_path=tmp_path / "a.ckpt"
        )


def test_load_from_checkpoint_reinjects_and_plain_loading_points_to_it(tmp_path):
    torch.manual_seed(0)
    model = LitLM("llama", depth=2)
    run = trainer(max_steps=3, callbacks=[MHCCallback(streams=4, readout="learned")])
    run.fit(model, token_loader())
    path = tmp_path / "m.ckpt"
    run.save_checkpoint(path)
    reloaded = load_from_checkpoint(LitLM, str(path))
    tokens = next(iter(token_loader()))[0]
    model.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(tokens), model(tokens), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="load_with__lightning_mhc.load_from_checkpoint"):
        LitLM.load_from_checkpoint(path)
    plain = tmp_path / "plain.ckpt"
    plain_run = trainer(max_steps=1)
    plain_run.fit(LitLM(), token_loader())
    plain_run.save_checkpoint(plain)
    with pytest.raises(ValueError, match=r"LitLM\.load_from_checkpoint"):
        load_from_checkpoint(LitLM, str(plain))


def test_validate_from_a_checkpoint_in_a_fresh_trainer(tmp_path):
    model = LitLM()
    run = trainer(max_steps=2, callbacks=[MHCCallback(streams=4)])
    run.fit(model, token_loader())
    run.save_checkpoint(tmp_path / "m.ckpt")
    fresh = LitLM()
    metrics = trainer(callbacks=[MHCCallback(streams=4)]).validate(fresh, token_loader(), ckpt_path=tmp_path / "m.ckpt")
    expected = trainer(callbacks=[MHCCallback(streams=4)]).validate(model, token_loader())
    assert metrics[0]["val_loss"] == pytest.approx(expected[0]["val_loss"], abs=1e-6)


def test_bf16_mixed_trains_with_fp32_coefficients():
    torch.manual_seed(0)
    model = LitLM()
    seen = []
    callback = MHCCallback(streams=4)
    run = trainer(max_steps=16, precision="bf16-mixed", callbacks=[callback])
    run.fit(model, token_loader())
    hyper = _blocks(model)[0].hyper[0]
    streams = torch.randn(2, 5, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = hyper.coefficients(streams)
    assert all(c.dtype == torch.float32 for c in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(model.losses)))
    assert sum(model.losses[-4:]) < sum(model.losses[:4])


def test_gradient_accumulation_equals_one_larger_batch():
    def one_step(batch_size, accumulate):
        torch.manual_seed(0)
        model = LitLM()
        run = trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[MHCCallback(streams=4)])
        run.fit(model, token_loader(samples=4, batch_size=batch_size))
        return model.state_dict()

    accumulated, large = one_step(2, 2), one_step(4, 1)
    for name, value in large.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_on_two_processes_keeps_ranks_identical(tmp_path):
    script = Path(__file__).with_name("ddp_fit.py")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    assert any(".hyper." in k for k in rank0)
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)
    initial = torch.load(tmp_path / "initial.pt")
    assert any(not torch.equal(initial[k], rank0[k]) for k in initial if ".hyper." in k)


@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_every_documented_metric_reaches_the_csv_logger(tmp_path, mode):
    torch.manual_seed(0)
    model = LitLM(depth=2)
    callback = MHCCallback(streams=4, mode=mode, log_every_n_steps=2)
    trainer(max_steps=6, logger=CSVLogger(tmp_path), callbacks=[callback]).fit(model, token_loader())
    with open(Path(tmp_path) / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("mhc/grad_norm")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for key in (*METRIC_KEYS, "mhc/composite_fwd/depth_000", "mhc/composite_bwd/depth_003"):
        assert all(r[key] != "" for r in rows), key
    fwd = [float(r["mhc/gain_fwd_composite"]) for r in rows]
    if mode == "mhc":
        assert all(abs(g - 1) < 1e-4 for g in fwd)
        assert all(float(r["mhc/sinkhorn_err"]) < 1e-2 for r in rows)
    else:
        assert all(abs(g - 1) > 1e-3 for g in fwd)
    assert all(float(r["mhc/grad_norm"]) > 0 for r in rows)
    assert all(m.capture is None for m in model.modules() if hasattr(m, "capture"))
    assert "mHC stability over 3 logged steps" in stability_summary(callback.history)


def test_residual_mode_logs_without_gains(tmp_path):
    callback = MHCCallback(mode="residual", log_every_n_steps=1)
    trainer(max_steps=2, callbacks=[callback]).fit(LitLM(depth=2), token_loader())
    assert [h["step"] for h in callback.history] == [0, 1]
    assert all("mhc/gain_fwd_composite" not in h and h["mhc/stream_diversity"] == 0 for h in callback.history)


def test_callback_adopts_a_module_injected_with_apply_mhc(tmp_path):
    from lightning_mhc import apply_mhc

    model = LitLM()
    apply_mhc(model, MHCConfig(streams=2), example_input=next(iter(token_loader()))[0][:1, :-1])
    run = trainer(max_steps=2, callbacks=[MHCCallback(streams=2, log_every_n_steps=1)])
    run.fit(model, token_loader())
    run.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = load_from_checkpoint(LitLM, str(tmp_path / "m.ckpt"))
    assert len(_blocks(reloaded)) == 3


class DataInSetup(LitLM):
    """Builds its data in setup(), which Lightning runs after the callbacks' setup."""

    def setup(self, stage):
        self.loader = token_loader()

    def train_dataloader(self):
        return self.loader


class PickleDuringFit(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.size = len(pickle.dumps(pl_module))


def test_injects_after_the_module_setup_and_stays_picklable():
    model = DataInSetup()
    pickler = PickleDuringFit()
    trainer(max_steps=2, callbacks=[MHCCallback(streams=2), pickler]).fit(model)
    assert len(_blocks(model)) == 3 and pickler.size > 0
    assert "setup" not in vars(model)


def test_config_with_default_fields_as_jsonargparse_passes_them():
    assert MHCCallback(config=MHCConfig(streams=2), mode="mhc", log_every_n_steps=50).config.streams == 2
    with pytest.raises(ValueError, match=r"not both \(got config and \['streams'\]\)"):
        MHCCallback(config=MHCConfig(streams=2), streams=3)


def test_spawn_strategies_are_refused_with_what_to_do_instead():
    callback = MHCCallback(streams=2)
    run = trainer(max_steps=1, strategy="ddp_spawn", devices=2, callbacks=[callback])
    with pytest.raises(RuntimeError, match="strategy='ddp'"):
        callback.setup(run, LitLM(), "fit")
