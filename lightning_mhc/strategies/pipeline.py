"""MHCPipelineStrategy: pipeline-parallel training of an mHC model in Lightning, on ``torch.distributed.pipelining``.

Every process builds the whole LightningModule (and :class:`~lightning_mhc.MHCCallback` injects mHC into it), then
the strategy cuts it into stages (``stages.py``), keeps only its own stages' parameters in the optimizers and runs
the chosen ``torch.distributed.pipelining`` schedule (forward and backward over the microbatches) as Lightning's
training step. The ``(..., n, C)`` stream state is what crosses the stage boundaries. With more processes than
pipeline ranks, a 2-D device mesh ``(dp, pp)`` holds data-parallel replicas of the pipeline: global rank
``dp_rank * pipeline_parallel_size + pp_rank``; gradients are averaged over the ``dp`` dimension after each step.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as _schedules

from lightning_mhc.capture import StreamCapture
from lightning_mhc.metrics import StreamDiversity
from lightning_mhc.mhc_block import MHCBlock
from lightning_mhc.moe import apply_bias_updates, defer_bias_updates, set_balance_group
from lightning_mhc.strategies.overlap import register_overlap
from lightning_mhc.strategies.stages import (
    StageModule,
    check_protocol,
    pipeline_parts,
    split_batch,
    stage_block_counts,
)

# Our names of the schedules and the classes of torch.distributed.pipelining that implement them (when present).
_SCHEDULE_CLASSES = {
    "GPipe": "ScheduleGPipe",
    "1F1B": "Schedule1F1B",
    "Interleaved1F1B": "ScheduleInterleaved1F1B",
    "LoopedBFS": "ScheduleLoopedBFS",
    "InterleavedZeroBubble": "ScheduleInterleavedZeroBubble",
    "ZBVZeroBubble": "ScheduleZBVZeroBubble",
    "DualPipeV": "ScheduleDualPipeV",
}
# Schedules whose ranks hold two stages placed in a V (rank r: stages r and 2P-1-r); the other multi-stage ones loop.
_V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")
_COMM_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FSDP2_REFUSAL = (
    "data_parallel='fsdp2' is not supported by MHCPipelineStrategy: every process keeps a full copy of the model "
    "(refreshed from the stages for validation, checkpoints and the single-process checkpoint format), so sharding "
    "a stage's parameters over the data-parallel replicas would save no memory while adding an all-gather before and "
    "a reduce-scatter after every microbatch. Use data_parallel='ddp' (gradients all-reduced over the replicas)."
)


def available_schedules() -> list[str]:
    """The schedule names this installation of torch provides."""
    return [name for name, cls in _SCHEDULE_CLASSES.items() if hasattr(_schedules, cls)]


def _resolve_schedule(name: str) -> str:
    found = {s.lower(): s for s in available_schedules()}
    if not isinstance(name, str) or name.lower() not in found:
        raise ValueError(
            f"schedule={name!r} is not available; pass one of {', '.join(map(repr, available_schedules()))} "
            f"(what torch {torch.__version__} provides)."
        )
    return found[name.lower()]


def _positive_int(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r} is not allowed; pass an integer >= 1 or None.")


class MHCPipelineStrategy(DDPStrategy):
    """Pipeline-parallel training for mHC models: one pipeline over all processes, each holding one stage (two for
    the multi-stage schedules), on ``torch.distributed.pipelining``.

    Example::

        trainer = L.Trainer(devices=2, strategy=MHCPipelineStrategy(schedule="1F1B", microbatches=4),
                            callbacks=[MHCCallback(streams=4)])
        trainer.fit(MoETransformerLM(), datamodule=ByteLMDataModule())

    or ``strategy="mhc_pipeline"`` (1F1B) / ``strategy="mhc_dualpipev"`` (DualPipeV).

    The LightningModule implements the pipeline protocol (``pipeline_parts``, ``pipeline_loss``, optionally
    ``pipeline_batch``; see ``lightning_mhc.strategies.stages``). The training step runs the schedule (forward and
    backward of every microbatch) instead of the module's ``training_step`` and logs the batch's mean loss as
    ``loss_name`` on every rank; validation, test and predict run the module's own steps on every rank after the
    weights of all stages are gathered. Automatic optimization, LR schedulers, gradient accumulation and gradient
    clipping (by the global norm over all stages) work as usual. Checkpoints hold the full, consolidated weights (a
    checkpoint loads into a single process with :func:`lightning_mhc.load_from_checkpoint`) and each stage's
    optimizer state. MoE layers with ``balancing="aux_free"`` step their routing bias once per batch, from the loads
    of all its microbatches (summed over the replicas), as one process does; with ``balancing="aux_loss"`` each
    microbatch adds its own balancing loss, as under gradient accumulation.

    Args:
        schedule: ``"GPipe"``, ``"1F1B"``, ``"Interleaved1F1B"``, ``"LoopedBFS"``, ``"InterleavedZeroBubble"``,
            ``"ZBVZeroBubble"`` or ``"DualPipeV"`` (those the installed torch has; case-insensitive).
        microbatches: microbatches per batch (must divide the batch size); default: the number of stages.
        pipeline_parallel_size: processes in one pipeline (must divide the number of processes); default: all. With
            fewer, ``world_size / pipeline_parallel_size`` data-parallel replicas of the pipeline each take their share
            of the batches (a distributed sampler over the replicas) and average their gradients after each step.
        data_parallel: how the replicas are kept in step: ``"ddp"`` (gradients all-reduced). ``"fsdp2"`` is refused
            with the reason.
        stage_split: blocks per stage, e.g. ``[3, 5]``; default: balanced by the blocks' parameter counts.
        comm_dtype: dtype of the stream state between stages (``"bf16"``, ``"fp16"``, ``"fp32"`` or a
            ``torch.dtype``); default: the compute dtype.
        loss_name: the name the training loss is logged under.
        overlap: for DualPipeV, run each overlapped forward/backward pair in the order its inputs arrive and send each
            result as soon as it is computed, so transfers overlap the other half's compute (see ``overlap.py``);
            ``False`` leaves torch's sequential default.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (process group, timeout, ...).
    """

    strategy_name = "mhc_pipeline"

    def __init__(
        self,
        schedule: str = "1F1B",
        microbatches: Optional[int] = None,
        pipeline_parallel_size: Optional[int] = None,
        data_parallel: str = "ddp",
        stage_split: Optional[list[int]] = None,
        comm_dtype: Optional[Union[str, torch.dtype]] = None,
        loss_name: str = "train_loss",
        overlap: bool = True,
        **kwargs: Any,
    ) -> None:
        self.schedule_name = _resolve_schedule(schedule)
        _positive_int("microbatches", microbatches)
        _positive_int("pipeline_parallel_size", pipeline_parallel_size)
        if data_parallel == "fsdp2":
            raise ValueError(_FSDP2_REFUSAL)
        if data_parallel != "ddp":
            raise ValueError(f"data_parallel={data_parallel!r} is not allowed; pass 'ddp'.")
        if stage_split is not None:
            stage_split = list(stage_split)
            if not stage_split or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stage_split):
                raise ValueError(f"stage_split={stage_split!r} is not allowed; pass a list of block counts >= 1.")
        if isinstance(comm_dtype, str):
            if comm_dtype not in _COMM_DTYPES:
                raise ValueError(f"comm_dtype={comm_dtype!r} is not allowed; pass one of {list(_COMM_DTYPES)} or None.")
            comm_dtype = _COMM_DTYPES[comm_dtype]
        elif comm_dtype is not None and not (isinstance(comm_dtype, torch.dtype) and comm_dtype.is_floating_point):
            raise ValueError(f"comm_dtype={comm_dtype!r} is not allowed; pass a floating torch.dtype, a name or None.")
        if "start_method" in kwargs and kwargs["start_method"] != "popen":
            raise ValueError("MHCPipelineStrategy runs its processes as scripts (start_method='popen') only.")
        super().__init__(**kwargs)
        self.microbatches = microbatches
        self.pipeline_parallel_size = pipeline_parallel_size
        self.data_parallel = data_parallel
        self.stage_split = stage_split
        self.comm_dtype = comm_dtype
        self.loss_name = loss_name
        self.overlap = overlap
        self.stages_per_rank = 2 if self.schedule_name not in ("GPipe", "1F1B") else 1
        self.stage_modules: list[StageModule] = []  # all stages of the pipeline, in order (every rank knows them)
        self.local_stages: list[int] = []
        self._schedule: Any = None
        self._batch_shape: Optional[tuple] = None
        self._loss_fn_scale = 1.0
        self._pending_grads: list[tuple[nn.Parameter, Optional[Tensor]]] = []
        self._pp_group: Any = None
        self._dp_group: Any = None

    # ----------------------------------------------------------------------------------------------------- layout
    @property
    def num_stages(self) -> int:
        return self.pp_size * self.stages_per_rank

    @property
    def pp_size(self) -> int:
        """Processes in one pipeline."""
        return self.pipeline_parallel_size or self.world_size

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas of the pipeline."""
        return self.world_size // self.pp_size

    @property
    def pp_rank(self) -> int:
        """This process's rank inside its pipeline."""
        return self.global_rank % self.pp_size

    @property
    def dp_rank(self) -> int:
        """The index of this process's pipeline replica."""
        return self.global_rank // self.pp_size

    def stage_to_rank(self, stage: int) -> int:
        """The pipeline rank (inside a replica) that runs ``stage``."""
        p = self.pp_size
        if self.stages_per_rank == 1:
            return stage
        if self.schedule_name in _V_SCHEDULES:
            return stage if stage < p else 2 * p - 1 - stage
        return stage % p

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every stage of a pipeline sees the same batches; the replicas split them
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    # ------------------------------------------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer) -> None:
        module = self.lightning_module
        check_protocol(module)
        if self.world_size % self.pp_size:
            raise ValueError(
                f"pipeline_parallel_size={self.pipeline_parallel_size} does not divide the {self.world_size} "
                "processes; pass a divisor (the processes form world_size / pipeline_parallel_size data-parallel "
                "replicas)."
            )
        if not module.automatic_optimization:
            raise ValueError("MHCPipelineStrategy runs the backward pass itself: use automatic optimization.")
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        _sync_module_states(self.model)  # every rank built (and injected) its own copy: start from rank 0's
        mesh = init_device_mesh(self.root_device.type, (self.dp_size, self.pp_size), mesh_dim_names=("dp", "pp"))
        self._pp_group, self._dp_group = mesh.get_group("pp"), mesh.get_group("dp")
        # MoE layers would sum their expert loads over all processes, which run different stages: a stage sees its
        # replica's whole batch, so the load is its own counts summed over the replicas
        set_balance_group(module, self._dp_group if self.dp_size > 1 else None)
        # ... and step the aux-free bias once per batch, from the loads of all its microbatches (as one process does
        # with one forward of the whole batch), not after every microbatch
        defer_bias_updates(module, True)
        self._build_stages(module)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._keep_local_parameters()
            self._build_schedule(trainer)
            self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm
        self.setup_precision_plugin()

    def _build_stages(self, module: L.LightningModule) -> None:
        embedding, blocks, head = pipeline_parts(module)
        counts = stage_block_counts(blocks, self.num_stages, self.stage_split)
        if self.microbatches is not None and self.schedule_name in _V_SCHEDULES and self.microbatches < self.num_stages:
            raise ValueError(
                f"schedule={self.schedule_name!r} needs at least as many microbatches as stages ({self.num_stages}); "
                f"got microbatches={self.microbatches}."
            )
        first = blocks[0]
        reduce = "sum" if isinstance(first, MHCBlock) and first.reduce == "sum" else "mean"
        if isinstance(first, MHCBlock) and first.channels_first:
            raise ValueError("MHCPipelineStrategy does not support channels-first block stacks yet.")
        shared = _shared_parameters([embedding, head], blocks, counts)
        if shared:
            raise ValueError(
                f"Parameters {shared} are shared between pipeline stages (tied embeddings?); untie them "
                "(e.g. tie_embeddings=False for the bundled models)."
            )
        self.stage_modules, start = [], 0
        for s, count in enumerate(counts):
            self.stage_modules.append(
                StageModule(
                    s,
                    len(counts),
                    embedding if s == 0 else None,
                    list(blocks[start : start + count]),
                    head if s == len(counts) - 1 else None,
                    reduce=reduce,
                    comm_dtype=self.comm_dtype,
                )
            )
            start += count
        self.local_stages = [s for s in range(self.num_stages) if self.stage_to_rank(s) == self.pp_rank]

    def _keep_local_parameters(self) -> None:
        """Optimizers step only this rank's stages' parameters (their state is per stage)."""
        local = {id(p) for s in self.local_stages for p in self.stage_modules[s].parameters()}
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) in local]

    def _build_schedule(self, trainer: L.Trainer) -> None:
        microbatches = self.microbatches or self.num_stages
        self._microbatches = microbatches
        self._loss_fn_scale = 1.0 / (microbatches * trainer.accumulate_grad_batches)
        stages = [
            PipelineStage(self.stage_modules[s], s, self.num_stages, self.root_device, group=self._pp_group)
            for s in self.local_stages
        ]
        for s in self.local_stages:
            self.stage_modules[s].aux_scale = self._loss_fn_scale
        module = self.lightning_module
        scale = self._loss_fn_scale

        def loss_fn(output: Tensor, target: Tensor) -> Tensor:
            return module.pipeline_loss(output, target) * scale

        cls = getattr(_schedules, _SCHEDULE_CLASSES[self.schedule_name])
        kwargs = {"n_microbatches": microbatches, "loss_fn": loss_fn, "scale_grads": False}
        self._schedule = cls(stages[0], **kwargs) if self.stages_per_rank == 1 else cls(stages, **kwargs)
        if self.schedule_name == "DualPipeV" and self.overlap and not register_overlap(self._schedule):
            rank_zero_warn(
                f"DualPipeV runs its forward/backward pairs one after the other: torch {torch.__version__} lacks the "
                "hook (or the schedule layout) the overlap function needs. Pass overlap=False to silence this."
            )

    # ----------------------------------------------------------------------------------------------- training step
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        batch = args[0] if args else kwargs["batch"]
        module = self.lightning_module
        inputs, targets = split_batch(module, batch)
        self._check_batch(inputs, targets)
        has_first = 0 in self.local_stages
        has_last = self.num_stages - 1 in self.local_stages
        losses: list[Tensor] = []
        capture = _attached_capture(module)
        for s in self.local_stages:
            self.stage_modules[s].captured = []
        inputs, targets = self.precision_plugin.convert_input((inputs, targets))
        params = [p for s in self.local_stages for p in self.stage_modules[s].parameters() if p.requires_grad]
        earlier = [p.grad for p in params]  # Lightning zeroes gradients between the step and backward()
        for p in params:
            p.grad = None
        with self.precision_plugin.train_step_context():
            self._schedule.step(
                *((inputs,) if has_first else ()),
                target=targets if has_last else None,
                losses=losses if has_last else None,
            )
        for s in self.local_stages:
            apply_bias_updates(self.stage_modules[s].blocks)
        self._pending_grads = [(p, p.grad) for p in params]
        for p, grad in zip(params, earlier):
            p.grad = grad
        loss = torch.zeros((), device=self.root_device, dtype=torch.float32)
        if has_last:
            loss = (torch.stack([x.detach().float() for x in losses]).sum() / self._loss_fn_scale) / self._microbatches
        dist.broadcast(loss, group=self._pp_group, group_src=self.stage_to_rank(self.num_stages - 1))
        if self.dp_size > 1:
            self._average_over_replicas(loss)
        if capture is not None:
            self._compose_capture(capture)
        module.log(self.loss_name, loss, prog_bar=True)
        return loss

    def _average_over_replicas(self, loss: Tensor) -> None:
        """Average the step's gradients (and ``loss``) over the data-parallel replicas, in one all-reduce. A gradient
        that no replica produced stays ``None`` (as in one process, where the optimizer then skips the parameter)."""
        grads = [g if g is not None else torch.zeros_like(p) for p, g in self._pending_grads]
        present = [float(g is not None) for _, g in self._pending_grads]
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads] + [loss.reshape(1), loss.new_tensor(present)])
        dist.all_reduce(flat, group=self._dp_group)
        values, flags = flat[: -len(present)], flat[-len(present) :]
        offset, averaged = 0, []
        for (p, _), grad, flag in zip(self._pending_grads, grads, flags.tolist()):
            n = grad.numel()
            averaged.append(
                (p, (values[offset : offset + n] / self.dp_size).view_as(grad).to(grad.dtype) if flag else None)
            )
            offset += n
        loss.copy_(values[offset] / self.dp_size)
        self._pending_grads = averaged

    def _check_batch(self, inputs: Any, targets: Any) -> None:
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError("MHCPipelineStrategy needs the batch's input and target to be tensors.")
        microbatches = self._microbatches
        if inputs.shape[0] % microbatches:
            raise ValueError(
                f"The batch size {inputs.shape[0]} is not divisible by microbatches={microbatches}; pass a batch size "
                "that is a multiple of it (and drop_last=True in the DataLoader)."
            )
        shape = (tuple(inputs.shape), tuple(targets.shape))
        if self._batch_shape is None:
            self._batch_shape = shape
        elif shape != self._batch_shape:
            raise ValueError(
                f"Batch shapes changed from {self._batch_shape} to {shape}: the pipeline's stages fix their "
                "communication shapes at the first step. Use batches of one shape (drop_last=True, fixed length)."
            )

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """The schedule already ran the backward pass in the training step: its gradients, kept aside (Lightning
        zeroes gradients between the step and the backward), are added to the parameters' here."""
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in self._pending_grads:
            if grad is not None:
                p.grad = grad if p.grad is None else p.grad + grad
        self._pending_grads = []
        return self.precision_plugin.post_backward(closure_loss, module)

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: Union[int, float]) -> None:
        """Clip by the norm over all stages' gradients (each rank holds its stages' part)."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = self._global_norm(params)
        coef = clip_val / (norm + 1e-6)
        if coef < 1.0 and math.isfinite(norm):
            for p in params:
                p.grad.detach().mul_(coef)

    def global_grad_norm(self, module: nn.Module) -> float:
        """The norm of the whole model's gradients (``mhc/grad_norm``): each rank holds its own stages' part."""
        return self._global_norm([p for p in module.parameters() if p.grad is not None])

    def _global_norm(self, params: list[nn.Parameter]) -> float:
        local = torch.zeros((), dtype=torch.float64, device=self.root_device)
        for p in params:
            local += p.grad.detach().double().pow(2).sum()
        dist.all_reduce(local, group=self._pp_group)  # the replicas hold equal (averaged) gradients
        return float(local.sqrt())

    def _compose_capture(self, capture: StreamCapture) -> None:
        """Rebuild, on every rank, the whole model's capture of this step from each stage's per-microbatch parts."""
        mine = {s: self.stage_modules[s].captured[-self._microbatches :] for s in self.local_stages}
        mine = {
            s: [([h.cpu() for h in hs], _cpu_state(diversity)) for hs, diversity in parts] for s, parts in mine.items()
        }
        gathered: list[Any] = [None] * self.pp_size
        dist.all_gather_object(gathered, mine, group=self._pp_group)
        by_stage: dict[int, Any] = {s: parts for rank_parts in gathered for s, parts in rank_parts.items()}
        device = self.root_device
        for m in range(self._microbatches):
            capture.forwards.append([h.to(device) for s in range(self.num_stages) for h in by_stage[s][m][0]])
            diversity = by_stage[self.num_stages - 1][m][1]
            if diversity is not None:
                if capture.diversity is None:
                    capture.diversity = StreamDiversity().to(device)
                capture.diversity.merge_state({k: v.to(device) for k, v in diversity.items()})

    # ------------------------------------------------------------------------------------------ weights and state
    def sync_full_model(self) -> None:
        """Every rank receives every stage's current weights from the rank of its pipeline that trains them."""
        if not self.stage_modules or not dist.is_initialized():
            return
        for s, stage in enumerate(self.stage_modules):
            src = self.stage_to_rank(s)
            for tensor in [*stage.parameters(), *stage.buffers()]:
                dist.broadcast(tensor.data, group=self._pp_group, group_src=src)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.sync_full_model()
        return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """All ranks' optimizer states (each holds its stages' parameters), keyed by pipeline rank."""
        local = super().optimizer_state(optimizer)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        layout = {"schedule": self.schedule_name, "world_size": self.world_size, "pp_size": self.pp_size}
        return {"mhc_pipeline": {**layout, "ranks": gathered}}

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        states = checkpoint["optimizer_states"]
        for optimizer, state in zip(self.optimizers, states):
            if "mhc_pipeline" not in state:
                raise RuntimeError(
                    "This checkpoint was not written by MHCPipelineStrategy, so its optimizer state does not match the "
                    "pipeline's stages. Load its weights only (e.g. lightning_mhc.load_from_checkpoint, then fit "
                    "without ckpt_path)."
                )
            saved = state["mhc_pipeline"]
            layout = (saved["world_size"], saved.get("pp_size", saved["world_size"]), saved["schedule"])
            if layout != (self.world_size, self.pp_size, self.schedule_name):
                raise RuntimeError(
                    f"The checkpoint's optimizer state was written by {layout[0]} processes in pipelines of "
                    f"{layout[1]} with schedule {layout[2]!r}; resume with the same layout (now {self.world_size}, "
                    f"{self.pp_size}, {self.schedule_name!r}) or load the weights only."
                )
            optimizer.load_state_dict(saved["ranks"][self.global_rank])

    def on_validation_start(self) -> None:
        self.sync_full_model()

    def on_test_start(self) -> None:
        self.sync_full_model()

    def on_predict_start(self) -> None:
        self.sync_full_model()

    def on_exception(self, exception: BaseException) -> None:
        """A rank that fails leaves the others inside the schedule: no collective may follow (teardown skips the
        weight sync), so that this process exits and Lightning's launcher (or torchrun) ends the others."""
        self._schedule = None
        super().on_exception(exception)

    def teardown(self) -> None:
        if self.lightning_module is not None and dist.is_initialized() and self._schedule is not None:
            self.sync_full_model()  # after fit every rank holds the trained model
        if self.lightning_module is not None:
            defer_bias_updates(self.lightning_module, False)  # the module trains as before outside the pipeline
        self._schedule = None
        super().teardown()


def _attached_capture(module: nn.Module) -> Optional[StreamCapture]:
    for m in module.modules():
        if isinstance(m, MHCBlock):
            return m.capture
    return None


def _shared_parameters(ends: list[nn.Module], blocks: nn.ModuleList, counts: list[int]) -> list[str]:
    """Parameters that two stages would both hold."""
    owners: dict[int, int] = {}
    shared = []
    groups, start = [], 0
    for c in counts:
        groups.append(list(blocks[start : start + c]))
        start += c
    groups[0] = [ends[0], *groups[0]]
    groups[-1] = [*groups[-1], ends[1]]
    for s, mods in enumerate(groups):
        for m in mods:
            for name, p in m.named_parameters():
                if owners.setdefault(id(p), s) != s:
                    shared.append(name)
    return shared


def _cpu_state(diversity: Optional[StreamDiversity]) -> Optional[dict[str, Tensor]]:
    """A stage's stream-diversity statistics as plain CPU tensors, to gather across ranks."""
    return None if diversity is None else {k: v.detach().cpu() for k, v in diversity.metric_state.items()}
