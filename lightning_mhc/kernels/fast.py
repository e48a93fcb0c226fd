"""The fast torch path: the mHC steps as three autograd Functions with analytic backwards, equal to ``reference``.

Used on CPU, on GPUs without Triton, and as what ``torch.compile`` traces. Two ideas make it fast in eager mode:

- **Sinkhorn tokens last.** Its 20 column/row normalisations run on ``(n, n, tokens)``: long contiguous rows of
  tokens instead of tiny ``n x n`` blocks, so ATen's sums over the leading dimensions vectorise (about a twentieth
  of the ``(tokens, n, n)`` time). Only divisions and sums run there (exactly rounded wherever an entry sits);
  ``exp`` and ``sigmoid`` run tokens first as in the reference, so identical streams stay bitwise identical.
- **Few passes over the stream state ``(..., n, C)``.** ``read`` is the coefficients and the pre-mix in one
  Function: forward reads the stream for the RMS, the projection and the pre-mix and saves nothing stream-sized
  beyond the stream itself; backward writes one stream-sized gradient (the projection's, with the RMS and
  pre-mix terms added in place). ``merge`` is one batched matmul plus an in-place ``addcmul`` each way.

Under ``torch.compile`` the steps take traceable forms instead (Sinkhorn's iterations tokens last, the merge and
the pre-mix as sums of products over the streams): inductor fuses them with the backward it derives, which measured
faster than the Functions and custom ops it would have to call (compiled n = 4 step 1.24x the compiled residual,
1.39x before). The traced Sinkhorn keeps its iterates for backward (2.6 MB per layer at 1024 tokens, n = 4) where
the eager one recomputes them. The custom ops are eager mode's.

Coefficient arithmetic is fp32 (fp64 stays fp64, for gradcheck); the stream keeps its dtype and is upcast only
where the projection needs it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mhc.kernels import reference
from lightning_mhc.kernels.reference import RMS_EPS, SINKHORN_EPS, Coefficients, at_least_fp32, logit_gains


def _start(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``e = exp(L - max L)`` of ``(tokens, n, n)`` logits and each entry's share of ``d max / d L`` (``1 / number of
    maxima`` on the maxima, else 0), both tokens last ``(n, n, tokens)``.

    Computed tokens first, as the reference does: a vectorised ``exp`` and its scalar tail round differently, and
    with tokens first every token's entries take the same path, so identical streams stay bitwise identical.
    """
    lf = at_least_fp32(logits)
    shift = lf.amax(dim=(-2, -1), keepdim=True)
    is_max = (lf == shift).to(lf.dtype)
    share = is_max / is_max.sum(dim=(-2, -1), keepdim=True)
    return _tokens_last(torch.exp(lf - shift), 2), _tokens_last(share, 2)


