"""Numerical edge cases of the mHC steps (issue 13): logits of +-1e4, an all-zero stream state (RMS 0), fp16 and bf16
streams. Outputs and gradients must be finite and ``H_res`` doubly stochastic, on the torch path (``kernels="torch"``)
and with the Triton kernels (in the interpreter on CPU, see ``conftest.py``)."""

from __future__ import annotations

import pytest
import torch

from lightning_mhc.kernels.dispatch import KernelOps, get_ops

try:
    import triton  # noqa: F401
except ImportError:
    triton = None
from kernel_devices import DEVICES

BACKENDS = [pytest.param("torch", "cpu", id="torch")] + [
    pytest.param("triton", p.values[0], marks=[*p.marks, pytest.mark.skipif(triton is None, reason="needs triton")])
    for p in DEVICES
]
HALF = [torch.float16, torch.bfloat16]
N, C, TOKENS = 4, 24, 10
# Rows are normalised last, so they sum to 1 to fp32 rounding. Columns converge with the iterations; with logits of
# +-1e4 all but a few entries start at eps = 1e-6 (ratios of 1e6), so 20 iterations leave columns off by up to ~0.1.
ROW_TOL, COL_TOL, EXTREME_COL_TOL = 1e-5, 5e-3, 0.1


def _ops(backend: str) -> KernelOps:
    return get_ops(backend)


def _assert_doubly_stochastic(h_res: torch.Tensor, col_tol: float) -> None:
    assert torch.isfinite(h_res).all()
    assert (h_res >= 0).all()
    assert (h_res.sum(-1) - 1).abs().max().item() < ROW_TOL
    assert (h_res.sum(-2) - 1).abs().max().item() < col_tol


def _assert_finite(*tensors: torch.Tensor | None) -> None:
    for t in tensors:
        assert t is not None and torch.isfinite(t).all()


def _params(device: str, bias_scale: float = 1.0, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = N * N + 2 * N
    phi = torch.randn(N * C, k, generator=gen) / (N * C) ** 0.5
    alpha = torch.full((3,), 0.5)
    bias = (torch.rand(k, generator=gen) * 2 - 1) * bias_scale
    return [t.to(device).requires_grad_() for t in (phi, alpha, bias)]


def _read_and_merge(ops: KernelOps, x: torch.Tensor, phi, alpha, bias, f: torch.Tensor):
    mixed, coeffs = ops.mhc_read(x, phi, alpha, bias, 20)
    out = ops.merge(x, f, coeffs.h_res, coeffs.h_post)
    loss = out.float().square().sum() + mixed.float().sum() + coeffs.h_pre.sum()
    return mixed, coeffs, out, torch.autograd.grad(loss, [x, phi, alpha, bias, f])


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_sinkhorn_of_logits_of_1e4(backend, device, scale):
    gen = torch.Generator().manual_seed(1)
    logits = ((torch.rand(TOKENS, N, N, generator=gen) * 2 - 1) * scale).to(device)
    logits[0] = scale  # all entries tie at the max
    logits[1, :, 0] = scale  # one column holds every maximum
    logits.requires_grad_()
    out = _ops(backend).sinkhorn(logits, 20)
    _assert_doubly_stochastic(out, EXTREME_COL_TOL)
    (grad,) = torch.autograd.grad(out, logits, torch.randn(out.shape, generator=gen).to(device))
    _assert_finite(grad)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("bias_scale", [1e4, -1e4])
def test_coefficient_logits_of_1e4(backend, device, bias_scale):
    # Logits of +-1e4 through the bias: sigmoids saturate to 0 or 1, Sinkhorn sees +-1e4.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(TOKENS, N, C, generator=gen).to(device).requires_grad_()
    f = torch.randn(TOKENS, C, generator=gen).to(device).requires_grad_()
    mixed, coeffs, out, grads = _read_and_merge(_ops(backend), x, *_params(device, abs(bias_scale), 3), f)
    _assert_finite(mixed, coeffs.h_pre, coeffs.h_post, out, *grads)
    _assert_doubly_stochastic(coeffs.h_res, EXTREME_COL_TOL)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_all_zero_stream_state(backend, device, dtype):
    # RMS 0: the RMS epsilon keeps 1/r finite; the logits are the bias and every gradient is finite.
    x = torch.zeros(TOKENS, N, C, dtype=dtype, device=device, requires_grad=True)
    f = torch.zeros(TOKENS, C, dtype=dtype, device=device, requires_grad=True)
    phi, alpha, bias = _params(device)
    mixed, coeffs, out, grads = _read_and_merge(_ops(backend), x, phi, alpha, bias, f)
    _assert_finite(mixed, coeffs.h_pre, coeffs.h_post, out, *grads)
    _assert_doubly_stochastic(coeffs.h_res, COL_TOL)
    assert (out == 0).all() and (mixed == 0).all()
    want = torch.sigmoid(bias.detach()[:N]).expand(TOKENS, N)
    torch.testing.assert_close(coeffs.h_pre.detach(), want)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e3])
def test_half_streams(backend, device, dtype, magnitude):
    # fp16/bf16 streams from tiny (fp16 subnormal territory once mixed) to large (squares overflow fp16).
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(TOKENS, N, C, generator=gen) * magnitude).to(device=device, dtype=dtype).requires_grad_()
    f = (torch.randn(TOKENS, C, generator=gen) * magnitude).to(device=device, dtype=dtype).requires_grad_()
    mixed, coeffs, out, grads = _read_and_merge(_ops(backend), x, *_params(device), f)
    assert mixed.dtype == out.dtype == dtype
    assert coeffs.h_res.dtype == torch.float32
    _assert_finite(mixed, coeffs.h_pre, coeffs.h_post, out, *grads)
    _assert_doubly_stochastic(coeffs.h_res, COL_TOL)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
def test_half_logits_of_1e4_into_sinkhorn(backend, device, dtype):
    logits = ((torch.rand(TOKENS, N, N, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 1e4).to(device, dtype)
    logits.requires_grad_()
    out = _ops(backend).sinkhorn(logits, 20)
    assert out.dtype == torch.float32
    _assert_doubly_stochastic(out, EXTREME_COL_TOL)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert grad.dtype == dtype
    _assert_finite(grad)
