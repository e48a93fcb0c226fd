"""MHCBlock: one user block, run by its own ``forward``, with its residual branches routed through mHC.

The first block of the stack expands its input into n streams; every block returns an ordinary hidden state (the
readout of its streams) carrying the stream state to the next block (``carry.py``), so the code around and between
the blocks sees hidden states of the original shape.
State-dict keys of the wrapped block keep their original names (no ``block.`` prefix), so weights move between
the plain and the injected model with ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils.checkpoint import checkpoint

from lightning_mhc.branches import ResidualWatcher, returns_last_sum
from lightning_mhc.capture import StreamCapture
from lightning_mhc.carry import attach_streams, carried_streams
from lightning_mhc.config import MHCConfig
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.kernels.reference import Coefficients
from lightning_mhc.recompute import RecomputeChain
from lightning_mhc.streams import StreamReadout, expand_streams

WRAPPED = "block"


HIDDEN_NAMES = ("hidden_states", "hidden", "x", "h", "inputs", "input")


def take_hidden(args: tuple, kwargs: dict) -> tuple[Tensor, Callable[[Tensor], tuple[tuple, dict]]]:
    """The hidden state a block is called with (the first positional argument, else the keyword named like a hidden
    state, else the first floating-point keyword tensor) and a function that puts a replacement in its place."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda h: ((h, *args[1:]), kwargs)
    named = [k for k in HIDDEN_NAMES if isinstance(kwargs.get(k), Tensor)]
    floating = [k for k, v in kwargs.items() if isinstance(v, Tensor) and v.is_floating_point()]
    for key in named[:1] or floating[:1]:
        return kwargs[key], lambda h, key=key: (args, {**kwargs, key: h})
    raise TypeError("mHC could not find the hidden state: pass it to the block as its first argument.")


def split_output(out: Any) -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The hidden state in a block's output (a tensor, or the first item of a tuple or list) and a rebuilder."""
    if isinstance(out, Tensor):
        return out, lambda h: h
    if isinstance(out, tuple) and hasattr(out, "_fields") and isinstance(out[0], Tensor):
        return out[0], lambda h: out._replace(**{out._fields[0]: h})
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0], lambda h: type(out)([h, *out[1:]])
    raise TypeError(
        f"mHC needs a block to return its hidden state as a tensor or as the first item of a tuple; got "
        f"{type(out).__name__}. Wrap the block so it does, or pass blocks= pointing at a stack that does."
    )


class _Steps:
    """A block's mHC steps for one call: straight through its hyper-connections, or through a recompute chain."""

    def __init__(self, hypers: nn.ModuleList, first_sublayer: int, chain: RecomputeChain | None) -> None:
        self.hypers = hypers
        self.first_sublayer = first_sublayer
        self.chain = chain

    def read(self, k: int, streams: Tensor) -> tuple[Tensor, Coefficients | None]:
        if self.chain is None:
            return self.hypers[k].read(streams)
        return self.chain.read(self.hypers[k], streams, self.first_sublayer + k)

    def write(self, k: int, streams: Tensor, branch_out: Tensor, coeffs: Coefficients | None) -> Tensor:
        if self.chain is None:
            return self.hypers[k].write(streams, branch_out, coeffs)
        return self.chain.write(self.hypers[k], streams, branch_out, coeffs)


class _StreamRouting:
    """Carries the stream state through one call of a split block: each residual sum becomes a merge, and the last
    one returns the readout hidden state (so whatever the block computes after it sees a hidden state)."""

    def __init__(
        self,
        steps: _Steps,
        streams: Tensor,
        block_name: str,
        read_out: Callable[[Tensor], Tensor],
        to_tokens: Callable[[Tensor], Tensor],
        from_tokens: Callable[[Tensor], Tensor],
    ) -> None:
        self.steps = steps
        self.to_tokens = to_tokens
        self.from_tokens = from_tokens
        self.branches = len(steps.hypers)
        self.streams = streams
        self.block_name = block_name
        self.read_out = read_out
        self.index = 0
        self.coeffs: Coefficients | None = None

    def first_input(self) -> Tensor:
        h, self.coeffs = self.steps.read(0, self.streams)
        return self.from_tokens(h)

    def end_branch(self, residual: Tensor, branch_out: Tensor) -> Tensor:
        if self.index >= self.branches:
            raise RuntimeError(
                f"{self.block_name} made more residual additions than the {self.branches} found when mHC was "
                "injected; its control flow changed. Inject with granularity='block' for such blocks."
            )
        self.streams = self.steps.write(self.index, self.streams, self.to_tokens(branch_out), self.coeffs)
        self.index += 1
        if self.index < self.branches:
            h, self.coeffs = self.steps.read(self.index, self.streams)
            return self.from_tokens(h)
        return self.read_out(self.streams)