def _iterate(e: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp from ``e = exp(L - max L)``, ``(n, n, tokens)``: ``M0 = e + eps``, then ``iters`` times
    columns, then rows, exactly ``reference.sinkhorn_unrolled``'s steps (divisions and sums only). Out of place, so
    ``torch.compile`` can differentiate it."""
    m = e + SINKHORN_EPS
    for _ in range(iters):
        m = m / m.sum(0, keepdim=True)
        m = m / m.sum(1, keepdim=True)
    return m


@torch.library.custom_op("lightning_mhc::sinkhorn_tokens_last", mutates_args=())
def _sinkhorn_iterate(e: Tensor, iters: int) -> Tensor:
    """:func:`_iterate` as one opaque op for eager mode (its backward is ``_sinkhorn_iterate_backward``)."""
    return _iterate(e, iters)


@_sinkhorn_iterate.register_fake
def _(e: Tensor, iters: int) -> Tensor:
    return torch.empty_like(e)


@torch.library.custom_op("lightning_mhc::sinkhorn_tokens_last_backward", mutates_args=())
def _sinkhorn_iterate_backward(e: Tensor, share: Tensor, grad: Tensor, iters: int) -> Tensor:
    """Gradient wrt the logits (tokens last) given ``e``, the shares of ``max L`` (``_start``) and the gradient wrt
    the result: recompute the iterates, then ``reference.Sinkhorn.backward``'s steps."""
    m = e + SINKHORN_EPS
    trace = []
    for _ in range(iters):
        col = m.sum(0, keepdim=True)
        after_cols = m / col
        row = after_cols.sum(1, keepdim=True)
        m = after_cols / row
        trace.append((col, after_cols, row, m))
    g = grad
    for col, after_cols, row, out in reversed(trace):
        g = (g - (g * out).sum(1, keepdim=True)) / row
        g = (g - (g * after_cols).sum(0, keepdim=True)) / col
    ge = g * e
    return ge - share * ge.sum(dim=(0, 1), keepdim=True)


@_sinkhorn_iterate_backward.register_fake
def _(e: Tensor, share: Tensor, grad: Tensor, iters: int) -> Tensor:
    return torch.empty_like(e)


def _tokens_last(t: Tensor, dims: int) -> Tensor:
    """``(..., *d)`` with ``dims`` trailing dimensions to a contiguous ``(*d, tokens)`` in at least fp32."""
    flat = at_least_fp32(t).reshape(-1, *t.shape[t.dim() - dims :])
    return flat.permute(*range(1, dims + 1), 0).contiguous()


def _tokens_first(t: Tensor, lead: torch.Size) -> Tensor:
    """Inverse of ``_tokens_last``: ``(*d, tokens)`` to a contiguous ``(*lead, *d)``."""
    return t.permute(t.dim() - 1, *range(t.dim() - 1)).contiguous().view(*lead, *t.shape[:-1])


class _Sinkhorn(torch.autograd.Function):
    """Doubly stochastic projection saving only the logits (the backward recomputes the iterates), tokens last."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        ctx.iters = iters
        n = logits.shape[-1]
        e, _ = _start(logits.reshape(-1, n, n))
        return _tokens_first(_sinkhorn_iterate(e, iters), logits.shape[:-2])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        n = logits.shape[-1]
        e, share = _start(logits.reshape(-1, n, n))
        grad = _sinkhorn_iterate_backward(e, share, _tokens_last(grad_out, 2), ctx.iters)
        return _tokens_first(grad, logits.shape[:-2]).to(logits.dtype), None


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """``reference.sinkhorn``: ``(..., n, n)`` logits to an fp32 doubly stochastic matrix, recomputing backward."""
    if torch.compiler.is_compiling():  # traced: inductor's fused loop (and the backward it derives) beat the ops
        n = logits.shape[-1]
        e, _ = _start(logits.reshape(-1, n, n))
        return _tokens_first(_iterate(e, iters), logits.shape[:-2])
    return _Sinkhorn.apply(logits, iters)


def _logits(proj: Tensor, rms: Tensor, alpha: Tensor, bias: Tensor, n: int) -> Tensor:
    """``(tokens, n*n + 2n)`` logits ``proj / rms * alpha + b``, with the reference's operations (no fused
    multiply-add, whose rounding would depend on an entry's position)."""
    dt = proj.dtype
    return proj / rms.unsqueeze(-1) * logit_gains(alpha.to(dt), n) + bias.to(dt)


class _Read(torch.autograd.Function):
    """``(H_pre · x, H_pre, H_post, H_res)`` of mHC: ``reference.mhc_logits``, ``coefficients_from_logits`` and
    ``pre_mix`` in one Function. Saves the stream (an input, kept anyway), the ``(tokens, n*n + 2n)`` projection,
    the RMS and ``H_pre``; everything else is recomputed in backward from those."""

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int) -> tuple[Tensor, ...]:  # type: ignore[override]
        n, c = x.shape[-2:]
        lead = x.shape[:-2]
        v = at_least_fp32(x.reshape(-1, n * c))
        proj = torch.mm(v, phi.to(v.dtype))  # the reference's GEMM
        rms = torch.sqrt(torch.linalg.vector_norm(v, dim=-1).square_().div_(n * c).add_(RMS_EPS))
        logits = _logits(proj, rms, alpha, bias, n)
        h_pre = torch.sigmoid(logits[:, :n])
        h_post = torch.sigmoid(logits[:, n : 2 * n]).mul_(2)
        e, _ = _start(logits[:, 2 * n :].unflatten(-1, (n, n)))
        h_res = _tokens_first(_sinkhorn_iterate(e, iters), lead)
        mixed = torch.matmul(h_pre.to(x.dtype).unsqueeze(-2), x.reshape(-1, n, c)).view(*lead, c)
        ctx.save_for_backward(x, phi, alpha, bias, proj, rms, h_pre)
        ctx.iters = iters
        ctx.set_materialize_grads(False)
        return mixed, h_pre.view(*lead, n), h_post.view(*lead, n), h_res

    @staticmethod
    def backward(ctx, g_mixed: Tensor | None, g_pre: Tensor | None, g_post: Tensor | None, g_res: Tensor | None):  # type: ignore[override]
        x, phi, alpha, bias, proj, rms, h_pre = ctx.saved_tensors
        n, c = x.shape[-2:]
        dt = proj.dtype
        v = at_least_fp32(x.reshape(-1, n * c))  # coefficient gradients reduce over C in fp32: no fp16 overflow
        tokens = v.shape[0]
        logits = _logits(proj, rms, alpha, bias, n)
        d_logits = torch.zeros_like(logits)
        d_pre = d_logits[:, :n]
        if g_pre is not None:
            d_pre.copy_(g_pre.reshape(tokens, n))
        if g_mixed is not None:
            g_mixed = g_mixed.reshape(tokens, 1, c).to(dt)
            d_pre.add_(torch.matmul(g_mixed, v.view(tokens, n, c).transpose(-1, -2)).view(tokens, n))
        d_pre.mul_(h_pre * (1 - h_pre))
        if g_post is not None:
            h_post = torch.sigmoid(logits[:, n : 2 * n]).mul_(2)
            d_logits[:, n : 2 * n] = g_post.reshape(tokens, n) * (h_post * (1 - h_post / 2))
        if g_res is not None:
            e, share = _start(logits[:, 2 * n :].unflatten(-1, (n, n)))
            d_res = _sinkhorn_iterate_backward(e, share, _tokens_last(g_res, 2), ctx.iters)
            d_logits[:, 2 * n :] = _tokens_first(d_res, torch.Size([tokens])).view(tokens, n * n)
        scaled = proj / rms.unsqueeze(-1)
        d_gains = (d_logits * scaled).sum(0)
        d_alpha = torch.stack([d_gains[:n].sum(), d_gains[n : 2 * n].sum(), d_gains[2 * n :].sum()])
        d_scaled = d_logits * logit_gains(alpha.to(dt), n)
        d_rms = -(d_scaled * scaled).sum(1) / rms
        d_proj = d_scaled / rms.unsqueeze(-1)
        d_x = d_phi = None
        if ctx.needs_input_grad[0]:
            d_x = torch.mm(d_proj, phi.to(dt).t())
            d_x.addcmul_((d_rms / (rms * (n * c))).unsqueeze(-1), v)
            if g_mixed is not None:
                d_x.view(tokens, n, c).addcmul_(h_pre.unsqueeze(-1), g_mixed)
            d_x = d_x.to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            d_phi = torch.mm(v.t(), d_proj).to(phi.dtype)
        return d_x, d_phi, d_alpha.to(alpha.dtype), d_logits.sum(0).to(bias.dtype), None


