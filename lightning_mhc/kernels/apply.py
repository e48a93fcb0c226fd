"""The two stream-mixing kernels of mHC and their backward passes (paper Eqs. 3 and 18-19).

``F_pre``: the branch input ``H_pre · x`` reads ``nC`` and writes ``C`` per token.
``F_post,res``: the new stream state ``H_res · x + H_post^T · F`` reads ``(n+1)C`` and writes ``nC`` per token,
the fused form whose traffic is the bandwidth floor (DESIGN §1).

Every program owns ``BLOCK_T`` tokens and walks ``C`` in ``BLOCK_C`` chunks, so loads and stores are
contiguous over ``C`` and the per-token reductions of the backward (``dH = sum_c g * x``) finish inside the
program, with no atomics and no partial buffers (the merge backward gathers them in per-thread accumulators and
crosses threads once per program, after its loop). The ``n x n`` mix is unrolled over the input stream ``j``
(``n`` is a compile-time constant): one contiguous ``(BLOCK_T, BLOCK_C)`` row of ``x`` at a time, multiplied
into all ``n`` outputs. Arithmetic is fp32 in registers whatever the storage dtype.

Token indices are int64 (``_tokens``) and every per-token tensor is addressed as ``token * stride + inner``, so
offsets past 2**31 elements (tokens * n * C >= 2**31: 75k tokens at n=4, C=7168) do not wrap; the stride
arguments also let the kernels read and write token-strided views without copies (``rows``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _tokens(BLOCK_T: tl.constexpr):
    """This program's token indices, in int64: ``token * stride`` passes 2**31 once tokens * n * C do (75k tokens
    at n=4, C=7168), and Triton keeps int32 arithmetic in int32."""
    return tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)


@triton.jit
def _pre_mix_fwd_kernel(
    x_ptr,
    h_ptr,
    out_ptr,
    n_tokens,
    C,
    stride_x,
    stride_out,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Streams first: warps and threads spread over (token, channel) and each thread holds all n streams of its
    # channels, so the sum over streams stays in the thread (pre_mix_forward sizes num_warps for that).
    t = _tokens(BLOCK_T)
    i = tl.arange(0, NP)
    t_mask = t < n_tokens
    h_mask = (i[:, None] < N) & t_mask[None, :]
    h = tl.load(h_ptr + t[None, :] * N + i[:, None], mask=h_mask, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        x_offs = i[:, None, None] * C + t[None, :, None] * stride_x + c[None, None, :]
        x = tl.load(x_ptr + x_offs, mask=h_mask[:, :, None] & c_mask[None, None, :], other=0.0).to(tl.float32)
        y = tl.sum(h[:, :, None] * x, axis=0)
        out_mask = t_mask[:, None] & c_mask[None, :]
        tl.store(out_ptr + t[:, None] * stride_out + c[None, :], y.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _pre_mix_bwd_kernel(
    x_ptr,
    h_ptr,
    grad_out_ptr,
    dx_ptr,
    dh_ptr,
    n_tokens,
    C,
    stride_x,
    stride_g,
    stride_dx,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = _tokens(BLOCK_T)
    i = tl.arange(0, NP)
    t_mask = t < n_tokens
    h_mask = t_mask[:, None] & (i[None, :] < N)
    h = tl.load(h_ptr + t[:, None] * N + i[None, :], mask=h_mask, other=0.0).to(tl.float32)
    dh = tl.zeros((BLOCK_T, NP), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        g_mask = t_mask[:, None] & c_mask[None, :]
        g = tl.load(grad_out_ptr + t[:, None] * stride_g + c[None, :], mask=g_mask, other=0.0).to(tl.float32)
        inner = i[None, :, None] * C + c[None, None, :]
        x_mask = h_mask[:, :, None] & c_mask[None, None, :]
        x = tl.load(x_ptr + t[:, None, None] * stride_x + inner, mask=x_mask, other=0.0).to(tl.float32)
        dx = (h[:, :, None] * g[:, None, :]).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + t[:, None, None] * stride_dx + inner, dx, mask=x_mask)
        dh += tl.sum(x * g[:, None, :], axis=2)
    tl.store(dh_ptr + t[:, None] * N + i[None, :], dh, mask=h_mask)


@triton.jit
def _merge_fwd_kernel(
    x_ptr,
    f_ptr,
    h_res_ptr,
    h_post_ptr,
    out_ptr,
    n_tokens,
    C,
    stride_x,
    stride_f,
    stride_out,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    t = _tokens(BLOCK_T)
    i = tl.arange(0, NP)
    t_mask = t < n_tokens
    h_mask = t_mask[:, None] & (i[None, :] < N)
    h_post = tl.load(h_post_ptr + t[:, None] * N + i[None, :], mask=h_mask, other=0.0).to(tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        row_mask = t_mask[:, None] & c_mask[None, :]
        f = tl.load(f_ptr + t[:, None] * stride_f + c[None, :], mask=row_mask, other=0.0).to(tl.float32)
        acc = h_post[:, :, None] * f[:, None, :]
        for j in tl.static_range(N):
            x_j = tl.load(x_ptr + t[:, None] * stride_x + j * C + c[None, :], mask=row_mask, other=0.0)
            h_j = tl.load(h_res_ptr + t[:, None] * (N * N) + i[None, :] * N + j, mask=h_mask, other=0.0)
            acc += h_j.to(tl.float32)[:, :, None] * x_j.to(tl.float32)[:, None, :]
        out_offs = t[:, None, None] * stride_out + i[None, :, None] * C + c[None, None, :]
        out_mask = h_mask[:, :, None] & c_mask[None, None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _merge_bwd_kernel(
    x_ptr,
    f_ptr,
    h_res_ptr,
    h_post_ptr,
    grad_out_ptr,
    dx_ptr,
    df_ptr,
    dh_res_ptr,
    dh_post_ptr,
    n_tokens,
    C,
    stride_x,
    stride_f,
    stride_g,
    stride_dx,
    stride_df,
    N: tl.constexpr,
    NP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VEC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # Rows r, the last axis of every tile so that threads and warps spread over rows only: BLOCK_T tokens x SLOTS
    # slots of VEC adjacent channels x SPLIT groups of NJ = NP / SPLIT input streams j. A thread holds every stream
    # i of g for its VEC channels and computes dx_j and dh_res[:, j] for the j of its group, so within a chunk every
    # product and sum stays in the thread (no shuffles, no shared memory, no barriers); dh_res and dh_post gather
    # in per-thread accumulators and cross threads once, after the loop.
    SLOTS: tl.constexpr = BLOCK_C // VEC
    NJ: tl.constexpr = NP // SPLIT
    r = tl.arange(0, BLOCK_T * SLOTS * SPLIT)
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + r // (SLOTS * SPLIT)
    slot = (r // SPLIT % SLOTS) * VEC
    j0 = (r % SPLIT) * NJ
    s = tl.arange(0, NP)
    jj = tl.arange(0, NJ)
    t_mask = t < n_tokens
    st_mask = (s[:, None] < N) & t_mask[None, :]
    h_post = tl.load(h_post_ptr + t[None, :] * N + s[:, None], mask=st_mask, other=0.0)
    acc_res = tl.zeros((NP, NJ, BLOCK_T * SLOTS * SPLIT), dtype=tl.float32)
    acc_post = tl.zeros((NP, BLOCK_T * SLOTS * SPLIT), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, VEC)[:, None] + slot[None, :]
        row_mask = (c < C) & t_mask[None, :]
        mask = (s[:, None, None] < N) & row_mask[None, :, :]
        g_offs = t[None, None, :] * stride_g + s[:, None, None] * C + c[None, :, :]
        g = tl.load(grad_out_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
        f = tl.load(f_ptr + t[None, :] * stride_f + c, mask=row_mask, other=0.0).to(tl.float32)
        df = tl.sum(h_post[:, None, :] * g, axis=0)
        df_mask = row_mask & (j0 == 0)[None, :]
        tl.store(df_ptr + t[None, :] * stride_df + c, df.to(df_ptr.dtype.element_ty), mask=df_mask)
        acc_post += tl.sum(g * f[None, :, :], axis=1)
        # Rows with channels left in this chunk: a loop-variant mask keeps the coefficients in L1, not in registers
        # across the loop (LLVM hoists a loop-invariant load).
        live = st_mask & (c0 + slot < C)[None, :]
        for k in tl.static_range(NJ):
            j = j0 + k
            h_j = tl.load(h_res_ptr + t[None, :] * (N * N) + s[:, None] * N + j[None, :], mask=live, other=0.0)
            dx_j = tl.sum(h_j[:, None, :] * g, axis=0)
            j_offs = j[None, :] * C + c
            j_mask = row_mask & (j < N)[None, :]
            tl.store(dx_ptr + t[None, :] * stride_dx + j_offs, dx_j.to(dx_ptr.dtype.element_ty), mask=j_mask)
            x_j = tl.load(x_ptr + t[None, :] * stride_x + j_offs, mask=j_mask, other=0.0).to(tl.float32)
            gx = tl.sum(g * x_j[None, :, :], axis=1)
            acc_res = tl.where(jj[None, :, None] == k, acc_res + gx[:, None, :], acc_res)
    # Once per program: sum each token's rows across threads (every group of j holds the same acc_post).
    acc_post = tl.where(j0 == 0, acc_post, 0.0)
    dh_post = tl.sum(tl.reshape(acc_post, (NP, BLOCK_T, SLOTS * SPLIT)), axis=2)
    dh_res = tl.sum(tl.reshape(acc_res, (NP, NJ, BLOCK_T, SLOTS, SPLIT)), axis=3)
    tok = _tokens(BLOCK_T)
    tok_mask = (s[:, None] < N) & (tok < n_tokens)[None, :]
    tl.store(dh_post_ptr + tok[None, :] * N + s[:, None], dh_post, mask=tok_mask)
    cols = tl.arange(0, SPLIT)[None, :] * NJ + jj[:, None]
    res_offs = tok[None, None, :, None] * (N * N) + s[:, None, None, None] * N + cols[None, :, None, :]
    tl.store(dh_res_ptr + res_offs, dh_res, mask=tok_mask[:, None, :, None] & (cols < N)[None, :, None, :])


# Per kernel: elements of the (BLOCK_T, n, BLOCK_C) tile a program holds per chunk, and elements per thread
# (num_warps = tile / (32 * per_thread), between 4 and 8). Sized for sm_90 so that every kernel stays at or
# below 128 registers per thread without spilling at n = 2..8 (tests/test_register_budget.py): the 64K-register
# file then holds >= 16 warps, two 8-warp programs per SM. The forward's 4096-element tile reached 128 registers
# (n = 8, C = 1280, fp32); at 2048 it takes <= 96. Two programs of half the tile keep as many bytes in flight per
# SM as one program of the whole tile did. The merge backward has its own layout (``_merge_bwd_config``).
TILES = {"pre_mix_fwd": (4096, 16), "pre_mix_bwd": (4096, 16), "merge_fwd": (2048, 8)}
MERGE_BWD_WARPS = 4


def _launch_config(n_tokens: int, n: int, c: int, kernel: str) -> tuple[int, int, int, int, int]:
    """Stream padding, tokens and channels per program, warps, grid.

    ``BLOCK_C`` is the power of two up to 512 that wastes the fewest masked lanes (C=1280 takes 256, not 512).
    """
    tile, per_thread = TILES[kernel]
    n_pad = triton.next_power_of_2(n)
    top = min(triton.next_power_of_2(c), 512)
    candidates = [b for b in (top, top // 2, top // 4) if b >= min(top, 128)]
    block_c = min(candidates, key=lambda b: (triton.cdiv(c, b) * b, -b))
    block_t = max(1, min(triton.next_power_of_2(n_tokens), tile // (n_pad * block_c)))
    num_warps = min(8, max(4, n_pad * block_c * block_t // (32 * per_thread)))
    return n_pad, block_t, block_c, num_warps, triton.cdiv(n_tokens, block_t)


def _merge_bwd_config(n_tokens: int, n: int, c: int, itemsize: int) -> tuple[int, int, int, int, int, int, int]:
    """Stream padding, tokens, channels, channels per thread (``VEC``) and groups of j per chunk, warps, grid.

    A chunk spans one 128-byte line per token and stream (64 bf16 / 32 fp32 channels), one row of ``VEC`` channels
    per thread. A thread keeps n * VEC values of g, n * n / SPLIT accumulators of dh_res and n of dh_post, and its
    group's coefficient columns, so ``VEC`` shrinks as n grows (8 at n = 2, 4 at n = 4, 2 at n = 8 in bf16) and
    n = 8 splits the 8 input streams j over ``SPLIT`` = 4 threads (one group of 2 took 137-140 registers). sm_90
    registers, n = 2 / 4 / 8: 64 / 96 / 72 (bf16), 56 / 112 / 110 (fp32), no spills.
    """
    n_pad = triton.next_power_of_2(n)
    vec = max(2, min(16 // itemsize, 16 // n_pad))
    split = max(1, n_pad * n_pad // 16)
    block_c = max(vec, min(128 // itemsize, triton.next_power_of_2(c)))
    per_token = block_c // vec * split
    block_t = max(1, min(triton.next_power_of_2(n_tokens), 32 * MERGE_BWD_WARPS // per_token))
    num_warps = max(1, min(MERGE_BWD_WARPS, block_t * per_token // 32))
    return n_pad, block_t, block_c, vec, split, num_warps, triton.cdiv(n_tokens, block_t)


def rows(t: Tensor) -> Tensor:
    """``t`` if everything after its token dimension is contiguous (any token stride), else a contiguous copy.

    The kernels address token ``k`` at ``k * t.stride(0)`` in 64-bit arithmetic and everything inside a token as
    contiguous, so token-strided views (and storages past 2**31 elements) need no copy.
    """
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return t.contiguous()
        expected *= size
    return t


def _output(given: Tensor | None, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh contiguous output shaped like ``like``, or the given one (any token stride, rest contiguous)."""
    if given is None:
        return torch.empty(like.shape, device=like.device, dtype=dtype or like.dtype)
    if given.shape != like.shape or given.dtype != (dtype or like.dtype) or rows(given) is not given:
        raise ValueError(f"output of shape {tuple(given.shape)} and {given.dtype} does not fit {tuple(like.shape)}")
    return given


