"""End-to-end training-step overhead of mHC on a CUDA GPU against the plain residual, in bf16 autocast.

The nanoGPT-style model of ``overhead.py`` at the paper's width (default d=2560, 8 blocks, 20 heads, 4x2048 tokens,
a 32768-token vocabulary), trained with fused AdamW. Cases: the plain residual; mHC (n=4) with the Triton kernels,
with and without recomputation; mHC with the torch kernels; with ``--compile`` instead the plain residual and mHC
(torch and Triton kernels) under ``torch.compile``, against the compiled plain residual. All cases are built up
front and timed in interleaved rounds (one CUDA-synchronised step per case per round); the table gives median step
times, the median over rounds of the same-round ratio to the baseline, and each case's activation memory (peak
during a step minus what was allocated before it).

    python benchmarks/gpu_overhead.py                      # ~1-2 min on an H200
    python benchmarks/gpu_overhead.py --dim 1280 --compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from overhead import GPT, Sizes
from torch import Tensor, nn

from lightning_mhc import MHCConfig, apply_mhc


class Case:
    """A model with its fused AdamW and a bf16-autocast training step."""

    def __init__(self, name: str, baseline: str, model: nn.Module, batch: Tensor) -> None:
        self.name, self.baseline, self.model = name, baseline, model
        self.tokens, self.targets = batch[:, :-1], batch[:, 1:]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(self) -> None:
        with torch.autocast(self.tokens.device.type, dtype=torch.bfloat16):
            logits = self.model(self.tokens)
        loss = F.cross_entropy(logits.float().flatten(0, 1), self.targets.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _injected(base: GPT, example: Tensor, **fields: object) -> GPT:
    model = copy.deepcopy(base)
    apply_mhc(model, MHCConfig(streams=fields.pop("streams", 4), blocks="blocks", **fields), example)
    return model


def build_cases(s: Sizes, streams: int, compiled: bool, device: str) -> list[tuple[str, str, Callable[[], nn.Module]]]:
    """``(name, baseline name, builder)`` per case; eager cases against the eager plain residual, compiled ones
    against the compiled plain residual."""
    torch.manual_seed(0)
    base = GPT(s).to(device)
    example = torch.randint(0, s.vocab, (1, s.seq), device=device)
    mhc = dict(streams=streams, granularity="sublayer")
    plain, compiled_plain = "plain residual", "compiled plain residual"
    if compiled:
        return [
            (plain, plain, lambda: copy.deepcopy(base)),
            (compiled_plain, compiled_plain, lambda: torch.compile(copy.deepcopy(base))),
            (
                f"compiled mHC n={streams}, torch kernels",
                compiled_plain,
                lambda: torch.compile(_injected(base, example, kernels="torch", **mhc)),
            ),
            (
                f"compiled mHC n={streams}, Triton kernels",
                compiled_plain,
                lambda: torch.compile(_injected(base, example, kernels="triton", **mhc)),
            ),
        ]
    return [
        (plain, plain, lambda: copy.deepcopy(base)),
        (f"mHC n={streams}, Triton kernels", plain, lambda: _injected(base, example, kernels="triton", **mhc)),
        (
            f"mHC n={streams}, Triton kernels + recompute",
            plain,
            lambda: _injected(base, example, kernels="triton", recompute=True, **mhc),
        ),
        (f"mHC n={streams}, torch kernels", plain, lambda: _injected(base, example, kernels="torch", **mhc)),
    ]


def _timed_step(case: Case) -> tuple[float, float]:
    """Milliseconds of one synchronised step and the bytes it allocated above what was live before it (CUDA)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        case.step()
        return (time.perf_counter() - start) * 1e3, 0.0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    case.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=20)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd plain and mHC cases")
    parser.add_argument("--device", default="cuda", help="'cpu' with tiny sizes checks the script without a GPU")
    args = parser.parse_args()
    s = Sizes(dim=args.dim, depth=args.depth, heads=args.heads, seq=args.seq, batch=args.batch, vocab=args.vocab)
    torch.manual_seed(1)
    batch = torch.randint(0, s.vocab, (s.batch, s.seq + 1), device=args.device)

    cases, failed = [], []
    for name, baseline, build in build_cases(s, args.streams, args.compile, args.device):
        try:
            case = Case(name, baseline, build(), batch)
            for _ in range(2):
                case.step()
            cases.append(case)
        except Exception as err:  # a failing case is reported, the others still run
            failed.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
        print(f"warmed up: {name}", file=sys.stderr, flush=True)

    times: dict[str, list[float]] = {c.name: [] for c in cases}
    memory: dict[str, float] = {}
    for r in range(args.rounds):
        shift = r % len(cases)
        for case in cases[shift:] + cases[:shift]:
            ms, extra = _timed_step(case)
            times[case.name].append(ms)
            memory[case.name] = max(memory.get(case.name, 0.0), extra)
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"## mHC end-to-end step overhead on {where} (bf16 autocast)\n")
    print(
        f"torch {torch.__version__}; d={s.dim}, {s.depth} blocks ({2 * s.depth} sublayers), {s.heads} heads, "
        f"batch {s.batch}x{s.seq}, vocab {s.vocab}, fused AdamW; {args.rounds} interleaved rounds.\n"
    )
    print("| config | median step ms | baseline | x baseline | overhead | activation GiB |")
    print("|---|---:|---|---:|---:|---:|")
    for case in cases:
        if case.baseline not in times:
            continue
        ratio = statistics.median(a / b for a, b in zip(times[case.name], times[case.baseline]))
        print(
            f"| {case.name} | {statistics.median(times[case.name]):.1f} | {case.baseline} | {ratio:.3f} | "
            f"{100 * (ratio - 1):+.1f}% | {memory[case.name] / 2**30:.2f} |"
        )
    for line in failed:
        print(f"\nfailed: {line}")


if __name__ == "__main__":
    main()