def read(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int) -> tuple[Tensor, Coefficients]:
    """Branch input ``H_pre · x`` (dtype of ``x``) and the fp32 coefficients of mHC, in one pass over the stream.

    Equals ``reference.pre_mix(x, c.h_pre)`` with ``c = reference.coefficients_from_logits(reference.mhc_logits(x,
    phi, alpha, bias), n, "mhc", iters)``, forward and backward.
    """
    if torch.compiler.is_compiling():  # traceable steps inductor fuses, as the merge (see ``_merge_traceable``)
        c = coefficients(x, phi, alpha, bias, iters)
        return (c.h_pre.unsqueeze(-1) * at_least_fp32(x)).sum(-2).to(x.dtype), c
    mixed, h_pre, h_post, h_res = _Read.apply(x, phi, alpha, bias, iters)
    return mixed, Coefficients(h_pre, h_post, h_res)


def coefficients(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int) -> Coefficients:
    """``reference.mhc_coefficients`` with this file's Sinkhorn."""
    pre, post, res = reference.split_logits(reference.mhc_logits(x, phi, alpha, bias), x.shape[-2])
    return Coefficients(torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(res, iters))


def _sum_to(grad: Tensor, like: Tensor) -> Tensor:
    """Reduce a broadcast gradient to the shape and dtype of the input it belongs to."""
    return grad.sum_to_size(like.shape).to(like.dtype)


class _Merge(torch.autograd.Function):
    """``H_res · x + H_post^T · F`` as one batched matmul and an in-place ``addcmul``, with the matmul backward."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:  # type: ignore[override]
        post, branch = h_post.to(x.dtype).unsqueeze(-1), f.to(x.dtype).unsqueeze(-2)
        out = torch.matmul(h_res.to(x.dtype), x)
        if out.shape == torch.broadcast_shapes(out.shape, post.shape, branch.shape):
            out.addcmul_(post, branch)
        else:
            out = torch.addcmul(out, post, branch)
        ctx.save_for_backward(x, f, h_res, h_post)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, f, h_res, h_post = ctx.saved_tensors
        need_x, need_f, need_res, need_post = ctx.needs_input_grad
        grad = grad.to(x.dtype)
        d_x = _sum_to(torch.matmul(h_res.to(x.dtype).transpose(-1, -2), grad), x) if need_x else None
        d_f = _sum_to(torch.matmul(h_post.to(x.dtype).unsqueeze(-2), grad).squeeze(-2), f) if need_f else None
        # The coefficient gradients reduce over C: in at least fp32, where half precision would overflow.
        g32 = at_least_fp32(grad)
        d_res = _sum_to(torch.matmul(g32, at_least_fp32(x).transpose(-1, -2)), h_res) if need_res else None
        d_post = _sum_to((g32 * at_least_fp32(f).unsqueeze(-2)).sum(-1), h_post) if need_post else None
        return d_x, d_f, d_res, d_post


def merge(x: Tensor, f: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:
    """``reference.merge``: new stream state ``H_res · x + H_post^T · F`` in the dtype of ``x``."""
    if torch.compiler.is_compiling():
        return _merge_traceable(x, f, h_res, h_post)
    return _Merge.apply(x, f, h_res, h_post)


def _merge_traceable(x: Tensor, f: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:
    """The merge as products summed over the n streams, for ``torch.compile``: inductor fuses it, and the backward
    it derives, into single passes over the stream state, where a batched matmul stays an external call. Sums in
    at least fp32 (the coefficient gradients reduce over C)."""
    mixed = (h_res.unsqueeze(-1) * at_least_fp32(x).unsqueeze(-3)).sum(-2)
    return (mixed + h_post.unsqueeze(-1) * at_least_fp32(f).unsqueeze(-2)).to(x.dtype)
