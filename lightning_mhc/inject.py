"""apply_mhc: inject mHC into the residual block stack of any ``nn.Module``, in place, without Lightning.

One probe forward (no gradients, eval mode) finds the block stack, the hidden width and how many residual
branches each block has; parameters are created then, before any optimizer exists. A stored plan (from a
checkpoint) replaces the probe when re-injecting.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Union

import torch
from torch import Tensor, nn

from lightning_mhc.branches import ResidualWatcher, returns_last_sum
from lightning_mhc.config import MHCConfig, check_bool, check_choice, check_int, short_repr
from lightning_mhc.mhc_block import MHCBlock, split_output, take_hidden
from lightning_mhc.recompute import recompute_layers

ExampleInput = Union[Tensor, tuple, dict, Callable[[nn.Module], Any], None]

# First key of an injected module's state dict, so that loading it into the plain module fails with this advice
# at the head of the list of unexpected keys; dropped again when loading into an injected module.
MARKER_KEY = "mhc_injected__load_with__lightning_mhc.load_from_checkpoint"


@dataclass
class BlockInjection:
    """What was done to one block."""

    index: int
    name: str
    block_type: str
    granularity: str
    branches: int
    params_added: int
    clone_input: bool = False

    def plan(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"granularity": self.granularity, "branches": self.branches}
        return {**entry, "clone_input": True} if self.clone_input else entry


@dataclass
class InjectionReport:
    """What ``apply_mhc`` did; ``plan()`` is what re-injection needs, ``str()`` a readable table."""

    stack: str
    dim: int
    config: MHCConfig
    blocks: list[BlockInjection] = field(default_factory=list)
    params_before: int = 0
    channels_first: bool = False

    @property
    def params_added(self) -> int:
        return sum(b.params_added for b in self.blocks)

    @property
    def branches(self) -> int:
        return sum(b.branches for b in self.blocks)

    def plan(self) -> dict[str, Any]:
        """Plain-data description of the injection, enough to redo it without a probe forward."""
        plan = {"stack": self.stack, "dim": self.dim, "blocks": [b.plan() for b in self.blocks]}
        return {**plan, "channels_first": True} if self.channels_first else plan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "config": self.config.to_dict()}

    def __str__(self) -> str:
        c = self.config
        lines = [
            f"mHC injected into '{self.stack}': {len(self.blocks)} blocks, {self.branches} residual branches, "
            f"width {self.dim}{' (channels first)' if self.channels_first else ''}, mode={c.mode}, "
            f"streams={c.stream_count}, readout={c.readout}",
            f"{'block':>5}  {'type':<24} {'granularity':<11} {'branches':>8} {'params added':>13}",
        ]
        for b in self.blocks:
            lines.append(
                f"{b.index:>5}  {b.block_type[:24]:<24} {b.granularity:<11} {b.branches:>8} {b.params_added:>13,}"
            )
        share = 100.0 * self.params_added / max(self.params_before, 1)
        lines.append(
            f"{'total':>5}  {'':<24} {'':<11} {self.branches:>8} {self.params_added:>13,}"
            f"  (+{share:.2f}% of {self.params_before:,})"
        )
        return "\n".join(lines)


@dataclass
class _Probe:
    """First call of one candidate block during the probe forward, with a copy of its arguments taken before it ran.

    The probe runs each block again (to find its branches); a block may change its arguments as it runs (a Hugging
    Face KV cache grows by each call), so every re-run gets the arguments as they were (``call_args``): a fresh copy
    of each argument's Python objects, sharing the tensors and modules in them (a cache grows by replacing its
    tensors, so a copy holds references, not K/V). An argument that cannot be copied is passed as it is now.
    """

    args: tuple
    kwargs: dict
    hidden: Tensor
    out_hidden: Tensor | None = None
    before: tuple[tuple, dict] = field(init=False)
    shared: dict[int, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.shared = _tensors_and_modules((self.args, self.kwargs))
        self.before = (
            tuple(self._copied(arg) for arg in self.args),
            {name: self._copied(value) for name, value in self.kwargs.items()},
        )

    def call_args(self) -> tuple[tuple, dict]:
        """The block's arguments as they were before its first call (those that cannot be copied as they are now)."""
        args, kwargs = self.before
        return tuple(self._fresh(a) for a in args), {name: self._fresh(v) for name, v in kwargs.items()}

    def _copied(self, value: Any) -> tuple[bool, Any]:
        try:
            return True, copy.deepcopy(value, dict(self.shared))
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - any object may refuse deepcopy (a lock, a process group): keep it as is
            return False, value

    def _fresh(self, entry: tuple[bool, Any]) -> Any:
        copied, value = entry
        return self._copied(value)[1] if copied else value


