"""MHCPipelineStrategy: the same training as one process, on 2 CPU processes (gloo).

Each multi-process test runs this file as a script (``python tests/test_pipeline.py fit OUT ...``); Lightning's own
launcher starts the second rank. The script saves, per rank, the logged losses, the first step's gradients of the
parameters that rank trains, and the weights after training; the test compares them with the same training in one
process (without a pipeline).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).parent))

import lightning as L  # noqa: E402
from block_styles import VOCAB  # noqa: E402
from lit_models import LitLM, token_loader, trainer  # noqa: E402

from lightning_mhc import MHCCallback, MHCPipelineStrategy  # noqa: E402
from lightning_mhc.models import MoETransformerLM  # noqa: E402

STEPS = 3


class _Embed(nn.Module):
    """NanoGPT's token + position embedding, as one part (holds the model's own embedding modules)."""

    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding) -> None:
        super().__init__()
        self.wte, self.wpe = wte, wpe

    def forward(self, idx):
        return self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))


class PipeLitLM(LitLM):
    """The test block-style LM (nanoGPT) with the pipeline protocol, trained with SGD (updates proportional to the
    gradients, so equal weights after training mean equal gradients at every step)."""

    def pipeline_parts(self):
        t = self.model.transformer
        return _Embed(t.wte, t.wpe), t.h, nn.Sequential(t.ln_f, self.model.lm_head)

    def pipeline_batch(self, batch):
        (tokens,) = batch
        return tokens[:, :-1], tokens[:, 1:]

    def pipeline_loss(self, logits, targets):
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)  # momentum: optimizer state to resume


class PipeMoELM(MoETransformerLM):
    """The bundled MoE LM (a dense block, then MoE blocks of 4 experts, top-2, a shared expert), small, on the test
    token batches ``(tokens,)``, trained with SGD like :class:`PipeLitLM`."""

    def __init__(self, depth: int = 4, balancing: str = "none") -> None:
        super().__init__(
            vocab_size=VOCAB,
            d_model=32,
            n_layers=depth,
            n_heads=4,
            seq_len=16,
            dense_ffn_size=64,
            num_experts=4,
            top_k=2,
            expert_ffn_size=32,
            shared_expert_size=32,
            balancing=balancing,
            bias_update_rate=1e-2,
            moe_backend="torch",
        )

    def pipeline_batch(self, batch):
        (tokens,) = batch
        return tokens[:, :-1], tokens[:, 1:]

    def training_step(self, batch, batch_idx):
        return super().training_step(self.pipeline_batch(batch), batch_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


class Record(L.Callback):
    """Loads the initial weights (when given) at the start; records the losses, the first step's gradients and the
    stability metrics."""

    def __init__(self, out: Path, initial: Path | None = None, tag: str = "", moe: bool = False) -> None:
        self.out, self.initial, self.tag, self.moe = out, initial, tag, moe
        self.losses, self.grads = [], None

    def on_train_start(self, trainer, pl_module):
        if self.initial is not None:
            pl_module.load_state_dict(torch.load(self.initial))
        elif trainer.global_rank == 0 and trainer.global_step == 0:
            torch.save(pl_module.state_dict(), self.out / initial_weights(self.moe))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(trainer.callback_metrics["train_loss"]))

    def on_train_end(self, trainer, pl_module):
        history = next(c.history for c in trainer.callbacks if isinstance(c, MHCCallback))
        record = {"losses": self.losses, "grads": self.grads, "history": history}
        torch.save(record, self.out / f"record{self.tag}{trainer.global_rank}.pt")


def initial_weights(moe: bool) -> str:
    """The file of a run's initial weights (every run of one model kind starts from the same, seed 0)."""
    return "initial-moe.pt" if moe else "initial.pt"


def _called_from(function: str) -> bool:
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_name != function:
        frame = frame.f_back
    return frame is not None


class PlantedFailure(L.Callback):
    """From the second step on, this rank's stages raise in their forward (with ``overlapped``: only inside one of
    DualPipeV's overlapped forward/backward pairs, while the backward's gradient may still be in flight)."""

    def __init__(self, rank: int, overlapped: bool) -> None:
        self.rank, self.overlapped = rank, overlapped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != 1 or trainer.global_rank != self.rank:
            return
        for s in trainer.strategy.local_stages:
            stage = trainer.strategy.stage_modules[s]
            stage.forward = self._failing(stage.forward)

    def _failing(self, forward):
        def failing(*args):
            if not self.overlapped or _called_from("overlap_forward_backward"):
                raise RuntimeError("planted failure")
            return forward(*args)

        return failing


