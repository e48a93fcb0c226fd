"""Selective recomputation (mHC paper §4.3.2): keep the stream state only at the start of each group of ``L_r``
sublayers and re-run the cheap mHC steps of a group in backward, never the branches F.

How. While a group's mHC steps (``HyperConnection.read``/``write``) run, a ``saved_tensors_hooks`` pair replaces
every tensor autograd saves with a small handle holding the group and the tensor's position in the group's
sequence of saves; the group keeps only its input stream state ``x_{l0}`` and each branch output ``F`` (which the
merge's backward needs anyway). While a branch F runs, only the tensors F saves that are views of its own input
``H_pre · x_l`` are replaced (their view geometry is kept), so F's other activations are stored as usual and F is
never run again. The first handle of a group unpacked in backward replays the group's mHC steps from ``x_{l0}``
and the stored ``F`` (gradients on, the same autocast state, no capture, saves recorded in order instead of
stored), which yields the same tensors in the same order; each handle takes its tensor out of that cache, so the
cache empties as backward walks through the group.

State lives in the objects of one forward pass (a :class:`RecomputeChain` handed from block to block on the
stream tensor, and its groups referenced by the autograd graph), so gradient accumulation, DDP and threads need
nothing global. Memory per token (paper): ``n C ceil(L / L_r)`` kept plus ``(n + 2) C L_r`` transient in backward,
least at ``L_r* = sqrt(n L / (n + 2))``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor
from torch.autograd.graph import saved_tensors_hooks
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_mhc.config import MHCConfig
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.kernels.reference import Coefficients

CHAIN_ATTRIBUTE = "_mhc_recompute_chain"
T = TypeVar("T")


def recompute_layers(config: MHCConfig, sublayers: int) -> int:
    """``L_r``: ``config.recompute_layers`` or the paper's optimum ``sqrt(n L / (n + 2))``, rounded, at least 1."""
    if config.recompute_layers is not None:
        return config.recompute_layers
    n = config.stream_count
    return max(1, round(math.sqrt(n * sublayers / (n + 2))))


def formula_elements(streams: int, dim: int, sublayers: int, layers_per_group: int) -> tuple[int, int]:
    """Paper's per-token mHC activation elements with recomputation: ``(kept, transient)`` =
    ``(n C ceil(L / L_r), (n + 2) C L_r)``; without it every sublayer keeps its ``(n + 2) C``."""
    n, c = streams, dim
    return n * c * math.ceil(sublayers / layers_per_group), (n + 2) * c * min(layers_per_group, sublayers)


class _Autocast(NamedTuple):
    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def current(cls, device_type: str) -> _Autocast:
        return cls(
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled(),
        )

    def restore(self) -> AbstractContextManager:
        return torch.autocast(
            self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=self.cache_enabled
        )


@dataclass
class _Sublayer:
    """What the replay of one sublayer needs: its hyper-connection, the stored F and the autocast states."""

    hyper: HyperConnection
    read_autocast: _Autocast
    branch_input_geometry: tuple[tuple[int, ...], tuple[int, ...], int]
    branch_out: _Stored | None = None
    write_autocast: _Autocast | None = None


class _Handle(NamedTuple):
    """What autograd stores in place of a saved tensor: its group, its key and how to check or view it."""

    group: RecomputeGroup
    key: Any
    shape: tuple[int, ...]
    dtype: torch.dtype
    view: tuple[tuple[int, ...], int] | None


class _Stored(NamedTuple):
    """A tensor kept for the replay, detached (so the group holds no graph and makes no reference cycle with it)."""

    data: Tensor
    requires_grad: bool

    @classmethod
    def of(cls, t: Tensor) -> _Stored:
        return cls(t.detach(), t.requires_grad)

    def replay_input(self) -> Tensor:
        """A fresh leaf that requires grad exactly when the original did, so the replay saves what forward did."""
        return self.data.detach().requires_grad_(self.requires_grad)


def _unreachable_unpack(_: Any) -> Tensor:
    raise RuntimeError(
        "A tensor saved while replaying an mHC recomputation group was unpacked; the replay's graph is discarded "
        "and must not be differentiated."
    )


