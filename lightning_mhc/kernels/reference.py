"""The torch reference of every mHC step: the ground truth the Triton kernels are tested against.

Stream tensors have shape ``(..., n, C)``; coefficients are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

RMS_EPS = 1e-6
SINKHORN_EPS = 1e-6


def logit_gains(alpha: Tensor, n: int) -> Tensor:
    """``alpha`` per logit, ``[alpha_pre] * n + [alpha_post] * n + [alpha_res] * n*n``, without a host sync (unlike
    ``repeat_interleave`` with a tensor of repeats, which reads their sum on the host)."""
    return torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])


def at_least_fp32(t: Tensor) -> Tensor:
    """Upcast half types to fp32; leave fp32 and fp64 as they are (fp64 is for gradcheck)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class Coefficients(NamedTuple):
    """Per-token maps of one hyper-connection: ``h_pre (..., n)``, ``h_post (..., n)``, ``h_res (..., n, n)``."""

    h_pre: Tensor
    h_post: Tensor
    h_res: Tensor


def mhc_logits(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor) -> Tensor:
    """Eqs. 14-17: ``(1/r) * alpha * (vec(x) @ phi) + b`` with the RMS division applied after the matmul.

    ``x``: ``(..., n, C)``; ``phi``: ``(n*C, n*n + 2n)``; ``alpha``: ``(3,)`` for pre/post/res; returns fp32
    ``(..., n*n + 2n)`` laid out as ``[pre (n) | post (n) | res (n*n)]``.
    """
    n = x.shape[-2]
    v = at_least_fp32(x.flatten(-2))
    rms = torch.sqrt(v.square().mean(-1, keepdim=True) + RMS_EPS)
    m = v @ phi.to(v.dtype)
    a = alpha.to(v.dtype)
    gains = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    return m / rms * gains + bias.to(v.dtype)


def hc_logits(x: Tensor, theta: Tensor, alpha: Tensor, bias: Tensor) -> Tensor:
    """HC's dynamic maps as the mHC paper writes them (Eq. 5), with ``x~ = RMSNorm(x)`` per stream (``n x C``):

        H_pre  = alpha_pre  * tanh(theta_pre  x~^T) + b_pre       theta_pre:  1 x C  ->  1 x n
        H_post = alpha_post * tanh(theta_post x~^T) + b_post      theta_post: 1 x C  ->  1 x n
        H_res  = alpha_res  * tanh(theta_res  x~^T) + b_res       theta_res:  n x C  ->  n x n

    so ``H_res[i, j] = alpha_res * tanh(theta_res[i] . x~_j) + b_res[i, j]``: column ``j`` is driven by stream
    ``j``'s content and row ``i`` (output stream ``i``) by its own weight vector ``theta_res[i]`` (in HC's own
    notation ``A_r(H)[j, i]``, since HC mixes with ``A_r^T``). ``theta``: ``(C, n + 2)`` with columns
    ``[theta_pre | theta_post | theta_res[0] .. theta_res[n-1]]``; returns fp32 logits in the mHC layout
    ``[pre (n) | post (n) | res (n*n, row-major)]``. No activation follows for HC (``coefficients_from_logits``).
    """
    xf = at_least_fp32(x)
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + RMS_EPS)
    t = torch.tanh(normed @ theta.to(xf.dtype))  # (..., n, n + 2): t[..., j, 2 + i] = tanh(theta_res[i] . x~_j)
    a = alpha.to(xf.dtype)
    res = t[..., 2:].transpose(-1, -2)  # res[..., i, j] = tanh(theta_res[i] . x~_j)
    dynamic = torch.cat([a[0] * t[..., 0], a[1] * t[..., 1], a[2] * res.flatten(-2)], dim=-1)
    return dynamic + bias.to(xf.dtype)


