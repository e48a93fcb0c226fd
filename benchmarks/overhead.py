"""Training-step overhead of mHC on CPU, against the plain residual and the public ``hyper-connections`` peer.

Every configuration is the same nanoGPT-style model (DESIGN §4: d=256, 8 blocks, 4 heads, batch 8x128, fp32,
2 threads) trained with AdamW. All models are built up front and timed in interleaved rounds, so drift on a
shared machine hits every configuration alike; the table reports median step times and the median over rounds of
each configuration's ratio to the plain residual timed in the same round, in wall and in process CPU time. A
torch.profiler pass over one mHC step then splits its time into the read (coefficients with Sinkhorn, and the
pre-mix), the merge, the per-block readout and the rest (backward ops are charged to the forward op that created
them, matched by autograd sequence number). The peer is an optional dependency (``pip install hyper-connections``);
without it its rows are left out.

    python benchmarks/overhead.py                # full sizes, n = 4; ~150 s of timed rounds, ~5 min in all
    python benchmarks/overhead.py --budget 600   # more rounds, tighter medians
    python benchmarks/overhead.py --targets --compile --streams 2 4 8  # plain, mHC and peer only, eager and
                                                 # under torch.compile (compiled ratios are to the compiled plain)
    python benchmarks/overhead.py --quick        # tiny sizes, 2 rounds (CI smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from lightning_mhc import MHCConfig, apply_mhc, hyper_connection
from lightning_mhc.branches import ResidualWatcher
from lightning_mhc.capture import StreamCapture
from lightning_mhc.kernels.dispatch import KernelOps
from lightning_mhc.mhc_block import MHCBlock, attach_capture
from lightning_mhc.monitor import StabilityMonitor, total_grad_norm

try:
    from hyper_connections import mc_get_init_and_expand_reduce_stream_functions
except ImportError:
    mc_get_init_and_expand_reduce_stream_functions = None

EVALUATE = "autograd::engine::evaluate_function: "
PHASES = {"model/forward": "model forward (rest)", "model/backward": "model backward (rest)", "optimizer": "AdamW"}
MHC_RANGES = {
    "mhc/read": "mHC read (x @ phi, RMS, Sinkhorn, pre-mix)",
    "mhc/coefficients": "mHC coefficients (HC mode)",
    "mhc/pre_mix": "mHC pre_mix (HC mode)",
    "mhc/merge": "mHC merge",
    "mhc/readout": "mHC per-block readout (mean of streams)",
}


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes."""

    dim: int
    depth: int
    heads: int
    seq: int
    batch: int
    vocab: int = 256


FULL = Sizes(dim=256, depth=8, heads=4, seq=128, batch=8)
QUICK = Sizes(dim=64, depth=2, heads=4, seq=32, batch=2)


