"""Every Triton kernel, forward and backward, against the torch reference.

On CPU the kernels run in the Triton interpreter (conftest sets ``TRITON_INTERPRET=1`` when there is no GPU), so
sizes stay tiny but awkward: ``C`` not a power of two, token counts that are no multiple of the block size,
``n`` in {1, 2, 4, 8}, fp32/fp16/bf16 storage. The same tests run on ``cuda`` (marked ``cuda``) with the
compiled kernels, where the coefficient matmul runs in tf32 and tolerances are set accordingly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from kernel_devices import DEVICES, INTERPRETING  # noqa: E402

from lightning_mhc.kernels import apply, coefficients, fast, ops, reference  # noqa: E402
from lightning_mhc.kernels.dispatch import get_ops, resolve_backend  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims, C): a token count below one block and one above it, C not a power of two.
SHAPES = [((7,), 40), ((3, 11), 72)]
STREAMS = [1, 2, 4, 8]
# fp32 round-off of a few hundred terms; for half storage the last rounding (one ulp) dominates.
TOL = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: 2**-7}
TF32_TOL = 5e-3


def _check(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Elementwise ``|a - e| <= tol * (|e| + max |e|)``: relative, with the tensor's scale as the floor."""
    assert actual.shape == expected.shape
    expected = expected.float()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.float(), expected, rtol=tol, atol=tol * max(scale, 1e-6))


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


def _logit_inputs(lead, n, c, dtype, device, gen):
    n_out = n * n + 2 * n
    x = torch.randn(*lead, n, c, generator=gen).to(device=device, dtype=dtype)
    phi = (torch.randn(n * c, n_out, generator=gen) / (n * c) ** 0.5).to(device)
    alpha = (torch.rand(3, generator=gen) + 0.5).to(device)
    bias = torch.randn(n_out, generator=gen).to(device)
    return x, phi, alpha, bias


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize(("lead", "c"), SHAPES)
def test_mhc_logits_matches_reference(lead, c, n, dtype, device):
    gen = torch.Generator().manual_seed(n * 100 + c)
    inputs = _logit_inputs(lead, n, c, dtype, device, gen)
    got_in, ref_in = _leaves(*inputs), _leaves(*inputs)
    got, ref = ops.mhc_logits(*got_in), reference.mhc_logits(*ref_in)
    assert got.dtype == ref.dtype == torch.float32
    tol = TF32_TOL if device == "cuda" else TOL[torch.float32]
    _check(got, ref, tol)
    grad_out = torch.randn(ref.shape, generator=gen).to(device)
    for g, r, inp in zip(_grads(got, got_in, grad_out), _grads(ref, ref_in, grad_out), inputs):
        assert g.dtype == inp.dtype
        _check(g, r, max(tol, TOL[inp.dtype]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 31, 32, 33, 100])
