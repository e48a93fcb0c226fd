"""Soak: the tiny MoE LM (examples/configs/tiny_moe_mhc.yaml) trained for 2,000 steps at a high learning rate, with
mHC and with unconstrained HC, under ``MHCCallback(on_nonfinite="raise")``; then what the non-finite detection costs.

The model and data are the config's (d=64, 4 layers, 8 experts, batch 16x128, gradient clipping 1.0), the learning
rate is raised (default 3e-2, ten times the config's) and everything else is kept. mHC should stay finite; HC may
diverge, and then must be stopped by ``on_nonfinite`` at the step it happens. The first table gives, per mode and
learning rate: steps reached, whether the weights are finite, the step caught (if any), the largest forward composite
gain logged (every 10 steps) and the last logged training loss.

The second table times the training step (forward, backward, detection, AdamW) of the mHC model with the detection on
and with it off, in interleaved rounds on one process (``--overhead-rounds`` rounds of ``--overhead-steps`` steps
each way), and reports median step times and the median over rounds of the same-round ratio.

    .venv/bin/python benchmarks/soak.py                       # 2,000 steps x 2 modes + overhead: ~15 min, 1 thread
    .venv/bin/python benchmarks/soak.py --steps 20 --overhead-rounds 1 --overhead-steps 5   # smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from lightning_mhc import MHCCallback
from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.models import MoETransformerLM
from lightning_mhc.nonfinite import NonFiniteError, NonFiniteGuard, first_nonfinite_state

CONFIG = Path(__file__).parents[1] / "examples" / "configs" / "tiny_moe_mhc.yaml"


def tiny_moe(lr: float, seed: int = 0) -> tuple[MoETransformerLM, ByteLMDataModule, dict]:
    """The config's model (with learning rate ``lr``), data module, and MHCCallback arguments."""
    config = OmegaConf.to_container(OmegaConf.load(CONFIG), resolve=True)
    torch.manual_seed(seed)
    model = MoETransformerLM(**{**config["model"]["init_args"], "lr": lr})
    data = ByteLMDataModule(**config["data"]["init_args"])
    mhc_args = next(c["init_args"] for c in config["trainer"]["callbacks"] if c["class_path"].endswith("MHCCallback"))
    return model, data, mhc_args


ACCELERATOR = "cpu"  # --accelerator


