"""Precision: the residual stream keeps its own dtype under autocast, and mHC's parameters learn under bf16-true."""

import copy

import lightning as L
import pytest
import torch
from block_styles import VOCAB, NanoGPTBlock, lm_batch
from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision
from lit_models import LitLM, token_loader, trainer
from torch import nn

from lightning_mhc import MHCCallback, MHCConfig, apply_mhc


class LoudStack(nn.Module):
    """A residual stack whose hidden state has magnitude ~100, where bf16 rounding steps are 0.5."""

    def __init__(self, dim=32, depth=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.layers = nn.ModuleList(NanoGPTBlock(dim) for _ in range(depth))

    def forward(self, idx):
        x = 100 * self.embed(idx)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_autocast_rounds_only_the_branches_never_the_stream(precision):
    torch.manual_seed(0)
    plain = LoudStack()
    injected = copy.deepcopy(plain)
    apply_mhc(injected, MHCConfig(streams=4, gate_init=0.0), example_input=lm_batch())
    plugin = MixedPrecision(precision, device="cpu")
    tokens = lm_batch(1)
    with torch.no_grad(), plugin.forward_context():
        expected, got = plain(tokens), injected(tokens)
    assert got.dtype == expected.dtype == torch.float32 and expected.abs().mean() > 50
    # Both round F alike; only the mixing of identical fp32 streams differs (fp32 rounding, ~1e-5 at 100).
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-3)


def test_half_precision_cast_keeps_mhc_parameters_float32():
    torch.manual_seed(0)
    model = LoudStack()
    apply_mhc(model, MHCConfig(streams=4, readout="learned"), example_input=lm_batch())
    model = HalfPrecision("bf16-true").convert_module(model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".hyper." in n or ".readout." in n)
    assert dtypes["embed.weight"] == torch.bfloat16
    with torch.no_grad():
        assert model(lm_batch(1)).dtype == torch.bfloat16


class InputGateBiases(L.Callback):
    """b_pre (= logit(1/n) at init, where bf16 steps are 2^-7) of every hyper-connection when training starts and
    ends, as the optimizer sees them."""

    def on_train_start(self, trainer, pl_module):
        self.start = self._read(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.end = self._read(pl_module)

    @staticmethod
    def _read(module):
        return torch.cat([p.detach().float()[:4] for n, p in module.named_parameters() if n.endswith("hyper.0.bias")])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-true"])
def test_mhc_input_gate_biases_learn_under_half_precision(precision):
    torch.manual_seed(0)
    model, biases = LitLM(lr=3e-4), InputGateBiases()
    callbacks = [MHCCallback(streams=4, log_every_n_steps=1000), biases]
    trainer(max_steps=20, precision=precision, callbacks=callbacks).fit(model, token_loader(samples=80))
    assert (biases.end != biases.start).float().mean() > 0.9
