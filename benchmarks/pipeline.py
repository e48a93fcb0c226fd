"""Pipeline schedules of ``MHCPipelineStrategy`` on 2 gloo CPU processes: step time, bubble, hidden transfer.

Every configuration trains the bundled dense LM with mHC injected (``MHCCallback(streams=4)``) for a few steps
under Lightning (``devices=2``, one thread per rank) and measures, per rank and per step, inside the schedule's
``step`` (forward and backward of every microbatch; the optimizer step is outside):

* **step**: wall time of the schedule's ``step`` (the slower rank's).
* **bubble**: the part of the step a rank spends outside its stages' compute (timers around
  ``PipelineStage.forward_one_chunk`` / ``backward_one_chunk`` / ``backward_weight_one_chunk``, overlapping
  intervals merged), averaged over the ranks.
* **hidden**: the fraction of stage-to-stage transfer time that does not lengthen the step,
  ``1 - (step with link - step without) / transfer`` per pair of consecutive steps (median and quartiles), where
  ``transfer`` is the time the rank's sends occupy the emulated link in one step (averaged over the ranks).

**Emulated link.** Gloo on one machine moves the stream state in microseconds, so a slower link is emulated where
``torch.distributed.pipelining`` issues its point-to-point ops (``schedules._batch_p2p``): each send is handed to a
per-peer link thread that first sleeps ``bytes x seconds_per_byte`` and then issues the real gloo send (receives
are posted at once). A send is thus in flight for its link time from the moment the schedule issues it, the
receiver gets the data that much later, and sends to one peer queue behind each other, as on a link of that
bandwidth. The sleep costs no CPU, which matters here: the machine has 2 cores shared with other work, so the two
ranks (one compute thread each, plus DualPipeV's overlap thread) already fill it, and a busy-wait link would steal
compute. ``seconds_per_byte`` is calibrated per configuration in the first steps (no link) so that a rank's transfer
time is ``--transfer-ratio`` (default 1/3) of its compute time. Steps with and without the link then alternate, so
drift on the shared machine hits both alike; the table reports medians, and the ratios (bubble, hidden) are what
to read, not the milliseconds.

    python benchmarks/pipeline.py                    # ~4 min on 2 busy cores
    python benchmarks/pipeline.py --rounds 8 --microbatches 8
    python benchmarks/pipeline.py --quick            # tiny sizes, 2 rounds (smoke)

Pass ``--comm-dtype bf16`` to send the stream state in bf16 (half the bytes of fp32). ``--loss-steps N`` instead
trains 1F1B for N steps on the bundled byte-level corpus twice from the same start, with the stream state sent in
fp32 and in bf16, and prints how far the two loss curves get apart.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules as _schedules
from torch.utils.data import DataLoader, TensorDataset

from lightning_mhc import MHCCallback, MHCPipelineStrategy
from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.models import DenseTransformerLM

CONFIGS = ["GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble", "DualPipeV", "DualPipeV+overlap"]
WARMUP, CALIBRATION = 2, 5


class _DelayedSend:
    """The ``Work`` of a send that the emulated link issues later: ``wait`` waits for the link, then the send."""

    def __init__(self) -> None:
        self.issued = threading.Event()
        self.work: Any = None

    def wait(self) -> bool:
        self.issued.wait()
        return self.work.wait()


class EmulatedLink:
    """Slows the pipeline's sends down to ``seconds_per_byte`` (0: torch's own path, untouched).

    Installed in place of ``torch.distributed.pipelining.schedules._batch_p2p``; one FIFO thread per peer sleeps
    each send's link time, then issues it.
    """

    def __init__(self) -> None:
        self.seconds_per_byte = 0.0
        self.bytes_sent = 0
        self._queues: dict[int, queue.Queue] = {}
        self._original = _schedules._batch_p2p
        _schedules._batch_p2p = self._batch_p2p

    def _batch_p2p(self, ops: list[dist.P2POp], desc: Optional[str] = None) -> list[Any]:
        sends = [op for op in ops if op.op is dist.isend]
        self.bytes_sent += sum(op.tensor.numel() * op.tensor.element_size() for op in sends)
        if self.seconds_per_byte == 0.0 or not sends:
            return self._original(ops, desc)
        works = [dist.irecv(op.tensor, group=op.group, tag=op.tag, group_src=op.group_peer) for op in ops
                 if op.op is not dist.isend]  # fmt: skip
        for op in sends:
            delayed = _DelayedSend()
            self._queue(op.group_peer).put((op, delayed))
            works.append(delayed)
        return works

    def _queue(self, peer: int) -> queue.Queue:
        if peer not in self._queues:
            self._queues[peer] = queue.Queue()
            threading.Thread(target=self._run, args=(self._queues[peer],), daemon=True, name="link").start()
        return self._queues[peer]

    def _run(self, sends: queue.Queue) -> None:
        while True:
            op, delayed = sends.get()
            time.sleep(op.tensor.numel() * op.tensor.element_size() * self.seconds_per_byte)
            delayed.work = dist.isend(op.tensor, group=op.group, tag=op.tag, group_dst=op.group_peer)
            delayed.issued.set()


class Probe(L.Callback):
    """Times the schedule's steps and its stages' compute, switches the emulated link, writes the results."""

    def __init__(self, out: Path, transfer_ratio: float, first_core: int) -> None:
        self.out, self.transfer_ratio, self.first_core = out, transfer_ratio, first_core
        self.link = EmulatedLink()
        self.intervals: list[tuple[float, float]] = []
        self.steps: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cores = sorted(os.sched_getaffinity(0))
        core = cores[(self.first_core + trainer.global_rank) % len(cores)]
        try:
            for thread in os.listdir("/proc/self/task"):  # one core per rank: every thread, and those started later
                os.sched_setaffinity(int(thread), {core})
        except OSError as error:
            print(f"rank {trainer.global_rank} runs unpinned: {error}", file=sys.stderr)
        schedule = trainer.strategy._schedule
        schedule.step = self._timed_step(schedule.step)
        for stage in getattr(schedule, "_stages", None) or [schedule._stage]:
            for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
                setattr(stage, name, self._timed_compute(getattr(stage, name)))

    def _timed_compute(self, compute: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return compute(*args, **kwargs)
            finally:
                self.intervals.append((start, time.perf_counter()))  # list.append is atomic (overlap thread)

        return timed

    def _timed_step(self, step: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.intervals, self.link.bytes_sent = [], 0
            start = time.perf_counter()
            result = step(*args, **kwargs)
            wall = time.perf_counter() - start
            compute = _union(self.intervals)
            self.steps.append(
                {"wall": wall, "compute": compute, "bytes": self.link.bytes_sent, "link": self.link.seconds_per_byte}
            )
            return result

        return timed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        step = trainer.global_step
        if step == WARMUP + CALIBRATION:  # calibrate the link on the calibration steps, agreed over the ranks
            measured = self.steps[WARMUP:]
            mine = torch.tensor(
                [statistics.median(s["compute"] for s in measured), statistics.median(s["bytes"] for s in measured)],
                dtype=torch.float64,
            )
            dist.all_reduce(mine)
            self.calibrated = float(self.transfer_ratio * mine[0] / mine[1])
        if step >= WARMUP + CALIBRATION:
            self.link.seconds_per_byte = self.calibrated if (step - WARMUP - CALIBRATION) % 2 else 0.0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.link.seconds_per_byte = 0.0
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps[WARMUP + CALIBRATION :]))


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by possibly overlapping intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _model(quick: bool) -> DenseTransformerLM:
    if quick:
        return DenseTransformerLM(d_model=32, n_layers=4, n_heads=2, seq_len=16, ffn_size=64, warmup_steps=0)
    return DenseTransformerLM(d_model=128, n_layers=8, n_heads=4, seq_len=128, ffn_size=512, warmup_steps=0)


def worker(args: argparse.Namespace) -> None:
    """One configuration, as one rank (Lightning starts the other by running this command again)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _model(args.quick)
    batch = args.microbatches * args.microbatch_size
    tokens = torch.randint(0, model.vocab_size, (batch * 4, model.seq_len + 1))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch, drop_last=True)
    strategy = MHCPipelineStrategy(
        schedule=args.schedule, microbatches=args.microbatches, overlap=args.overlap, comm_dtype=args.comm_dtype
    )
    probe = Probe(Path(args.out), args.transfer_ratio, args.first_core)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=WARMUP + CALIBRATION + 2 * args.rounds,
        callbacks=[MHCCallback(streams=4, log_every_n_steps=10_000), probe],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)


