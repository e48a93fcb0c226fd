"""HC vs mHC vs the plain residual on CPU: the paper's stability result at small scale.

Trains the same deep, narrow byte-level LM (24 residual sublayers, same seed, an aggressive learning rate) three
times, with ``mode="residual"``, ``"hc"`` and ``"mhc"``, then prints a table and writes the report plots.

    python examples/stability/run.py            # about 8 minutes on 2 CPU cores
    python examples/stability/run.py --steps 40 # a quick look
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_mhc import MHCCallback
from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.models import DenseTransformerLM
from lightning_mhc.report import find_runs, write_plots


def train(mode: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    L.seed_everything(args.seed, verbose=False)
    model = DenseTransformerLM(
        d_model=args.width,
        n_layers=args.blocks,
        n_heads=4,
        seq_len=args.seq_len,
        ffn_size=4 * args.width,
        lr=args.lr,
        warmup_steps=10,
        weight_decay=0.0,
    )
    data = ByteLMDataModule(seq_len=args.seq_len, batch_size=args.batch_size, max_bytes=2_000_000, seed=args.seed)
    init = args.init if mode == "mhc" else None
    callback = MHCCallback(
        streams=args.streams, mode=mode, init=init, log_every_n_steps=args.log_every, res_init=args.res_init
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        logger=CSVLogger(out, name=mode, version=""),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        log_every_n_steps=args.log_every,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    history = callback.history

    def worst(key: str) -> float:
        values = [h[key] for h in history if key in h]
        return max(values) if values else float("nan")

    return {
        "final loss": float(trainer.callback_metrics["train_loss"]),
        "max grad norm": worst("mhc/grad_norm"),
        "max gain fwd": worst("mhc/gain_fwd_composite") if mode != "residual" else 1.0,
        "max gain bwd": worst("mhc/gain_bwd_composite") if mode != "residual" else 1.0,
        "minutes": (time.perf_counter() - start) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--blocks", type=int, default=12, help="transformer blocks (2 residual sublayers each)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--init", choices=["paper", "symmetric", "onehot"], default=None, help="mHC preset")
    parser.add_argument("--res-init", type=float, default=None, help="H_res diagonal logit (default: the preset's)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", default=["residual", "hc", "mhc"])
    parser.add_argument("--out", type=Path, default=Path("runs/stability"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {mode: train(mode, args, args.out) for mode in args.modes}
    print(
        f"\n{args.blocks * 2} residual sublayers, width {args.width}, n={args.streams}, lr {args.lr}, "
        f"{args.steps} steps, seed {args.seed}"
    )
    print("| mode | final loss | max grad norm | max composite gain fwd | max composite gain bwd | minutes |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['final loss']:.3f} | {r['max grad norm']:.3g} | {r['max gain fwd']:.3g} | "
            f"{r['max gain bwd']:.3g} | {r['minutes']:.1f} |"
        )
    for path in write_plots(find_runs([args.out / mode for mode in args.modes]), args.out / "plots"):
        print(path)


if __name__ == "__main__":
    main()
