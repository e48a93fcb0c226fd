"""MHCBlock: one user block, run by its own ``forward``, with its residual branches routed through mHC.

Between blocks the hidden state is the stream state ``(..., n, C)``; the first block of the stack expands its
input into n streams and the last reduces them, so the code around the stack sees ordinary hidden states.
State-dict keys of the wrapped block keep their original names (no ``block.`` prefix), so weights move between
the plain and the injected model with ``strict=False``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mhc.branches import ResidualWatcher, returns_last_sum
from lightning_mhc.capture import StreamCapture
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
    """Carries the stream state through one call of a split block: each residual sum becomes a merge."""

    def __init__(self, steps: _Steps, streams: Tensor, block_name: str) -> None:
        self.steps = steps
        self.branches = len(steps.hypers)
        self.streams = streams
        self.block_name = block_name
        self.index = 0
        self.coeffs: Coefficients | None = None

    def first_input(self) -> Tensor:
        h, self.coeffs = self.steps.read(0, self.streams)
        return h

    def end_branch(self, residual: Tensor, branch_out: Tensor) -> Tensor:
        if self.index >= self.branches:
            raise RuntimeError(
                f"{self.block_name} made more residual additions than the {self.branches} found when mHC was "
                "injected; its control flow changed. Inject with granularity='block' for such blocks."
            )
        self.streams = self.steps.write(self.index, self.streams, branch_out, self.coeffs)
        self.index += 1
        if self.index < self.branches:
            h, self.coeffs = self.steps.read(self.index, self.streams)
            return h
        return branch_out


class MHCBlock(nn.Module):
    """A user block whose residual branches each get a :class:`HyperConnection`.

    ``granularity="sublayer"``: the block's residual sums are found as it runs (see ``branches.py``);
    ``"block"``: the whole block is one branch, ``F(h) = block(h) - h``. With ``recompute_layers`` (``L_r``) set,
    the mHC steps run under a :class:`RecomputeChain` whose groups start at stack-wide sublayer indices that are
    multiples of ``L_r``; ``first_sublayer`` is the stack-wide index of this block's first branch.
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
    ) -> None:
        super().__init__()
        self.block = block
        self.hyper = nn.ModuleList(HyperConnection(dim, config) for _ in range(branches))
        self.granularity = granularity
        self.streams = config.stream_count
        self.first = first
        self.last = last
        self.readout = StreamReadout(self.streams, config.readout) if last else None
        self.block_name = type(block).__name__
        self.first_sublayer = first_sublayer
        self.recompute_layers = recompute_layers if self.streams > 1 else None
        self.capture: StreamCapture | None = None
        self.register_state_dict_post_hook(_drop_wrapped_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapped_prefix)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, with_hidden = take_hidden(args, kwargs)
        if self.capture is not None and self.first:
            self.capture.begin_forward()
        streams = expand_streams(hidden, self.streams) if self.first else hidden
        if streams.dim() < 2 or streams.shape[-2] != self.streams:
            raise RuntimeError(
                f"{self.block_name} received a hidden state of shape {tuple(hidden.shape)} instead of the "
                f"{self.streams}-stream state: the injected blocks must run in order, each on the previous output."
            )
        chain = None
        if self.recompute_layers is not None and torch.is_grad_enabled():
            chain = RecomputeChain(self.recompute_layers)
            if not self.first:
                chain = RecomputeChain.take(hidden, chain)
        steps = _Steps(self.hyper, self.first_sublayer, chain)
        with nullcontext() if chain is None else chain.hooks():
            if self.granularity == "block":
                streams, rebuild = self._forward_whole(streams, with_hidden, steps)
            else:
                streams, rebuild = self._forward_split(streams, with_hidden, steps)
        if not self.last:
            if chain is not None:
                chain.hand_over(streams)
            return rebuild(streams)
        if self.capture is not None:
            self.capture.add_final_streams(streams)
        return rebuild(self.readout(streams))

    def _forward_whole(self, streams: Tensor, with_hidden: Callable, steps: _Steps) -> tuple[Tensor, Callable]:
        h, coeffs = steps.read(0, streams)
        args, kwargs = with_hidden(h)
        out, rebuild = split_output(self.block(*args, **kwargs))
        return steps.write(0, streams, out - h, coeffs), rebuild

    def _forward_split(self, streams: Tensor, with_hidden: Callable, steps: _Steps) -> tuple[Tensor, Callable]:
        routing = _StreamRouting(steps, streams, self.block_name)
        h = routing.first_input()
        args, kwargs = with_hidden(h)
        watcher = ResidualWatcher(h, routing.end_branch)
        with watcher:
            out = self.block(*args, **kwargs)
        out_hidden, rebuild = split_output(out)
        if routing.index != len(self.hyper) or not returns_last_sum(watcher, out_hidden):
            raise RuntimeError(
                f"{self.block_name} made {routing.index} residual additions (expected {len(self.hyper)}) or did "
                "not return its last residual sum; its control flow changed since injection. Inject with "
                "granularity='block' for such blocks."
            )
        return routing.streams, rebuild

    def extra_repr(self) -> str:
        recompute = "" if self.recompute_layers is None else f", recompute_layers={self.recompute_layers}"
        return (
            f"granularity={self.granularity!r}, branches={len(self.hyper)}, first={self.first}, last={self.last}"
            + recompute
        )


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