def _tensors_and_modules(obj: Any) -> dict[int, Any]:
    """Every tensor and module reachable from ``obj`` through containers and attributes, by id: in a deepcopy's memo
    they are shared instead of copied."""
    found: dict[int, Any] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (Tensor, nn.Module)):
            found[id(item)] = item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return found


def apply_mhc(
    module: nn.Module,
    config: MHCConfig | None = None,
    example_input: ExampleInput = None,
    plan: dict[str, Any] | None = None,
) -> InjectionReport:
    """Inject mHC into ``module``'s residual block stack, in place.

    Args:
        module: any ``nn.Module`` holding an ``nn.ModuleList``/``nn.Sequential`` of residual blocks.
        config: the injection settings (defaults to ``MHCConfig()``).
        example_input: what to run ``module`` on once to learn the stack, width and branches: a tensor
            (``module(x)``), a tuple (``module(*x)``), a dict (``module(**x)``) or a callable ``f(module)``.
            Defaults to ``module.example_input_array``.
        plan: a stored ``InjectionReport.plan()``; re-injects exactly as before, without a probe.

    The report is also kept as ``module.mhc_report``.

    Example::

        report = apply_mhc(model, MHCConfig(streams=4), example_input=tokens[:1])
        print(report)
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module={short_repr(module)} is not allowed; pass the torch.nn.Module to inject into.")
    if isinstance(config, dict):
        raise ValueError(
            f"config={short_repr(config)} is not allowed; pass MHCConfig(**config) (or None for the defaults)."
        )
    if config is not None and not isinstance(config, MHCConfig):
        raise ValueError(f"config={short_repr(config)} is not allowed; pass an MHCConfig (or None for the defaults).")
    if plan is not None:
        check_plan(plan)
    config = config or MHCConfig()
    if any(isinstance(m, MHCBlock) for m in module.modules()):
        raise RuntimeError("mHC is already injected into this module; inject once (one MHCCallback per Trainer).")
    params_before = sum(p.numel() for p in module.parameters())
    plan = _checked_plan(module, plan) if plan is not None else _probe_plan(module, config, example_input)
    stack_name, dim, channels_first = plan["stack"], int(plan["dim"]), bool(plan.get("channels_first", False))
    stack = module.get_submodule(stack_name)
    report = InjectionReport(stack_name, dim, config, params_before=params_before, channels_first=channels_first)
    last = len(stack) - 1
    sublayers = sum(b["branches"] for b in plan["blocks"])
    layers_per_group = recompute_layers(config, sublayers) if config.recompute else None
    first_sublayer = 0
    for i, entry in enumerate(plan["blocks"]):
        block, granularity, branches = stack[i], entry["granularity"], entry["branches"]
        clone_input = bool(entry.get("clone_input", False))
        wrapped = MHCBlock(
            block,
            dim,
            branches,
            granularity,
            config,
            i == 0,
            i == last,
            first_sublayer,
            layers_per_group,
            clone_input=clone_input,
            channels_first=channels_first,
        )
        first_sublayer += branches
        wrapped.to(device=_device_of(block))
        stack[i] = wrapped
        added = sum(p.numel() for p in wrapped.parameters()) - sum(p.numel() for p in block.parameters())
        report.blocks.append(
            BlockInjection(i, f"{stack_name}.{i}", type(block).__name__, granularity, branches, added, clone_input)
        )
    module.register_state_dict_post_hook(_add_marker)
    module.register_load_state_dict_pre_hook(_drop_marker)
    _refuse_save_pretrained(module)
    module.mhc_report = report
    return report


def _refuse_save_pretrained(module: nn.Module) -> None:
    """Make ``save_pretrained`` of every Hugging Face model in ``module`` raise: ``from_pretrained`` would load the
    files as the plain model, silently dropping mHC."""
    for m in module.modules():
        if callable(getattr(m, "save_pretrained", None)) and callable(getattr(m, "from_pretrained", None)):
            m.save_pretrained = partial(_save_pretrained_refused, type(m).__name__)
            if callable(getattr(m, "push_to_hub", None)):
                m.push_to_hub = partial(_save_pretrained_refused, type(m).__name__)


def _save_pretrained_refused(name: str, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError(
        f"{name} has mHC injected; save_pretrained would write files that {name}.from_pretrained loads as the "
        "plain model, without mHC and computing something else. Save a Lightning checkpoint (or "
        "torch.save(model.state_dict())) and reload it with lightning_mhc.load_from_checkpoint(...) (or build the "
        "plain model, apply_mhc(model, config, plan=model.mhc_report.plan()) and load_state_dict)."
    )


def _add_marker(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    state_dict[prefix + MARKER_KEY] = torch.ones(())
    if hasattr(state_dict, "move_to_end"):
        state_dict.move_to_end(prefix + MARKER_KEY, last=False)


def _drop_marker(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    state_dict.pop(prefix + MARKER_KEY, None)


def _device_of(block: nn.Module) -> torch.device:
    first = next(block.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


_PLAN_KEYS = {"stack": True, "dim": True, "blocks": True, "channels_first": False}
_PLAN_BLOCK_KEYS = {"granularity": True, "branches": True, "clone_input": False}


def check_plan(plan: Any) -> None:
    """Raise ``ValueError`` naming the entry unless ``plan`` has the shape ``InjectionReport.plan()`` gives (plain
    dicts, lists, str, int and bool), as a plan read from an untrusted checkpoint must."""
    _check_keys("plan", plan, _PLAN_KEYS)
    if not isinstance(plan["stack"], str):
        raise ValueError(f"plan['stack']={plan['stack']!r} is not allowed; pass the dotted path of the block stack.")
    check_int("plan['dim']", plan["dim"], 1)
    check_bool("plan['channels_first']", plan.get("channels_first", False))
    blocks = plan["blocks"]
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(
            f"plan['blocks']={short_repr(blocks)} is not allowed; pass a non-empty list, one entry per block."
        )
    for i, entry in enumerate(blocks):
        name = f"plan['blocks'][{i}]"
        _check_keys(name, entry, _PLAN_BLOCK_KEYS)
        check_choice(f"{name}['granularity']", entry["granularity"], ("sublayer", "block"))
        check_int(f"{name}['branches']", entry["branches"], 1)
        if entry["granularity"] == "block" and entry["branches"] != 1:
            raise ValueError(
                f"{name}['branches']={entry['branches']!r} is not allowed with granularity 'block'; pass 1."
            )
        check_bool(f"{name}['clone_input']", entry.get("clone_input", False))


def _check_keys(name: str, value: Any, keys: dict[str, bool]) -> None:
    """``value`` is a dict holding every required key (``keys[k]`` true) and no key outside ``keys``."""
    if not isinstance(value, dict):
        raise ValueError(f"{name}={short_repr(value)} is not allowed; pass a dict with keys {list(keys)}.")
    missing = [k for k, required in keys.items() if required and k not in value]
    unknown = [k for k in value if k not in keys]
    if missing or unknown:
        raise ValueError(
            f"{name} has keys {list(value)}, not allowed (missing {missing}, unknown {unknown}); pass keys "
            f"{list(keys)}, optional: {[k for k, required in keys.items() if not required]}."
        )


def _checked_plan(module: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    stack = _resolve_stack(module, plan["stack"])
    if len(plan["blocks"]) != len(stack):
        raise ValueError(
            f"The stored mHC plan has {len(plan['blocks'])} blocks but '{plan['stack']}' has {len(stack)}: the module "
            "was built with a different depth than the checkpoint. Build it with the checkpoint's hyperparameters."
        )
    return plan


def candidate_stacks(module: nn.Module) -> list[str]:
    """Dotted names of every ``nn.ModuleList``/``nn.Sequential`` with at least one child."""
    return [name for name, m in module.named_modules() if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m)]


def _resolve_stack(module: nn.Module, path: str) -> nn.Module:
    try:
        stack = module.get_submodule(path)
    except AttributeError:
        stack = None
    if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
        found = ", ".join(repr(c) for c in candidate_stacks(module)) or "none"
        what = "does not exist" if stack is None else f"is a {type(stack).__name__}"
        raise ValueError(
            f"blocks={path!r} {what}; pass the dotted path of an nn.ModuleList or nn.Sequential of residual "
            f"blocks. Candidates in {type(module).__name__}: {found}."
        )
    return stack


def _run_example(module: nn.Module, example_input: ExampleInput) -> None:
    if example_input is None:
        example_input = getattr(module, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            "apply_mhc runs the module once to find its blocks, width and residual branches: pass "
            "example_input= (a tensor, a tuple of arguments, a dict of keyword arguments or a callable taking "
            "the module), or set module.example_input_array."
        )
    if callable(example_input) and not isinstance(example_input, Tensor):
        example_input(module)
    elif isinstance(example_input, tuple):
        module(*example_input)
    elif isinstance(example_input, dict):
        module(**example_input)
    else:
        module(example_input)


def _probe_plan(module: nn.Module, config: MHCConfig, example_input: ExampleInput) -> dict[str, Any]:
    names = [config.blocks] if config.blocks else candidate_stacks(module)
    stacks = {name: _resolve_stack(module, name) for name in names}
    probes: dict[int, _Probe] = {}
    handles = []
    for stack in stacks.values():
        for block in stack:
            handles.append(block.register_forward_pre_hook(_record_call(probes), with_kwargs=True))
            handles.append(block.register_forward_hook(_record_output(probes), with_kwargs=True))
    training = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            _run_example(module, example_input)
            if config.blocks:
                stack_name = config.blocks
                _check_stack(stack_name, stacks[stack_name], probes)
            else:
                stack_name = _choose_stack(module, stacks, probes)
            stack = stacks[stack_name]
            first = probes[id(stack[0])]
            channels_first = _is_channels_first(stack[0], first)
            blocks = [_split_plan(f"{stack_name}.{i}", b, probes[id(b)], config) for i, b in enumerate(stack)]
    finally:
        for h in handles:
            h.remove()
        for m, mode in training.items():
            m.training = mode
    dim = first.hidden.shape[1 if channels_first else -1]
    plan = {"stack": stack_name, "dim": dim, "blocks": blocks}
    return {**plan, "channels_first": True} if channels_first else plan


def _record_call(probes: dict[int, _Probe]) -> Callable:
    def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
        if id(block) not in probes:
            try:
                hidden, _ = take_hidden(args, kwargs)
            except TypeError:
                return
            probes[id(block)] = _Probe(args, kwargs, hidden)

    return hook


def _record_output(probes: dict[int, _Probe]) -> Callable:
    def hook(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        probe = probes.get(id(block))
        if probe is not None and probe.out_hidden is None:
            try:
                probe.out_hidden, _ = split_output(out)
            except TypeError:
                return

    return hook


def _stack_problem(stack: nn.Module, probes: dict[int, _Probe]) -> str | None:
    """Why ``stack`` is not a chain of shape-preserving blocks, or ``None`` if it is."""
    previous_out = None
    for i, block in enumerate(stack):
        probe = probes.get(id(block))
        if probe is None or probe.out_hidden is None:
            return f"block {i} ({type(block).__name__}) did not run or returned no hidden state"
        if not probe.hidden.is_floating_point():
            return (
                f"block {i} ({type(block).__name__}) is called on a {probe.hidden.dtype} tensor; mHC mixes the "
                "streams of a floating-point hidden state"
            )
        if probe.out_hidden.shape != probe.hidden.shape:
            return (
                f"block {i} ({type(block).__name__}) changes the hidden shape from {tuple(probe.hidden.shape)} to "
                f"{tuple(probe.out_hidden.shape)}; mHC needs residual blocks whose output shape equals their input"
            )
        if previous_out is not None and probe.hidden is not previous_out:
            return f"block {i} ({type(block).__name__}) is not called on the previous block's output"
        previous_out = probe.out_hidden
    return None


def _check_stack(name: str, stack: nn.Module, probes: dict[int, _Probe]) -> None:
    problem = _stack_problem(stack, probes)
    if problem is not None:
        raise ValueError(f"blocks={name!r}: {problem}.")


def _choose_stack(module: nn.Module, stacks: dict[str, nn.Module], probes: dict[int, _Probe]) -> str:
    """The longest list of same-typed, shape-preserving blocks, each run on the previous one's output."""
    best, rejected = None, []
    for name, stack in stacks.items():
        if len(stack) < 2 or len({type(b) for b in stack}) != 1:
            rejected.append(f"'{name}': not at least two blocks of one type")
            continue
        problem = _stack_problem(stack, probes)
        if problem is not None:
            rejected.append(f"'{name}': {problem}")
        elif best is None or len(stack) > len(stacks[best]):
            best = name
    if best is None:
        why = "; ".join(rejected) or "the module has no nn.ModuleList or nn.Sequential"
        raise ValueError(
            f"Could not find a stack of residual blocks in {type(module).__name__} ({why}). "
            "Pass blocks='dotted.path.to.blocks' naming the nn.ModuleList of residual blocks."
        )
    return best