def fit(
    out: Path,
    strategy,
    devices: int,
    initial: Path | None = None,
    depth: int = 4,
    mode: str = "mhc",
    max_steps: int = STEPS,
    samples: int = 16,
    save: str | None = None,
    resume: str | None = None,
    tag: str = "",
    clip: float | None = None,
    batch_size: int = 4,
    distributed_sampler: bool = False,
    fail: tuple[int, bool] | None = None,
    mhc: dict | None = None,
    moe: str | None = None,
    accumulate: int = 1,
) -> L.LightningModule:
    torch.manual_seed(0)
    model = PipeLitLM(depth=depth) if moe is None else PipeMoELM(depth=depth, balancing=moe)
    hc = MHCCallback(streams=4, mode=mode, gate_init=0.3, log_every_n_steps=1, **(mhc or {}))
    callbacks = [hc, Record(out, initial, tag, moe=moe is not None)]
    callbacks += [PlantedFailure(*fail)] if fail else []
    run = trainer(
        max_steps=max_steps,
        devices=devices,
        strategy=strategy,
        callbacks=callbacks,
        use_distributed_sampler=distributed_sampler,
        gradient_clip_val=clip,
        accumulate_grad_batches=accumulate,
    )
    loader = token_loader(samples=samples, batch_size=batch_size)
    if distributed_sampler and devices == 1:  # the order Lightning's distributed sampler gives a pipeline (epoch 0)
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(0)).tolist()
        loader = DataLoader(Subset(loader.dataset, order), batch_size=batch_size)
    run.fit(model, loader, ckpt_path=resume)
    if save is not None:
        run.save_checkpoint(out / save)
    if run.global_rank == 0:
        torch.save(model.state_dict(), out / f"final{tag}.pt")
    return model


def _main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.add_argument("out")
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--fit", default="{}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    strategy = MHCPipelineStrategy(schedule=args.schedule, microbatches=args.microbatches, **json.loads(args.options))
    fit(out, strategy, args.devices, **json.loads(args.fit))


def run_pipeline(
    tmp_path: Path, schedule: str, microbatches: int = 2, devices: int = 2, check=True, fit=None, **options
):
    command = [sys.executable, __file__, "fit", str(tmp_path), "--schedule", schedule, "--fit", json.dumps(fit or {})]
    command += ["--microbatches", str(microbatches), "--devices", str(devices), "--options", json.dumps(options)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def reference(tmp_path: Path, name: str = "reference", **kwargs) -> tuple[dict, dict]:
    """The same training in this process, from the pipeline run's initial weights."""
    ref = tmp_path / name
    ref.mkdir()
    torch.set_num_threads(1)
    model = fit(ref, "auto", 1, initial=tmp_path / initial_weights(kwargs.get("moe") is not None), **kwargs)
    return torch.load(ref / "record0.pt"), model.state_dict()


def _assert_equal_training(
    tmp_path: Path, devices: int = 2, tag: str = "", pp: int | None = None, expected=None, **kwargs
) -> None:
    """The run ``tag`` on ``devices`` processes (replicas of ``pp``-rank pipelines) trained as one process did."""
    expected, final = expected or reference(tmp_path, **kwargs)
    assert len(expected["losses"]) == STEPS
    pp = pp or devices
    records = [torch.load(tmp_path / f"record{tag}{r}.pt") for r in range(devices)]
    for record in records:  # the loss of the last stage (averaged over the replicas) is logged on every rank
        torch.testing.assert_close(record["losses"], expected["losses"], rtol=0, atol=1e-5)
    grads = {}
    for record in records[:pp]:
        assert not grads.keys() & record["grads"].keys()  # every parameter trained by one rank of a pipeline
        grads.update(record["grads"])
    for rank, record in enumerate(records[pp:], pp):  # the other replicas hold the same averaged gradients
        for name, grad in record["grads"].items():
            torch.testing.assert_close(grad, grads[name], rtol=0, atol=1e-6, msg=f"rank {rank}: {name}")
    assert grads.keys() == expected["grads"].keys()
    for name, grad in expected["grads"].items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-5, msg=name)
    pipelined = torch.load(tmp_path / f"final{tag}.pt")
    for name, value in final.items():
        torch.testing.assert_close(pipelined[name], value, rtol=0, atol=1e-5, msg=f"{tag}: {name}")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "microbatches"),
    [("1F1B", 2), ("GPipe", 4), ("Interleaved1F1B", 4), ("ZBVZeroBubble", 4), ("DualPipeV", 4)],
)
def test_pipeline_trains_like_one_process(tmp_path, schedule, microbatches):
    run_pipeline(tmp_path, schedule, microbatches)
    _assert_equal_training(tmp_path)