class Attention(nn.Module):
    """Causal multi-head self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """nanoGPT block: ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Token and position embeddings, a stack of blocks, final norm, LM head; ``expand``/``reduce`` around the
    stack are identities unless the peer's stream functions replace them."""

    def __init__(self, s: Sizes) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(s.vocab, s.dim), nn.Embedding(s.seq, s.dim)
        self.blocks = nn.ModuleList(Block(s.dim, s.heads) for _ in range(s.depth))
        self.expand: nn.Module = nn.Identity()
        self.reduce: nn.Module = nn.Identity()
        self.ln_f = nn.LayerNorm(s.dim)
        self.head = nn.Linear(s.dim, s.vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.expand(self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(self.reduce(x)))


class Watched(nn.Module):
    """A block run under a no-op :class:`ResidualWatcher`: the TorchFunctionMode dispatch cost alone."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        with ResidualWatcher(x):
            return self.block(x)


class PeerBlock(nn.Module):
    """A block's two branches wrapped by the peer's mHC, as its README shows (``init_hyper_conn(dim, branch)``)."""

    def __init__(self, block: Block, init_hyper_conn: Callable[..., nn.Module], index: int) -> None:
        super().__init__()
        dim = block.ln_1.normalized_shape[0]
        self.attn = init_hyper_conn(dim=dim, branch=nn.Sequential(block.ln_1, block.attn), layer_index=2 * index)
        self.mlp = init_hyper_conn(dim=dim, branch=nn.Sequential(block.ln_2, block.mlp), layer_index=2 * index + 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.attn(x))


class Case:
    """One configuration: a model, its AdamW, the case whose same-round step time its ratio is taken to (``None``:
    the first case) and, for logging steps, a hook run around each step. ``compiled`` runs ``torch.compile(model)``."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        batch: Tensor,
        logging: Callable[[], Callable[[Tensor], None]] | None = None,
        baseline: str | None = None,
        compiled: bool = False,
    ) -> None:
        self.name = name
        self.model = torch.compile(model) if compiled else model
        self.tokens, self.targets = batch[:, :-1], batch[:, 1:]
        self.logging = logging
        self.baseline = baseline
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def step(self) -> None:
        """Forward, backward and optimizer step (with the logging hook around them, if any)."""
        finish = self.logging() if self.logging is not None else None
        with record_function("model/forward"):
            logits = self.model(self.tokens)
            loss = F.cross_entropy(logits.flatten(0, 1), self.targets.flatten())
        with record_function("model/backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("optimizer"):
            self.optimizer.step()
        if finish is not None:
            finish(loss.detach())


def _gpt(s: Sizes) -> GPT:
    torch.manual_seed(0)
    return GPT(s)


def _mhc(s: Sizes, example: Tensor, streams: int, **fields: object) -> tuple[GPT, int]:
    model = _gpt(s)
    report = apply_mhc(model, MHCConfig(streams=streams, blocks="blocks", kernels="torch", **fields), example)
    return model, report.branches


def _peer(s: Sizes, streams: int) -> GPT:
    model = _gpt(s)
    init_hyper_conn, expand, reduce = mc_get_init_and_expand_reduce_stream_functions(streams, sinkhorn_iters=20)
    model.blocks = nn.ModuleList(PeerBlock(b, init_hyper_conn, i) for i, b in enumerate(model.blocks))
    model.expand, model.reduce = expand, reduce
    return model


def _capture_each_step(model: nn.Module) -> Callable[[], Callable[[Tensor], None]]:
    """What ``MHCCallback`` does on a logging step: attach a fresh capture, detach it after the step."""

    def begin() -> Callable[[Tensor], None]:
        attach_capture(model, StreamCapture())
        return lambda loss: attach_capture(model, None)

    return begin


def _capture_and_metrics(model: nn.Module, layers: int) -> Callable[[], Callable[[Tensor], None]]:
    """A logging step including the stability metrics the callback computes from the capture."""
    monitor = StabilityMonitor(layers)

    def begin() -> Callable[[Tensor], None]:
        capture = StreamCapture()
        attach_capture(model, capture)

        def finish(loss: Tensor) -> None:
            attach_capture(model, None)
            monitor.observe_loss(loss)
            monitor.update(capture)
            monitor.compute(total_grad_norm(model))

        return finish

    return begin


PLAIN, PLAIN_COMPILED = "plain residual", "plain residual, compiled"


def _mhc_name(streams: int, branches: int) -> str:
    return f"mHC n={streams}, sublayer ({branches} HCs)"


def _target_cases(s: Sizes, batch: Tensor, streams: int, compiled: bool) -> list[Case]:
    """mHC (sublayer) and, where installed, the peer at ``streams``; compiled ones are compared to the compiled
    plain residual."""
    suffix, baseline = (", compiled", PLAIN_COMPILED) if compiled else ("", None)
    model, branches = _mhc(s, batch[:1, :-1], streams, granularity="sublayer")
    cases = [Case(_mhc_name(streams, branches) + suffix, model, batch, baseline=baseline, compiled=compiled)]
    if mc_get_init_and_expand_reduce_stream_functions is not None:
        name = f"peer hyper-connections mHC n={streams} ({branches} HCs){suffix}"
        cases.append(Case(name, _peer(s, streams), batch, baseline=baseline, compiled=compiled))
    return cases


def _detail_cases(s: Sizes, batch: Tensor, streams: int) -> list[Case]:
    """Branch-splitting dispatch alone, block granularity, HC mode and the logging-step variants at ``streams``."""
    example = batch[:1, :-1]
    watched = _gpt(s)
    watched.blocks = nn.ModuleList(Watched(b) for b in watched.blocks)
    block, block_branches = _mhc(s, example, streams, granularity="block")
    hc, branches = _mhc(s, example, streams, granularity="sublayer", mode="hc")
    detached, _ = _mhc(s, example, streams, granularity="sublayer")
    attach_capture(detached, StreamCapture())
    attach_capture(detached, None)
    logged, _ = _mhc(s, example, streams, granularity="sublayer")
    logged_metrics, _ = _mhc(s, example, streams, granularity="sublayer")
    return [
        Case("plain + no-op ResidualWatcher (dispatch only)", watched, batch),
        Case(f"mHC n={streams}, block ({block_branches} HCs)", block, batch),
        Case(f"HC n={streams}, sublayer ({branches} HCs)", hc, batch),
        Case("mHC sublayer, capture attached once, detached", detached, batch),
        Case("mHC sublayer, logging step (fresh capture)", logged, batch, _capture_each_step(logged)),
        Case(
            "mHC sublayer, logging step + stability metrics",
            logged_metrics,
            batch,
            _capture_and_metrics(logged_metrics, branches),
        ),
    ]


def build_cases(s: Sizes, streams: list[int], targets: bool = False, compiled: bool = False) -> list[Case]:
    """The configurations of the table, first the plain residual (the ratios' baseline): mHC and the peer at every
    stream count, then (unless ``targets``) the detail rows at the first one, then (with ``compiled``) the compiled
    plain residual and the compiled mHC and peer."""
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, s.vocab, (s.batch, s.seq + 1), generator=g)
    cases = [Case(PLAIN, _gpt(s), batch)]
    for n in streams:
        cases += _target_cases(s, batch, n, compiled=False)
    if not targets:
        cases += _detail_cases(s, batch, streams[0])
    if compiled:
        cases.append(Case(PLAIN_COMPILED, _gpt(s), batch, compiled=True))
        for n in streams:
            cases += _target_cases(s, batch, n, compiled=True)
    return cases


