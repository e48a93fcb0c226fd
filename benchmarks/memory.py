"""Activation memory of mHC with and without selective recomputation, against the paper's formula (§4.3.2).

A nanoGPT-style model (d=256, 12 blocks = 24 sublayers, n=4, batch 8x128, fp32) is run forward once per setting:
``kept`` is the bytes of the tensors that forward allocated and that are still alive when it returns (what backward
needs, measured by ``lightning_mhc.recompute.retained_bytes``). ``saved`` is the difference to ``recompute=False``;
``formula`` is what our accounting predicts it to be, ``L (n + 1) C - ceil(L / L_r) n C`` per token (every sublayer's
stream state and branch input are dropped, one stream state per group is kept; coefficients, a few ``n^2 + 2n`` per
sublayer, are left out as in the paper). ``paper`` is the paper's per-token mHC footprint ``n C ceil(L / L_r) +
(n + 2) C L_r`` (kept plus the transient of one recomputed group), least at ``L_r* = sqrt(n L / (n + 2))``.
``peak`` is the growth of the peak over one forward+backward: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's peak RSS (Linux ``VmHWM``, in a fresh process per setting) on CPU. Step time (forward, backward, AdamW)
of recomputation at ``L_r*`` against none is timed in interleaved rounds and reported as the median per-round ratio.

    python benchmarks/memory.py            # full sizes, a few minutes on 2 shared CPU cores
    python benchmarks/memory.py --quick    # tiny sizes, seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_mhc import MHCConfig, apply_mhc
from lightning_mhc.recompute import formula_elements, recompute_layers, retained_bytes

MIB = 2**20


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes."""

    dim: int = 256
    blocks: int = 12
    heads: int = 4
    seq: int = 128
    batch: int = 8
    streams: int = 4
    vocab: int = 256

    @property
    def sublayers(self) -> int:
        return 2 * self.blocks

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


QUICK = Sizes(dim=64, blocks=4, heads=2, seq=32, batch=2)


class Block(nn.Module):
    """nanoGPT block: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def attn(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Token and position embeddings, a stack of blocks, a final norm and the LM head."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(s.vocab, s.dim), nn.Embedding(s.seq, s.dim)
        self.blocks = nn.ModuleList(Block(s.dim, s.heads) for _ in range(s.blocks))
        self.ln_f, self.head = nn.LayerNorm(s.dim), nn.Linear(s.dim, s.vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(s: Sizes, layers: int | None, device: torch.device) -> tuple[nn.Module, Tensor]:
    """The injected model (``layers=None``: no recomputation, ``0``: the default ``L_r*``) and a token batch."""
    torch.manual_seed(0)
    model = GPT(s).to(device)
    config = MHCConfig(streams=s.streams, recompute=layers is not None, recompute_layers=layers or None)
    apply_mhc(model, config, example_input=torch.zeros(1, s.seq, dtype=torch.long, device=device))
    tokens = torch.randint(0, s.vocab, (s.batch, s.seq), generator=torch.Generator().manual_seed(1)).to(device)
    return model, tokens


def loss_of(model: nn.Module, tokens: Tensor) -> Tensor:
    logits = model(tokens)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def kept_bytes(s: Sizes, layers: int | None, device: torch.device) -> int:
    """Bytes forward leaves alive for backward."""
    model, tokens = build(s, layers, device)
    loss, kept = retained_bytes(lambda: loss_of(model, tokens))
    loss.backward()
    return kept


def peak_growth(s: Sizes, layers: int | None, device: torch.device) -> int:
    """Growth of the peak over one forward+backward (CUDA allocator, else this process's peak RSS)."""
    model, tokens = build(s, layers, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss_of(model, tokens).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    base = _reset_peak_rss()
    loss_of(model, tokens).backward()
    return _status_kib("VmHWM") * 1024 - base


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss() -> int:
    """Reset this process's peak RSS (Linux ``clear_refs``) and return the current RSS in bytes.

    ``ru_maxrss`` cannot be used: Linux carries it over from the parent across fork and exec.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_in_fresh_process(s: Sizes, layers: int | None, device: torch.device) -> int:
    """``peak_growth`` in a new interpreter, so that an earlier setting's peak does not hide this one's."""
    if device.type == "cuda":
        return peak_growth(s, layers, device)
    args = [sys.executable, __file__, "--peak-of", json.dumps({"sizes": asdict(s), "layers": layers})]
    # A fixed mmap threshold makes glibc map every block of 64 KiB or more on its own and unmap it when freed, so
    # RSS follows the live tensors instead of keeping freed heap memory (the default threshold grows after frees).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env).stdout
    return int(out.strip().splitlines()[-1])


def step_time_ratio(s: Sizes, layers: int, device: torch.device, rounds: int) -> tuple[float, float, float]:
    """Median seconds per training step without and with recomputation, and the median per-round ratio."""
    runs = []
    for setting in (None, layers):
        model, tokens = build(s, setting, device)
        runs.append((model, tokens, torch.optim.AdamW(model.parameters(), lr=1e-4)))

    def step(model: nn.Module, tokens: Tensor, opt: torch.optim.Optimizer) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_of(model, tokens).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for run in runs:
        step(*run)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            times[i].append(step(*runs[i]))
    ratio = statistics.median(b / a for a, b in zip(*times))
    return statistics.median(times[0]), statistics.median(times[1]), ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.peak_of:
        job = json.loads(args.peak_of)
        print(peak_growth(Sizes(**job["sizes"]), job["layers"], device))
        return
    s = QUICK if args.quick else Sizes()
    n, c, depth = s.streams, s.dim, s.sublayers
    best = recompute_layers(MHCConfig(streams=n), depth)
    settings = sorted({1, 2, best, 2 * best, depth})
    print(
        f"mHC activation memory: d={c}, {depth} sublayers, n={n}, batch {s.batch}x{s.seq} ({s.tokens} tokens), fp32, "
        f"{device.type}; L_r* = sqrt(nL/(n+2)) = {math.sqrt(n * depth / (n + 2)):.2f} -> {best}"
    )
    base = kept_bytes(s, None, device)
    base_peak = peak_in_fresh_process(s, None, device)
    header = (
        f"{'L_r':>5} {'groups':>6} {'kept MiB':>9} {'saved MiB':>10} {'formula MiB':>12} {'meas/formula':>12} "
        f"{'paper el/token':>14} {'peak MiB':>9}"
    )
    print(header)
    print(
        f"{'off':>5} {'':>6} {base / MIB:>9.1f} {'':>10} {'':>12} {'':>12} {(n + 2) * c * depth:>14,} "
        f"{base_peak / MIB:>9.1f}"
    )
    for layers in settings:
        kept = kept_bytes(s, layers, device)
        stored, transient = formula_elements(n, c, depth, layers)
        formula = (depth * (n + 1) * c - stored) * 4 * s.tokens
        peak = peak_in_fresh_process(s, layers, device)
        mark = "*" if layers == best else " "
        print(
            f"{layers:>4}{mark} {math.ceil(depth / layers):>6} {kept / MIB:>9.1f} {(base - kept) / MIB:>10.1f} "
            f"{formula / MIB:>12.1f} {(base - kept) / formula:>12.2f} {stored + transient:>14,} {peak / MIB:>9.1f}"
        )
    off, on, ratio = step_time_ratio(s, best, device, args.rounds)
    print(
        f"step time (fwd+bwd+AdamW), median of {args.rounds} interleaved rounds: recompute off {off * 1e3:.0f} ms, "
        f"L_r={best} {on * 1e3:.0f} ms, ratio {ratio:.3f}"
    )


if __name__ == "__main__":
    main()