def run_torchrun(tmp_path: Path, processes: int, runs: dict) -> None:
    """Several pipeline trainings (``runs``, see ``pipeline_torchrun.py``) in one process group under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command += [str(Path(__file__).parent / "pipeline_torchrun.py"), str(tmp_path), json.dumps(runs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


# Four processes under torchrun, one process group for all runs (the test model with 8 blocks, batches of 8): every
# schedule as a 4-rank pipeline, and two data-parallel replicas of a 2-rank pipeline (batches of 4 per replica), the
# test model and the bundled MoE LM (aux-free balancing: the bias steps from the loads summed over the replicas).
FOUR_PROCESS_RUNS = {
    "1F1B": ({"schedule": "1F1B", "microbatches": 4}, {}),
    "GPipe": ({"schedule": "GPipe", "microbatches": 4}, {}),
    "Interleaved1F1B": ({"schedule": "Interleaved1F1B", "microbatches": 8}, {}),
    "ZBVZeroBubble": ({"schedule": "ZBVZeroBubble", "microbatches": 8}, {}),
    "DualPipeV": ({"schedule": "DualPipeV", "microbatches": 8}, {}),
    "dp2-1F1B": ({"schedule": "1F1B", "microbatches": 2, "pipeline_parallel_size": 2}, {"batch_size": 4}),
    "dp2-DualPipeV": ({"schedule": "DualPipeV", "microbatches": 4, "pipeline_parallel_size": 2}, {"batch_size": 4}),
    "dp2-moe-DualPipeV": (
        {"schedule": "DualPipeV", "microbatches": 4, "pipeline_parallel_size": 2},
        {"batch_size": 4, "moe": "aux_free"},
    ),
}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_four_processes_under_torchrun_train_like_one_process(tmp_path):
    """``torchrun --nproc_per_node 4``: each schedule over 4 pipeline ranks, and data parallel x pipeline (2 x 2,
    gradients averaged over the replicas, a distributed sampler over the replicas only, the MoE LM's aux-free bias
    stepped from the loads of both replicas): losses, first-step gradients and final weights equal one process
    training on the full batches."""
    shared = {"depth": 8, "samples": 24, "batch_size": 8}
    runs = {tag: {"strategy": options, "fit": {**shared, **fit}} for tag, (options, fit) in FOUR_PROCESS_RUNS.items()}
    run_torchrun(tmp_path, 4, runs)
    expected = {
        moe: reference(tmp_path, f"reference-{moe}", moe=moe, distributed_sampler=True, **shared)
        for moe in {fit.get("moe") for _, fit in FOUR_PROCESS_RUNS.values()}
    }
    for tag, (options, fit) in FOUR_PROCESS_RUNS.items():
        pp = options.get("pipeline_parallel_size")
        _assert_equal_training(tmp_path, 4, tag, pp=pp, expected=expected[fit.get("moe")])


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("balancing", ["none", "aux_free"])
def test_moe_model_trains_like_one_process(tmp_path, balancing):
    """The bundled MoE LM under 1F1B and DualPipeV, and DualPipeV with recomputation (2 processes, one process group
    for all): losses, first-step gradients and final weights (the aux-free routing bias included) equal one process
    without recomputation (a block re-run in backward routes as its forward did and records no load)."""
    recompute = {"recompute": True, "recompute_layers": 3}
    runs = {
        "1F1B": ({"schedule": "1F1B", "microbatches": 2}, {}),
        "DualPipeV": ({"schedule": "DualPipeV", "microbatches": 4}, {}),
        "DualPipeV-recompute": ({"schedule": "DualPipeV", "microbatches": 4}, {"mhc": recompute}),
    }
    run_torchrun(
        tmp_path,
        2,
        {tag: {"strategy": options, "fit": {"moe": balancing, **fit}} for tag, (options, fit) in runs.items()},
    )
    expected = reference(tmp_path, moe=balancing, distributed_sampler=True)
    for tag in runs:
        _assert_equal_training(tmp_path, 2, tag, expected=expected)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_moe_balancing_loss_is_per_microbatch_as_under_gradient_accumulation(tmp_path):
    """``balancing="aux_loss"``: each microbatch's forward adds its own balancing loss (its expert loads times its
    router scores), as MegaBlocks under Megatron's pipeline and one process under gradient accumulation do; a
    whole-batch loss cannot be formed, since 1F1B runs a microbatch's backward before later microbatches' forwards.
    So the pipeline trains exactly as one process accumulating gradients over the same microbatches (and not as one
    process on the whole batch: the check below shows the two differ, so the comparison can fail)."""
    schedules = {
        "1F1B": {"schedule": "1F1B", "microbatches": 2},
        "DualPipeV": {"schedule": "DualPipeV", "microbatches": 4},
    }
    run_torchrun(
        tmp_path, 2, {tag: {"strategy": options, "fit": {"moe": "aux_loss"}} for tag, options in schedules.items()}
    )
    whole, _ = reference(tmp_path, "reference-whole", moe="aux_loss", distributed_sampler=True)
    for tag, options in schedules.items():
        m = options["microbatches"]
        record, final = reference(
            tmp_path, f"reference-{tag}", moe="aux_loss", distributed_sampler=True, batch_size=4 // m, accumulate=m
        )
        router = [name for name in record["grads"] if "router" in name]
        # the whole batch's balancing loss gives other router gradients, beyond the tolerance compared with below
        assert router and all((record["grads"][n] - whole["grads"][n]).abs().max() > 4e-5 for n in router)
        per_batch = torch.tensor(record["losses"]).view(-1, m).mean(dim=1).tolist()  # logged: the batch's mean
        _assert_equal_training(tmp_path, 2, tag, expected=({**record, "losses": per_batch}, final))


def test_deferred_aux_free_bias_steps_once_from_the_summed_loads():
    """What the pipeline does with its microbatches: the loads of several forwards summed, one bias step, equal to
    one forward of the whole batch."""
    from lightning_mhc.moe import MoEConfig, apply_bias_updates, build_moe, defer_bias_updates

    torch.manual_seed(0)
    config = MoEConfig(
        hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, balancing="aux_free", bias_update_rate=0.1
    )
    whole, split = build_moe(config, backend="torch"), build_moe(config, backend="torch")
    split.load_state_dict(whole.state_dict())
    x = torch.randn(12, 8)
    whole(x)
    assert defer_bias_updates(split) == 1
    for part in x.chunk(3):
        split(part)
    assert torch.equal(split.expert_bias, torch.zeros(4))
    assert apply_bias_updates(split) == 1 and apply_bias_updates(split) == 0
    assert not torch.equal(whole.expert_bias, torch.zeros(4))
    torch.testing.assert_close(split.expert_bias, whole.expert_bias, rtol=0, atol=0)
    defer_bias_updates(split, False)  # back to a step after every forward
    whole(x), split(x)
    torch.testing.assert_close(split.expert_bias, whole.expert_bias, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_dualpipev_without_the_overlap_function_trains_like_one_process(tmp_path):
    """The parametrized test above runs DualPipeV with its overlapped forward/backward pairs in two threads (the
    default); here torch runs them one after the other. Both equal one process."""
    run_pipeline(tmp_path, "DualPipeV", 4, overlap=False)
    _assert_equal_training(tmp_path)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_recomputation_groups_end_at_stage_boundaries(tmp_path):
    """``recompute=True`` with groups of 3 sublayers over 8 (4 blocks): in one process a group spans blocks 1 and 2,
    which DualPipeV puts on stages 1 and 2 (the same rank, handed over locally) — and groups spanning ranks would
    too. Each stage starts its own groups, and the gradients equal one process's."""
    mhc = {"recompute": True, "recompute_layers": 3}
    run_pipeline(tmp_path, "DualPipeV", 4, fit={"mhc": mhc})
    _assert_equal_training(tmp_path, mhc=mhc)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bf16_stream_transfer_stays_close_to_one_process(tmp_path):
    run_pipeline(tmp_path, "1F1B", 2, comm_dtype="bf16")
    expected, _ = reference(tmp_path)
    losses = torch.load(tmp_path / "record1.pt")["losses"]
    torch.testing.assert_close(losses, expected["losses"], rtol=0, atol=2e-2)
    print("bf16 transfer, loss differences:", [a - b for a, b in zip(losses, expected["losses"])])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gradient_clipping_uses_the_norm_over_all_stages(tmp_path):
    run_pipeline(tmp_path, "1F1B", 2, fit={"clip": 0.05})
    _assert_equal_training(tmp_path, clip=0.05)