@dataclass
class Timing:
    """Median step times of one case and the medians over rounds of its same-round ratios to the baseline."""

    wall_ms: float
    wall_ratio: float
    cpu_ms: float
    cpu_ratio: float


def measure(cases: list[Case], budget_s: float, min_rounds: int) -> tuple[dict[str, Timing], int]:
    """One warm-up step per case (two for compiled ones, compiling), then rounds of one timed step per case (order
    rotating each round) until ``budget_s`` is spent and at least ``min_rounds`` ran; ratios are to each case's
    baseline (``cases[0]`` by default) in the same round."""
    for case in cases:
        case.step()
        case.step()
    wall: dict[str, list[float]] = {c.name: [] for c in cases}
    cpu: dict[str, list[float]] = {c.name: [] for c in cases}
    start, rounds = time.perf_counter(), 0
    while rounds < min_rounds or time.perf_counter() - start < budget_s:
        shift = rounds % len(cases)
        for case in cases[shift:] + cases[:shift]:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            case.step()
            wall[case.name].append((time.perf_counter() - wall0) * 1e3)
            cpu[case.name].append((time.process_time() - cpu0) * 1e3)
        rounds += 1
        print(f"round {rounds} done after {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    def ratio(values: dict[str, list[float]], case: Case) -> float:
        baseline = case.baseline or cases[0].name
        return statistics.median(a / b for a, b in zip(values[case.name], values[baseline]))

    timings = {
        c.name: Timing(statistics.median(wall[c.name]), ratio(wall, c), statistics.median(cpu[c.name]), ratio(cpu, c))
        for c in cases
    }
    return timings, rounds


def _labelled(fn: Callable[..., Tensor], label: str) -> Callable[..., Tensor]:
    def run(*args: object) -> Tensor:
        with record_function(label):
            return fn(*args)

    return run


@contextlib.contextmanager
def labelled_mhc_ops() -> Iterator[None]:
    """Wrap the torch backend's mHC steps in profiler ranges named ``mhc/*`` for the duration of the block."""
    get_ops = hyper_connection.get_ops
    read_out = MHCBlock._read_out

    def labelled_ops(backend: str) -> KernelOps:
        ops = get_ops(backend)
        return dataclasses.replace(
            ops,
            mhc_read=_labelled(ops.mhc_read, "mhc/read"),
            mhc_coefficients=_labelled(ops.mhc_coefficients, "mhc/coefficients"),
            pre_mix=_labelled(ops.pre_mix, "mhc/pre_mix"),
            merge=_labelled(ops.merge, "mhc/merge"),
        )

    hyper_connection.get_ops = labelled_ops
    MHCBlock._read_out = _labelled(read_out, "mhc/readout")
    try:
        yield
    finally:
        hyper_connection.get_ops = get_ops
        MHCBlock._read_out = read_out


def _owner(event: FunctionEvent, by_sequence: dict[int, str]) -> str:
    """The profiler range an op's time belongs to; a backward node belongs to the range of its forward op."""
    e: FunctionEvent | None = event
    while e is not None:
        if e.name in MHC_RANGES:
            return MHC_RANGES[e.name]
        if e.name.startswith(EVALUATE) and e.sequence_nr in by_sequence:
            return by_sequence[e.sequence_nr]
        if e.name in PHASES:
            return PHASES[e.name]
        e = e.cpu_parent
    return "outside"


def breakdown(case: Case) -> tuple[dict[str, float], list[tuple[str, int, float]], float]:
    """Profile one step: self CPU ms by owner, the top ops by self time (name, calls, ms) and the step's ms."""
    with labelled_mhc_ops(), profile(activities=[ProfilerActivity.CPU]) as prof:
        case.step()
    events = list(prof.events())
    by_sequence: dict[int, str] = {}
    for e in events:
        owner = _owner(e, {})
        if e.sequence_nr >= 0 and owner in MHC_RANGES.values():
            by_sequence[e.sequence_nr] = owner
    owners: dict[str, float] = {}
    for e in events:
        owner = _owner(e, by_sequence)
        owners[owner] = owners.get(owner, 0.0) + e.self_cpu_time_total / 1e3
    total = sum(e.cpu_time_total for e in events if e.cpu_parent is None) / 1e3
    top = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:12]
    ops = [(a.key, a.count, a.self_cpu_time_total / 1e3) for a in top]
    return owners, ops, total


