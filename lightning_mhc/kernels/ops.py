"""Triton-backed mHC steps: autograd Functions over the kernels, with the reference's signatures and dtypes.

Every public function takes the same arguments as its namesake in ``reference`` and returns the same shapes
and dtypes: leading dimensions are flattened to tokens, streams and coefficients may be fp32/fp16/bf16
(coefficient arithmetic is fp32), and results come back in the reference's dtype. fp64 inputs (gradcheck)
take the reference path, since the kernels compute in fp32. Importing this module imports Triton.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from lightning_mhc.kernels import reference
from lightning_mhc.kernels.apply import merge_backward, merge_forward, pre_mix_backward, pre_mix_forward
from lightning_mhc.kernels.coefficients import logits_backward, logits_forward
from lightning_mhc.kernels.reference import Coefficients
from lightning_mhc.kernels.sinkhorn import sinkhorn_backward, sinkhorn_forward


def _on_device(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _is_fp64(*tensors: Tensor) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


class _MHCLogits(torch.autograd.Function):
    """Fused logits; with ``activate`` the pre/post columns are ``sigmoid`` / ``2 sigmoid`` already."""

    @staticmethod
    def forward(ctx, x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, activate: bool) -> Tensor:  # type: ignore[override]
        n, c = x.shape[-2:]
        flat = x.reshape(-1, n * c).contiguous()
        with _on_device(x):
            out, mr, r = logits_forward(flat, phi, alpha, bias, n, activate)
        ctx.save_for_backward(flat, phi, alpha, mr, r, out if activate else None)
        ctx.meta = (x.shape, n, activate, bias.dtype)
        return out.reshape(*x.shape[:-2], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, None]:  # type: ignore[override]
        flat, phi, alpha, mr, r, out = ctx.saved_tensors
        x_shape, n, activate, bias_dtype = ctx.meta
        g = grad_out.reshape(mr.shape).float()
        if activate:
            pre, post = out[:, :n], out[:, n : 2 * n]
            g = torch.cat([g[:, :n] * pre * (1 - pre), g[:, n : 2 * n] * post * (1 - post / 2), g[:, 2 * n :]], -1)
        with _on_device(flat):
            dx, dphi, dalpha, dbias = logits_backward(flat, phi, alpha, g, mr, r, n)
        return dx.reshape(x_shape), dphi.to(phi.dtype), dalpha.to(alpha.dtype), dbias.to(bias_dtype), None


class _Sinkhorn(torch.autograd.Function):
    """Sinkhorn-Knopp saving only the logits; the backward kernel recomputes the iterates on chip."""

    @staticmethod
    def forward(ctx, logits: Tensor, iters: int) -> Tensor:  # type: ignore[override]
        n = logits.shape[-1]
        flat = logits.reshape(-1, n, n)
        with _on_device(logits):
            out = sinkhorn_forward(flat, iters)
        ctx.save_for_backward(flat)
        ctx.meta = (logits.shape, logits.dtype, iters)
        return out.reshape(logits.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (flat,) = ctx.saved_tensors
        shape, dtype, iters = ctx.meta
        with _on_device(flat):
            grad = sinkhorn_backward(flat, grad_out.reshape(flat.shape), iters)
        return grad.reshape(shape).to(dtype), None


class _PreMix(torch.autograd.Function):
    """``H_pre · x`` over flattened tokens."""

    @staticmethod
    def forward(ctx, x: Tensor, h_pre: Tensor) -> Tensor:  # type: ignore[override]
        n, c = x.shape[-2:]
        flat_x = x.reshape(-1, n, c).contiguous()
        flat_h = h_pre.reshape(-1, n).contiguous()
        with _on_device(x):
            out = pre_mix_forward(flat_x, flat_h)
        ctx.save_for_backward(flat_x, flat_h)
        ctx.meta = (x.shape, h_pre.shape, h_pre.dtype)
        return out.reshape(*x.shape[:-2], c)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        flat_x, flat_h = ctx.saved_tensors
        x_shape, h_shape, h_dtype = ctx.meta
        with _on_device(flat_x):
            dx, dh = pre_mix_backward(flat_x, flat_h, grad_out.reshape(flat_x.shape[0], flat_x.shape[2]))
        return dx.reshape(x_shape), dh.reshape(h_shape).to(h_dtype)


class _Merge(torch.autograd.Function):
    """``H_res · x + H_post^T · F`` over flattened tokens."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:  # type: ignore[override]
        n, c = x.shape[-2:]
        flat = (
            x.reshape(-1, n, c).contiguous(),
            f.reshape(-1, c).contiguous(),
            h_res.reshape(-1, n, n).contiguous(),
            h_post.reshape(-1, n).contiguous(),
        )
        with _on_device(x):
            out = merge_forward(*flat)
        ctx.save_for_backward(*flat)
        ctx.meta = (x.shape, f.shape, h_res.shape, h_res.dtype, h_post.shape, h_post.dtype)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        flat = ctx.saved_tensors
        x_shape, f_shape, res_shape, res_dtype, post_shape, post_dtype = ctx.meta
        with _on_device(flat[0]):
            dx, df, dh_res, dh_post = merge_backward(*flat, grad_out.reshape(flat[0].shape))
        return (
            dx.reshape(x_shape),
            df.reshape(f_shape),
            dh_res.reshape(res_shape).to(res_dtype),
            dh_post.reshape(post_shape).to(post_dtype),
        )