class MHCBlock(nn.Module):
    """A user block whose residual branches each get a :class:`HyperConnection`.

    ``granularity="sublayer"``: the block's residual sums are found as it runs (see ``branches.py``);
    ``"block"``: the whole block is one branch, ``F(h) = block(h) - h``. With ``recompute_layers`` (``L_r``) set,
    the mHC steps run under a :class:`RecomputeChain` whose groups start at stack-wide sublayer indices that are
    multiples of ``L_r``; ``first_sublayer`` is the stack-wide index of this block's first branch.

    What the block returns is a hidden state of the original shape: the readout of its streams (the configured
    readout for the last block; the mean, or the sum with ``readout="sum"``, for the others), carrying the stream
    state for the next block (see ``carry.py``). Attributes the wrapper does not have are read from and written to
    the wrapped block, so ``model.layers[0].self_attn`` still reaches the attention module.

    Activation checkpointing requested on the wrapped block (Hugging Face ``gradient_checkpointing_enable()``,
    ``checkpoint_wrapper``/``apply_activation_checkpointing``) is done here instead, around the block and its mHC
    steps, so the recomputation in backward replays the same merges.
    """

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        branches: int,
        granularity: str,
        config: MHCConfig,
        first: bool,
        last: bool,
        first_sublayer: int = 0,
        recompute_layers: int | None = None,
        clone_input: bool = False,
        channels_first: bool = False,
    ) -> None:
        super().__init__()
        self.block = block
        self.hyper = nn.ModuleList(HyperConnection(dim, config, first_sublayer + k) for k in range(branches))
        self.granularity = granularity
        self.streams = config.stream_count
        self.first = first
        self.last = last
        self.readout = StreamReadout(self.streams, config.readout) if last else None
        self.reduce = "sum" if config.readout == "sum" else "mean"
        self.block_name = type(block).__name__
        self.first_sublayer = first_sublayer
        self.recompute_layers = recompute_layers if self.streams > 1 else None
        self.clone_input = clone_input
        self.channels_first = channels_first
        self.capture: StreamCapture | None = None
        self.register_state_dict_post_hook(_drop_wrapped_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapped_prefix)
        self._forward_attributes = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if WRAPPED not in modules:
                raise
            return getattr(modules[WRAPPED], name)

    def __setattr__(self, name: str, value: Any) -> None:
        block = self.__dict__.get("_modules", {}).get(WRAPPED)
        forwarding = self.__dict__.get("_forward_attributes", False)
        if not forwarding or _is_own_attribute(self, name) or not hasattr(block, name):
            super().__setattr__(name, value)
        else:
            setattr(block, name, value)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._takes_over_checkpointing():
            return self._run(*args, **kwargs)
        if _is_hf_checkpointing_layer(self.block) and not getattr(self.block, "_can_checkpoint_with_cache", False):
            # As Hugging Face does when it checkpoints: a cache would be updated again by the recomputation.
            kwargs = {k: (None if k in _CACHE_ARGUMENTS else v) for k, v in kwargs.items()}
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
        return checkpoint(self._run, *args, use_reentrant=False, **kwargs)

    def _takes_over_checkpointing(self) -> bool:
        """Whether the wrapped block asked for activation checkpointing (which this wrapper then does)."""
        if not (self.training and torch.is_grad_enabled()):
            return False
        return isinstance(self.block, CheckpointWrapper) or _is_hf_checkpointing_layer(self.block)

    def _activations_checkpointed(self) -> bool:
        """Whether activation checkpointing (ours, or the user's around this block: its saved-tensor hooks are
        active) already keeps this block's activations out of memory, so selective recomputation must not."""
        if self._takes_over_checkpointing():
            return True
        return not torch.compiler.is_compiling() and _saved_tensor_hooks_active()

    def _recomputes(self) -> bool:
        """Whether this call runs selective recomputation: asked for, gradients on, no activation checkpointing
        already, and not under ``torch.compile`` (whose graph the saved-tensor hooks of ``recompute.py`` cannot enter;
        there the compiler's partitioner chooses what backward keeps, so a compiled model stays one graph)."""
        return (
            self.recompute_layers is not None
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not self._activations_checkpointed()
        )

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        hidden, with_hidden = take_hidden(args, kwargs)
        streams = self._streams_in(hidden)
        chain = None
        if self._recomputes():
            chain = RecomputeChain(self.recompute_layers)
            if not self.first:
                chain = RecomputeChain.take(streams, chain)
        steps = _Steps(self.hyper, self.first_sublayer, chain)
        with nullcontext() if chain is None else chain.hooks(), _own_checkpointing_off(self.block) as block:
            if self.granularity == "block":
                streams, out_hidden, rebuild = self._forward_whole(block, streams, with_hidden, steps)
            else:
                streams, out_hidden, rebuild = self._forward_split(block, streams, with_hidden, steps)
        if self.last:
            if self.capture is not None:
                self.capture.add_final_streams(streams)
            return rebuild(out_hidden)
        if chain is not None:
            chain.hand_over(streams)
        return rebuild(attach_streams(out_hidden, streams))

    def _streams_in(self, hidden: Tensor) -> Tensor:
        if self.first:
            if self.capture is not None:
                self.capture.begin_forward()
            return expand_streams(self._to_tokens(hidden), self.streams)
        streams = carried_streams(hidden, self.block_name)
        if streams is None:
            raise RuntimeError(
                f"{self.block_name} (an mHC-injected block after the first) received a hidden state that no injected "
                "block returned, so its stream state is unknown. The injected blocks must run in order, each on the "
                "previous one's output (code between them must not replace it). Under activation checkpointing "
                "use use_reentrant=False: the reentrant variant passes detached copies."
            )
        if self.training and not torch.is_grad_enabled() and streams.requires_grad:
            raise RuntimeError(
                f"{self.block_name} runs without gradients inside a training forward whose stream state needs them: "
                "this is how torch.utils.checkpoint(..., use_reentrant=True) calls a block, and its gradients could "
                "not reach the mHC streams. Pass use_reentrant=False to checkpoint (Hugging Face: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))."
            )
        return streams

    def _to_tokens(self, x: Tensor) -> Tensor:
        """Channels last, the layout of the stream state (a view of a channels-first ``(B, C, H, W)`` hidden)."""
        return x.movedim(1, -1) if self.channels_first else x

    def _from_tokens(self, x: Tensor) -> Tensor:
        return x.movedim(-1, 1) if self.channels_first else x

    def _read_out(self, streams: Tensor) -> Tensor:
        if self.readout is not None:
            return self._from_tokens(self.readout(streams))
        return self._from_tokens(streams.sum(-2) if self.reduce == "sum" else streams.mean(-2))

    def _forward_whole(
        self, block: nn.Module, streams: Tensor, with_hidden: Callable, steps: _Steps
    ) -> tuple[Tensor, Tensor, Callable]:
        h, coeffs = steps.read(0, streams)
        h = self._from_tokens(h)
        args, kwargs = with_hidden(h.clone() if self.clone_input else h)
        out, rebuild = split_output(block(*args, **kwargs))
        streams = steps.write(0, streams, self._to_tokens(out - h), coeffs)
        return streams, self._read_out(streams), rebuild

    def _forward_split(
        self, block: nn.Module, streams: Tensor, with_hidden: Callable, steps: _Steps
    ) -> tuple[Tensor, Tensor, Callable]:
        routing = _StreamRouting(steps, streams, self.block_name, self._read_out, self._to_tokens, self._from_tokens)
        h = routing.first_input()
        args, kwargs = with_hidden(h)
        watcher = ResidualWatcher(h, routing.end_branch)
        with watcher:
            out = block(*args, **kwargs)
        out_hidden, rebuild = split_output(out)
        if routing.index != len(self.hyper) or not returns_last_sum(watcher, out_hidden):
            raise RuntimeError(
                f"{self.block_name} made {routing.index} residual additions (expected {len(self.hyper)}) or did "
                "not return its last residual sum; its control flow changed since injection. Inject with "
                "granularity='block' for such blocks."
            )
        return routing.streams, out_hidden, rebuild

    def extra_repr(self) -> str:
        recompute = "" if self.recompute_layers is None else f", recompute_layers={self.recompute_layers}"
        return (
            f"granularity={self.granularity!r}, branches={len(self.hyper)}, first={self.first}, last={self.last}"
            + (", channels_first=True" if self.channels_first else "")
            + recompute
        )


