"""Achieved bandwidth of the mHC Triton kernels against the HBM roofline, and speedup over the torch reference.

On CUDA, for every ``C`` and ``n`` asked for, times each kernel (forward and backward) with
``triton.testing.do_bench`` and divides the bytes it must move (DESIGN §1) by its time:

    pre_mix   fwd: reads nC, writes C            bwd: reads nC + C, writes nC
    merge     fwd: reads (n+1)C, writes nC       bwd: reads (2n+1)C, writes (n+1)C
    logits    fwd: reads nC + phi                bwd: reads nC + phi, writes nC + phi partial sums
    sinkhorn  fwd/bwd: n*n fp32 in and out per token (compute-bound; its GB/s is not a roofline figure)

Without CUDA it checks correctness on small sizes in the Triton interpreter instead, and says so.

    python benchmarks/kernels.py                          # C in {1280, 2560, 4096}, n in {2, 4, 8}, bf16
    python benchmarks/kernels.py --peak-gbps 3350 --tokens 8192 --channels 4096 --streams 4
    python benchmarks/kernels.py --sweep-logits --channels 2560 --streams 4   # logits kernels at other tile shapes
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lightning_mhc.kernels import apply, coefficients, ops, reference, sinkhorn  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(tokens: int, n: int, c: int, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    n_out = n * n + 2 * n

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    return {
        "x": randn(tokens, n, c).to(dtype),
        "f": randn(tokens, c).to(dtype),
        "phi": randn(n * c, n_out) / (n * c) ** 0.5,
        "alpha": torch.full((3,), 0.01, device=device),
        "bias": randn(n_out),
        "h_pre": torch.rand(tokens, n, generator=gen, device=device),
        "h_post": 2 * torch.rand(tokens, n, generator=gen, device=device),
        "h_res": reference.sinkhorn(randn(tokens, n, n), 20),
        "res_logits": randn(tokens, n, n),
    }


def _reference_backward(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> Callable[[], object]:
    """A closure running only the reference's backward (the forward graph is built once, retained)."""
    leaves = [a.detach().clone().requires_grad_() for a in args]
    out = fn(*leaves)
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def _cases(t: dict[str, torch.Tensor], n: int, c: int, iters: int) -> list[tuple[str, Callable, Callable, int]]:
    """``(name, triton closure, torch closure, bytes moved)`` for every kernel, forward and backward."""
    tokens, el = t["x"].shape[0], t["x"].element_size()
    x, f, phi, alpha, bias = t["x"], t["f"], t["phi"], t["alpha"], t["bias"]
    h_pre, h_post, h_res, res_logits = t["h_pre"], t["h_post"], t["h_res"], t["res_logits"]
    flat = x.reshape(tokens, n * c)
    n_out = phi.shape[1]
    _, mr, r = coefficients.logits_forward(flat, phi, alpha, bias, n, False)
    g_logits = torch.randn_like(mr)
    g_mix, g_merge = torch.randn_like(f), torch.randn_like(x)
    phi_bytes = phi.numel() * 4
    coeff_bytes = tokens * (2 * n_out + 1) * 4
    return [
        (
            "pre_mix fwd",
            lambda: apply.pre_mix_forward(x, h_pre),
            lambda: reference.pre_mix(x, h_pre),
            tokens * (n + 1) * c * el,
        ),
        (
            "pre_mix bwd",
            lambda: apply.pre_mix_backward(x, h_pre, g_mix),
            _reference_backward(reference.pre_mix, x, h_pre),
            tokens * (2 * n + 1) * c * el,
        ),
        (
            "merge fwd",
            lambda: apply.merge_forward(x, f, h_res, h_post),
            lambda: reference.merge(x, f, h_res, h_post),
            tokens * (2 * n + 1) * c * el,
        ),
        (
            "merge bwd",
            lambda: apply.merge_backward(x, f, h_res, h_post, g_merge),
            _reference_backward(reference.merge, x, f, h_res, h_post),
            tokens * (3 * n + 2) * c * el,
        ),
        (
            "logits fwd",
            lambda: coefficients.logits_forward(flat, phi, alpha, bias, n, False),
            lambda: reference.mhc_logits(x, phi, alpha, bias),
            tokens * n * c * el + phi_bytes + coeff_bytes,
        ),
        (
            "logits bwd",
            lambda: coefficients.logits_backward(flat, phi, alpha, g_logits, mr, r, n),
            _reference_backward(reference.mhc_logits, x, phi, alpha, bias),
            tokens * 2 * n * c * el + 2 * phi_bytes + coeff_bytes,
        ),
        (
            f"sinkhorn fwd ({iters})",
            lambda: sinkhorn.sinkhorn_forward(res_logits, iters),
            lambda: reference.sinkhorn(res_logits, iters),
            tokens * 2 * n * n * 4,
        ),
        (
            f"sinkhorn bwd ({iters})",
            lambda: sinkhorn.sinkhorn_backward(res_logits, torch.ones_like(res_logits), iters),
            _reference_backward(lambda logits: reference.sinkhorn(logits, iters), res_logits),
            tokens * 3 * n * n * 4,
        ),
    ]


