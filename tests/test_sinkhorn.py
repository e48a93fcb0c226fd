import pytest
import torch

from lightning_mhc.kernels.reference import sinkhorn, sinkhorn_unrolled


def _spread_logits(count, n, spread, seed, dtype=torch.float64):
    """Logits uniform in ``[-spread/2, spread/2]``: ``max - min`` of each matrix is close to ``spread``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(count, n, n, generator=gen, dtype=dtype) - 0.5) * spread


def _row_col_errors(m):
    return (m.sum(-1) - 1).abs().max().item(), (m.sum(-2) - 1).abs().max().item()


@pytest.mark.parametrize("n", [2, 4, 8])
def test_rows_exact_and_columns_close(n):
    m = sinkhorn(torch.randn(512, n, n, generator=torch.Generator().manual_seed(0)), 20)
    row_err, col_err = _row_col_errors(m)
    assert row_err < 1e-6
    assert col_err < 5e-3
    assert (m >= 0).all()


def test_column_error_shrinks_with_iterations():
    # Measured on 4096 standard-normal 4x4 logits (fp32), max |column sum - 1| after t_max iterations:
    #   t=1: ~0.7, t=5: ~0.06, t=10: ~0.01, t=20: ~6e-4, t=40: ~2e-7.  Rows are exact (~1e-7) at every t.
    logits = torch.randn(4096, 4, 4, generator=torch.Generator().manual_seed(1))
    errors = [_row_col_errors(sinkhorn(logits, t))[1] for t in (1, 5, 10, 20, 40)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.1
    assert errors[3] < 2e-3
    assert errors[4] < 1e-5


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_extreme_logits_stay_finite_and_doubly_stochastic(scale):
    logits = (torch.rand(256, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1) * scale
    m = sinkhorn(logits, 20)
    assert torch.isfinite(m).all()
    row_err, col_err = _row_col_errors(m)
    assert row_err < 1e-6
    assert col_err < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_fp32_doubly_stochastic(dtype):
    logits = torch.randn(256, 4, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
    m = sinkhorn(logits, 20)
    assert m.dtype == torch.float32
    assert torch.isfinite(m).all()
    row_err, col_err = _row_col_errors(m)
    assert row_err < 1e-6 and col_err < 5e-3
    torch.testing.assert_close(m, sinkhorn(logits.float(), 20))


def test_recomputing_backward_passes_gradcheck():
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,))


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("spread", [12.0, 20.0, 30.0])
def test_gradcheck_at_large_logit_spreads(spread, n):
    """``M0 = exp(L - max L) + eps`` depends on ``max L`` once entries fall to ``eps`` (spreads above ~14); the
    backward must include that term. Before it did, the relative gradient error was 4e-4 at spread 10 and
    0.3 at spread 30, and gradcheck failed from spread 10 on."""
    logits = _spread_logits(3, n, spread, seed=n).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,))


@pytest.mark.parametrize("spread", [12.0, 30.0])
def test_gradcheck_of_the_unrolled_autograd_version(spread):
    """The plain-autograd version differentiates through ``max L`` too (it is what the others are compared to)."""
    logits = _spread_logits(2, 4, spread, seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sinkhorn_unrolled(x, 20), (logits,))


def test_backward_at_tied_maxima_follows_amax():
    """``max`` has no derivative where the largest logits tie (e.g. at ``alpha = 0`` with a diagonal ``b_res``):
    the backward splits the shift's gradient evenly among the tied maxima, as autograd's ``amax`` does."""
    logits = _spread_logits(16, 4, 30.0, seed=7)
    logits.diagonal(dim1=-2, dim2=-1).fill_(20.0)
    logits[:4, 0, 1] = 20.0  # five tied maxima in some matrices
    logits.requires_grad_()
    grad_out = torch.randn(logits.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (ours,) = torch.autograd.grad(sinkhorn(logits, 20), logits, grad_out)
    (unrolled,) = torch.autograd.grad(sinkhorn_unrolled(logits, 20), logits, grad_out)
    torch.testing.assert_close(ours, unrolled, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("scale", "dtype"), [(1e4, torch.float32), (1e4, torch.float16), (30.0, torch.float16)])
def test_extreme_and_half_logits_have_finite_gradients(scale, dtype):
    logits = ((torch.rand(64, 4, 4, generator=torch.Generator().manual_seed(9)) * 2 - 1) * scale).to(dtype)
    logits.requires_grad_()
    out = sinkhorn(logits, 20)
    assert torch.isfinite(out).all()
    row_err, col_err = _row_col_errors(out)
    assert row_err < 1e-6 and col_err < 0.1
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(10))
    (grad,) = torch.autograd.grad(out, logits, grad_out)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    (unrolled,) = torch.autograd.grad(sinkhorn_unrolled(logits, 20), logits, grad_out)
    tol = 1e-5 if dtype == torch.float32 else 2**-10  # fp16 gradients: one rounding of the fp32 result
    scale = unrolled.abs().max().item()
    torch.testing.assert_close(grad.float(), unrolled.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("spread", [4.0, 30.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_recomputing_backward_equals_autograd_through_the_loop(n, spread):
    gen = torch.Generator().manual_seed(n)
    logits = _spread_logits(64, n, spread, seed=n).requires_grad_()
    grad_out = torch.randn(64, n, n, generator=gen, dtype=torch.float64)
    (ours,) = torch.autograd.grad(sinkhorn(logits, 20), logits, grad_out)
    (unrolled,) = torch.autograd.grad(sinkhorn_unrolled(logits, 20), logits, grad_out)
    torch.testing.assert_close(ours, unrolled, rtol=1e-10, atol=1e-12)


def test_saves_only_the_logits():
    logits = torch.randn(8, 4, 4, requires_grad=True)
    out = sinkhorn(logits, 20)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].shape == logits.shape