def mhc_logits(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor) -> Tensor:
    """Fused Eqs. 14-17: fp32 logits ``(..., n*n + 2n)`` laid out ``[pre | post | res]``, as ``reference``."""
    if _is_fp64(x, phi):
        return reference.mhc_logits(x, phi, alpha, bias)
    return _MHCLogits.apply(x, phi, alpha, bias, False)


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Doubly stochastic projection of ``(..., n, n)`` logits (fp32 result), recomputing backward on chip."""
    if _is_fp64(logits):
        return reference.sinkhorn(logits, iters)
    return _Sinkhorn.apply(logits, iters)


def pre_mix(x: Tensor, h_pre: Tensor) -> Tensor:
    """Branch input ``H_pre · x``: ``(..., n, C)`` and ``(..., n)`` to ``(..., C)`` in ``x``'s dtype."""
    if _is_fp64(x, h_pre):
        return reference.pre_mix(x, h_pre)
    return _PreMix.apply(x, h_pre.expand(x.shape[:-1]))


def merge(x: Tensor, f: Tensor, h_res: Tensor, h_post: Tensor) -> Tensor:
    """New stream state ``H_res · x + H_post^T · F``: ``(..., n, C)`` in the dtype of ``x``."""
    if _is_fp64(x, f, h_res, h_post):
        return reference.merge(x, f, h_res, h_post)
    n, c = x.shape[-2:]
    lead = x.shape[:-2]
    return _Merge.apply(x, f.expand(*lead, c), h_res.expand(*lead, n, n), h_post.expand(*lead, n))


def mhc_coefficients(x: Tensor, phi: Tensor, alpha: Tensor, bias: Tensor, iters: int) -> Coefficients:
    """``H_pre``, ``H_post``, ``H_res`` of mHC in two kernels: logits with the sigmoids fused in, then Sinkhorn.

    Equals ``reference.coefficients_from_logits(reference.mhc_logits(x, phi, alpha, bias), n, "mhc", iters)``.
    """
    n = x.shape[-2]
    if _is_fp64(x, phi):
        return reference.coefficients_from_logits(reference.mhc_logits(x, phi, alpha, bias), n, "mhc", iters)
    out = _MHCLogits.apply(x, phi, alpha, bias, True)
    h_pre, h_post, res = reference.split_logits(out, n)
    return Coefficients(h_pre, h_post, sinkhorn(res, iters))