def _split_plan(name: str, block: nn.Module, probe: _Probe, config: MHCConfig) -> dict[str, Any]:
    """Granularity, branch count and whether the block changes its input in place (then it gets a copy), from
    running it again: under a ``ResidualWatcher`` to find its residual sums, and with gradients to check that each
    branch reads the previous branch's sum (parallel branches, ``x + attn(ln x) + mlp(ln x)``, do not)."""
    clone_input = _changes_its_input(block, probe)
    whole = {"granularity": "block", "branches": 1, **({"clone_input": True} if clone_input else {})}
    if config.granularity == "block":
        return whole
    watcher = ResidualWatcher(probe.hidden)
    args, kwargs = probe.call_args()
    with watcher:
        out = block(*args, **kwargs)
    out_hidden, _ = split_output(out)
    if not returns_last_sum(watcher, out_hidden):
        why = f"found {watcher.branches} additions to the residual, and the block must return its last one unchanged"
    elif watcher.branches > 1 and not _branches_read_previous_sums(block, probe):
        why = "its residual branches run in parallel on the same input, so they are one branch"
    else:
        return {"granularity": "sublayer", "branches": watcher.branches}
    if config.granularity == "sublayer":
        raise ValueError(
            f"granularity='sublayer' but mHC cannot split {name} ({type(block).__name__}): {why}. Use "
            "granularity='auto' or 'block'."
        )
    warnings.warn(
        f"mHC wraps {name} ({type(block).__name__}) whole as one branch, F(h) = block(h) - h: {why}.", stacklevel=3
    )
    return whole


