"""The fast torch path (``kernels/fast.py``, what ``kernels="torch"`` runs) against the straightforward formulas of
``kernels/reference.py``: float64 gradcheck, and equal forward and gradients in fp32/fp16/bf16, over stream counts,
leading shapes, broadcasting, the expanded stream of a first block, unused outputs and ties in Sinkhorn's max."""

from __future__ import annotations

import pytest
import torch

from lightning_mhc import HyperConnection, MHCConfig, expand_streams
from lightning_mhc.kernels import fast, reference
from lightning_mhc.kernels.dispatch import get_ops

STREAMS = [1, 2, 4, 8]
LEADS = [(3,), (2, 3)]
# fp32 round-off of the reductions; for half streams one rounding of the stream dtype.
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _reference_read(x, phi, alpha, bias, iters):
    coeffs = reference.coefficients_from_logits(reference.mhc_logits(x, phi, alpha, bias), x.shape[-2], "mhc", iters)
    return reference.pre_mix(x, coeffs.h_pre), coeffs


def _read_inputs(lead, n, c, dtype=torch.float64, seed=0, x_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    k = n * n + 2 * n
    x = torch.randn(*lead, n, c, generator=gen, dtype=dtype).to(x_dtype or dtype)
    phi = torch.randn(n * c, k, generator=gen, dtype=dtype) / (n * c) ** 0.5
    alpha = torch.rand(3, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(k, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (x, phi, alpha, bias)]


def _flat_read(*inputs, iters=5):
    mixed, coeffs = fast.read(*inputs, iters)
    return mixed, *coeffs


def _flat_reference_read(*inputs, iters=5):
    mixed, coeffs = _reference_read(*inputs, iters)
    return mixed, *coeffs


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("lead", LEADS)
def test_read_passes_gradcheck_and_equals_reference(lead, n):
    inputs = _read_inputs(lead, n, 5)
    assert torch.autograd.gradcheck(_flat_read, inputs)
    for got, want in zip(_flat_read(*inputs), _flat_reference_read(*inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize("lead", LEADS)
def test_merge_and_sinkhorn_pass_gradcheck_and_equal_reference(lead, n):
    gen = torch.Generator().manual_seed(n)
    x, f = torch.randn(*lead, n, 5, generator=gen, dtype=torch.float64), torch.randn(*lead, 5, dtype=torch.float64)
    h_res, h_post = torch.rand(*lead, n, n, dtype=torch.float64), torch.rand(*lead, n, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, f, h_res, h_post)]
    assert torch.autograd.gradcheck(fast.merge, inputs)
    torch.testing.assert_close(fast.merge(*inputs), reference.merge(*inputs), rtol=1e-12, atol=1e-12)
    logits = torch.randn(*lead, n, n, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fast.sinkhorn(t, 7), (logits,))
    torch.testing.assert_close(fast.sinkhorn(logits, 7), reference.sinkhorn(logits, 7), rtol=1e-12, atol=1e-12)


def test_merge_broadcasts_as_reference():
    # One map shared by all tokens, a branch output broadcast over a leading dimension.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    h_res = torch.rand(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    h_post = torch.rand(2, 1, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast.merge, (x, f, h_res, h_post))
    torch.testing.assert_close(fast.merge(x, f, h_res, h_post), reference.merge(x, f, h_res, h_post))


def _grads(outputs, inputs, seed=9):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs]
    return torch.autograd.grad(outputs, inputs, grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [2, 4])
def test_read_and_merge_match_reference_in_stream_dtypes(n, dtype):
    inputs = _read_inputs((3, 7), n, 40, torch.float32, seed=n, x_dtype=dtype)
    got, want = _flat_read(*inputs, iters=20), _flat_reference_read(*inputs, iters=20)
    assert [t.dtype for t in got] == [t.dtype for t in want] == [dtype] + [torch.float32] * 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=TOL[dtype], atol=TOL[dtype])
    for g, w, inp in zip(_grads(got, inputs), _grads(want, inputs), inputs):
        assert g.dtype == inp.dtype
        scale = w.abs().max().item()
        torch.testing.assert_close(g.float(), w.float(), rtol=TOL[dtype], atol=TOL[dtype] * scale)
    x, h_res, h_post = inputs[0], want[3].detach(), want[2].detach()
    merge_in = [t.detach().clone().requires_grad_() for t in (x, torch.randn(3, 7, 40).to(dtype), h_res, h_post)]
    got_m, want_m = fast.merge(*merge_in), reference.merge(*merge_in)
    torch.testing.assert_close(got_m.float(), want_m.float(), rtol=TOL[dtype], atol=TOL[dtype])
    for g, w in zip(_grads([got_m], merge_in), _grads([want_m], merge_in)):
        torch.testing.assert_close(g.float(), w.float(), rtol=TOL[dtype], atol=TOL[dtype] * w.abs().max().item())


def test_read_of_an_expanded_stream_and_unused_outputs():
    # The first block reads a stride-0 expansion of the hidden state; often only the branch input gets a gradient.
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    _, phi, alpha, bias = _read_inputs((2, 3), 4, 6)

    def only_mixed(h, *params):
        return fast.read(expand_streams(h, 4), *params, 5)[0]

    assert torch.autograd.gradcheck(only_mixed, (hidden, phi, alpha, bias))
    want = _reference_read(expand_streams(hidden, 4), phi, alpha, bias, 5)[0]
    torch.testing.assert_close(only_mixed(hidden, phi, alpha, bias), want, rtol=1e-12, atol=1e-12)


def test_sinkhorn_gradient_at_tied_maxima_equals_autograd_of_the_unrolled_formula():
    logits = torch.zeros(3, 4, 4, dtype=torch.float64)
    logits[:, 0, 0] = logits[:, 2, 1] = 1.5  # two maxima per matrix
    logits[1] = 0.25  # all sixteen tie
    logits.requires_grad_()
    grad_out = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (got,) = torch.autograd.grad(fast.sinkhorn(logits, 9), logits, grad_out)
    (want,) = torch.autograd.grad(reference.sinkhorn_unrolled(logits, 9), logits, grad_out)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_torch_backend_runs_the_fast_path_and_hyper_connection_equals_reference():
    assert get_ops("torch").mhc_read is fast.read and get_ops("torch").merge is fast.merge
    torch.manual_seed(0)
    hc = HyperConnection(8, MHCConfig(streams=4, kernels="torch", init="paper")).double()
    x = torch.randn(2, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    branch = torch.nn.Linear(8, 8).double()
    out = hc(x, branch)
    coeffs = reference.coefficients_from_logits(reference.mhc_logits(x, hc.phi, hc.alpha, hc.bias), 4, "mhc", 20)
    want = reference.merge(x, branch(reference.pre_mix(x, coeffs.h_pre)), coeffs.h_res, coeffs.h_post)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    params = [x, hc.phi, hc.alpha, hc.bias]
    for g, w in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
