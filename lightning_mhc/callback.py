"""MHCCallback: inject mHC into a user's LightningModule from the Trainer, without changing the model's code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_mhc.capture import StreamCapture
from lightning_mhc.config import STRUCTURAL_FIELDS, MHCConfig, check_choice, check_int, short_repr
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.inject import MARKER_KEY, InjectionReport, apply_mhc
from lightning_mhc.kernels.dispatch import resolve_backend
from lightning_mhc.mhc_block import MHCBlock, attach_capture
from lightning_mhc.monitor import METRIC_KEYS, StabilityMonitor, total_grad_norm
from lightning_mhc.nonfinite import ON_NONFINITE, NonFiniteError, NonFiniteGuard, first_nonfinite_state
from lightning_mhc.strategies.pipeline import MHCPipelineStrategy

try:  # lightning >= 2.6
    from lightning.pytorch.callbacks import WeightAveraging

    _AVERAGING_CALLBACKS: tuple[type, ...] = (WeightAveraging, StochasticWeightAveraging)
except ImportError:
    _AVERAGING_CALLBACKS = (StochasticWeightAveraging,)

CHECKPOINT_KEY = "mhc"
# Version of what checkpoints store under CHECKPOINT_KEY. 2: HC mode's H_res follows the paper's Eq. 5 (version 1,
# lightning_mhc 0.1.0, had it transposed, so its HC weights would compute something else now).
STORED_FORMAT = 2
# What an injected module cannot change any more: its structure and what its blocks were built with.
BAKED_IN_FIELDS = (*STRUCTURAL_FIELDS, "kernels", "recompute", "recompute_layers")


class MHCCallback(L.Callback):
    """Widen the residual stream of the model's block stack into ``streams`` mixed streams (mHC).

    Injects after the module's own ``setup()`` and before ``configure_model`` (so that layers sharded there carry
    their mHC parameters), or right after ``configure_model`` when the module builds its block stack there (then
    it must not shard them there: see the error it raises); before optimizers exist and before a checkpoint is
    restored. Stores its config and injection plan in checkpoints, weights-only ones included.
    To find the block stack it runs the module once: ``forward(example_input_array)`` when that is set, else the
    stage's own step (``training_step`` for fit) on one sample of the first batch, in eval mode without gradients
    and with logging switched off. With manual optimization, set ``example_input_array`` (``training_step`` steps the
    optimizers, which do not exist yet). Every ``log_every_n_steps`` optimizer steps it logs the ``mhc/*`` stability
    metrics (``monitor.METRIC_KEYS``) to every logger of the Trainer, and prints a summary when fitting ends.
    Weight-averaging callbacks (``EMAWeightAveraging``, ``StochasticWeightAveraging``) average the injected model.

    Every optimizer step it checks that the loss, the gradients and every layer's ``H_res`` are finite (one flag read
    per optimizer step, see :mod:`lightning_mhc.nonfinite`) and acts as ``on_nonfinite`` says; it refuses to write a
    checkpoint of non-finite weights (raising :class:`~lightning_mhc.nonfinite.NonFiniteError`), so that one never
    replaces a good checkpoint.

    Example::

        trainer = L.Trainer(callbacks=[MHCCallback(streams=4)])
        trainer.fit(model, datamodule=dm)

    Args:
        config: a full :class:`MHCConfig`; or pass its fields as keyword arguments instead.
        on_nonfinite: what a non-finite loss, gradient or ``H_res`` does: ``"raise"`` (default; names the step and
            the first layer found non-finite, before the step is applied), ``"skip"`` (the optimizer step is not
            applied: its gradients are set to ``None``, which PyTorch optimizers skip; counted in
            ``mhc/skipped_steps``) or ``"warn"`` (a warning, and the step is applied).
        max_consecutive_skips: with ``on_nonfinite="skip"``, raise when more steps than this in a row are skipped.
        **fields: ``MHCConfig`` fields (``streams``, ``mode``, ``blocks``, ``sinkhorn_iters``, ``gate_init``, ...).
    """

    def __init__(
        self,
        config: MHCConfig | None = None,
        *,
        on_nonfinite: str = "raise",
        max_consecutive_skips: int = 10,
        **fields: Any,
    ) -> None:
        check_choice("MHCCallback(on_nonfinite)", on_nonfinite, ON_NONFINITE)
        check_int("MHCCallback(max_consecutive_skips)", max_consecutive_skips, 1)
        defaults = MHCConfig()
        fields = {k: v for k, v in fields.items() if config is None or getattr(defaults, k, object()) != v}
        if config is not None and fields:
            raise ValueError(
                f"Pass either config=MHCConfig(...) or MHCConfig fields as keyword arguments, not both "
                f"(got config and {sorted(fields)})."
            )
        if config is not None and not isinstance(config, MHCConfig):
            raise TypeError(f"config must be an MHCConfig, got {type(config).__name__}; or pass its fields directly.")
        try:
            self.config = config or MHCConfig(**fields)
        except TypeError as error:
            known = sorted(MHCConfig.__dataclass_fields__)
            raise TypeError(f"{error}. MHCCallback takes the MHCConfig fields {known}.") from None
        self.report: InjectionReport | None = None
        self.monitor: StabilityMonitor | None = None
        self.history: list[dict[str, float]] = []
        self._capture: StreamCapture | None = None
        self._capture_step = -1
        self._grad_norm = 0.0
        self.guard = NonFiniteGuard(on_nonfinite, max_consecutive_skips)
        self._watching: torch.nn.Module | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        mine = [c for c in trainer.callbacks if isinstance(c, MHCCallback)]
        if len(mine) > 1:
            raise RuntimeError(
                f"{len(mine)} MHCCallbacks on one Trainer; mHC is injected once. Keep one MHCCallback(...)."
            )
        resolve_backend(self.config.kernels, trainer.strategy.root_device)
        _refuse_half_true_under_fsdp2(trainer)
        if _is_injected(pl_module):
            self._check_same_injection(pl_module)
        else:
            if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
                raise RuntimeError(
                    "MHCCallback cannot inject under a spawn/fork strategy (e.g. 'ddp_spawn'): the worker processes "
                    "would train mHC weights that never reach your module in the main process. Use strategy='ddp', "
                    "or inject before fitting with lightning_mhc.apply_mhc(model, config, example_input=...)."
                )
            # After the module's own setup, which may build its data or layers (Lightning runs it after this one).
            _run_after(pl_module, "setup", partial(self._inject_or_wait, trainer, pl_module, stage))
        # Module-level hooks, not the callback's: Lightning skips callbacks' on_save_checkpoint for weights-only
        # checkpoints (ModelCheckpoint(save_weights_only=True)), but always calls the module's.
        pl_module.on_load_checkpoint = partial(_check_then_load, pl_module, pl_module.on_load_checkpoint, self.config)
        _store_mhc_on_save(pl_module, self.config)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        vars(pl_module).pop("on_load_checkpoint", None)

    def _inject_or_wait(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Inject now, before ``configure_model``, when the block stack exists: a ``configure_model`` that shards or
        parallelizes the blocks (FSDP2 ``fully_shard``, tensor parallelism) must find them injected, so that the mHC
        parameters are sharded with their block. Else the module builds its layers in ``configure_model``: inject
        right after it."""
        if is_overridden("configure_model", pl_module) and not _has_block_stack(pl_module, self.config):
            _run_after(pl_module, "configure_model", partial(self._inject, trainer, pl_module, stage))
        else:
            self._inject(trainer, pl_module, stage)

    def _inject(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        with _all_ranks_or_none(trainer, "MHCCallback's injection (its probe forward at setup)"):
            self._inject_here(trainer, pl_module, stage)

    def _inject_here(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if _is_injected(pl_module):  # e.g. apply_mhc in the module's setup or configure_model
            self._check_same_injection(pl_module)
            return
        _refuse_sharded(pl_module)
        if pl_module.example_input_array is None and stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(pl_module).__name__} uses manual optimization (automatic_optimization = False), so "
                "MHCCallback cannot find the block stack by running training_step once: that step calls "
                "self.optimizers(), which do not exist yet (mHC must add its parameters before the optimizers are "
                "built). Set self.example_input_array to an input of forward (in __init__ or setup) and the callback "
                "probes with forward(example_input_array) instead; or inject before fitting with "
                "lightning_mhc.apply_mhc(model, MHCConfig(...), example_input=...)."
            )
        device_before = pl_module.device
        like_training = _prepare_like_training(trainer, pl_module)
        if pl_module.example_input_array is not None:
            example = _converted_example(trainer, pl_module) if like_training else None  # None: apply_mhc's own
        else:
            example = _step_runner(trainer, stage, convert_input=like_training)
        with _step_context(trainer, stage) if like_training else nullcontext():
            self.report = apply_mhc(pl_module, self.config, example_input=example)
        rank_zero_info(str(self.report))
        _recopy_averaged_models(trainer, pl_module, stage, device_before)

    def _check_same_injection(self, pl_module: L.LightningModule) -> None:
        report = pl_module.mhc_report
        differ = report.config.differences(self.config, BAKED_IN_FIELDS)
        if differ:
            raise RuntimeError(
                f"This module already has mHC injected with other settings (injected vs this MHCCallback: {differ}); "
                "a second injection is not possible. Use the same MHCCallback settings or a fresh module."
            )
        self.report = report

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = self.report.branches if self.config.stream_count > 1 else 0
        self.monitor = StabilityMonitor(layers).to(pl_module.device)
        self.history = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The pipeline composes whatever sits in the capture slot across its stages, a gather per step: there the
        # loss and gradients are checked, and H_res only through them.
        watch_h_res = not isinstance(trainer.strategy, MHCPipelineStrategy)
        modules = pl_module.named_modules() if watch_h_res else ()
        names = [n for n, m in modules if isinstance(m, HyperConnection) and m.mode != "residual"]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._watching = pl_module if self.guard.start(names, check_gradients=scaler is None) else None
        self._attach(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._watching is not None:
            attach_capture(pl_module, None)  # validation forwards are not training steps

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._attach(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_watching(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_watching(pl_module)

    def _attach(self, pl_module: L.LightningModule) -> None:
        """Point the blocks at the non-finite watch (with the logging capture inside it), or at the capture alone."""
        if self._watching is not None:
            self.guard.watch.inner = self._capture
            attach_capture(pl_module, self.guard.watch)
        else:
            attach_capture(pl_module, self._capture)

    def _stop_watching(self, pl_module: L.LightningModule) -> None:
        self._watching = None
        self._capture = None
        attach_capture(pl_module, None)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._capture is None and trainer.global_step % self.config.log_every_n_steps == 0:
            self._capture = StreamCapture()
            self._capture_step = trainer.global_step
            self._attach(pl_module)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.guard.observe_loss(loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._capture is not None:
            # A strategy whose processes each hold part of the gradients (the pipeline) knows the whole norm.
            self._grad_norm = getattr(trainer.strategy, "global_grad_norm", total_grad_norm)(pl_module)
        self.guard.check(trainer, pl_module, optimizer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            self.monitor.observe_loss(loss)
        if self._capture is None or trainer.global_step == self._capture_step:
            return
        capture, self._capture = self._capture, None
        self._attach(pl_module)
        self.monitor.update(capture)
        metrics = {**self.monitor.compute(self._grad_norm), "mhc/skipped_steps": float(self.guard.skipped)}
        self.history.append({"step": self._capture_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._capture_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history:
            rank_zero_info(stability_summary(self.history))


def stability_summary(history: list[dict[str, float]]) -> str:
    """A few lines a person reads at the end of a run: worst and last values of the stability metrics."""
    lines = [f"mHC stability over {len(history)} logged steps (max / last):"]
    for key in METRIC_KEYS:
        values = [h[key] for h in history if key in h]
        if values:
            lines.append(f"  {key:<24} {max(values):>10.4g} / {values[-1]:.4g}")
    return "\n".join(lines)


@contextmanager
def _all_ranks_or_none(trainer: L.Trainer, what: str) -> Iterator[None]:
    """Run ``what`` on every rank, then agree in one all-reduce whether it succeeded everywhere: a rank that failed
    raises its own error, every other rank an error naming it.

    Without this the other ranks would go on to the next collective (DDP's broadcast of the weights) and wait there
    for a rank that is gone: gloo notices the closed connection, NCCL only at its timeout (30 minutes by default).
    """
    if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except BaseException as caught:  # re-raised below, after the other ranks have heard of it
        error = caught
    failed = torch.zeros(trainer.world_size, device=trainer.strategy.root_device)
    failed[trainer.global_rank] = float(error is not None)
    dist.all_reduce(failed)
    if error is not None:
        raise error
    ranks = failed.nonzero().flatten().tolist()
    if ranks:
        raise RuntimeError(
            f"{what} failed on rank(s) {ranks}; their error is in their output. Rank {trainer.global_rank} stops too "
            "instead of waiting for them at the next collective."
        )


def _has_block_stack(module: torch.nn.Module, config: MHCConfig) -> bool:
    """Whether the module already holds what the injection looks for: ``config.blocks``, or else a list of at least
    two blocks of one type (what the automatic search accepts)."""
    if config.blocks:
        try:
            return isinstance(module.get_submodule(config.blocks), (torch.nn.ModuleList, torch.nn.Sequential))
        except AttributeError:
            return False
    return any(
        isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m) >= 2 and len({type(b) for b in m}) == 1
        for m in module.modules()
    )


def _refuse_sharded(module: torch.nn.Module) -> None:
    """Refuse to inject into a module whose layers are already sharded or parallelized: the mHC parameters would
    stay plain tensors beside DTensors (their gradients never reduced across ranks, gradient clipping failing on
    mixed Tensor/DTensor) and the sharded blocks' forward hooks would see rewrapped inputs."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule

    found, what = None, ""
    for name, sub in module.named_modules():
        if isinstance(sub, (FSDPModule, FullyShardedDataParallel)):
            found = name or type(module).__name__
            what = "is already sharded (fully_shard)" if isinstance(sub, FSDPModule) else "is already wrapped in FSDP"
            break
    if found is None:
        found = next((n for n, p in module.named_parameters() if isinstance(p, DTensor)), None)
        what = "is already a DTensor (sharded or tensor-parallel)"
    if found is not None:
        raise RuntimeError(
            f"MHCCallback must inject mHC before the layers are sharded or parallelized, but {found!r} {what} "
            "when it injects (right after configure_model, since the block stack did not exist before it). Build the "
            "layers in __init__ (or setup) and only shard them in configure_model: the callback then injects before "
            "configure_model, and your fully_shard/parallelize_module calls shard the mHC parameters with their "
            "blocks. Or, in configure_model, call lightning_mhc.apply_mhc(self, MHCConfig(...), example_input=...) "
            "after building the layers and before sharding them."
        )


def _prepare_like_training(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Convert the module to the training precision and move it to its training device, so that the probe runs as
    training will (a bf16-true model in bf16, a GPU model on its GPU, each DDP rank on its own device).

    Only where Lightning would do exactly this right after ``setup`` anyway (single-device and DDP-like strategies);
    sharded strategies (FSDP, ModelParallel, DeepSpeed) convert and place the module their own way, where it may not
    fit on one device or still be on the meta device, so the probe runs where the module is. Returns whether it did.
    """
    strategy = trainer.strategy
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
        return False
    if any(p.is_meta for p in pl_module.parameters()):
        return False
    trainer.precision_plugin.convert_module(pl_module)
    pl_module.to(strategy.root_device)
    return True


def _step_context(trainer: L.Trainer, stage: str) -> AbstractContextManager:
    """The precision plugin's context for the stage's step (autocast, default dtype...), as the loops use it."""
    plugin = trainer.precision_plugin
    return {
        "fit": plugin.train_step_context,
        "validate": plugin.val_step_context,
        "test": plugin.test_step_context,
        "predict": plugin.predict_step_context,
    }[stage]()


def _converted_example(trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
    """``example_input_array`` converted to the training precision and moved to the module's device."""
    example = trainer.precision_plugin.convert_input(pl_module.example_input_array)
    return move_data_to_device(example, pl_module.device)


def _recopy_averaged_models(
    trainer: L.Trainer, pl_module: L.LightningModule, stage: str, device_before: torch.device
) -> None:
    """Let weight-averaging callbacks copy the injected module again.

    ``WeightAveraging``/``EMAWeightAveraging`` and ``StochasticWeightAveraging`` copy the module in their ``setup``,
    which Lightning runs before the module's own ``setup`` and so before the injection, whatever the order of the
    callbacks: their copy is the plain module (or, for a module that builds its layers in ``configure_model``, an
    empty one), whose parameters no longer pair with the injected module's. Their ``setup`` copies it afresh.
    """
    for callback in trainer.callbacks:
        average = getattr(callback, "_average_model", None) if isinstance(callback, _AVERAGING_CALLBACKS) else None
        if isinstance(average, torch.nn.Module) and not _is_injected(average):
            callback.setup(trainer, pl_module, stage)
            # Where their first copy was: the module's device at their setup, before the probe moved the module.
            if isinstance(callback, StochasticWeightAveraging) or getattr(callback, "_device", None) is None:
                callback._average_model.to(device_before)


def _store_mhc_on_save(module: L.LightningModule, config: MHCConfig) -> None:
    """Make every checkpoint of ``module`` carry the mHC config and plan, weights-only ones included.

    Stays after the fit: the module keeps its mHC blocks, so a later ``trainer.save_checkpoint`` needs the plan too.
    """
    current = vars(module).get("on_save_checkpoint")
    if isinstance(current, partial) and current.func is _save_with_mhc:
        original = current.args[1]  # installed by an earlier fit: replace, do not stack
    else:
        original = module.on_save_checkpoint
    module.on_save_checkpoint = partial(_save_with_mhc, module, original, config)


def _save_with_mhc(
    module: L.LightningModule, on_save_checkpoint: Callable[[dict], None], config: MHCConfig, checkpoint: dict
) -> None:
    bad = first_nonfinite_state(module)
    if bad is not None:
        raise NonFiniteError(
            f"Refusing to write a checkpoint: {bad!r} of {type(module).__name__} is non-finite (NaN or inf), and it "
            "would replace a good checkpoint. Earlier checkpoints are left as they were. To keep this state for "
            "debugging, torch.save(model.state_dict(), path) it yourself."
        )
    report = getattr(module, "mhc_report", None)
    if report is not None and _is_injected(module):
        checkpoint[CHECKPOINT_KEY] = {"config": config.to_dict(), "plan": report.plan(), "format": STORED_FORMAT}
    on_save_checkpoint(checkpoint)


def _check_then_load(
    module: L.LightningModule, on_load_checkpoint: Callable[[dict], None], config: MHCConfig, checkpoint: dict
) -> None:
    """Compare a checkpoint's stored mHC with ours before its weights meet the model, for a clear error."""
    stored = checkpoint.get(CHECKPOINT_KEY)
    if stored is None:
        if has_mhc_weights(checkpoint):
            raise ValueError(
                "This checkpoint holds mHC weights but not the mHC config and injection plan (a weights-only "
                "checkpoint written by lightning_mhc 0.1.0 or older, which left them out). It cannot be resumed "
                "with ckpt_path; load its weights into an injected module instead: apply_mhc(model, MHCConfig(<the "
                "settings it was trained with>), example_input=...), then model.load_state_dict(checkpoint["
                "'state_dict']), and fit without ckpt_path."
            )
        raise ValueError(
            "This checkpoint was written without MHCCallback, so it has no mHC weights to restore. To start "
            "mHC from plain weights, load them into the module first (module.load_state_dict(weights, "
            "strict=False)) and fit without ckpt_path."
        )
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.state.fn == "fit" and "optimizer_states" not in checkpoint:
        raise ValueError(
            "This checkpoint holds only the weights (written with ModelCheckpoint(save_weights_only=True) or "
            "save_checkpoint(weights_only=True)), so training cannot resume from it: it has no optimizer, scheduler "
            "or callback state. To continue training from its weights, load it with "
            f"lightning_mhc.load_from_checkpoint({type(module).__name__}, path) and fit that model without ckpt_path; "
            "to resume exactly, save full checkpoints."
        )
    try:
        differ = stored_config(stored).differences(config, STRUCTURAL_FIELDS)
    except ValueError as error:
        raise ValueError(f"This checkpoint cannot be resumed: {error}") from error
    report = getattr(module, "mhc_report", None) if _is_injected(module) else None
    if differ or (report is not None and stored["plan"] != report.plan()):
        raise ValueError(
            f"The checkpoint was trained with another mHC structure (checkpoint vs this MHCCallback: "
            f"{differ or 'same fields, different injection plan'}; plan {stored['plan']}). Pass the "
            "checkpoint's values to MHCCallback to resume it."
        )
    on_load_checkpoint(checkpoint)


def check_stored_metadata(stored: Any) -> None:
    """Refuse mHC metadata that is not what :class:`MHCCallback` writes: plain types of the expected shape, a format
    this version reads."""
    if (
        not isinstance(stored, dict)
        or set(stored) - {"config", "plan", "format"}
        or not {"config", "plan"} <= set(stored)
    ):
        raise ValueError(
            f"its mHC metadata ({CHECKPOINT_KEY!r}) is malformed: a dict with 'config', 'plan' and 'format' was "
            f"expected, got {short_repr(stored, 120)}. The file was changed or written by other code; pass a "
            "checkpoint written by MHCCallback."
        )
    version = stored.get("format", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= STORED_FORMAT:
        raise ValueError(
            f"its mHC metadata format={version!r} is not one this lightning_mhc reads (1 to {STORED_FORMAT}); a "
            "newer format needs a newer lightning_mhc: upgrade it."
        )


def stored_config(stored: Any) -> MHCConfig:
    """The config a checkpoint stored under ``CHECKPOINT_KEY``, checked, refusing what this version computes
    differently."""
    check_stored_metadata(stored)
    config = MHCConfig.from_dict(stored["config"])
    if stored.get("format", 1) < 2 and config.mode == "hc":
        raise ValueError(
            "This checkpoint was trained in HC mode by lightning_mhc 0.1.0, whose H_res was the transpose of the HC "
            "paper's (mHC paper Eq. 5); this version builds it as the paper does, so these weights would compute "
            "another function. Retrain the HC model, or load it with lightning_mhc 0.1.0. (mHC-mode checkpoints "
            "are unaffected.)"
        )
    return config


def has_mhc_weights(checkpoint: dict) -> bool:
    """Whether the checkpoint's state dict came from an injected module (it carries apply_mhc's marker key)."""
    return any(key.endswith(MARKER_KEY) for key in checkpoint.get("state_dict", {}))


def _run_after(module: torch.nn.Module, hook: str, then: Callable[[], None]) -> None:
    """Make the module's next call of ``hook`` run ``then`` afterwards (once; picklable, unlike a closure)."""
    setattr(module, hook, partial(_call_then, module, hook, getattr(module, hook), then))


def _call_then(module: torch.nn.Module, hook: str, original: Callable, then: Callable[[], None], *args, **kwargs):
    vars(module).pop(hook, None)
    result = original(*args, **kwargs)
    then()
    return result


def _refuse_half_true_under_fsdp2(trainer: L.Trainer) -> None:
    """FSDP2 shards one parameter dtype per group; under ``*-true`` half precision the mHC parameters stay float32
    beside half-precision block weights, which ``fully_shard`` rejects with an assertion deep in torch."""
    if isinstance(trainer.strategy, ModelParallelStrategy) and trainer.precision in ("bf16-true", "16-true"):
        raise ValueError(
            f"MHCCallback with ModelParallelStrategy (FSDP2) and precision={trainer.precision!r}: mHC keeps its own "
            "parameters in float32 (half-precision updates of its gates round away), and FSDP2 needs one parameter "
            "dtype per sharded group. Train in bf16 the FSDP2 way: precision='32-true' and fully_shard(..., "
            "mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)) in your "
            "configure_model."
        )


def _is_injected(module: torch.nn.Module) -> bool:
    return any(isinstance(m, MHCBlock) for m in module.modules())


def _first_sample(batch: Any) -> Any:
    """Shrink a batch to its first sample when every tensor in it shares the batch dimension."""
    sizes = set()
    apply_to_collection(batch, Tensor, lambda t: sizes.add(t.shape[0] if t.dim() else None))
    if len(sizes) != 1 or None in sizes:
        return batch
    return apply_to_collection(batch, Tensor, lambda t: t[:1])


def _step_runner(trainer: L.Trainer, stage: str, convert_input: bool = False):
    """A probe that runs the module's own step on one sample of the stage's first batch, logging switched off.

    The sample goes the way the loops send a batch: precision conversion (with ``convert_input``), the module's
    batch-transfer hooks, the module's device.
    """
    loop, step = {
        "fit": (trainer.fit_loop, "training_step"),
        "validate": (trainer.validate_loop, "validation_step"),
        "test": (trainer.test_loop, "test_step"),
        "predict": (trainer.predict_loop, "predict_step"),
    }[stage]

    def run(pl_module: L.LightningModule) -> None:
        dataloader = loop._data_source.dataloader()
        if isinstance(dataloader, (list, tuple)):
            dataloader = dataloader[0]
        if dataloader is None:
            raise ValueError(
                "MHCCallback runs one forward to find the block stack but found no data for stage "
                f"{stage!r}; set example_input_array on your LightningModule or pass dataloaders to the Trainer."
            )
        device = next(pl_module.parameters()).device
        batch = _first_sample(next(iter(dataloader)))
        if convert_input:
            batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = pl_module._apply_batch_transfer_handler(batch, device=device, dataloader_idx=0)
        pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None
        try:
            getattr(pl_module, step)(batch, 0)
        finally:
            del pl_module.log, pl_module.log_dict

    return run
