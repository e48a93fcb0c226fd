"""MHCConfig.init presets: where each is function-preserving, what each does to the streams' symmetry."""

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from block_styles import VOCAB, LlamaLike, NanoGPT, TinyViT, image_batch, lm_batch

from lightning_mhc import MHCCallback, MHCConfig, apply_mhc
from lightning_mhc.carry import carried_streams
from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.models import DenseTransformerLM

STYLES = {"nanogpt": (NanoGPT, lm_batch), "llama": (LlamaLike, lm_batch), "vit": (TinyViT, lambda: image_batch()[0])}
PRESETS = {"paper": {"gate_init": 0.0}, "symmetric": {}, "onehot": {}}  # the setting at which each is exact


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_starts_at_the_original_model(style, preset):
    build, example = STYLES[style]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model).eval()
    apply_mhc(model, MHCConfig(streams=4, init=preset, **PRESETS[preset]), example_input=example())
    model.eval()
    x = example()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=2e-5)


def test_presets_set_alpha_and_the_onehot_input_gates():
    assert MHCConfig(init="symmetric").initial_gate == MHCConfig(init="onehot").initial_gate == 1.0
    assert MHCConfig(init="onehot", gate_init=0.1).initial_gate == 0.1
    model = NanoGPT()
    apply_mhc(model, MHCConfig(streams=4, init="onehot"), example_input=lm_batch())
    hypers = [h for block in model.transformer.h for h in block.hyper]
    read = [int(torch.sigmoid(h.bias[:4]).argmax()) for h in hypers]
    assert read == [i % 4 for i in range(len(hypers))]
    assert all(torch.sigmoid(h.bias[:4]).sum().item() == pytest.approx(1.0, abs=1e-6) for h in hypers)
    assert all(float(h.phi.abs().max()) == 0.0 for h in hypers)


def test_presets_of_mhc_are_refused_for_other_modes():
    with pytest.raises(ValueError, match="init='onehot' is a preset of mode='mhc'"):
        MHCConfig(mode="hc", init="onehot")


def _stream_spread_after_training(preset, steps=5):
    torch.manual_seed(0)
    model = NanoGPT()
    apply_mhc(model, MHCConfig(streams=4, init=preset), example_input=lm_batch())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        tokens = lm_batch(step)
        F.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    outputs = []
    model.transformer.h[1].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(lm_batch(9))
    streams = carried_streams(outputs[0], "next block")
    return float((streams - streams[..., :1, :]).abs().max())


def test_symmetric_preset_keeps_the_streams_identical_while_training():
    assert _stream_spread_after_training("symmetric") == 0.0


@pytest.mark.parametrize("preset", ["onehot", "paper"])
def test_asymmetric_presets_break_the_streams_symmetry_in_a_few_steps(preset):
    assert _stream_spread_after_training(preset) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_composite_gain_stays_near_one_for_every_preset_on_the_stability_model(preset):
    L.seed_everything(0, verbose=False)
    model = DenseTransformerLM(d_model=32, n_layers=6, n_heads=4, seq_len=32, ffn_size=128, lr=3e-3, warmup_steps=5)
    callback = MHCCallback(streams=4, init=preset, log_every_n_steps=5)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(model, ByteLMDataModule(seq_len=32, batch_size=8, max_bytes=200_000))
    gains = [h[k] for h in callback.history for k in ("mhc/gain_fwd_composite", "mhc/gain_bwd_composite")]
    assert gains and all(0.5 <= g <= 2.0 for g in gains), gains