def benchmark(args: argparse.Namespace) -> None:
    """Print one row per kernel, ``C`` and ``n``: time, GB/s, share of the peak and speedup over torch."""
    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    print(f"{args.tokens} tokens, {args.dtype}, peak {args.peak_gbps:.0f} GB/s, {torch.cuda.get_device_name()}")
    header = f"{'kernel':<20}{'C':>6}{'n':>3}{'triton ms':>11}{'GB/s':>8}{'% peak':>8}{'torch ms':>10}{'speedup':>9}"
    print(header)
    print("-" * len(header))
    for c in args.channels:
        for n in args.streams:
            tensors = _inputs(args.tokens, n, c, dtype, "cuda")
            for name, fast, slow, n_bytes in _cases(tensors, n, c, args.sinkhorn_iters):
                ms = do_bench(fast)
                ref_ms = do_bench(slow)
                gbps = n_bytes / ms / 1e6
                print(
                    f"{name:<20}{c:>6}{n:>3}{ms:>11.4f}{gbps:>8.0f}{100 * gbps / args.peak_gbps:>7.1f}%"
                    f"{ref_ms:>10.4f}{ref_ms / ms:>8.2f}x"
                )
            del tensors
            torch.cuda.empty_cache()


LOGITS_SWEEP = {  # (BLOCK_T, BLOCK_K, num_warps, num_stages) per kernel, next to the default tiles
    True: [(64, 64, 8, 3), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4), (32, 128, 4, 3), (128, 32, 8, 4)],
    False: [(32, 64, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 32, 4, 4), (128, 32, 8, 3), (16, 128, 4, 3)],
}


def sweep_logits(args: argparse.Namespace) -> None:
    """Time the logits kernels at other tile shapes than ``coefficients.logits_tiles`` picks (``*`` = default)."""
    from triton.testing import do_bench

    chosen = coefficients.logits_tiles
    print(f"logits tile sweep, {args.tokens} tokens, {args.dtype}, peak {args.peak_gbps:.0f} GB/s")
    print(f"{'kernel':<12}{'C':>6}{'n':>3}{'T x K, warps, stages':>24}{'ms':>9}{'% peak':>8}")
    try:
        for c in args.channels:
            for n in args.streams:
                coefficients.logits_tiles = chosen
                t = _inputs(args.tokens, n, c, DTYPES[args.dtype], "cuda")
                cases = {name: (fn, n_bytes) for name, fn, _, n_bytes in _cases(t, n, c, 1) if "logits" in name}
                for forward, name in ((True, "logits fwd"), (False, "logits bwd")):
                    default = chosen(n * c, n * n + 2 * n, forward)
                    shapes = [default] + [
                        default._replace(block_t=bt, block_k=bk, num_warps=w, num_stages=st)
                        for bt, bk, w, st in LOGITS_SWEEP[forward]
                    ]
                    for shape in dict.fromkeys(shapes):
                        coefficients.logits_tiles = lambda *_, shape=shape, **__: shape
                        label = f"{shape.block_t} x {shape.block_k}, {shape.num_warps}, {shape.num_stages}"
                        try:
                            ms = do_bench(cases[name][0])
                        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory at this shape
                            print(f"{name:<12}{c:>6}{n:>3}{label:>24}  failed: {str(err).splitlines()[0][:60]}")
                            continue
                        share = 100 * cases[name][1] / ms / 1e6 / args.peak_gbps
                        mark = " *" if shape == default else ""
                        print(f"{name:<12}{c:>6}{n:>3}{label:>24}{ms:>9.4f}{share:>7.1f}%{mark}")
                del t
                torch.cuda.empty_cache()
    finally:
        coefficients.logits_tiles = chosen


def check_in_interpreter() -> None:
    """Without CUDA: forward and backward of every public op against the reference on small sizes."""
    print("No CUDA device: no timings. Checking correctness in the Triton interpreter on small sizes instead.")
    print(f"{'op':<12}{'C':>5}{'n':>3}{'max |err| out':>16}{'max |err| grads':>18}")
    for c, n in ((40, 2), (72, 4), (24, 8)):
        t = _inputs(13, n, c, torch.float32, "cpu")
        for name, args in (
            ("mhc_logits", (t["x"], t["phi"], t["alpha"], t["bias"])),
            ("sinkhorn", (t["res_logits"], 20)),
            ("pre_mix", (t["x"], t["h_pre"])),
            ("merge", (t["x"], t["f"], t["h_res"], t["h_post"])),
        ):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            results = []
            for fn in (getattr(ops, name), getattr(reference, name)):
                leaves = [a.detach().clone().requires_grad_() for a in tensors]
                out = fn(*leaves, *args[len(tensors) :])
                results.append((out, torch.autograd.grad(out, leaves, torch.ones_like(out))))
            (out, grads), (ref_out, ref_grads) = results
            errs = [(g - rg).abs().max().item() for g, rg in zip(grads, ref_grads)]
            out_err = (out - ref_out).abs().max().item()
            print(f"{name:<12}{c:>5}{n:>3}{out_err:>16.2e}{max(errs):>18.2e}")
            assert out_err < 1e-4 and max(errs) < 1e-4, f"{name} differs from the reference"
    print("All ops match the reference.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per call (batch x sequence)")
    parser.add_argument("--channels", type=int, nargs="+", default=[1280, 2560, 4096], help="hidden sizes C")
    parser.add_argument("--streams", type=int, nargs="+", default=[2, 4, 8], help="stream counts n")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="storage dtype of x and F")
    parser.add_argument("--sinkhorn-iters", type=int, default=20, help="Sinkhorn iterations (paper: 20)")
    parser.add_argument("--peak-gbps", type=float, default=4800.0, help="HBM bandwidth roofline (H200: 4800)")
    parser.add_argument("--sweep-logits", action="store_true", help="time the logits kernels at other tile shapes")
    args = parser.parse_args()
    if torch.cuda.is_available():
        if args.sweep_logits:
            sweep_logits(args)
        else:
            benchmark(args)
    else:
        check_in_interpreter()


if __name__ == "__main__":
    main()