def test_unknown_schedule_is_refused_at_construction_listing_what_exists():
    with pytest.raises(ValueError, match="schedule='Zigzag' is not available; pass one of .*'1F1B'.*'DualPipeV'"):
        MHCPipelineStrategy(schedule="Zigzag")
    assert MHCPipelineStrategy(schedule="dualpipev").schedule_name == "DualPipeV"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"microbatches": 0}, "microbatches=0"),
        ({"pipeline_parallel_size": -1}, "pipeline_parallel_size=-1"),
        ({"stage_split": [2, 0]}, "stage_split"),
        ({"comm_dtype": "int8"}, "comm_dtype='int8'"),
        ({"data_parallel": "fsdp2"}, "data_parallel='fsdp2' is not supported .* would save no memory"),
        ({"data_parallel": "zero3"}, "data_parallel='zero3' is not allowed"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MHCPipelineStrategy(**kwargs)


def test_strategy_names_are_registered():
    from lightning.pytorch.strategies import StrategyRegistry

    assert StrategyRegistry["mhc_pipeline"]["init_params"] == {"schedule": "1F1B"}
    assert StrategyRegistry["mhc_dualpipev"]["init_params"] == {"schedule": "DualPipeV"}


def test_a_model_without_the_protocol_gets_an_explanation_with_an_example():
    from lightning_mhc.strategies.stages import check_protocol

    with pytest.raises(TypeError, match=r"no pipeline_parts or pipeline_loss(.|\n)*def pipeline_parts\(self\)"):
        check_protocol(LitLM())
    check_protocol(PipeLitLM())


def test_stages_split_evenly_by_parameters_or_as_asked():
    from lightning_mhc.strategies.stages import balanced_split, stage_block_counts

    assert balanced_split([1, 1, 1, 1], 2) == [2, 2]
    assert balanced_split([4, 1, 1, 1, 1], 2) == [1, 4]
    assert balanced_split([1, 1, 1], 3) == [1, 1, 1]
    blocks = PipeLitLM(depth=4).model.transformer.h
    assert stage_block_counts(blocks, 2, [1, 3]) == [1, 3]
    with pytest.raises(ValueError, match="4 stages but the model has only 3 blocks"):
        stage_block_counts(PipeLitLM(depth=3).model.transformer.h, 4, None)
    with pytest.raises(ValueError, match="stage_split=\\[2, 1\\] does not fit"):
        stage_block_counts(blocks, 2, [2, 1])


def test_a_batch_that_microbatches_do_not_divide_is_refused():
    strategy = MHCPipelineStrategy(microbatches=3)
    strategy._microbatches = 3
    with pytest.raises(ValueError, match="batch size 4 is not divisible by microbatches=3"):
        strategy._check_batch(torch.zeros(4, 8), torch.zeros(4, 8))
    strategy._microbatches = 2
    strategy._check_batch(torch.zeros(4, 8), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="Batch shapes changed"):
        strategy._check_batch(torch.zeros(2, 8), torch.zeros(2, 8))


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("schedule", "depth", "microbatches", "message"),
    [
        ("Interleaved1F1B", 2, 4, "4 stages but the model has only 2 blocks"),
        ("1F1B", 4, 3, "not divisible by microbatches=3"),
    ],
)
def test_bad_layouts_fail_on_every_rank_without_hanging(tmp_path, schedule, depth, microbatches, message):
    result = run_pipeline(tmp_path, schedule, microbatches=microbatches, check=False, fit={"depth": depth})
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(("schedule", "rank", "overlapped"), [("1F1B", 0, False), ("DualPipeV", 1, True)])
def test_a_rank_raising_inside_the_schedule_ends_every_rank(tmp_path, schedule, rank, overlapped):
    """A stage raising in its forward (rank 0, Lightning's launching process; or rank 1 inside DualPipeV's overlapped
    forward/backward, while the backward thread waits for its peer) ends both processes with an error, no hang."""
    start = time.monotonic()
    result = run_pipeline(tmp_path, schedule, 4, check=False, fit={"fail": [rank, overlapped], "max_steps": 4})
    assert result.returncode != 0
    assert "planted failure" in result.stderr
    assert time.monotonic() - start < 120