_CACHE_ARGUMENTS = ("cache", "layer_past", "past_key_values")


def _saved_tensor_hooks_active() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _is_own_attribute(module: nn.Module, name: str) -> bool:
    return (
        name in module.__dict__
        or name in module.__dict__.get("_parameters", {})
        or name in module.__dict__.get("_buffers", {})
        or name in module.__dict__.get("_modules", {})
        or hasattr(type(module), name)
    )


def _is_hf_checkpointing_layer(block: nn.Module) -> bool:
    """A Hugging Face ``GradientCheckpointingLayer`` with checkpointing switched on."""
    return getattr(block, "gradient_checkpointing", False) is True and hasattr(block, "_gradient_checkpointing_func")


@contextmanager
def _own_checkpointing_off(block: nn.Module) -> Iterator[nn.Module]:
    """The module to call in place of ``block``, with the block's own activation checkpointing switched off."""
    if isinstance(block, CheckpointWrapper):
        yield block._checkpoint_wrapped_module
    elif _is_hf_checkpointing_layer(block):
        block.gradient_checkpointing = False
        try:
            yield block
        finally:
            block.gradient_checkpointing = True
    else:
        yield block


def _drop_wrapped_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    inner = prefix + WRAPPED + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_wrapped_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    own = {prefix + "hyper." + name for name in module.hyper.state_dict(keep_vars=True)}
    if module.readout is not None:
        own |= {prefix + "readout." + name for name in module.readout.state_dict(keep_vars=True)}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in own]:
        state_dict[prefix + WRAPPED + "." + key[len(prefix) :]] = state_dict.pop(key)


def attach_capture(module: nn.Module, capture: StreamCapture | None) -> None:
    """Point every injected block and hyper-connection of ``module`` at ``capture`` (``None`` detaches)."""
    for m in module.modules():
        if isinstance(m, (HyperConnection, MHCBlock)):
            m.capture = capture
