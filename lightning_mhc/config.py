"""MHCConfig: every knob of the injection in one validated dataclass.

Plain types only, so omegaconf, LightningCLI and checkpoints can carry it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NoReturn, Optional

MODES = ("mhc", "hc", "residual")
READOUTS = ("mean", "sum", "learned")
GRANULARITIES = ("auto", "sublayer", "block")
KERNELS = ("auto", "triton", "torch")
INITS = ("paper", "symmetric", "onehot")
# Fields that decide the parameters and the function of an injected model; the others (initial values, kernels,
# recomputation, logging) may change between a checkpoint and its resumption.
STRUCTURAL_FIELDS = ("streams", "mode", "blocks", "sinkhorn_iters", "readout", "granularity")


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to its first line and ``limit`` characters (a module's repr is its whole tree)."""
    text = repr(value)
    first = text.splitlines()[0] if text else text
    return text if first == text and len(text) <= limit else first[:limit] + "..."


def _reject(name: str, value: Any, allowed: str) -> NoReturn:
    raise ValueError(f"{name}={short_repr(value)} is not allowed; pass {allowed}.")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        _reject(name, value, "one of " + ", ".join(map(repr, allowed)))


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is an integer ``>= minimum`` (``bool`` is
    not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _reject(name, value, f"an integer >= {minimum}")


def check_float(
    name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is a finite number between ``low`` and
    ``high`` (each bound included unless marked open; infinite bounds are no bound)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < low or value > high or (low_open and value == low) or (high_open and value == high):
        bounds = [f"{'>' if low_open else '>='} {low}"] if low != -math.inf else []
        bounds += [f"{'<' if high_open else '<='} {high}"] if high != math.inf else []
        _reject(name, value, " ".join(["a finite number", " and ".join(bounds)]).strip())


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``name`` and ``value`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        _reject(name, value, "True or False")


@dataclass(frozen=True)
class MHCConfig:
    """How mHC is injected into a model.

    Args:
        streams: width ``n`` of the residual stream (1 is the plain residual).
        mode: ``"mhc"`` (doubly stochastic ``H_res``), ``"hc"`` (unconstrained Hyper-Connections) or
            ``"residual"`` (the plain residual, one stream, for comparison runs).
        blocks: dotted path to the ``nn.ModuleList``/``nn.Sequential`` of residual blocks; ``None`` finds it.
        sinkhorn_iters: Sinkhorn-Knopp iterations ``t_max``.
        init: how mHC's maps start (``mode="mhc"``; ``None`` is ``"onehot"`` for mHC, ``"paper"`` for HC, chosen
            by the study in the README); every preset computes the original model at ``gate_init=0``, the
            ``symmetric`` and ``onehot`` ones at any ``gate_init``:

            - ``"paper"``: the paper's ``alpha = 0.01``, small random ``phi``, ``H_pre = 1/n``, ``H_post = 1``,
              ``H_res = J/n``. The dynamic maps start nearly inert.
            - ``"symmetric"``: ``alpha = 1`` with ``phi = 0``, the same biases. Starts exactly at the original
              model whatever ``alpha``; the streams stay identical (a learned, input-dependent gain on each
              branch's input and output, no stream mixing).
            - ``"onehot"``: ``alpha = 1``, ``phi = 0``, sublayer ``l`` reads stream ``l mod n`` (``H_pre`` 0.98 on
              it, the rest spread over the others), ``H_res`` near the identity (diagonal logit 4). Starts at the
              original model (to fp32 rounding) and breaks the streams' symmetry from the first step.
        gate_init: initial value of the three gating scalars ``alpha``; ``None`` takes the preset's (0.01 for
            ``paper``, 1 otherwise); 0 makes the injected model compute exactly the original one.
        res_init: initial logit on the diagonal of ``H_res``; ``None`` takes the preset's (0, which starts at
            ``J/n``, or 4 for ``onehot``); larger starts nearer ``I``.
        readout: how the last block reduces the streams: ``"mean"``, ``"sum"`` or ``"learned"``.
        granularity: ``"sublayer"`` (one hyper-connection per residual branch), ``"block"`` (the whole block is
            one branch) or ``"auto"`` (sublayer where the branches can be found, else block).
        kernels: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        recompute: recompute the mHC intermediates in backward instead of storing them.
        recompute_layers: sublayers per recomputation block ``L_r``; ``None`` uses ``sqrt(n L / (n + 2))``.
        log_every_n_steps: how often the callback captures ``H_res`` and logs stability metrics.
    """

    streams: int = 4
    mode: str = "mhc"
    blocks: Optional[str] = None
    sinkhorn_iters: int = 20
    init: Optional[str] = None
    gate_init: Optional[float] = None
    res_init: Optional[float] = None
    readout: str = "mean"
    granularity: str = "auto"
    kernels: str = "auto"
    recompute: bool = False
    recompute_layers: Optional[int] = None
    log_every_n_steps: int = 50

    def __post_init__(self) -> None:
        check_int("MHCConfig.streams", self.streams, 1)
        check_choice("MHCConfig.mode", self.mode, MODES)
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks.strip(".")):
            _reject(
                "MHCConfig.blocks",
                self.blocks,
                "a dotted path such as 'model.layers', or None to find the block stack automatically",
            )
        check_int("MHCConfig.sinkhorn_iters", self.sinkhorn_iters, 1)
        if self.init is not None:
            check_choice("MHCConfig.init", self.init, INITS)
        if self.init not in (None, "paper") and self.mode != "mhc":
            raise ValueError(
                f"MHCConfig.init={self.init!r} is a preset of mode='mhc' (got mode={self.mode!r}); pass init='paper' "
                "or mode='mhc'."
            )
        if self.gate_init is not None:
            check_float("MHCConfig.gate_init", self.gate_init, 0.0)
        if self.res_init is not None:
            check_float("MHCConfig.res_init", self.res_init, -math.inf)
        check_choice("MHCConfig.readout", self.readout, READOUTS)
        check_choice("MHCConfig.granularity", self.granularity, GRANULARITIES)
        check_choice("MHCConfig.kernels", self.kernels, KERNELS)
        check_bool("MHCConfig.recompute", self.recompute)
        if self.recompute_layers is not None:
            check_int("MHCConfig.recompute_layers", self.recompute_layers, 1)
        check_int("MHCConfig.log_every_n_steps", self.log_every_n_steps, 1)

    @property
    def init_preset(self) -> str:
        """The ``init`` preset in effect: ``init``, or the mode's default."""
        if self.init is not None:
            return self.init
        return "onehot" if self.mode == "mhc" else "paper"

    @property
    def initial_gate(self) -> float:
        """``alpha``'s starting value: ``gate_init``, or the ``init`` preset's."""
        if self.gate_init is not None:
            return float(self.gate_init)
        return 0.01 if self.init_preset == "paper" else 1.0

    @property
    def initial_res_logit(self) -> float:
        """The starting logit on ``H_res``'s diagonal: ``res_init``, or the ``init`` preset's."""
        if self.res_init is not None:
            return float(self.res_init)
        return 4.0 if self.init_preset == "onehot" else 0.0

    @property
    def stream_count(self) -> int:
        """Streams actually carried: the plain residual carries one whatever ``streams`` says."""
        return 1 if self.mode == "residual" else self.streams

    def differences(self, other: MHCConfig, fields: tuple[str, ...] | None = None) -> dict[str, tuple[Any, Any]]:
        """``{field: (ours, theirs)}`` for the ``fields`` (default: all) whose values differ."""
        names = fields or tuple(f.name for f in dataclasses.fields(self))
        return {n: (getattr(self, n), getattr(other, n)) for n in names if getattr(self, n) != getattr(other, n)}

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (str, int, float, bool and None values: safe for ``torch.load(weights_only=True)``
        and YAML)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MHCConfig:
        """Build from a stored dict, rejecting unknown keys with the list of known ones."""
        if not isinstance(values, dict):
            raise ValueError(
                f"An MHCConfig is stored as a dict of its fields; got a {type(values).__name__} ({short_repr(values)})."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(repr, set(values) - known))
        if unknown:
            raise ValueError(f"Unknown MHCConfig field(s) {', '.join(unknown)}; known fields are {sorted(known)}.")
        return cls(**values)