@pytest.mark.slow
@pytest.mark.multiprocess
def test_composite_gain_under_the_pipeline_equals_one_process(tmp_path):
    """HC mode, where the gains leave 1: every logged stability metric, the gradient norm over all stages included,
    equals the single-process value."""
    run_pipeline(tmp_path, "1F1B", 2, fit={"mode": "hc"})
    expected, _ = reference(tmp_path, mode="hc")
    assert abs(expected["history"][-1]["mhc/gain_fwd_composite"] - 1) > 1e-4
    for rank in (0, 1):
        history = torch.load(tmp_path / f"record{rank}.pt")["history"]
        assert len(history) == len(expected["history"]) > 0
        for got, want in zip(history, expected["history"]):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


@pytest.mark.slow
@pytest.mark.multiprocess
def test_checkpoint_resumes_and_loads_into_one_process(tmp_path):
    """Two pipeline steps, a checkpoint, two more steps resumed from it (SGD with momentum, so the optimizer state
    matters; one batch per epoch): the same losses and weights as four steps in one process; the checkpoint loads
    into a single-process model with lightning_mhc.load_from_checkpoint."""
    from lightning_mhc import load_from_checkpoint

    run_pipeline(tmp_path, "1F1B", 2, fit={"max_steps": 2, "samples": 4, "save": "two.ckpt"})
    ckpt = tmp_path / "two.ckpt"
    run_pipeline(tmp_path, "1F1B", 2, fit={"max_steps": 4, "samples": 4, "resume": str(ckpt), "tag": "resumed"})
    expected, final = reference(tmp_path, max_steps=4, samples=4)
    first, resumed = torch.load(tmp_path / "record0.pt"), torch.load(tmp_path / "recordresumed1.pt")
    torch.testing.assert_close(first["losses"] + resumed["losses"], expected["losses"], rtol=0, atol=1e-5)
    pipelined = torch.load(tmp_path / "finalresumed.pt")
    for name, value in final.items():
        torch.testing.assert_close(pipelined[name], value, rtol=0, atol=1e-5, msg=name)
    loaded = load_from_checkpoint(PipeLitLM, ckpt).state_dict()
    two_steps = torch.load(tmp_path / "final.pt")
    assert loaded.keys() == two_steps.keys()
    for name, value in two_steps.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