def test_mhc_logits_backward_sums_token_splits(tokens, device, monkeypatch):
    # On GPU the weight gradient is reduced over several token splits; force three here (fewer when there are fewer
    # token blocks). Token counts around the 32-token block check the backward's one-block-ahead loads of x.
    monkeypatch.setattr(coefficients, "_token_splits", lambda x, k_chunks, token_blocks: 3)
    gen = torch.Generator().manual_seed(7)
    inputs = _logit_inputs((tokens,), 2, 24, torch.float32, device, gen)
    got_in, ref_in = _leaves(*inputs), _leaves(*inputs)
    got, ref = ops.mhc_logits(*got_in), reference.mhc_logits(*ref_in)
    grad_out = torch.randn(ref.shape, generator=gen).to(device)
    tol = TF32_TOL if device == "cuda" else TOL[torch.float32]
    for g, r in zip(_grads(got, got_in, grad_out), _grads(ref, ref_in, grad_out)):
        _check(g, r, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", STREAMS)
def test_mhc_coefficients_fuse_sigmoids_and_sinkhorn(n, device):
    gen = torch.Generator().manual_seed(n)
    inputs = _logit_inputs((2, 9), n, 40, torch.bfloat16, device, gen)
    got_in, ref_in = _leaves(*inputs), _leaves(*inputs)
    iters = 6
    got = ops.mhc_coefficients(*got_in, iters)
    ref = get_ops("torch").mhc_coefficients(*ref_in, iters)
    tol = TF32_TOL if device == "cuda" else 1e-5
    weights = [torch.randn(r.shape, generator=gen).to(device) for r in ref]
    for g, r in zip(got, ref):
        _check(g, r, tol)
    got_loss = sum((g * w).sum() for g, w in zip(got, weights))
    ref_loss = sum((r * w).sum() for r, w in zip(ref, weights))
    for g, r, inp in zip(torch.autograd.grad(got_loss, got_in), torch.autograd.grad(ref_loss, ref_in), inputs):
        _check(g, r, max(tol, TOL[inp.dtype]))


def _sinkhorn_case(lead, n, iters, dtype, device, scale=2.0):
    gen = torch.Generator().manual_seed(n + iters)
    logits = (torch.randn(*lead, n, n, generator=gen) * scale).to(device=device, dtype=dtype)
    (got_in,), (ref_in,) = _leaves(logits), _leaves(logits)
    got, ref = ops.sinkhorn(got_in, iters), reference.sinkhorn(ref_in, iters)
    assert got.dtype == ref.dtype == torch.float32
    _check(got, ref, 1e-5)
    grad_out = torch.randn(ref.shape, generator=gen).to(device)
    (g,), (r,) = _grads(got, [got_in], grad_out), _grads(ref, [ref_in], grad_out)
    assert g.dtype == dtype
    _check(g, r, max(1e-5, TOL[dtype]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_sinkhorn_matches_reference(n, dtype, device):
    _sinkhorn_case((33,), n, 5, dtype, device)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [4, 8])
def test_sinkhorn_paper_iterations(n, device):
    _sinkhorn_case((5, 20), n, 20, torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_sinkhorn_extreme_logits_match_reference(scale, device):
    _sinkhorn_case((17,), 4, 10, torch.float32, device, scale=scale)


def _fp32_sinkhorn_tol(n: int, iters: int) -> float:
    """A priori bound for fp32 vs exact: each of the ``2 * iters`` normalisations of the forward (and of the
    backward's recomputation and reverse sweep) rounds sums of ``n`` terms, ``~ n * u`` relative with
    ``u = 2**-24``; Sinkhorn steps contract rather than amplify these, so ``2 * iters * n * u`` bounds the
    accumulated error (4.8e-6 at n=2, 1.9e-5 at n=8). Measured: <= 4e-7 of the largest entry for spreads up
    to 60. The backward that dropped ``d max L`` was off by 4e-4 (spread 10) to 0.3 (spread 30)."""
    return 2 * iters * n * 2**-24


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("spread", [12.0, 30.0])
def test_sinkhorn_gradient_matches_float64_at_large_spreads(spread, n, device):
    """The kernel's fp32 forward and backward against the float64 reference (which passes gradcheck at these
    spreads, test_sinkhorn.py), on the same fp32-representable logits."""
    gen = torch.Generator().manual_seed(n)
    logits = ((torch.rand(40, n, n, generator=gen) - 0.5) * spread).to(device)
    grad_out = torch.randn(logits.shape, generator=gen).to(device)
    (got_in,) = _leaves(logits)
    exact_in = logits.detach().double().requires_grad_()
    got, exact = ops.sinkhorn(got_in, 20), reference.sinkhorn(exact_in, 20)
    tol = _fp32_sinkhorn_tol(n, 20)
    _check(got, exact, tol)
    (g,), (e,) = _grads(got, [got_in], grad_out), _grads(exact, [exact_in], grad_out.double())
    _check(g, e, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_gradient_at_tied_maxima_and_extremes(device):
    """Tied maxima split the shift's gradient as ``amax`` does; logits of +-1e4 and fp16 logits stay finite."""
    gen = torch.Generator().manual_seed(11)
    logits = (torch.rand(24, 4, 4, generator=gen) - 0.5) * 30
    logits.diagonal(dim1=-2, dim2=-1).fill_(20.0)
    logits[8:16] = (torch.rand(8, 4, 4, generator=gen) * 2 - 1) * 1e4
    grad_out = torch.randn(logits.shape, generator=gen).to(device)
    for dtype in (torch.float32, torch.float16):
        (got_in,) = _leaves(logits.to(device=device, dtype=dtype))
        exact_in = got_in.detach().double().requires_grad_()
        got = ops.sinkhorn(got_in, 20)
        assert torch.isfinite(got).all()
        assert (got.sum(-1) - 1).abs().max() < 1e-6 and (got.sum(-2) - 1).abs().max() < 0.1
        (g,) = torch.autograd.grad(got, got_in, grad_out)
        (e,) = torch.autograd.grad(reference.sinkhorn_unrolled(exact_in, 20), exact_in, grad_out.double())
        assert g.dtype == dtype and torch.isfinite(g).all()
        _check(g, e, max(_fp32_sinkhorn_tol(4, 20), TOL[dtype]))


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_of_one_stream_is_one_and_reads_strided_logits(device):
    ones = ops.sinkhorn(torch.randn(9, 1, 1, device=device), 20)
    assert torch.equal(ones, torch.ones_like(ones))
    wide = torch.randn(13, 4, 8, device=device)
    strided = wide[..., :4]
    torch.testing.assert_close(ops.sinkhorn(strided, 7), reference.sinkhorn(strided, 7), rtol=1e-5, atol=1e-6)


def _apply_inputs(lead, n, c, dtype, device, gen, f_dtype=None):
    x = torch.randn(*lead, n, c, generator=gen).to(device=device, dtype=dtype)
    f = torch.randn(*lead, c, generator=gen).to(device=device, dtype=f_dtype or dtype)
    h_pre = torch.rand(*lead, n, generator=gen).to(device)
    h_res = torch.rand(*lead, n, n, generator=gen).to(device)
    h_post = 2 * torch.rand(*lead, n, generator=gen).to(device)
    return x, f, h_pre, h_res, h_post


def _compare_apply(name, inputs, device, gen):
    """Kernel on the given storage dtypes vs the reference on the same values upcast to fp32."""
    got_in = _leaves(*inputs)
    ref_in = _leaves(*(t.float() for t in inputs))
    got = getattr(ops, name)(*got_in)
    ref = getattr(reference, name)(*ref_in)
    assert got.dtype == getattr(reference, name)(*inputs).dtype
    _check(got, ref, TOL[got.dtype])
    grad_out = torch.randn(ref.shape, generator=gen).to(device=device, dtype=got.dtype)
    for g, r, inp in zip(_grads(got, got_in, grad_out), _grads(ref, ref_in, grad_out.float()), inputs):
        assert g.dtype == inp.dtype
        _check(g, r, TOL[inp.dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize(("lead", "c"), SHAPES)
def test_pre_mix_matches_reference(lead, c, n, dtype, device):
    gen = torch.Generator().manual_seed(n * 10 + c)
    x, _, h_pre, _, _ = _apply_inputs(lead, n, c, dtype, device, gen)
    _compare_apply("pre_mix", (x, h_pre), device, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", STREAMS)
@pytest.mark.parametrize(("lead", "c"), SHAPES)
def test_merge_matches_reference(lead, c, n, dtype, device):
    gen = torch.Generator().manual_seed(n * 10 + c + 1)
    x, f, _, h_res, h_post = _apply_inputs(lead, n, c, dtype, device, gen)
    _compare_apply("merge", (x, f, h_res, h_post), device, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("x_dtype", "f_dtype"), [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_merge_with_branch_output_in_another_dtype(x_dtype, f_dtype, device):
    gen = torch.Generator().manual_seed(3)
    x, f, _, h_res, h_post = _apply_inputs((10,), 4, 40, x_dtype, device, gen, f_dtype=f_dtype)
    _compare_apply("merge", (x, f, h_res, h_post), device, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_walks_several_channel_chunks(device):
    # C above the largest channel block, so each program loops over C.
    gen = torch.Generator().manual_seed(4)
    x, f, h_pre, h_res, h_post = _apply_inputs((5,), 2, 1100, torch.bfloat16, device, gen)
    _compare_apply("pre_mix", (x, h_pre), device, gen)
    _compare_apply("merge", (x, f, h_res, h_post), device, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [3, 8])
def test_merge_backward_on_token_strided_views(n, dtype, device):
    """The merge backward over several channel chunks with a ragged tail (C = 200), padded streams (n = 3) and
    input streams split over threads (n = 8), reading token-strided views of x, f and grad_out."""
    gen = torch.Generator().manual_seed(20 + n)
    tokens, c = 5, 200

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x, f, grad_out = randn(tokens, n + 1, c)[:, 1:], randn(tokens, 2 * c)[:, c:], randn(tokens, n + 2, c)[:, 2:]
    h_res = torch.rand(tokens, n, n, generator=gen).to(device)
    h_post = 2 * torch.rand(tokens, n, generator=gen).to(device)
    got = apply.merge_backward(x, f, h_res, h_post, grad_out)
    ref_in = _leaves(x.float(), f.float(), h_res, h_post)
    want = _grads(reference.merge(*ref_in), ref_in, grad_out.float())
    for g, w, inp in zip(got, want, (x, f, h_res, h_post)):
        assert g.dtype == inp.dtype
        _check(g, w, TOL[inp.dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_apply_broadcasts_coefficients_over_leading_dims(device):
    gen = torch.Generator().manual_seed(5)
    x, f, h_pre, h_res, h_post = _apply_inputs((2, 6), 4, 40, torch.float32, device, gen)
    shared = (h_pre[:1], h_res[:1], h_post[:1])
    _compare_apply("pre_mix", (x, shared[0]), device, gen)
    _compare_apply("merge", (x, f, shared[1], shared[2]), device, gen)


def test_fp64_takes_the_reference_path_and_passes_gradcheck():
    gen = torch.Generator().manual_seed(6)
    x, phi, alpha, bias = (t.double().requires_grad_() for t in _logit_inputs((3,), 2, 5, torch.float32, "cpu", gen))
    assert torch.autograd.gradcheck(ops.mhc_logits, (x, phi, alpha, bias))
    logits = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.sinkhorn(t, 4), (logits,))


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU (compiled kernels)")
@pytest.mark.parametrize("n", [2, 4, 8])
def test_large_sizes_on_cuda(n):
    """Many tokens and production widths: several token splits, channel chunks and K chunks."""
    gen = torch.Generator().manual_seed(n)
    device, dtype, lead, c = "cuda", torch.bfloat16, (4, 1000), 1280
    inputs = _logit_inputs(lead, n, c, dtype, device, gen)
    got_in, ref_in = _leaves(*inputs), _leaves(*inputs)
    got, ref = ops.mhc_coefficients(*got_in, 20), get_ops("torch").mhc_coefficients(*ref_in, 20)
    for g, r in zip(got, ref):
        _check(g, r, TF32_TOL)
    loss_got = sum(t.square().sum() for t in got)
    loss_ref = sum(t.square().sum() for t in ref)
    for g, r in zip(torch.autograd.grad(loss_got, got_in), torch.autograd.grad(loss_ref, ref_in)):
        _check(g, r, 2e-2)
    x, f, h_pre, h_res, h_post = _apply_inputs(lead, n, c, dtype, device, gen)
    _compare_apply("pre_mix", (x, h_pre), device, gen)
    _compare_apply("merge", (x, f, h_res, h_post), device, gen)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_tokens(device):
    gen = torch.Generator().manual_seed(8)
    x, phi, alpha, bias = _leaves(*_logit_inputs((0,), 4, 40, torch.bfloat16, device, gen))
    coeffs = ops.mhc_coefficients(x, phi, alpha, bias, 3)
    _, f, _, _, _ = _apply_inputs((0,), 4, 40, torch.bfloat16, device, gen)
    out = ops.merge(x, f, coeffs.h_res, coeffs.h_post) + ops.pre_mix(x, coeffs.h_pre).unsqueeze(-2)
    assert out.shape == (0, 4, 40)
    grads = torch.autograd.grad(out.sum() + sum(c.sum() for c in coeffs), (x, phi, alpha, bias))
    assert [g.shape for g in grads] == [x.shape, phi.shape, alpha.shape, bias.shape]
    assert all(not g.any() for g in grads)


def test_resolve_backend(monkeypatch):
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("triton", "cuda:0") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match='kernels="torch".*TRITON_INTERPRET=1'):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="kernel backend"):
        resolve_backend("cuda", torch.device("cpu"))
    assert get_ops("torch").merge is fast.merge  # the fast torch path, tested against reference in test_fast_path
    assert get_ops("triton").merge is ops.merge
    with pytest.raises(ValueError, match="resolve_backend"):
        get_ops("auto")


def test_package_imports_and_dispatches_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, lightning_mhc\n"
        "from lightning_mhc.kernels.dispatch import get_ops, resolve_backend\n"
        "assert resolve_backend('auto', torch.device('cuda')) == 'torch'\n"
        "get_ops('torch')\n"
        "try:\n"
        "    resolve_backend('triton', torch.device('cuda'))\n"
        "except RuntimeError as err:\n"
        "    assert 'not installed' in str(err)\n"
        "else:\n"
        "    raise AssertionError('triton resolved without triton')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
