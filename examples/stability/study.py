"""Does mHC earn its cost? Residual, HC and mHC per ``init`` preset, several seeds, the learning rate tuned per variant.

Every variant trains the same byte-level LM (the stability model: a deep, narrow dense transformer; or the bundled
tiny MoE model with ``--model moe``) for each learning rate of a small grid and each seed. Per variant the table
reports the learning rate with the best mean validation loss and, at that rate, the mean ± spread (min..max over
seeds) of the validation loss, the final stream diversity, the largest composite gain and the median step time.
Results are appended run by run to ``--out/results.jsonl`` (a rerun skips finished runs), so the study can be
stopped and resumed.

    python examples/stability/study.py                      # the full grid: about an hour on 2 idle CPU cores
    python examples/stability/study.py --steps 60 --seeds 0 --lrs 3e-3   # a quick look
    python examples/stability/study.py --model moe --out runs/study_moe --plot docs/study_moe.png  # table + plot
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from lightning_mhc import MHCCallback
from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.models import DenseTransformerLM, MoETransformerLM

VARIANTS = {
    "residual": {"mode": "residual"},
    "hc": {"mode": "hc"},
    "mhc-paper": {"mode": "mhc", "init": "paper"},
    "mhc-symmetric": {"mode": "mhc", "init": "symmetric"},
    "mhc-onehot": {"mode": "mhc", "init": "onehot"},
}


class StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)


def build_model(args: argparse.Namespace, lr: float) -> L.LightningModule:
    if args.model == "moe":
        return MoETransformerLM(
            d_model=64,
            n_layers=4,
            n_heads=4,
            seq_len=args.seq_len,
            dense_layers=1,
            dense_ffn_size=256,
            num_experts=8,
            top_k=2,
            expert_ffn_size=64,
            shared_expert_size=64,
            bias_update_rate=0.01,
            lr=lr,
            warmup_steps=30,
        )
    return DenseTransformerLM(
        d_model=args.width,
        n_layers=args.blocks,
        n_heads=4,
        seq_len=args.seq_len,
        ffn_size=4 * args.width,
        lr=lr,
        warmup_steps=10,
        weight_decay=0.0,
    )


def run(variant: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    L.seed_everything(seed, verbose=False)
    model = build_model(args, lr)
    data = ByteLMDataModule(
        seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=2_000_000, max_val_windows=128, seed=seed
    )
    mhc = MHCCallback(streams=args.streams, log_every_n_steps=args.log_every, **VARIANTS[variant])
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=False,
        callbacks=[mhc, timer],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=args.steps,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    trainer.fit(model, data)
    history = mhc.history
    gains = [h[k] for h in history for k in ("mhc/gain_fwd_composite", "mhc/gain_bwd_composite") if k in h]
    return {
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "stream_diversity": history[-1]["mhc/stream_diversity"] if history else 0.0,
        "max_composite_gain": max(gains) if gains else 1.0,
        "step_ms": 1000 * statistics.median(timer.times[5:] or timer.times),
    }


def summarize(results: list[dict]) -> str:
    lines = [
        "| variant | best lr | val loss mean (min..max) | stream diversity | max composite gain | step ms |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        by_lr: dict[float, list[dict]] = {}
        for r in results:
            if r["variant"] == variant:
                by_lr.setdefault(r["lr"], []).append(r)
        if not by_lr:
            continue
        lr, runs = min(by_lr.items(), key=lambda item: statistics.mean(r["val_loss"] for r in item[1]))
        losses = [r["val_loss"] for r in runs]
        lines.append(
            f"| {variant} | {lr:g} | {statistics.mean(losses):.3f} ({min(losses):.3f}..{max(losses):.3f}), "
            f"{len(runs)} seeds | {statistics.mean(r['stream_diversity'] for r in runs):.2g} | "
            f"{max(r['max_composite_gain'] for r in runs):.3g} | "
            f"{statistics.median(r['step_ms'] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    """Validation loss (mean, min..max over seeds) and largest composite gain against the learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, gain_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for variant in VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        lrs = sorted({r["lr"] for r in runs})
        if not lrs:
            continue
        losses = [[r["val_loss"] for r in runs if r["lr"] == lr] for lr in lrs]
        means = [statistics.mean(v) for v in losses]
        style = {"color": "black", "linestyle": "--"} if variant == "residual" else {}
        (line,) = loss_ax.plot(lrs, means, marker="o", label=variant, **style)
        loss_ax.fill_between(
            lrs, [min(v) for v in losses], [max(v) for v in losses], alpha=0.15, color=line.get_color()
        )
        gains = [max(r["max_composite_gain"] for r in runs if r["lr"] == lr) for lr in lrs]
        gain_ax.plot(lrs, gains, marker="o", color=line.get_color(), label=variant)
    loss_ax.set(xscale="log", xlabel="learning rate", ylabel="validation loss (nats), mean and min..max over seeds")
    gain_ax.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="largest composite gain (fwd or bwd)")
    loss_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["stability", "moe"], default="stability")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=12, help="stability model: blocks (2 sublayers each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("runs/study"))
    parser.add_argument("--plot", type=Path, help="also write a plot of every result in --out to this PNG file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    results = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = {(r["variant"], r["lr"], r["seed"]) for r in results}
    for seed in args.seeds:
        for lr in args.lrs:
            for variant in args.variants:
                if (variant, lr, seed) in done:
                    continue
                result = run(variant, lr, seed, args)
                results.append(result)
                with path.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
    heading = f"{args.model} model, {args.steps} steps, n={args.streams}, seeds {args.seeds}, lrs {args.lrs}"
    print(f"\n{heading}")
    print(summarize(results))
    if args.plot:
        plot(results, args.plot, heading)


if __name__ == "__main__":
    main()