def machine() -> str:
    """CPU model, threads, torch version and date."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, {now}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CI smoke)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timed rounds after warm-up (default 150, quick 0)"
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[4], help="stream counts n of the mHC rows")
    parser.add_argument("--targets", action="store_true", help="only the plain residual, mHC and the peer")
    parser.add_argument("--compile", action="store_true", help="also every target row under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    budget = args.budget if args.budget is not None else (0.0 if args.quick else 150.0)

    cases = build_cases(s, args.streams, args.targets, args.compile)
    timings, rounds = measure(cases, budget, min_rounds=2 if args.quick else 3)
    print(f"## mHC training-step overhead (fp32, CPU)\n\n{machine()}")
    print(
        f"d={s.dim}, {s.depth} blocks, {s.heads} heads, batch {s.batch}x{s.seq}, AdamW; {rounds} interleaved rounds of "
        "one step per config; ratios are medians over rounds of same-round ratios to the plain residual (compiled "
        "rows: to the compiled plain residual), in wall time and in process CPU time, which a busy machine inflates "
        "less.\n"
    )
    print("| config | median step ms | x plain | median CPU ms | CPU x plain |\n|---|---:|---:|---:|---:|")
    for case in cases:
        t = timings[case.name]
        print(f"| {case.name} | {t.wall_ms:.1f} | {t.wall_ratio:.2f} | {t.cpu_ms:.1f} | {t.cpu_ratio:.2f} |")

    mhc = next(c for c in cases if c.name.startswith("mHC n=")).name
    owners, ops, total = breakdown(next(c for c in cases if c.name == mhc))
    print(f"\n### Where the time goes: {mhc} (torch.profiler, {total:.1f} ms in the profiled step)\n")
    print("| part | self CPU ms | share |\n|---|---:|---:|")
    for owner, ms in sorted(owners.items(), key=lambda kv: -kv[1]):
        print(f"| {owner} | {ms:.1f} | {100 * ms / total:.1f}% |")
    print("\n| top ops by self CPU | calls | ms | share |\n|---|---:|---:|---:|")
    for name, calls, ms in ops:
        print(f"| {name} | {calls} | {ms:.1f} | {100 * ms / total:.1f}% |")
    if args.targets:
        return
    plain, watched = timings[PLAIN], timings["plain + no-op ResidualWatcher (dispatch only)"]
    block = next(timings[c.name] for c in cases if ", block (" in c.name)
    print(
        f"\nTorchFunctionMode dispatch alone (no-op watcher on the plain model): "
        f"{watched.wall_ms - plain.wall_ms:+.1f} ms/step, {watched.wall_ratio - 1:+.2f}x plain; "
        f"mHC sublayer vs block: {timings[mhc].wall_ratio - block.wall_ratio:+.2f}x plain (dispatch plus twice the "
        "hyper-connections)."
    )


if __name__ == "__main__":
    main()
