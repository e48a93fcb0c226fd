"""``torch.compile`` of an injected model: one graph without breaks (with selective recomputation configured too),
a compiled training step equal to the eager one, and compiled models training under ``MHCCallback`` like eager. The
torch path's autograd Functions are traced, backward included; the saved-tensor hooks of ``recompute.py`` stay out
of compiled graphs (``MHCBlock._recomputes``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from block_styles import NanoGPT, lm_batch
from lit_models import LitLM, token_loader, trainer

from lightning_mhc import MHCCallback, MHCConfig, apply_mhc
from lightning_mhc.mhc_block import MHCBlock


def _injected(recompute: bool, granularity: str = "sublayer") -> NanoGPT:
    torch.manual_seed(0)
    model = NanoGPT()
    config = MHCConfig(streams=4, kernels="torch", init="paper", recompute=recompute, granularity=granularity)
    apply_mhc(model, config, example_input=lm_batch())
    return model.train()


def _step(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    params = [p for p in model.parameters() if p.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, params))


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [False, True])
def test_training_forward_is_one_graph(recompute):
    model = _injected(recompute)
    try:
        explained = torch._dynamo.explain(model)(lm_batch(1))
    finally:
        torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
@pytest.mark.parametrize(("recompute", "granularity"), [(False, "sublayer"), (True, "sublayer"), (True, "block")])
def test_compiled_training_step_equals_eager(recompute, granularity):
    # fullgraph=True fails on any graph break; aot_eager traces forward and backward (the autograd Functions'
    # analytic backwards included) without inductor's code generation, which the numerics do not depend on.
    model = _injected(recompute, granularity)
    batch = lm_batch(2, seq=17)
    want_loss, want_grads = _step(model, batch)
    try:
        got_loss, got_grads = _step(torch.compile(model, fullgraph=True, backend="aot_eager"), batch)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_read_and_merge_equal_eager_for_half_streams(dtype):
    """Under torch.compile the read and the merge take traceable forms (which inductor fuses); they too reduce in
    fp32, so half-precision streams whose sums over C exceed fp16's range keep finite gradients equal to eager's."""
    from lightning_mhc.kernels import fast

    gen = torch.Generator().manual_seed(0)
    n, c, tokens = 4, 64, 12
    x = (torch.randn(tokens, n, c, generator=gen) * 1e3).to(dtype).requires_grad_()
    f = (torch.randn(tokens, c, generator=gen) * 1e3).to(dtype).requires_grad_()
    phi = (torch.randn(n * c, n * n + 2 * n, generator=gen) / (n * c) ** 0.5).requires_grad_()
    alpha, bias = torch.full((3,), 0.5, requires_grad=True), torch.zeros(n * n + 2 * n, requires_grad=True)
    inputs = [x, f, phi, alpha, bias]

    def step(x, f, phi, alpha, bias):
        mixed, coeffs = fast.read(x, phi, alpha, bias, 20)
        out = fast.merge(x, f, coeffs.h_res, coeffs.h_post)
        return out.float().square().sum() + mixed.float().square().sum() + coeffs.h_pre.sum()

    want = torch.autograd.grad(step(*inputs), inputs)
    try:
        got = torch.autograd.grad(torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs), inputs)
    finally:
        torch._dynamo.reset()
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=2e-2, atol=1e-2 * w.abs().max().item())


class CompiledLitLM(LitLM):
    """Compiles its model in configure_model, as large-model code does; the callback injects into what it wraps."""

    def configure_model(self):
        if not isinstance(self.model, torch._dynamo.eval_frame.OptimizedModule):
            self.model = torch.compile(self.model, backend="aot_eager")


class BlockwiseCompiledLitLM(LitLM):
    """Compiles each block on its own in configure_model; the callback then wraps the compiled blocks."""

    def configure_model(self):
        for block in self.model.transformer.h:
            block.compile(backend="aot_eager")


@pytest.mark.slow
@pytest.mark.parametrize("compiled_class", [CompiledLitLM, BlockwiseCompiledLitLM])
def test_callback_injects_into_a_model_compiled_in_configure_model(compiled_class):
    # the callback's per-step watch and logging-step capture ask, at every block, whether a forward is a checkpoint's
    # replay: a graph break, not a difference (compiled blocks run the injected merges inside their graphs)
    modules = {}
    for module_class in (compiled_class, LitLM):
        torch.manual_seed(0)
        modules[module_class] = module_class()
        try:
            trainer(max_steps=4, callbacks=[MHCCallback(streams=4, kernels="torch", log_every_n_steps=2)]).fit(
                modules[module_class], token_loader()
            )
        finally:
            torch._dynamo.reset()
    model = modules[compiled_class].model
    blocks = (model._orig_mod if compiled_class is CompiledLitLM else model).transformer.h
    assert all(isinstance(block, MHCBlock) for block in blocks)
    torch.testing.assert_close(modules[compiled_class].losses, modules[LitLM].losses, rtol=1e-5, atol=1e-6)