def split_logits(logits: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split ``[pre | post | res]`` logits into ``(..., n)``, ``(..., n)``, ``(..., n, n)``."""
    pre, post, res = logits.split([n, n, n * n], dim=-1)
    return pre, post, res.unflatten(-1, (n, n))


def sinkhorn_unrolled(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp on ``(..., n, n)`` logits in fp32: ``M0 = exp(L - max L) + eps``, then ``iters`` times
    normalise columns, then rows (rows last, so row sums are exact). Differentiable by plain autograd,
    including through ``max L`` (see ``_sinkhorn_start``)."""
    m = _sinkhorn_start(logits)
    for _ in range(iters):
        m = m / m.sum(-2, keepdim=True)
        m = m / m.sum(-1, keepdim=True)
    return m


def _sinkhorn_start(logits: Tensor) -> Tensor:
    """``M0 = exp(L - max L) + eps`` per matrix, in at least fp32.

    ``eps`` keeps every entry positive, so logits of +-1e4 (all but one entry underflowing) stay finite and the
    iterations converge: it bounds the ratio of entries by ``1/eps``. Because of it the result is *not*
    invariant to a shift of ``L``: it equals Sinkhorn of ``exp(L) + eps * exp(max L)``, so it depends on
    ``max L`` and the shift must not be detached. (Without ``eps``, 4x4 logits uniform in +-30 end 20 iterations
    with column sums off by up to 0.94, against 0.06 with it.) ``max`` has no derivative where the largest entries
    tie; there autograd's ``amax`` splits the gradient evenly among them, and ``Sinkhorn.backward`` and the
    Triton kernel do the same.
    """
    lf = at_least_fp32(logits)
    return torch.exp(lf - lf.amax(dim=(-2, -1), keepdim=True)) + SINKHORN_EPS


def _shift_backward(logits: Tensor, grad_start: Tensor) -> Tensor:
    """Gradient wrt ``L`` of ``M0 = exp(L - max L) + eps`` given the gradient wrt ``M0``.

    ``d M0_kl / d L_ij = e_kl (delta_(kl),(ij) - d max / d L_ij)`` with ``e = exp(L - max L)``, and
    ``d max / d L`` is ``1 / (number of maxima)`` on the maxima (``amax``'s convention at ties), else 0.
    """
    lf = at_least_fp32(logits)
    shift = lf.amax(dim=(-2, -1), keepdim=True)
    ge = grad_start * torch.exp(lf - shift)
    is_max = (lf == shift).to(ge.dtype)
    share = is_max / is_max.sum(dim=(-2, -1), keepdim=True)
    return ge - share * ge.sum(dim=(-2, -1), keepdim=True)


def _normalise_backward(grad_out: Tensor, out: Tensor, total: Tensor, dim: int) -> Tensor:
    # y = x / sum(x, dim)  =>  dx = (dy - sum(dy * y, dim)) / sum(x, dim)
    return (grad_out - (grad_out * out).sum(dim, keepdim=True)) / total


class Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp that saves only its input logits and recomputes the iterates in backward.

    Saved memory per token is ``n*n`` (the logits), not ``iters * n*n``; the backward is analytic.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return sinkhorn_unrolled(logits, iters)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (logits,) = ctx.saved_tensors
        start = _sinkhorn_start(logits)
        m = start
        trace = []
        for _ in range(ctx.iters):
            col_sum = m.sum(-2, keepdim=True)
            after_cols = m / col_sum
            row_sum = after_cols.sum(-1, keepdim=True)
            m = after_cols / row_sum
            trace.append((col_sum, after_cols, row_sum, m))
        g = at_least_fp32(grad_out)
        for col_sum, after_cols, row_sum, out in reversed(trace):
            g = _normalise_backward(g, out, row_sum, -1)
            g = _normalise_backward(g, after_cols, col_sum, -2)
        return _shift_backward(logits, g).to(logits.dtype), None


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Doubly stochastic projection of ``(..., n, n)`` logits (fp32 result), recomputing backward."""
    return Sinkhorn.apply(logits, iters)


def coefficients_from_logits(logits: Tensor, n: int, mode: str, sinkhorn_iters: int) -> Coefficients:
    """Map logits to ``H_pre = sigmoid``, ``H_post = 2 sigmoid`` and ``H_res`` (Sinkhorn for mHC, raw for HC)."""
    pre, post, res = split_logits(logits, n)
    if mode == "mhc":
        return Coefficients(torch.sigmoid(pre), 2 * torch.sigmoid(post), sinkhorn(res, sinkhorn_iters))
    if mode == "hc":
        return Coefficients(pre, post, res)
    raise ValueError(f"mode={mode!r} has no coefficients; pass 'mhc' or 'hc'.")


def pre_mix(x: Tensor, h_pre: Tensor) -> Tensor:
    """Branch input ``H_pre · x``: ``(..., n, C)`` and ``(..., n)`` to ``(..., C)`` in ``x``'s dtype."""
    return torch.einsum("...n,...nc->...c", h_pre.to(x.dtype), x)


def merge(x: Tensor, f: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:
    """New stream state ``H_res · x + H_post^T · F``: ``(..., n, C)`` in the dtype of ``x``."""
    mixed = torch.matmul(h_res.to(x.dtype), x)
    return torch.addcmul(mixed, h_post.to(x.dtype).unsqueeze(-1), f.to(x.dtype).unsqueeze(-2))