class LossRecord(L.Callback):
    """Writes the logged training loss of every step (rank 0)."""

    def __init__(self, out: Path) -> None:
        self.out, self.losses = out, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            (self.out / "losses.json").write_text(json.dumps(self.losses))


def loss_worker(args: argparse.Namespace) -> None:
    """1F1B training on the byte-level corpus with the stream state sent in ``--comm-dtype`` (one rank)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _model(args.quick)
    model.lr = 3e-3
    data = ByteLMDataModule(seq_len=model.seq_len, batch_size=args.microbatches * args.microbatch_size)
    strategy = MHCPipelineStrategy(schedule="1F1B", microbatches=args.microbatches, comm_dtype=args.comm_dtype)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=args.loss_steps,
        callbacks=[MHCCallback(streams=4, log_every_n_steps=10_000), LossRecord(Path(args.out))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=data)


def _launch(args: argparse.Namespace, out: str, *extra: str) -> None:
    """Run this script as a worker (its first rank; Lightning starts the second)."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", "--out", out, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=out, timeout=1800)
    if done.returncode:
        sys.exit(f"{' '.join(extra)} failed:\n{done.stderr[-4000:]}")


def compare_losses(args: argparse.Namespace) -> None:
    """Loss curves of fp32 and bf16 stream transfer from the same start."""
    curves = {}
    for dtype in ("fp32", "bf16"):
        with tempfile.TemporaryDirectory() as tmp:
            _launch(args, tmp, "--comm-dtype", dtype)
            curves[dtype] = json.loads((Path(tmp) / "losses.json").read_text())
    fp32, bf16 = curves["fp32"], curves["bf16"]
    diff = [b - a for a, b in zip(fp32, bf16)]
    tail = max(1, len(diff) // 10)
    print(f"1F1B, {len(diff)} steps, byte-level corpus, AdamW lr 3e-3; loss, stream state sent in bf16 minus fp32:")
    print("| steps | fp32 loss (mean) | bf16 loss (mean) | mean diff | max abs diff |")
    print("|---|---|---|---|---|")
    for start in range(0, len(diff), tail):
        a, b, d = fp32[start : start + tail], bf16[start : start + tail], diff[start : start + tail]
        print(
            f"| {start + 1}-{start + len(d)} | {statistics.mean(a):.4f} | {statistics.mean(b):.4f} "
            f"| {statistics.mean(d):+.4f} | {max(abs(x) for x in d):.4f} |"
        )


def summarize(out: Path) -> dict[str, float]:
    """Medians over the steps without and with the link, from both ranks' records. ``hidden`` is the median over
    consecutive (without, with) step pairs of each pair's hidden fraction, so slow drift of the machine cancels;
    ``hidden_lo`` / ``hidden_hi`` are the quartiles of those per-pair values."""
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    rows: dict[str, list[float]] = {k: [] for k in ("off", "on", "bubble_off", "bubble_on", "transfer", "compute")}
    pairs: list[float] = []
    for steps in zip(*ranks):
        on = steps[0]["link"] > 0
        wall = max(s["wall"] for s in steps)
        rows["on" if on else "off"].append(wall)
        bubble = statistics.mean(1 - s["compute"] / s["wall"] for s in steps)
        rows["bubble_on" if on else "bubble_off"].append(bubble)
        if on:
            transfer = statistics.mean(s["bytes"] * s["link"] for s in steps)
            rows["transfer"].append(transfer)
            rows["compute"].append(statistics.mean(s["compute"] for s in steps))
            if len(rows["off"]) == len(rows["on"]):  # this step follows its step without the link
                pairs.append(1 - (wall - rows["off"][-1]) / transfer)
    m = {k: statistics.median(v) for k, v in rows.items()}
    m["ratio"] = m["transfer"] / m["compute"]
    m["hidden"] = statistics.median(pairs)
    m["hidden_lo"], _, m["hidden_hi"] = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else (pairs[0],) * 3
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--microbatch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6, help="steps with and without the link, each")
    parser.add_argument("--transfer-ratio", type=float, default=1 / 3, help="transfer time / compute time per rank")
    parser.add_argument("--comm-dtype", default=None)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    parser.add_argument("--first-core", type=int, default=0, help="rank r runs on the (first-core + r)-th core")
    parser.add_argument("--loss-steps", type=int, default=0, help="compare fp32 and bf16 stream transfer instead")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", help=argparse.SUPPRESS)
    parser.add_argument("--overlap", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    if args.worker:
        (loss_worker if args.loss_steps else worker)(args)
        return
    if args.loss_steps:
        compare_losses(args)
        return
    print(
        f"2 gloo processes x 1 thread, dense LM with mHC (n=4), {args.microbatches} microbatches of "
        f"{args.microbatch_size}, link calibrated to transfer = {args.transfer_ratio:.2f} x compute, "
        f"comm_dtype={args.comm_dtype}, {args.rounds} steps with and without the link (medians)\n"
    )
    print("| schedule | overlap | step ms (no link) | step ms (link) | bubble (no link) | bubble (link) "
          "| transfer / compute | transfer hidden (quartiles) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        schedule, overlap = config.removesuffix("+overlap"), config.endswith("+overlap")
        with tempfile.TemporaryDirectory() as tmp:
            _launch(args, tmp, "--schedule", schedule, "--overlap", str(int(overlap)))
            m = summarize(Path(tmp))
        print(
            f"| {schedule} | {'yes' if overlap else 'no'} | {1e3 * m['off']:.1f} | {1e3 * m['on']:.1f} "
            f"| {m['bubble_off']:.2f} | {m['bubble_on']:.2f} | {m['ratio']:.2f} "
            f"| {m['hidden']:.2f} ({m['hidden_lo']:.2f}–{m['hidden_hi']:.2f}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