def pre_mix_forward(x: Tensor, h_pre: Tensor, out: Tensor | None = None) -> Tensor:
    """``(T, C)`` in ``x``'s dtype from ``x (T, n, C)`` and contiguous ``h_pre (T, n)`` (into ``out`` if given)."""
    x = rows(x)
    n_tokens, n, c = x.shape
    out = _output(out, x[:, 0])
    n_pad, block_t, block_c, num_warps, grid = _launch_config(n_tokens, n, c, "pre_mix_fwd")
    # No more warps than (token, 16-byte vector) positions, so no stream lands on another warp.
    num_warps = max(1, min(num_warps, block_t * block_c * x.element_size() // (32 * 16)))
    _pre_mix_fwd_kernel[(grid,)](
        x,
        h_pre,
        out,
        n_tokens,
        c,
        x.stride(0),
        out.stride(0),
        N=n,
        NP=n_pad,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def pre_mix_backward(x: Tensor, h_pre: Tensor, grad_out: Tensor, dx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Gradients wrt ``x`` (``x``'s dtype, into ``dx`` if given) and ``h_pre`` (fp32)."""
    x, grad_out = rows(x), rows(grad_out)
    n_tokens, n, c = x.shape
    dx = _output(dx, x)
    dh = torch.empty((n_tokens, n), device=x.device, dtype=torch.float32)
    n_pad, block_t, block_c, num_warps, grid = _launch_config(n_tokens, n, c, "pre_mix_bwd")
    _pre_mix_bwd_kernel[(grid,)](
        x,
        h_pre,
        grad_out,
        dx,
        dh,
        n_tokens,
        c,
        x.stride(0),
        grad_out.stride(0),
        dx.stride(0),
        N=n,
        NP=n_pad,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return dx, dh


def merge_forward(x: Tensor, f: Tensor, h_res: Tensor, h_post: Tensor, out: Tensor | None = None) -> Tensor:
    """``(T, n, C)`` in ``x``'s dtype (into ``out`` if given) from ``x (T, n, C)``, ``f (T, C)`` and contiguous
    ``h_res (T, n, n)``, ``h_post (T, n)``."""
    x, f = rows(x), rows(f)
    n_tokens, n, c = x.shape
    out = _output(out, x)
    n_pad, block_t, block_c, num_warps, grid = _launch_config(n_tokens, n, c, "merge_fwd")
    _merge_fwd_kernel[(grid,)](
        x,
        f,
        h_res,
        h_post,
        out,
        n_tokens,
        c,
        x.stride(0),
        f.stride(0),
        out.stride(0),
        N=n,
        NP=n_pad,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def merge_backward(
    x: Tensor,
    f: Tensor,
    h_res: Tensor,
    h_post: Tensor,
    grad_out: Tensor,
    dx: Tensor | None = None,
    df: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients wrt ``x`` and ``f`` (their dtypes, into ``dx`` / ``df`` if given), ``h_res`` and ``h_post``
    (fp32)."""
    x, f, grad_out = rows(x), rows(f), rows(grad_out)
    n_tokens, n, c = x.shape
    dx, df = _output(dx, x), _output(df, f)
    dh_res = torch.empty((n_tokens, n, n), device=x.device, dtype=torch.float32)
    dh_post = torch.empty((n_tokens, n), device=x.device, dtype=torch.float32)
    n_pad, block_t, block_c, vec, split, num_warps, grid = _merge_bwd_config(n_tokens, n, c, x.element_size())
    _merge_bwd_kernel[(grid,)](
        x,
        f,
        h_res,
        h_post,
        grad_out,
        dx,
        df,
        dh_res,
        dh_post,
        n_tokens,
        c,
        x.stride(0),
        f.stride(0),
        grad_out.stride(0),
        dx.stride(0),
        df.stride(0),
        N=n,
        NP=n_pad,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        VEC=vec,
        SPLIT=split,
        num_warps=num_warps,
    )
    return dx, df, dh_res, dh_post