if __name__ == "__main__":
    _main()


def test_overlap_takes_each_pairs_own_sends_out_of_the_schedule_or_leaves_it_alone():
    """The overlap function sends an overlapped pair's results itself, so it removes the sends torch put right after
    the pair; where torch lays them out otherwise it declines (``None``: the schedule stays as torch built it)."""
    from types import SimpleNamespace

    from torch.distributed.pipelining import schedules as S

    from lightning_mhc.strategies.overlap import _without_pair_sends

    schedule = SimpleNamespace(stage_index_to_group_rank={0: 0, 1: 1, 2: 1, 3: 0}, _num_stages=4)  # a V on 2 ranks
    pair = S._Action(-1, S.OVERLAP_F_B, None, (S._Action(0, S.FORWARD, 3), S._Action(3, S.FULL_BACKWARD, 1)))
    send_f, send_b = S._Action(0, S.SEND_F, 3), S._Action(3, S.SEND_B, 1)
    later = [S._Action(3, S.FORWARD, 2), S._Action(0, S.SEND_F, 4)]
    assert _without_pair_sends(schedule, [pair, send_f, send_b, *later], S.OVERLAP_F_B) == [pair, *later]
    assert _without_pair_sends(schedule, [pair, send_b, send_f, *later], S.OVERLAP_F_B) is None
    assert _without_pair_sends(schedule, [pair, later[0], send_f, send_b], S.OVERLAP_F_B) is None
    assert _without_pair_sends(schedule, [pair, send_f], S.OVERLAP_F_B) is None
    local = SimpleNamespace(stage_index_to_group_rank={0: 0, 1: 0, 2: 1, 3: 1}, _num_stages=4)  # neighbours local
    assert _without_pair_sends(local, [pair, *later], S.OVERLAP_F_B) == [pair, *later]  # nothing to send
