"""mHC logits (paper Eqs. 14-17) in one pass over the stream state: ``alpha * (vec(x) @ phi) / r + b``.

Formulation: the product is a skinny GEMM, ``(T, K) @ (K, N)`` with ``K = n*C`` large (16384 at n=4, C=4096)
and ``N = n*n + 2n`` small (24 at n=4). Each forward program owns ``BLOCK_T`` tokens and walks ``K`` in
``BLOCK_K`` chunks: one coalesced load of the ``x`` chunk feeds both ``tl.dot`` (``N`` padded to a power of two
>= 16, fp32 accumulation) and the running sum of squares, so ``x`` is read exactly once and the RMS division
is applied to the ``(BLOCK_T, N)`` result after the matmul, as the paper fuses it. ``phi`` (``K*N`` fp32, about
1.5 MB at n=4, C=4096) is re-read by every program and stays L2-resident; a larger ``BLOCK_T`` amortises it. The
forward reads it transposed, ``(N, K)``, copied once per call: a tf32 ``tl.dot`` takes both operands K-major from
shared memory, and from the ``(K, N)`` parameter the copies into shared memory were 4 bytes each (16 with
``phi^T``, sm_90 PTX; the transpose costs one ``K*N`` copy per call). ``N`` is a compile-time constant
(``n*n + 2n``, one value per n), so for even n the ``(T, N)`` rows are 16-byte aligned and stored in 16-byte
vectors.
A reduction formulation (broadcast-multiply and ``tl.sum``) would run on CUDA cores: at ``N`` = 24-80 flops per
byte of ``x`` that is compute-bound on Hopper, while tensor cores keep the kernel on the bandwidth roofline.
The dot runs in tf32 on GPU (``DOT_PRECISION``), as the paper allows for ``phi``; ``x`` in bf16 loses nothing
to tf32. Inputs of any float dtype are upcast to fp32 in registers (the interpreter mishandles bf16 math).

Backward needs no second pass over ``x`` for a reduction: with ``m/r`` and ``r`` saved (``N + 1`` floats per
token), ``dx = Gm @ phi^T + c * x`` is known chunk by chunk, where ``Gm = g * alpha / r`` and
``c = -sum(g * alpha * m/r) / (K r^2)``. So one kernel over a ``(K chunks, token splits)`` grid reads each ``x``
chunk once, writes ``dx`` and accumulates ``dphi = x^T @ Gm`` for its chunk; the per-split partial sums of
``dphi`` are added by torch. The ``alpha`` and ``bias`` gradients are sums over the small ``(T, N)`` tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_mhc.kernels.reference import RMS_EPS, logit_gains

DOT_PRECISION = "tf32"


@triton.jit
def _logits_fwd_kernel(
    x_ptr,
    phi_t_ptr,
    alpha_ptr,
    bias_ptr,
    out_ptr,
    mr_ptr,
    r_ptr,
    n_tokens,
    K,
    stride_xt,
    n_streams,
    N: tl.constexpr,
    ACTIVATE: tl.constexpr,
    EPS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: t * stride_xt passes 2**31
    j = tl.arange(0, BLOCK_N)
    t_mask = t < n_tokens
    j_mask = j < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        v = tl.load(x_ptr + t[:, None] * stride_xt + k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        v = v.to(tl.float32)
        w = tl.load(phi_t_ptr + j[:, None] * K + k[None, :], mask=j_mask[:, None] & k_mask[None, :], other=0.0)
        sum_sq += tl.sum(v * v, axis=1)
        acc = tl.dot(v, tl.trans(w.to(tl.float32)), acc, input_precision=PRECISION)
    r = tl.sqrt(sum_sq / K + EPS)
    mr = acc / r[:, None]
    alpha_pre = tl.load(alpha_ptr).to(tl.float32)
    alpha_post = tl.load(alpha_ptr + 1).to(tl.float32)
    alpha_res = tl.load(alpha_ptr + 2).to(tl.float32)
    gain = tl.where(j < n_streams, alpha_pre, tl.where(j < 2 * n_streams, alpha_post, alpha_res))
    z = mr * gain[None, :] + tl.load(bias_ptr + j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATE:
        s = tl.sigmoid(z)
        z = tl.where(j[None, :] < n_streams, s, tl.where(j[None, :] < 2 * n_streams, 2.0 * s, z))
    out_mask = t_mask[:, None] & j_mask[None, :]
    tl.store(out_ptr + t[:, None] * N + j[None, :], z, mask=out_mask)
    tl.store(mr_ptr + t[:, None] * N + j[None, :], mr, mask=out_mask)
    tl.store(r_ptr + t, r, mask=t_mask)


@triton.jit
def _logits_bwd_kernel(
    x_ptr,
    phi_ptr,
    gm_ptr,
    c_ptr,
    dx_ptr,
    dphi_ptr,
    n_tokens,
    K,
    stride_xt,
    stride_dxt,
    tokens_per_split,
    N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1).to(tl.int64)  # int64: token offsets and split * K * N pass 2**31
    j = tl.arange(0, BLOCK_N)
    k_mask = k < K
    j_mask = j < N
    w = tl.load(phi_ptr + k[:, None] * N + j[None, :], mask=k_mask[:, None] & j_mask[None, :], other=0.0)
    w_t = tl.trans(w.to(tl.float32))
    dphi = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    t_start = split * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, n_tokens)
    # x is loaded one token block ahead (it feeds a dot and an elementwise term, so Triton does not pipeline it):
    # the next block's load is in flight while this block computes.
    t = t_start + tl.arange(0, BLOCK_T).to(tl.int64)
    v_next = tl.load(
        x_ptr + t[:, None] * stride_xt + k[None, :], mask=(t < t_end)[:, None] & k_mask[None, :], other=0.0
    )
    for t0 in range(t_start, t_end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)  # int64 whatever type the loop variable gets
        t_mask = t < t_end
        x_mask = t_mask[:, None] & k_mask[None, :]
        v = v_next.to(tl.float32)
        ahead = t + BLOCK_T
        ahead_mask = (ahead < t_end)[:, None] & k_mask[None, :]
        v_next = tl.load(x_ptr + ahead[:, None] * stride_xt + k[None, :], mask=ahead_mask, other=0.0)
        gm = tl.load(gm_ptr + t[:, None] * N + j[None, :], mask=t_mask[:, None] & j_mask[None, :], other=0.0)
        c = tl.load(c_ptr + t, mask=t_mask, other=0.0)
        dx = tl.dot(gm, w_t, input_precision=PRECISION) + c[:, None] * v
        tl.store(dx_ptr + t[:, None] * stride_dxt + k[None, :], dx.to(dx_ptr.dtype.element_ty), mask=x_mask)
        dphi = tl.dot(tl.trans(v), gm, dphi, input_precision=PRECISION)
    tl.store(dphi_ptr + split * K * N + k[:, None] * N + j[None, :], dphi, mask=k_mask[:, None] & j_mask[None, :])


class LogitsTiles(NamedTuple):
    """Launch shape of a logits kernel: tokens, ``K`` and (padded) ``N`` per tile, warps, pipeline stages."""

    block_t: int
    block_k: int
    block_n: int
    num_warps: int = 8
    num_stages: int = 3


def logits_tiles(k_dim: int, n_out: int, forward: bool) -> LogitsTiles:
    """Tiles sized so that both kernels take at most 128 registers per thread at 8 warps on sm_90 without spilling
    (two programs per SM; see tests/test_register_budget.py). ``N`` is padded for ``tl.dot`` (>= 16). The forward
    holds the fp32 copy of ``x`` for the sum of squares besides the dot's operands (<= 80 registers at n = 2..8).
    The backward holds a ``phi`` chunk, its transpose, the ``dphi`` accumulator, ``x``/``dx`` tiles and the next
    token block of ``x``: with ``BLOCK_K * BLOCK_N = 4096`` it took 124-195 registers (one program per SM), with
    2048 it takes <= 128. At n = 16 (``BLOCK_N = 512``) fewer tokens per program keep the ``(BLOCK_T, BLOCK_N)``
    accumulators small: the forward took 255 registers and spilled 468 bytes, now 111; the backward 164, now 126.
    ``benchmarks/kernels.py --sweep-logits`` times alternatives on a GPU."""
    block_n = max(16, triton.next_power_of_2(n_out))
    if forward:
        block_t = max(16, min(64, 8192 // block_n))  # 64 up to n = 8; fewer tokens for n = 16's 512 columns
        return LogitsTiles(block_t, max(16, min(triton.next_power_of_2(k_dim), 2048 // max(block_n, 32))), block_n)
    block_t = max(16, min(32, 8192 // block_n))
    return LogitsTiles(block_t, max(16, min(triton.next_power_of_2(k_dim), 2048 // block_n)), block_n)


def logits_forward(
    x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, n: int, activate: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Logits ``(T, N)`` fp32 from ``x`` viewed as ``(T, n*C)`` (unit stride over ``n*C``).

    With ``activate`` the pre/post columns hold ``sigmoid`` / ``2 sigmoid`` of the logits (``H_pre``, ``H_post``)
    and the res columns stay logits. Also returns ``m / r`` ``(T, N)`` and ``r`` ``(T,)`` for the backward.
    """
    n_tokens, k_dim = x.shape
    n_out = phi.shape[1]
    alpha, bias = alpha.contiguous(), bias.contiguous()
    out = torch.empty((n_tokens, n_out), device=x.device, dtype=torch.float32)
    mr = torch.empty_like(out)
    r = torch.empty((n_tokens,), device=x.device, dtype=torch.float32)
    tiles = logits_tiles(k_dim, n_out, forward=True)
    _logits_fwd_kernel[(triton.cdiv(n_tokens, tiles.block_t),)](
        x,
        phi.t().contiguous(),
        alpha,
        bias,
        out,
        mr,
        r,
        n_tokens,
        k_dim,
        x.stride(0),
        n,
        N=n_out,
        ACTIVATE=activate,
        EPS=RMS_EPS,
        BLOCK_T=tiles.block_t,
        BLOCK_K=tiles.block_k,
        BLOCK_N=tiles.block_n,
        PRECISION=DOT_PRECISION,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out, mr, r


def _token_splits(x: Tensor, k_chunks: int, token_blocks: int) -> int:
    """Enough token splits to give every SM a few programs; one split off GPU (the interpreter prefers few)."""
    if x.device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    return max(1, min(token_blocks, triton.cdiv(4 * sms, k_chunks)))


def logits_backward(
    x: Tensor,
    phi: Tensor,
    alpha: Tensor,
    grad_logits: Tensor,
    mr: Tensor,
    r: Tensor,
    n: int,
    dx: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients wrt ``x`` (``x``'s dtype, ``(T, n*C)``, into ``dx`` if given: any token stride, unit stride over
    ``n*C``), ``phi``, ``alpha`` and ``bias`` (fp32) from the gradient wrt the pre-activation logits ``(T, N)``."""
    n_tokens, k_dim = x.shape
    n_out = phi.shape[1]
    g = grad_logits.float()
    gains = logit_gains(alpha.float(), n)
    gm = (g * gains / r[:, None]).contiguous()
    c = (-(g * gains * mr).sum(-1) / (k_dim * r * r)).contiguous()
    tiles = logits_tiles(k_dim, n_out, forward=False)
    k_chunks = triton.cdiv(k_dim, tiles.block_k)
    token_blocks = triton.cdiv(n_tokens, tiles.block_t)
    splits = _token_splits(x, k_chunks, token_blocks)
    tokens_per_split = max(1, triton.cdiv(token_blocks, splits)) * tiles.block_t
    splits = triton.cdiv(n_tokens, tokens_per_split)
    if dx is None:
        dx = torch.empty((n_tokens, k_dim), device=x.device, dtype=x.dtype)
    elif dx.shape != x.shape or dx.dtype != x.dtype or (k_dim > 1 and dx.stride(1) != 1):
        raise ValueError(f"dx of shape {tuple(dx.shape)} and {dx.dtype} does not fit x {tuple(x.shape)}")
    dphi = torch.empty((splits, k_dim, n_out), device=x.device, dtype=torch.float32)
    _logits_bwd_kernel[(k_chunks, splits)](
        x,
        phi.contiguous(),
        gm,
        c,
        dx,
        dphi,
        n_tokens,
        k_dim,
        x.stride(0),
        dx.stride(0),
        tokens_per_split,
        N=n_out,
        BLOCK_T=tiles.block_t,
        BLOCK_K=tiles.block_k,
        BLOCK_N=tiles.block_n,
        PRECISION=DOT_PRECISION,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    per_column = (g * mr).sum(0)
    dalpha = torch.stack([per_column[:n].sum(), per_column[n : 2 * n].sum(), per_column[2 * n :].sum()])
    return dx, dphi.sum(0), dalpha, g.sum(0)
