"""Mixture-of-Experts feed-forward layer with two interchangeable backends.

``build_moe(config)`` returns a module mapping ``(..., hidden)`` to ``(..., hidden)``:

* ``"megablocks"``: MegaBlocks' dropless MoE (``megablocks.layers.dmoe.dMoE``, grouped GEMM), CUDA only, imported
  lazily so this file imports without it.
* ``"torch"``: :class:`TorchDroplessMoE`, the same math in plain PyTorch (runs anywhere). Its parameter names and
  shapes equal dMoE's (bias off, no expert parallelism), so state dicts move between the two backends.

Both backends expose the same state after every forward:

* ``aux_loss``: the load-balancing loss of the last training forward (already multiplied by
  ``aux_loss_weight``), or ``None``; the caller adds it to the training loss (:func:`moe_aux_loss` sums and clears
  it over a model).
* ``tokens_per_expert``: ``LongTensor [num_experts]``, detached, the expert load of the last forward.
* ``router_entropy``: mean entropy (nats) of the router's softmax over the tokens of the last forward.
* ``expert_bias`` (``balancing="aux_free"`` only): DeepSeek-V3's auxiliary-loss-free routing bias (see
  :class:`MoEConfig`). It is our own state, not MegaBlocks': a persistent float32 buffer that takes its initial value
  (zeros) when a loaded state dict lacks it, so MegaBlocks checkpoints load; :func:`strip_expert_bias` removes it for
  strict loading into a plain MegaBlocks ``dMoE``. Under ``torch.distributed`` its update uses the *global* expert load:
  the counts are summed over the ranks (one all-reduce per update, see :func:`set_balance_group`), so every rank takes
  the same step, from the load of the whole batch, as DeepSeek-V3 does; ``tokens_per_expert`` stays this rank's own.

Routing follows MegaBlocks' ``LearnedRouter`` (``megablocks/layers/router.py``): ``softmax(x W_r^T)`` over experts,
top-k, and the top-k probabilities are used as gate weights *without* renormalisation (MegaBlocks' default
``moe_normalize_expert_weights=None``); ``normalize_expert_weights=True`` divides them by their sum (MegaBlocks with
``moe_normalize_expert_weights=1``, DeepSeek-V3 style). The state of a forward is per call: a module called several
times per step keeps only the last call's ``aux_loss``, and the ``aux_free`` bias is updated after every training
forward (each micro-batch under gradient accumulation), unless :func:`defer_bias_updates` makes the layers sum their
loads until :func:`apply_bias_updates` (a pipeline's microbatches: one step per batch, as one process takes). A forward
re-run by activation checkpointing routes with the bias of its original forward and records nothing.
Under ``torch.distributed`` every rank of the balancing group must therefore run the same number of training
forwards of each layer (as DDP/FSDP already require); a pipeline stage holding different layers must not join a
collective over all ranks: give it a data-parallel group, or ``None``, with :func:`set_balance_group`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lightning_mhc.capture import in_backward
from lightning_mhc.config import check_bool, check_choice, check_float, check_int, short_repr

MLP_TYPES = ("mlp", "glu")
BALANCINGS = ("aux_loss", "aux_free", "none")
ACTIVATIONS = ("auto", "gelu", "silu")
BACKENDS = ("auto", "megablocks", "torch")

MEGABLOCKS_INSTALL_HINT = (
    "Do not `pip install megablocks`: its releases pin torch 2.7.0 and would replace your torch. Build it against the "
    "installed torch with `bash scripts/install_megablocks.sh` from the lightning_mhc repository (needs nvcc; it "
    "installs stanford-stk 0.7.1, grouped_gemm 0.3.0 and megablocks 0.10.0 with --no-deps --no-build-isolation and "
    "patches megablocks for CUDA 13), or pass backend='torch'."
)

_ELEMENTWISE_TINY = 1e-20

#: ``balance_group`` of an MoE layer meaning "the default process group" (see :func:`set_balance_group`).
WORLD = "world"


@dataclass(frozen=True)
class MoEConfig:
    """Shape and balancing of one MoE feed-forward layer (plain types, so LightningCLI/omegaconf can carry it).

    Args:
        hidden_size: model width ``h`` (input and output size).
        ffn_hidden_size: hidden size ``f`` of each routed expert.
        num_experts: number of routed experts ``E``.
        top_k: experts per token, ``1 <= top_k <= num_experts``.
        mlp_type: ``"mlp"`` (``act(x w1^T) w2``) or ``"glu"`` (``(act(x w1^T) * x v1^T) w2``).
        shared_expert_hidden_size: hidden size of an always-on shared expert added to the routed output; 0 = none.
        balancing: ``"aux_loss"`` (MegaBlocks' load-balancing loss, see :func:`load_balancing_loss`), ``"aux_free"``
            (DeepSeek-V3: a per-expert bias added to the routing scores for top-k selection only, moved by
            ``bias_update_rate * sign(mean_load - load_e)`` after each training forward, with the load summed over
            the ranks under ``torch.distributed``, see :func:`set_balance_group`) or ``"none"``.
        aux_loss_weight: weight of the load-balancing loss (MegaBlocks' ``moe_loss_weight``).
        bias_update_rate: step of the ``aux_free`` bias update (DeepSeek-V3's ``gamma``; 1e-3 in the paper).
        activation: ``"gelu"`` (tanh approximation, MegaBlocks' default), ``"silu"``, or ``"auto"`` (gelu for
            ``mlp``, silu for ``glu``, i.e. SwiGLU).
        normalize_expert_weights: divide the top-k gate weights by their sum (off in MegaBlocks by default).
        init_std: standard deviation of the normal init of router and expert weights (MegaBlocks' default 0.02).
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int = 8
    top_k: int = 2
    mlp_type: str = "mlp"
    shared_expert_hidden_size: int = 0
    balancing: str = "aux_loss"
    aux_loss_weight: float = 0.01
    bias_update_rate: float = 1e-3
    activation: str = "auto"
    normalize_expert_weights: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for field in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            check_int(f"MoEConfig.{field}", getattr(self, field), 1)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k!r} is not allowed; pass an integer between 1 and "
                f"num_experts={self.num_experts}."
            )
        check_choice("MoEConfig.mlp_type", self.mlp_type, MLP_TYPES)
        check_int("MoEConfig.shared_expert_hidden_size", self.shared_expert_hidden_size, 0)
        check_choice("MoEConfig.balancing", self.balancing, BALANCINGS)
        check_float("MoEConfig.aux_loss_weight", self.aux_loss_weight, 0.0)
        check_float("MoEConfig.bias_update_rate", self.bias_update_rate, 0.0)
        check_choice("MoEConfig.activation", self.activation, ACTIVATIONS)
        check_bool("MoEConfig.normalize_expert_weights", self.normalize_expert_weights)
        check_float("MoEConfig.init_std", self.init_std, 0.0, low_open=True)

    @property
    def activation_name(self) -> str:
        """The activation actually used: ``"gelu"`` or ``"silu"`` (``"auto"`` resolved by ``mlp_type``)."""
        if self.activation == "auto":
            return "silu" if self.mlp_type == "glu" else "gelu"
        return self.activation


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The expert activation for ``name``; ``"gelu"`` is the tanh approximation, as MegaBlocks' default."""
    if name == "gelu":
        return functools.partial(F.gelu, approximate="tanh")
    if name == "silu":
        return F.silu
    raise ValueError(f"activation {name!r} is not supported; pass 'gelu' or 'silu'.")


def load_balancing_loss(
    tokens_per_expert: torch.Tensor, scores: torch.Tensor, top_k: int, weight: float
) -> torch.Tensor:
    """MegaBlocks' load-balancing loss of one layer, times ``weight``.

    ``weight * E / (T * top_k) * sum_e tokens_per_expert[e] * mean_t scores[t, e]``, as in
    ``megablocks/layers/moe.py`` (``ParallelMLP.load_balancing_loss`` and ``batched_load_balancing_loss`` with one
    layer): 1 for a uniform router with uniform load, ``E`` when every token goes to one expert with certainty.
    Gradients flow through ``scores`` only. Zero (with a graph) when there are no tokens.
    """
    tokens, num_experts = scores.shape
    if tokens == 0:
        return scores.sum() * 0.0
    scale = weight * num_experts / (tokens * top_k)
    return scale * torch.dot(tokens_per_expert.to(scores.dtype), scores.mean(dim=0))


def load_imbalance(tokens_per_expert: torch.Tensor) -> float:
    """Max over mean expert load (1.0 = perfectly balanced, ``E`` = one expert takes everything)."""
    counts = tokens_per_expert.detach().double()
    mean = counts.mean().item()
    return counts.max().item() / mean if mean > 0 else 1.0


class _MoEState:
    """Routing selection, per-forward statistics, aux loss, aux-free bias and state-dict handling of both backends.

    A mixin for ``nn.Module`` subclasses; ``_init_moe_state`` must run after ``nn.Module.__init__``.
    """

    config: MoEConfig
    backend: str
    aux_loss: Optional[torch.Tensor]
    tokens_per_expert: torch.Tensor
    router_entropy: torch.Tensor
    expert_bias: torch.Tensor
    balance_group: Any
    training: bool
    register_buffer: Callable[..., None]

    def _init_moe_state(self, config: MoEConfig, backend: str, device: Optional[torch.device]) -> None:
        self.config = config
        self.backend = backend
        self.aux_loss = None
        self.tokens_per_expert = torch.zeros(config.num_experts, dtype=torch.long, device=device)
        self.router_entropy = torch.zeros((), device=device)
        self.balance_group = WORLD
        self.defer_bias_update = False
        self.pending_load: Optional[torch.Tensor] = None
        if config.balancing == "aux_free":
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32, device=device))

    def _select(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts per token and their gate weights; the aux-free bias moves the choice, never the weights."""
        k = self.config.top_k
        if self.config.balancing == "aux_free":
            experts = torch.topk(scores.detach().float() + self._routing_bias(), k, dim=-1).indices
            weights = scores.gather(-1, experts)
        else:
            weights, experts = torch.topk(scores, k, dim=-1)
        if self.config.normalize_expert_weights:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def _routing_bias(self) -> torch.Tensor:
        """The aux-free bias to route with. A forward re-run in backward (activation checkpointing) routes with the
        bias its original forward used: that forward has stepped the bias since, and routing with the stepped one
        would send tokens to other experts and give wrong gradients."""
        if in_backward():
            return self.__dict__.get("routed_bias", self.expert_bias)
        if self.training:
            self.routed_bias = self.expert_bias.clone()
        return self.expert_bias

    def _record(self, scores: torch.Tensor, tokens_per_expert: torch.Tensor) -> None:
        """Store load, router entropy and aux loss of this forward; step the aux-free bias in training. A forward
        re-run in backward records nothing: its original forward did."""
        if in_backward():
            return
        config = self.config
        with torch.no_grad():
            counts = tokens_per_expert.detach().to(torch.long)
            self.tokens_per_expert = counts
            probs = scores.detach().float()
            entropy = -(probs * probs.clamp_min(_ELEMENTWISE_TINY).log()).sum(-1)
            self.router_entropy = entropy.mean() if entropy.numel() else entropy.new_zeros(())
            if self.training and config.balancing == "aux_free":
                if self.__dict__.get("defer_bias_update", False):
                    pending = self.__dict__.get("pending_load")
                    self.pending_load = counts if pending is None else pending + counts
                else:
                    self._step_bias(counts)
        if self.training and config.balancing == "aux_loss" and config.aux_loss_weight > 0:
            self.aux_loss = load_balancing_loss(counts, scores, config.top_k, config.aux_loss_weight)
        else:
            self.aux_loss = None

    def _step_bias(self, counts: torch.Tensor) -> None:
        load = self._global_load(counts)
        self.expert_bias.add_(self.config.bias_update_rate * torch.sign(load.mean() - load))

    def apply_deferred_bias_update(self) -> bool:
        """Step the aux-free bias once from the loads accumulated since the last call (see
        :func:`defer_bias_updates`); ``False`` when no training forward ran."""
        pending = self.__dict__.get("pending_load")
        self.pending_load = None
        if pending is None:
            return False
        with torch.no_grad():
            self._step_bias(pending)
        return True

    def _global_load(self, counts: torch.Tensor) -> torch.Tensor:
        """``counts`` (int64) summed over the balancing group, as float32; ``counts`` itself stays local.

        One all-reduce of ``E`` integers per update, on the counts' device; no host sync (NCCL enqueues it on the
        stream). A rank that routed no token to some expert contributes zeros, so every rank calls it alike.
        """
        group = self.__dict__.get("balance_group", WORLD)  # modules pickled before this attribute existed
        if group is None or not dist.is_available() or not dist.is_initialized():
            return counts.float()
        pg = None if isinstance(group, str) else group
        if dist.get_world_size(pg) == 1:
            return counts.float()
        total = counts.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pg)
        return total.float()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "expert_bias"
        if self.config.balancing == "aux_free" and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.expert_bias)
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        """Move/cast like any module, but keep ``expert_bias`` in float32 (1e-3 steps vanish in bf16)."""
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        bias = self._buffers.get("expert_bias")  # type: ignore[attr-defined]
        if bias is not None and bias.dtype != torch.float32:
            self._buffers["expert_bias"] = bias.float()  # type: ignore[attr-defined]
        return result


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` handles these operands: on CPU for fp32/bf16/fp16 with 16-byte row strides.

    Measured on CPU (torch 2.13, one thread): 3x faster than a per-expert loop at E=8, f=64, h=32, 1.5x at
    f=256, h=128, 4096 tokens, identical results. Its CUDA kernels need sm90 and bf16, so CUDA takes the loop.
    """
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return False
    align = 16 // x.element_size()
    return all(size % align == 0 for size in weight.shape[1:])


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    if t.requires_grad:
        t.register_hook(lambda grad: grad.contiguous())
    return t


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``cat_e(x_e @ w_e^T if transpose else x_e @ w_e)`` for rows ``x`` sorted by expert, ``counts[e]`` rows each.

    ``weight`` is ``[E, rows, cols]``; experts without tokens contribute nothing (their gradient is zero).
    """
    w = weight.transpose(1, 2) if transpose else weight
    if x.shape[0] == 0:
        return x.new_zeros(0, w.shape[2])
    if _grouped_mm_supported(x, w):
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return _contiguous_grad(torch._grouped_mm(x, w, offs=offsets))
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ w[e] for e, chunk in enumerate(chunks)])


class GroupedExpertMLP(nn.Module):
    """The routed experts' weights in MegaBlocks' dMoE layout, each ``[E * f, h]`` (``megablocks/layers/mlp.py``).

    ``w1`` (and ``v1`` for GLU) are applied transposed (``x @ w1_e^T``), ``w2`` as stored (``x @ w2_e``), where
    ``w_e`` is rows ``e*f:(e+1)*f``, exactly as MegaBlocks' ``GroupedMLP``/``GroupedGLU`` do.
    """

    def __init__(self, config: MoEConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_size = config.hidden_size
        self.glu = config.mlp_type == "glu"
        self.act = activation_fn(config.activation_name)
        rows = config.num_experts * config.ffn_hidden_size
        names = ("w1", "v1", "w2") if self.glu else ("w1", "w2")
        for name in names:
            weight = nn.Parameter(torch.empty(rows, config.hidden_size, device=device, dtype=dtype))
            nn.init.normal_(weight, mean=0.0, std=config.init_std)
            self.register_parameter(name, weight)

    def _expert_view(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(self.num_experts, -1, self.hidden_size)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """Apply expert ``e`` to its ``tokens_per_expert[e]`` contiguous rows of ``x``."""
        hidden = self.act(grouped_matmul(x, self._expert_view(self.w1), tokens_per_expert, transpose=True))
        if self.glu:
            hidden = hidden * grouped_matmul(x, self._expert_view(self.v1), tokens_per_expert, transpose=True)
        return grouped_matmul(hidden, self._expert_view(self.w2), tokens_per_expert, transpose=False)


class DroplessExperts(nn.Module):
    """Permute tokens by expert, run :class:`GroupedExpertMLP` on contiguous groups, un-permute and mix (no drops)."""

    def __init__(self, config: MoEConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_experts = config.num_experts
        self.mlp = GroupedExpertMLP(config, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, expert_weights: torch.Tensor, top_experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, h]``, ``expert_weights``/``top_experts [T, k]`` -> ``(sum_k w_k expert_k(x) [T, h], load [E])``."""
        tokens, top_k = top_experts.shape
        flat = top_experts.reshape(-1)
        with torch.no_grad():
            order = torch.argsort(flat, stable=True)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            tokens_per_expert = torch.bincount(flat, minlength=self.num_experts)
        routed = self.mlp(x[order // top_k], tokens_per_expert)
        routed = routed[inverse].view(tokens, top_k, -1)
        return (routed * expert_weights.unsqueeze(-1)).sum(dim=1), tokens_per_expert


class LinearRouter(nn.Module):
    """Router logits ``x W_r^T`` (``layer.weight [E, h]``, no bias), as MegaBlocks' ``LearnedRouter``."""

    def __init__(self, config: MoEConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.layer = nn.Linear(config.hidden_size, config.num_experts, bias=False, device=device, dtype=dtype)
        nn.init.normal_(self.layer.weight, mean=0.0, std=config.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax routing probabilities ``[T, E]``."""
        return self.layer(x).softmax(dim=-1)


class SharedExpert(nn.Module):
    """Always-on expert with MegaBlocks' ``SharedMLP``/``SharedGLU`` names: ``up_proj``, ``down_proj``, ``gate_proj``.

    MLP: ``down(act(up(x)))``; GLU: ``down(act(gate(x)) * up(x))``. No biases (we build with ``bias=False``).
    """

    def __init__(self, config: MoEConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        h, s = config.hidden_size, config.shared_expert_hidden_size
        self.act = activation_fn(config.activation_name)
        self.up_proj = nn.Linear(h, s, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(s, h, bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(h, s, bias=False, device=device, dtype=dtype) if config.mlp_type == "glu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Shared expert output ``[..., h]``."""
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TorchDroplessMoE(_MoEState, nn.Module):
    """Dropless MoE in plain PyTorch with MegaBlocks dMoE's parameters (``router.layer.weight``,
    ``experts.mlp.{w1,v1,w2}``, ``shared_expert.{up,gate,down}_proj.weight``) and math.

    Tokens are sorted by expert and each expert runs on its contiguous slice (``torch._grouped_mm`` on CPU, a loop
    elsewhere), so no token is dropped and no padding is computed.

    Example::

        moe = TorchDroplessMoE(MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=8, top_k=2))
        y = moe(x)                      # x: [B, T, 64]
        loss = task_loss + moe.aux_loss  # in training, with balancing="aux_loss"
    """

    def __init__(self, config: MoEConfig, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        nn.Module.__init__(self)
        self.router = LinearRouter(config, device=device, dtype=dtype)
        self.experts = DroplessExperts(config, device=device, dtype=dtype)
        self.shared_expert = (
            SharedExpert(config, device=device, dtype=dtype) if config.shared_expert_hidden_size > 0 else None
        )
        self._init_moe_state(config, "torch", device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., h) -> (..., h)``; records load, entropy, aux loss (training) and steps the aux-free bias."""
        shape = x.shape
        if shape[-1] != self.config.hidden_size:
            raise ValueError(f"expected input of shape (..., {self.config.hidden_size}), got {tuple(shape)}.")
        tokens = x.reshape(-1, shape[-1])
        scores = self.router(tokens)
        weights, top_experts = self._select(scores)
        out, tokens_per_expert = self.experts(tokens, weights, top_experts)
        self._record(scores, tokens_per_expert)
        if self.shared_expert is not None:
            out = self.shared_expert(tokens) + out
        return out.view(shape)


@functools.cache
def _megablocks_probe() -> Optional[str]:
    """``None`` when MegaBlocks' dMoE and grouped GEMM import, else why not."""
    try:
        from megablocks import grouped_gemm_util
        from megablocks.layers import dmoe  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:
        return f"MegaBlocks could not be imported ({type(error).__name__}: {error})"
    if not grouped_gemm_util.grouped_gemm_is_available():
        return "MegaBlocks imported but its grouped GEMM package `grouped_gemm` did not"
    return None


def megablocks_available() -> bool:
    """Whether the MegaBlocks backend can be built here (importable with grouped GEMM, and CUDA present)."""
    return _megablocks_probe() is None and torch.cuda.is_available()


@functools.cache
def _megablocks_class() -> type[nn.Module]:
    """dMoE subclass sharing :class:`TorchDroplessMoE`'s state API (defined lazily: MegaBlocks is optional)."""
    from megablocks.layers import common
    from megablocks.layers.dmoe import dMoE
    from megablocks.layers.moe import get_load_balancing_loss

    class MegaBlocksMoE(_MoEState, dMoE):
        """MegaBlocks ``dMoE`` (parameters and kernels untouched) plus our per-forward state and aux-free routing.

        MegaBlocks appends ``(tokens_per_expert, scores)`` of each training forward to a global list; this forward
        takes its own entry out again (so the list never grows across steps) and turns it into ``aux_loss``.
        """

        def __init__(self, config: MoEConfig, args: Any, device: torch.device):
            dMoE.__init__(self, args)
            self._init_moe_state(config, "megablocks", device)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            tokens = common.cast_if_autocast_enabled(x).reshape(-1, shape[-1])
            if tokens.device.type != "cuda" or self.experts.mlp.w1.device.type != "cuda":
                raise RuntimeError(
                    f"MegaBlocks' kernels run on CUDA only, got input on {tokens.device} and weights on "
                    f"{self.experts.mlp.w1.device}; move the module to a GPU (Lightning does so when fitting on "
                    "accelerator='gpu'), or build with backend='torch'."
                )
            if tokens.dtype != torch.bfloat16 or self.experts.mlp.w1.dtype != torch.bfloat16:
                raise RuntimeError(
                    "MegaBlocks' grouped GEMM supports bfloat16 only, got input "
                    f"{tokens.dtype} and weights {self.experts.mlp.w1.dtype}; train with precision='bf16-true' "
                    "(or bf16 autocast and bf16 weights), or build with backend='torch'."
                )
            scores, weights, top_experts = self.router(tokens)
            if self.config.balancing == "aux_free":
                weights, top_experts = self._select(scores)
            pending = get_load_balancing_loss()
            before = len(pending)
            out = self.experts(tokens, scores, weights, top_experts)
            saved = pending[before:]
            del pending[before:]
            if saved:
                tokens_per_expert = saved[0][0]
            else:
                tokens_per_expert = torch.bincount(top_experts.flatten(), minlength=self.config.num_experts)
            self._record(scores, tokens_per_expert)
            if self.shared_expert is not None:
                out = self.shared_expert.add_experts_sharedexpert(self.shared_expert(tokens), out)
            return out.view(shape)

    return MegaBlocksMoE


def _build_megablocks(config: MoEConfig, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> nn.Module:
    reason = _megablocks_probe()
    if reason is not None:
        raise ImportError(f"MoE backend 'megablocks' is unavailable: {reason}. {MEGABLOCKS_INSTALL_HINT}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "MoE backend 'megablocks' needs a CUDA GPU (its kernels are CUDA only); pass backend='torch' on CPU. "
            + MEGABLOCKS_INSTALL_HINT
        )
    from megablocks.layers.arguments import DEFAULT_ACTIVATION_FN, Arguments

    # Not cuda:current_device(): a module built in __init__ is built before Lightning picks each rank's GPU, when every
    # rank's current device is cuda:0. Like any torch module, build on the default device (CPU, or the device that
    # trainer.init_module() / `with torch.device(...)` sets) and let the strategy move it (MegaBlocks uses
    # args.device only to create parameters; its forward follows the input's device).
    device = torch.get_default_device() if device is None else torch.device(device)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    init = functools.partial(nn.init.normal_, mean=0.0, std=config.init_std)
    args = Arguments(
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_layers=1,
        bias=False,
        return_bias=False,
        activation_fn=DEFAULT_ACTIVATION_FN if config.activation_name == "gelu" else F.silu,
        moe_num_experts=config.num_experts,
        moe_top_k=config.top_k,
        moe_normalize_expert_weights=1 if config.normalize_expert_weights else None,
        moe_loss_weight=config.aux_loss_weight if config.balancing == "aux_loss" else 0.0,
        mlp_type=config.mlp_type,
        mlp_impl="grouped",
        fp16=False,
        bf16=dtype == torch.bfloat16,
        device=device,
        init_method=init,
        output_layer_init_method=init,
        shared_expert=config.shared_expert_hidden_size > 0,
        shared_expert_hidden_size=config.shared_expert_hidden_size or None,
    )
    module = _megablocks_class()(config, args, device)
    if module.shared_expert is not None:
        module.shared_expert.to(dtype=dtype)
    return module


def build_moe(
    config: MoEConfig,
    backend: str = "auto",
    *,
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Build an MoE feed-forward layer ``(..., h) -> (..., h)``.

    Args:
        config: the layer's :class:`MoEConfig`.
        backend: ``"megablocks"`` (MegaBlocks dMoE, CUDA and bf16 only), ``"torch"`` (:class:`TorchDroplessMoE`) or
            ``"auto"``: MegaBlocks when it imports, CUDA is available, the target device is CUDA and the parameter
            dtype (``dtype`` or the default dtype) is bfloat16; the torch backend otherwise.
        device: where the parameters are created (the default device when ``None``, CPU unless inside
            ``trainer.init_module()`` or a ``torch.device`` context; Lightning moves them to each rank's device).
        dtype: parameter dtype (the default dtype when ``None``).

    Raises:
        ImportError: ``backend="megablocks"`` and MegaBlocks or grouped GEMM cannot be imported (says how to install).
        RuntimeError: ``backend="megablocks"`` without CUDA.
    """
    if not isinstance(config, MoEConfig):
        raise ValueError(
            f"config={short_repr(config)} is not allowed; pass a MoEConfig(hidden_size=..., ffn_hidden_size=...)."
        )
    check_choice("backend", backend, BACKENDS)
    device = torch.device(device) if device is not None else None
    if backend == "auto":
        wants_cuda = device is None or device.type == "cuda"
        is_bf16 = (dtype or torch.get_default_dtype()) == torch.bfloat16
        backend = "megablocks" if wants_cuda and is_bf16 and megablocks_available() else "torch"
    if backend == "megablocks":
        return _build_megablocks(config, device, dtype)
    return TorchDroplessMoE(config, device=device, dtype=dtype)


def iter_moe_layers(module: nn.Module) -> Iterator[nn.Module]:
    """All MoE layers built by :func:`build_moe` inside ``module`` (either backend), in module order."""
    for sub in module.modules():
        if isinstance(sub, _MoEState):
            yield sub


def moe_aux_loss(module: nn.Module, clear: bool = True) -> Optional[torch.Tensor]:
    """Sum of the stored ``aux_loss`` of every MoE layer in ``module`` (``None`` if none stored one).

    Call once per training step after the forward and add the result to the loss; ``clear`` resets the stored
    losses so a stale value is never added twice and its graph is freed.
    """
    total: Optional[torch.Tensor] = None
    for layer in iter_moe_layers(module):
        loss = layer.aux_loss
        if loss is not None:
            total = loss if total is None else total + loss
            if clear:
                layer.aux_loss = None
    return total


def set_balance_group(module: nn.Module, group: Any) -> int:
    """Choose over which processes the ``aux_free`` expert loads of every MoE layer in ``module`` are summed before
    the bias update; returns how many layers were set.

    ``group`` is :data:`WORLD` (``"world"``, the default of every layer: the default process group whenever
    ``torch.distributed`` is initialized, as DDP, FSDP and tensor/sequence parallelism need; ranks that see the same
    tokens only scale all loads alike, which leaves the sign update unchanged), a ``ProcessGroup`` (e.g. the
    data-parallel group of a pipeline-parallel run), or ``None`` (this process's counts only, e.g. for a pipeline
    stage without data parallelism, which sees the whole batch and whose layers no other rank runs). Every rank in
    the group must run the same number of training forwards of each layer, or the all-reduce hangs.
    """
    is_group = dist.is_available() and isinstance(group, dist.ProcessGroup)
    if not (group is None or is_group or (isinstance(group, str) and group == WORLD)):
        raise ValueError(
            f"set_balance_group(group={group!r}) is not allowed; pass {WORLD!r}, a torch.distributed ProcessGroup, "
            "or None (local counts only)."
        )
    layers = 0
    for layer in iter_moe_layers(module):
        layer.balance_group = group
        layers += 1
    return layers


def defer_bias_updates(module: nn.Module, defer: bool = True) -> int:
    """With ``defer``, the ``aux_free`` MoE layers in ``module`` sum the expert loads of their training forwards
    instead of stepping the bias after each; :func:`apply_bias_updates` then takes one step from the summed load. A
    pipeline runs one forward per microbatch: stepping once per batch from the whole batch's load is what one process
    does with one forward per batch. ``defer=False`` restores the step after every forward (pending loads dropped).
    Returns how many layers were set."""
    layers = 0
    for layer in iter_moe_layers(module):
        layer.defer_bias_update = defer
        layer.pending_load = None
        layers += 1
    return layers


def apply_bias_updates(module: nn.Module) -> int:
    """Apply the deferred ``aux_free`` bias step of every MoE layer in ``module`` that ran a training forward since
    the last call (one all-reduce of the summed loads per layer over its balancing group); returns how many stepped."""
    return sum(layer.apply_deferred_bias_update() for layer in iter_moe_layers(module))


def strip_expert_bias(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` without our ``expert_bias`` entries, for strict loading into a plain MegaBlocks dMoE."""
    return {k: v for k, v in state_dict.items() if k != "expert_bias" and not k.endswith(".expert_bias")}