class RecomputeGroup:
    """``L_r`` consecutive sublayers: the stored stream state ``x_{l0}``, each sublayer's F, and the replay."""

    def __init__(self, x0: Tensor) -> None:
        self.x0 = _Stored.of(x0)
        self.sublayers: list[_Sublayer] = []
        self.positions = 0
        self.view_uses: dict[int, int] = {}
        self._cache: dict[Any, list] = {}
        self._lock = threading.Lock()

    def pack_position(self, t: Tensor) -> _Handle:
        handle = _Handle(self, self.positions, tuple(t.shape), t.dtype, None)
        self.positions += 1
        return handle

    def pack_view(self, t: Tensor) -> _Handle:
        k = len(self.sublayers) - 1
        self.view_uses[k] = self.view_uses.get(k, 0) + 1
        return _Handle(self, ("branch_input", k), tuple(t.shape), t.dtype, (tuple(t.stride()), t.storage_offset()))

    def unpack(self, handle: _Handle) -> Tensor:
        """The recomputed tensor for ``handle``; replays the group on the first request (or after a consumed one)."""
        with self._lock:
            entry = self._cache.get(handle.key)
            if entry is None:
                self._cache = self._replay()
                entry = self._cache[handle.key]
            tensor = entry[0]
            entry[1] -= 1
            if entry[1] == 0:
                del self._cache[handle.key]
        if handle.view is not None:
            tensor = tensor.as_strided(handle.shape, *handle.view)
        if tuple(tensor.shape) != handle.shape or tensor.dtype != handle.dtype:
            raise RuntimeError(
                f"mHC recomputation produced a {tensor.dtype} tensor of shape {tuple(tensor.shape)} where forward "
                f"saved {handle.dtype} {handle.shape}: the mHC steps are not deterministic here (were parameters "
                "frozen or unfrozen between forward and backward?). Train with MHCConfig(recompute=False)."
            )
        return tensor

    def _replay(self) -> dict[Any, list]:
        """Re-run the group's mHC steps from ``x_{l0}`` and the stored F; every saved tensor in forward order."""
        saved: list[Tensor] = []

        def record(t: Tensor) -> None:
            saved.append(t.detach())

        cache: dict[Any, list] = {}
        x = self.x0.replay_input()
        with torch.enable_grad(), saved_tensors_hooks(record, _unreachable_unpack):
            for k, sub in enumerate(self.sublayers):
                with sub.read_autocast.restore():
                    h, coeffs = sub.hyper.read(x, capture=False)
                if (tuple(h.shape), tuple(h.stride()), h.storage_offset()) != sub.branch_input_geometry:
                    raise RuntimeError("mHC recomputation laid out a branch input differently from forward.")
                if k in self.view_uses:
                    cache[("branch_input", k)] = [h.detach(), self.view_uses[k]]
                with sub.write_autocast.restore():
                    x = sub.hyper.write(x, sub.branch_out.replay_input(), coeffs)
        if len(saved) != self.positions:
            raise RuntimeError(
                f"mHC recomputation saved {len(saved)} tensors where forward saved {self.positions}; train with "
                "MHCConfig(recompute=False) for this model."
            )
        cache.update({i: [t, 1] for i, t in enumerate(saved)})
        return cache


_OFF, _MHC, _BRANCH = "off", "mhc", "branch"


def _pass_or_unpack(packed: Any) -> Tensor:
    return packed.group.unpack(packed) if isinstance(packed, _Handle) else packed