def _changes_its_input(block: nn.Module, probe: _Probe) -> bool:
    """Whether ``block`` modifies its hidden-state input in place (``x += f(x)``), run on a copy of it."""
    hidden = probe.hidden.clone()
    args, kwargs = take_hidden(*probe.call_args())[1](hidden)
    version = hidden._version
    block(*args, **kwargs)
    return hidden._version != version


def _branches_read_previous_sums(block: nn.Module, probe: _Probe) -> bool:
    """Whether every residual branch after the first depends on the sum the previous branch ended with."""
    sums: list[tuple[Tensor, Tensor]] = []

    def record(residual: Tensor, branch_out: Tensor) -> Tensor:
        sums.append((residual, branch_out))
        return residual + branch_out

    hidden = probe.hidden.detach().clone().requires_grad_(True)
    args, kwargs = take_hidden(*probe.call_args())[1](hidden)
    try:
        with torch.enable_grad():
            with ResidualWatcher(hidden, record):
                block(*args, **kwargs)
            for residual, branch_out in sums[1:]:
                if not branch_out.requires_grad:
                    return False
                (grad,) = torch.autograd.grad(branch_out.sum(), residual, retain_graph=True, allow_unused=True)
                if grad is None:
                    return False
    except RuntimeError:
        return False
    return True


def _is_channels_first(block: nn.Module, probe: _Probe) -> bool:
    """Whether the hidden state is channels-first (``(B, C, H, W)``, conv nets): a convolution in the first block
    takes a tensor of the hidden state's shape with ``in_channels`` equal to its dimension 1."""
    shape = probe.hidden.shape
    if probe.hidden.dim() < 3:
        return False
    seen: list[bool] = []

    def check(conv: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], Tensor) and args[0].shape == shape and conv.in_channels == shape[1]:
            seen.append(True)

    convs = [m for m in block.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    handles = [conv.register_forward_pre_hook(check) for conv in convs]
    args, kwargs = probe.call_args()
    try:
        block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return bool(seen)
