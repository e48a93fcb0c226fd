"""Sinkhorn-Knopp on per-token ``n x n`` logits, entirely in registers.

Forward: each program holds a ``(BLOCK_T, n, n)`` tile, computes ``M0 = exp(L - max L) + eps`` and runs ``iters``
column-then-row normalisations without touching memory between them, exactly as ``reference.sinkhorn``.
Because of ``eps`` the result depends on ``max L`` (it is Sinkhorn of ``exp(L) + eps * exp(max L)``), so the
backward differentiates through the shift too (``reference._shift_backward``), as the reference does.

Backward: only the logits are saved. Step ``k`` of the reverse sweep needs the iterate that entered forward
step ``k``; the kernel recomputes it from the start matrix (``k`` forward steps, in registers), so the whole
backward costs ``iters * (iters + 1) / 2`` normalisation steps and no memory beyond the ``n x n`` tile.
That is quadratic in ``iters`` but register-light (storing ``iters`` iterates of ``n*n`` per token would spill),
and each step is a handful of flops on a tile that never leaves the chip: about 20k flops per token at n=4,
t=20, against the ~70 KB per token that the apply kernels move at C=4096. The arithmetic is the reference's,
step for step, so gradients match it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_mhc.kernels.reference import SINKHORN_EPS


@triton.jit
def _tile_offsets(tok0, n_tokens, N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    """Token, row and column indices of a ``(BLOCK_T, NP, NP)`` tile; ``tok0`` is int64, so ``t * stride`` is."""
    t = tok0 + tl.arange(0, BLOCK_T)
    r = tl.arange(0, NP)
    c = tl.arange(0, NP)
    mask = (t[:, None, None] < n_tokens) & (r[None, :, None] < N) & (c[None, None, :] < N)
    return t[:, None, None], r[None, :, None], c[None, None, :], mask


@triton.jit
def _start(logits_ptr, t, r, c, mask, stride_t, stride_r, stride_c, EPS: tl.constexpr):
    """``e = exp(L - max L)`` (zero outside the mask), the start matrix ``e + eps``, and which entries are
    maxima of their matrix (``max L`` is where the backward's shift term goes)."""
    logits = tl.load(logits_ptr + t * stride_t + r * stride_r + c * stride_c, mask=mask, other=-float("inf"))
    logits = logits.to(tl.float32)
    shift = tl.max(tl.max(logits, axis=2), axis=1)
    is_max = mask & (logits == shift[:, None, None])
    shift = tl.where(shift == -float("inf"), 0.0, shift)
    e = tl.where(mask, tl.exp(logits - shift[:, None, None]), 0.0)
    return e, tl.where(mask, e + EPS, 0.0), is_max


@triton.jit
def _step(m):
    """One Sinkhorn step: normalise columns, then rows. Returns column sums, the column-normalised matrix,
    row sums and the result (padding rows/columns have zero sums; they divide by one instead)."""
    col = tl.sum(m, axis=1)
    col = tl.where(col > 0, col, 1.0)
    after_cols = m / col[:, None, :]
    row = tl.sum(after_cols, axis=2)
    row = tl.where(row > 0, row, 1.0)
    return col, after_cols, row, after_cols / row[:, :, None]


@triton.jit
def _sinkhorn_fwd_kernel(
    logits_ptr,
    out_ptr,
    n_tokens,
    iters,
    stride_t,
    stride_r,
    stride_c,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    EPS: tl.constexpr,
):
    t, r, c, mask = _tile_offsets(tl.program_id(0).to(tl.int64) * BLOCK_T, n_tokens, N, NP, BLOCK_T)
    _, m, _ = _start(logits_ptr, t, r, c, mask, stride_t, stride_r, stride_c, EPS)
    for _ in range(iters):
        _, _, _, m = _step(m)
    tl.store(out_ptr + t * (N * N) + r * N + c, m, mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(
    logits_ptr,
    grad_out_ptr,
    grad_in_ptr,
    n_tokens,
    iters,
    stride_t,
    stride_r,
    stride_c,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    EPS: tl.constexpr,
):
    t, r, c, mask = _tile_offsets(tl.program_id(0).to(tl.int64) * BLOCK_T, n_tokens, N, NP, BLOCK_T)
    e, start, is_max = _start(logits_ptr, t, r, c, mask, stride_t, stride_r, stride_c, EPS)
    g = tl.load(grad_out_ptr + t * (N * N) + r * N + c, mask=mask, other=0.0).to(tl.float32)
    for back in range(iters):
        m = start
        for _ in range(iters - 1 - back):
            _, _, _, m = _step(m)
        col, after_cols, row, out = _step(m)
        # y = x / sum(x, dim)  =>  dx = (dy - sum(dy * y, dim)) / sum(x, dim); rows first (they ran last).
        g = (g - tl.sum(g * out, axis=2)[:, :, None]) / row[:, :, None]
        g = (g - tl.sum(g * after_cols, axis=1)[:, None, :]) / col[:, None, :]
        g = tl.where(mask, g, 0.0)
    # Through M0 = exp(L - max L) + eps: g * e, minus sum(g * e) on the maxima (split evenly at ties).
    ge = g * e
    total = tl.sum(tl.sum(ge, axis=2), axis=1)
    count = tl.sum(tl.sum(is_max.to(tl.float32), axis=2), axis=1)
    share = total / tl.maximum(count, 1.0)
    grad = ge - tl.where(is_max, share[:, None, None], 0.0)
    tl.store(grad_in_ptr + t * (N * N) + r * N + c, grad, mask=mask)


def _launch_config(n_tokens: int, n: int, tile: int) -> tuple[int, int, int]:
    """Stream padding, tokens per program (``tile`` matrix entries per program) and grid."""
    n_pad = triton.next_power_of_2(n)
    block_t = max(1, min(triton.next_power_of_2(n_tokens), tile // (n_pad * n_pad)))
    return n_pad, block_t, triton.cdiv(n_tokens, block_t)


def sinkhorn_forward(logits: Tensor, iters: int) -> Tensor:
    """Doubly stochastic ``(T, n, n)`` fp32 matrices from ``(T, n, n)`` logits of any float dtype and strides."""
    n_tokens, n = logits.shape[0], logits.shape[-1]
    out = torch.empty((n_tokens, n, n), device=logits.device, dtype=torch.float32)
    n_pad, block_t, grid = _launch_config(n_tokens, n, 2048)
    _sinkhorn_fwd_kernel[(grid,)](
        logits, out, n_tokens, iters, *logits.stride(), N=n, NP=n_pad, BLOCK_T=block_t, EPS=SINKHORN_EPS
    )
    return out


def sinkhorn_backward(logits: Tensor, grad_out: Tensor, iters: int) -> Tensor:
    """Gradient wrt the logits (fp32, contiguous ``(T, n, n)``), recomputing the iterates on chip."""
    n_tokens, n = logits.shape[0], logits.shape[-1]
    grad_out = grad_out.contiguous()
    grad_in = torch.empty((n_tokens, n, n), device=logits.device, dtype=torch.float32)
    n_pad, block_t, grid = _launch_config(n_tokens, n, 1024)
    _sinkhorn_bwd_kernel[(grid,)](
        logits, grad_out, grad_in, n_tokens, iters, *logits.stride(), N=n, NP=n_pad, BLOCK_T=block_t, EPS=SINKHORN_EPS
    )
    return grad_in