class RecomputeChain:
    """Selective recomputation across one forward pass over the block stack, handed from block to block.

    Sublayer ``i`` (counted over the whole stack) starts a group when ``i % L_r == 0``; groups never cross the
    stack's ends because the first block starts a new chain.
    """

    def __init__(self, layers_per_group: int) -> None:
        self.layers_per_group = layers_per_group
        self.group: RecomputeGroup | None = None
        self.next_sublayer = 0
        self.phase = _OFF
        self.branch_input: Tensor | None = None
        self._branch_ptr = 0

    @staticmethod
    def take(streams: Tensor, default: RecomputeChain) -> RecomputeChain:
        """The chain the previous block handed over on ``streams``, or ``default`` when there is none."""
        chain = streams.__dict__.pop(CHAIN_ATTRIBUTE, None)
        return chain if isinstance(chain, RecomputeChain) else default

    def hand_over(self, streams: Tensor) -> None:
        """Attach the chain to the stream state the next block receives (taken off again by ``take``)."""
        setattr(streams, CHAIN_ATTRIBUTE, self)

    def hooks(self) -> AbstractContextManager:
        """The saved-tensor hooks to hold while a block runs."""
        return saved_tensors_hooks(self._pack, _pass_or_unpack)

    def read(self, hyper: HyperConnection, x: Tensor, sublayer: int) -> tuple[Tensor, Coefficients | None]:
        """``hyper.read`` with its saves packed; starts a new group at every ``L_r``-th sublayer."""
        if self.group is None or sublayer % self.layers_per_group == 0 or sublayer != self.next_sublayer:
            self.group = RecomputeGroup(x)
        self.next_sublayer = sublayer + 1
        self.phase = _MHC
        h, coeffs = hyper.read(x)
        self.group.sublayers.append(
            _Sublayer(hyper, _Autocast.current(x.device.type), (tuple(h.shape), tuple(h.stride()), h.storage_offset()))
        )
        self.phase = _BRANCH
        self.branch_input = h
        self._branch_ptr = h.untyped_storage().data_ptr() if h.layout == torch.strided and h.numel() else 0
        return h, coeffs

    def write(self, hyper: HyperConnection, x: Tensor, branch_out: Tensor, coeffs: Coefficients | None) -> Tensor:
        """``hyper.write`` with its saves packed; stores ``F`` for the replay."""
        sub = self.group.sublayers[-1]
        sub.branch_out = _Stored.of(branch_out)
        sub.write_autocast = _Autocast.current(x.device.type)
        self.phase = _MHC
        out = hyper.write(x, branch_out, coeffs)
        self.phase = _OFF
        self.branch_input = None
        self._branch_ptr = 0
        return out

    def _pack(self, t: Tensor) -> Any:
        if self.phase == _MHC:
            return self.group.pack_position(t)
        if self.phase == _BRANCH and self._views_branch_input(t):
            return self.group.pack_view(t)
        return t

    def _views_branch_input(self, t: Tensor) -> bool:
        # branch_input is held until the write, so its storage cannot be reused by a tensor F saves.
        h = self.branch_input
        return (
            self._branch_ptr != 0
            and type(t) is Tensor
            and t.layout == torch.strided
            and t.dtype == h.dtype
            and t.device == h.device
            and t.untyped_storage().data_ptr() == self._branch_ptr
        )


def _storages(tree: Any) -> list[torch.UntypedStorage]:
    return [
        t.untyped_storage()
        for t in tree_flatten(tree)[0]
        if isinstance(t, Tensor) and t.layout == torch.strided and not t.is_meta
    ]


class _StorageTracker(TorchDispatchMode):
    """Weak references to the storage of every tensor the ops under it allocate (not views or in-place results)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[StorageWeakRef, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {s.data_ptr() for s in _storages((args, kwargs))}
        for storage in _storages(out):
            if storage.data_ptr() not in inputs:
                self.storages[StorageWeakRef(storage)] = storage.nbytes()
        return out


@contextmanager
def _tracking() -> Iterator[_StorageTracker]:
    tracker = _StorageTracker()
    with tracker:
        yield tracker


def retained_bytes(run: Callable[[], T]) -> tuple[T, int]:
    """Run ``run()`` and count the bytes of the tensor storages it created that are still alive when it returns.

    Called on a forward pass that returns the loss, this is the activation memory held for backward (whatever
    holds it: autograd's saved tensors or objects they reference), measured the same way on CPU and GPU.
    """
    with _tracking() as tracker:
        result = run()
    return result, sum(nbytes for ref, nbytes in tracker.storages.items() if not ref.expired())
