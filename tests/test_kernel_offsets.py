"""Kernel index math past 2**31 elements, without 8 GB of data.

Every per-token tensor is addressed as ``token * token_stride + inner``. With int32 indices that product wraps
once ``tokens * n * C >= 2**31`` (75k tokens at n=4, C=7168). Here three tokens sit ``S = 2**30 + 2**20``
elements apart in one lazily allocated storage of ``2**32 + 2**22`` bf16 elements (8 GB of address space, of
which only the pages the test writes, a few MB, become memory), so token 2 is at offset ``2**31 + 2**21``.
The views start at element ``2**31``: a wrapped (negative) int32 offset then still lands inside the storage, on
zeros, so int32 index math fails these comparisons cleanly instead of faulting. Inputs, outputs and gradient
buffers are all such views, so loads and stores are both checked, against the torch reference on contiguous
copies of the same values.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernel_devices import DEVICES  # noqa: E402

from lightning_mhc.kernels import apply, coefficients, reference, sinkhorn  # noqa: E402

TOKENS, N, C = 3, 4, 40
STRIDE = 2**30 + 2**20  # token 2 at 2**31 + 2**21: past int32
BASE = 2**31  # where the views start, so wrapped int32 offsets stay inside the storage
REGION = 256  # elements per tensor inside one token period (>= n * C)
DTYPE = torch.bfloat16
TOL = 2**-7  # bf16 storage: one rounding of the result


@pytest.fixture(scope="module", params=DEVICES)
def far(request):
    """``far(k, *inner)``: a zeroed ``(3, *inner)`` view whose token ``t`` starts at ``BASE + k*REGION + t*STRIDE``."""
    device = request.param
    try:
        storage = torch.empty(BASE + 2 * STRIDE + 2**22, dtype=DTYPE, device=device)
    except (RuntimeError, MemoryError) as err:  # strict overcommit: no 8 GB of address space
        pytest.skip(f"cannot reserve 8 GB of address space: {err}")

    def view(k: int, *inner: int) -> torch.Tensor:
        assert (k + 1) * REGION <= 2**22 and torch.Size(inner).numel() <= REGION
        inner_strides = torch.empty(inner).stride() if inner else ()
        t = storage.as_strided((TOKENS, *inner), (STRIDE, *inner_strides), BASE + k * REGION)
        return t.zero_()

    view.device = device
    return view


def _filled(view: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    view.copy_(torch.randn(view.shape, generator=gen))
    return view


def _check(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    expected = expected.float()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float().cpu(), expected.cpu(), rtol=tol, atol=tol * scale)


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().float().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out.float())


def test_views_pass_int32(far):
    x = far(0, N, C)
    assert x.storage_offset() + (TOKENS - 1) * x.stride(0) >= 2**31 > x.stride(0)


def test_pre_mix_far_tokens(far):
    gen = torch.Generator().manual_seed(0)
    x, grad_out = _filled(far(0, N, C), gen), _filled(far(1, C), gen)
    h_pre = torch.rand(TOKENS, N, generator=gen).to(far.device)
    out_buffer, dx_buffer = far(2, C), far(3, N, C)
    out = apply.pre_mix_forward(x, h_pre, out=out_buffer)
    dx, dh = apply.pre_mix_backward(x, h_pre, grad_out, dx=dx_buffer)
    want, (want_dx, want_dh) = _grads(reference.pre_mix, (x, h_pre), grad_out)
    assert out is out_buffer and dx is dx_buffer
    _check(out, want)
    _check(dx, want_dx)
    _check(dh, want_dh, 1e-5)


def test_merge_far_tokens(far):
    gen = torch.Generator().manual_seed(1)
    x, f, grad_out = _filled(far(0, N, C), gen), _filled(far(1, C), gen), _filled(far(2, N, C), gen)
    h_res = torch.rand(TOKENS, N, N, generator=gen).to(far.device)
    h_post = torch.rand(TOKENS, N, generator=gen).to(far.device)
    out = apply.merge_forward(x, f, h_res, h_post, out=far(3, N, C))
    dx, df, dh_res, dh_post = apply.merge_backward(x, f, h_res, h_post, grad_out, dx=far(4, N, C), df=far(5, C))
    want, want_grads = _grads(reference.merge, (x, f, h_res, h_post), grad_out)
    _check(out, want)
    for got, expected, tol in zip((dx, df, dh_res, dh_post), want_grads, (TOL, TOL, 1e-5, 1e-5)):
        _check(got, expected, tol)


def test_logits_far_tokens(far):
    gen = torch.Generator().manual_seed(2)
    x = _filled(far(0, N * C), gen)
    n_out = N * N + 2 * N
    phi = (torch.randn(N * C, n_out, generator=gen) / (N * C) ** 0.5).to(far.device)
    alpha = (torch.rand(3, generator=gen) + 0.5).to(far.device)
    bias = torch.randn(n_out, generator=gen).to(far.device)
    grad = torch.randn(TOKENS, n_out, generator=gen).to(far.device)
    out, mr, r = coefficients.logits_forward(x, phi, alpha, bias, N, activate=False)
    dx, dphi, dalpha, dbias = coefficients.logits_backward(x, phi, alpha, grad, mr, r, N, dx=far(1, N * C))

    def logits(x, phi, alpha, bias):
        return reference.mhc_logits(x.unflatten(-1, (N, C)), phi, alpha, bias)

    want, want_grads = _grads(logits, (x, phi, alpha, bias), grad)
    tol = 1e-5 if far.device == "cpu" else 5e-3  # tf32 dot on GPU
    _check(out, want, tol)
    _check(dx, want_grads[0], max(tol, TOL))
    for got, expected in zip((dphi, dalpha, dbias), want_grads[1:]):
        _check(got, expected, tol)


def test_sinkhorn_far_tokens(far):
    gen = torch.Generator().manual_seed(3)
    logits = far(0, N, N).copy_(torch.randn(TOKENS, N, N, generator=gen) * 3)
    grad_out = torch.randn(TOKENS, N, N, generator=gen).to(far.device)
    out = sinkhorn.sinkhorn_forward(logits, 10)
    grad = sinkhorn.sinkhorn_backward(logits, grad_out, 10)
    want, (want_grad,) = _grads(lambda t: reference.sinkhorn(t, 10), (logits,), grad_out)
    _check(out, want, 1e-5)
    _check(grad, want_grad, 1e-5)
