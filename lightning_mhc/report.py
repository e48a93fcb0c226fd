"""``lightning-mhc report LOGDIR...``: PNG plots of a run's stability from its CSV or TensorBoard logs.

Plots: training loss, gradient norm, composite forward/backward Amax gain over steps (the paper's Fig. 3 /
Fig. 7 views, log scale), and the composite gain per layer depth at the last logged step. One colour per run.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections.abc import Sequence
from pathlib import Path

Series = list[tuple[int, float]]
Run = dict[str, Series]

DEPTH_PATTERN = re.compile(r"^mhc/composite_(fwd|bwd)/depth_(\d+)$")
LOSS_KEYS = ("train_loss", "train_loss_step", "loss")


def read_csv_metrics(path: Path) -> Run:
    """Every numeric column of a Lightning ``CSVLogger`` ``metrics.csv`` as ``key -> [(step, value)]``."""
    run: Run = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                run.setdefault(key, []).append((int(float(step)), float(value)))
    return run


def read_tensorboard_metrics(directory: Path) -> Run:
    """Every scalar of the TensorBoard event files in ``directory`` as ``key -> [(step, value)]``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def find_runs(logdirs: Sequence[str | Path]) -> dict[str, Run]:
    """Runs under each log directory: every ``metrics.csv`` and every folder of TensorBoard event files."""
    runs: dict[str, Run] = {}
    for logdir in map(Path, logdirs):
        if not logdir.exists():
            raise FileNotFoundError(f"{logdir} does not exist; pass the log directory of a run (e.g. its log_dir).")
        sources = [(p, read_csv_metrics) for p in sorted(logdir.rglob("metrics.csv"))]
        event_dirs = sorted({p.parent for p in logdir.rglob("events.out.tfevents.*")})
        sources += [(d, read_tensorboard_metrics) for d in event_dirs]
        for source, read in sources:
            name = str(source.parent if source.is_file() else source)
            run = read(source)
            if run:
                runs[name] = run
    if not runs:
        raise ValueError(
            f"No metrics.csv or TensorBoard event files with scalars under {', '.join(map(str, logdirs))}; pass the "
            "directory a CSVLogger or TensorBoardLogger wrote to."
        )
    return _short_names(runs)


def _short_names(runs: dict[str, Run]) -> dict[str, Run]:
    """Drop the path prefix all runs share, so legends stay readable."""
    names = list(runs)
    if len(names) == 1:
        return {Path(names[0]).name or names[0]: runs[names[0]]}
    parts = [Path(n).parts for n in names]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return {str(Path(*Path(n).parts[common:])): runs[n] for n in names}


def _loss_key(run: Run) -> str | None:
    for key in LOSS_KEYS:
        if key in run:
            return key
    return next((k for k in run if "loss" in k and not k.startswith(("mhc/", "val"))), None)


def last_depth_profile(run: Run, direction: str) -> list[tuple[int, float]]:
    """Composite gain per depth at the last logged step, from the ``mhc/composite_{dir}/depth_NNN`` keys."""
    profile = []
    for key, series in run.items():
        match = DEPTH_PATTERN.match(key)
        if match and match.group(1) == direction and series:
            profile.append((int(match.group(2)), series[-1][1]))
    return sorted(profile)


def write_plots(runs: dict[str, Run], out_dir: str | Path) -> list[Path]:
    """Write the four PNGs for ``runs`` into ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    written = []

    def _finish(fig, ax, title: str, xlabel: str, ylabel: str, log: bool, path: Path) -> None:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def over_steps(filename: str, title: str, ylabel: str, keys: dict[str, str], log: bool) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for name, run in runs.items():
            for key, style in keys.items():
                key = _loss_key(run) if key == "loss" else key
                series = run.get(key) if key else None
                if series:
                    steps, values = zip(*series)
                    label = name if len(keys) == 1 else f"{name} ({'backward' if '_bwd_' in key else 'forward'})"
                    ax.plot(steps, values, style, color=colours[name], label=label)
        _finish(fig, ax, title, "training step", ylabel, log, out / filename)

    over_steps("loss.png", "Training loss", "loss (nats)", {"loss": "-"}, log=False)
    over_steps("grad_norm.png", "Gradient norm", "total gradient L2 norm", {"mhc/grad_norm": "-"}, log=True)
    over_steps(
        "composite_gain.png",
        "Composite Amax gain of H_res over the whole stack",
        "Amax gain (solid: forward, dashed: backward)",
        {"mhc/gain_fwd_composite": "-", "mhc/gain_bwd_composite": "--"},
        log=True,
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, run in runs.items():
        for direction, style in (("fwd", "-o"), ("bwd", "--s")):
            profile = last_depth_profile(run, direction)
            if profile:
                depths, gains = zip(*profile)
                ax.plot(depths, gains, style, color=colours[name], markersize=3, label=f"{name} ({direction})")
    _finish(
        fig,
        ax,
        "Composite Amax gain by depth, last logged step",
        "sublayer depth (H_res_l ... H_res_0)",
        "Amax gain",
        True,
        out / "composite_gain_by_depth.png",
    )
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Entry point of ``lightning-mhc report``."""
    parser = argparse.ArgumentParser(prog="lightning-mhc report", description=__doc__.splitlines()[0])
    parser.add_argument("logdirs", nargs="+", help="log directories of one or more runs (CSV or TensorBoard)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: <first logdir>/plots)")
    args = parser.parse_args(argv)
    runs = find_runs(args.logdirs)
    written = write_plots(runs, args.out or Path(args.logdirs[0]) / "plots")
    for path in written:
        print(path)
    return written