def make_trainer(steps: int, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        accelerator=ACCELERATOR,
        devices=1,
        max_steps=steps,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def soak(mode: str, lr: float, steps: int) -> dict:
    """Train ``steps`` steps in ``mode``; what happened, as one table row."""
    model, data, mhc_args = tiny_moe(lr)
    callback = MHCCallback(**{**mhc_args, "mode": mode, "init": "onehot" if mode == "mhc" else "paper"})
    trainer = make_trainer(steps, [callback])
    caught, start = None, time.perf_counter()
    try:
        trainer.fit(model, datamodule=data)
    except NonFiniteError as error:
        caught = error.step
    gains = [h["mhc/gain_fwd_composite"] for h in callback.history]
    return {
        "mode": mode,
        "lr": lr,
        "steps": trainer.global_step,
        "finite": first_nonfinite_state(model) is None,
        "caught": caught,
        "max_gain": max((g for g in gains if math.isfinite(g)), default=math.nan),
        "loss": float(trainer.callback_metrics.get("train_loss", math.nan)),
        "seconds": time.perf_counter() - start,
    }


class StepTimes(L.Callback):
    """Wall time of each training step, batch start to batch end (the optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._start)


class NoChecks(NonFiniteGuard):
    """A guard that checks nothing: MHCCallback exactly as before the detection existed."""

    def start(self, layer_names: list[str], check_gradients: bool = True) -> bool:
        return False

    def observe_loss(self, loss: torch.Tensor) -> None:
        pass

    def check(self, trainer, module, optimizer) -> None:
        pass


def time_calls(obj: object, names: tuple[str, ...], clock: list[float]) -> None:
    """Make ``obj``'s methods ``names`` add their wall time to ``clock[0]`` (exact on CPU, where ops are synchronous;
    on CUDA it shows launch time, plus the wait for the step's kernels at the one flag read)."""
    for name in names:
        method = getattr(obj, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                clock[0] += time.perf_counter() - start

        setattr(obj, name, timed)


def overhead(lr: float, rounds: int, steps: int) -> dict:
    """Median step time with and without detection, timed in interleaved rounds on the same model and data."""
    runs = {}
    for name in ("on", "off"):
        model, data, mhc_args = tiny_moe(lr)
        callback = MHCCallback(**mhc_args)
        if name == "off":
            callback.guard = NoChecks("raise", 1)
        runs[name] = (model, data, callback)
    inside = [0.0]  # seconds spent in the detection's own calls, over all steps of the "on" fits
    time_calls(runs["on"][2].guard, ("observe_loss", "check"), inside)
    time_calls(runs["on"][2].guard.watch, ("add_h_res",), inside)
    inside_steps = 0
    times: dict[str, list[float]] = {"on": [], "off": []}
    ratios = []
    for _ in range(rounds):
        medians = {}
        for name, (model, data, callback) in runs.items():
            timer = StepTimes()
            make_trainer(steps + 2, [callback, timer]).fit(model, datamodule=data)
            inside_steps += len(timer.times) if name == "on" else 0
            measured = timer.times[2:]  # the first steps of a fit warm up
            times[name] += measured
            medians[name] = statistics.median(measured)
        ratios.append(medians["on"] / medians["off"])
    return {
        "on_ms": 1e3 * statistics.median(times["on"]),
        "off_ms": 1e3 * statistics.median(times["off"]),
        "ratio": statistics.median(ratios),
        "inside_ms": 1e3 * inside[0] / inside_steps,
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-2])
    parser.add_argument("--modes", nargs="+", default=["mhc", "hc"])
    parser.add_argument("--overhead-rounds", type=int, default=7)
    parser.add_argument("--overhead-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--accelerator", default="cpu", help="'cuda' runs the Triton kernels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global ACCELERATOR
    ACCELERATOR = args.accelerator

    where = f"{args.accelerator}, {args.threads} thread(s)"
    lines = [f"Soak: tiny MoE ({CONFIG.name}), {args.steps} steps, on_nonfinite='raise', {where}", ""]
    lines += [
        "| mode | lr | steps reached | finite? | caught at step | max composite gain (fwd) | last loss | wall s |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for lr in args.lr:
        for mode in args.modes:
            r = soak(mode, lr, args.steps)
            caught = "-" if r["caught"] is None else str(r["caught"])
            lines.append(
                f"| {r['mode']} | {r['lr']:g} | {r['steps']} | {'yes' if r['finite'] else 'no'} | {caught} | "
                f"{r['max_gain']:.4g} | {r['loss']:.3f} | {r['seconds']:.0f} |"
            )
            print(lines[-1], flush=True)
    o = overhead(args.lr[0], args.overhead_rounds, args.overhead_steps)
    lines += ["", f"Non-finite detection cost: mHC tiny MoE, lr {args.lr[0]:g}, {where}, {args.overhead_rounds} "]
    lines[-1] += f"interleaved rounds x {args.overhead_steps} steps each way (first 2 steps of each fit not timed)"
    lines += [""]
    lines += [
        "| detection | median step ms | ratio on/off (median of same-round ratios) | ms per step in its own calls |"
    ]
    lines += ["|---|---|---|---|", f"| off | {o['off_ms']:.2f} | 1 | - |"]
    ratios = ", ".join(f"{r:.3f}" for r in o["ratios"])
    lines += [f"| on | {o['on_ms']:.2f} | {o['ratio']:.4f} (rounds: {ratios}) | {o['inside_ms']:.3f} |"]
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
