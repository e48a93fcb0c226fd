"""Property-based tests (hypothesis, derandomized so CI is deterministic).

* ``MHCConfig``: every valid config constructs and round-trips through ``to_dict``/``from_dict`` and a
  ``weights_only`` torch file; a config with one bad field raises ``ValueError`` naming that field.
* ``apply_mhc`` over randomly built small module trees (pre- and post-norm blocks, tuple returns, keyword and extra
  positional arguments, in-place ops, parallel and unsplittable blocks, stacks nested in ``ModuleDict``/``ModuleList``/
  ``Sequential``): it either injects, computes the original function at ``gate_init=0`` and trains one step to a finite
  loss, or raises one of its documented errors (``ValueError``, raised by lightning_mhc itself), never an exception
  from inside torch.
"""

import copy
import dataclasses
import inspect
import io
import math
import traceback
import warnings

import pytest
import torch
import torch.nn.functional as F
from block_styles import (
    BasicBlock,
    ConvNet,
    ConvNeXtBlock,
    InplaceBlock,
    LlamaLike,
    NanoGPT,
    ParallelBlock,
    TinyViT,
    TokenStack,
    UnsplittableNet,
    image_batch,
    lm_batch,
    rgb_batch,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_mhc import MHCConfig, apply_mhc
from lightning_mhc.config import GRANULARITIES, INITS, KERNELS, MODES, READOUTS

CONFIG_EXAMPLES = 400
TREE_EXAMPLES = 600
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ MHCConfig

identifier = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
dotted_paths = st.lists(identifier | st.integers(0, 9).map(str), min_size=1, max_size=3).map(".".join)
finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6)


@st.composite
def valid_configs(draw) -> MHCConfig:
    mode = draw(st.sampled_from(MODES))
    return MHCConfig(
        streams=draw(st.integers(1, 16)),
        mode=mode,
        blocks=draw(
            st.none() | st.lists(identifier | st.integers(0, 9).map(str), min_size=1, max_size=3).map(".".join)
        ),
        sinkhorn_iters=draw(st.integers(1, 100)),
        init=draw(st.none() | st.sampled_from(INITS if mode == "mhc" else ("paper",))),
        gate_init=draw(st.none() | finite.map(abs)),
        res_init=draw(st.none() | finite),
        readout=draw(st.sampled_from(READOUTS)),
        granularity=draw(st.sampled_from(GRANULARITIES)),
        kernels=draw(st.sampled_from(KERNELS)),
        recompute=draw(st.booleans()),
        recompute_layers=draw(st.none() | st.integers(1, 64)),
        log_every_n_steps=draw(st.integers(1, 10_000)),
    )


not_int = st.floats(allow_nan=True) | st.text(max_size=3) | st.booleans() | st.none() | st.just([1])
not_number = st.text(max_size=3) | st.booleans() | st.just([0.1]) | st.sampled_from([math.nan, math.inf, -math.inf])
not_choice = st.text(max_size=8) | st.integers() | st.none() | st.just(["mhc"])
BAD_VALUES = {
    "streams": st.integers(max_value=0) | not_int,
    "mode": not_choice,
    "blocks": st.integers() | st.just(["layers"]) | st.text(".", max_size=3),
    "sinkhorn_iters": st.integers(max_value=0) | not_int,
    "init": not_choice,
    "gate_init": st.floats(max_value=-1e-9, allow_infinity=False) | not_number,
    "res_init": not_number,
    "readout": not_choice,
    "granularity": not_choice,
    "kernels": not_choice,
    "recompute": st.integers(0, 1) | st.text(max_size=3) | st.none(),
    "recompute_layers": st.integers(max_value=0) | st.floats() | st.text(max_size=3) | st.booleans(),
    "log_every_n_steps": st.integers(max_value=0) | not_int,
}


@settings(max_examples=CONFIG_EXAMPLES, **SETTINGS)
@given(valid_configs())
def test_valid_configs_round_trip(config):
    stored = config.to_dict()
    assert MHCConfig.from_dict(stored) == config
    buffer = io.BytesIO()
    torch.save({"mhc": {"config": stored}}, buffer)
    buffer.seek(0)
    assert MHCConfig.from_dict(torch.load(buffer, weights_only=True)["mhc"]["config"]) == config
    assert config.differences(MHCConfig.from_dict(stored)) == {}
    assert config.stream_count == (1 if config.mode == "residual" else config.streams)


@settings(max_examples=CONFIG_EXAMPLES, **SETTINGS)
@given(valid_configs(), st.data())
def test_one_bad_field_is_named(config, data):
    field = data.draw(st.sampled_from(sorted(BAD_VALUES)))
    value = data.draw(BAD_VALUES[field])
    if field == "init" and (value is None or value in INITS):
        return  # a valid preset (None, or one the text strategy drew)
    event(f"bad {field}")
    with pytest.raises(ValueError, match=rf"MHCConfig\.{field}="):
        dataclasses.replace(config, **{field: value})
    with pytest.raises(ValueError, match=rf"MHCConfig\.{field}="):
        MHCConfig.from_dict({**config.to_dict(), field: value})


# ------------------------------------------------------------------ random module trees

IN, OUT = 4, 3


def mlp(dim: int, inplace: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(inplace=inplace), nn.Linear(2 * dim, dim))


class Block(nn.Module):
    """One residual block of a given ``style``; every style maps a hidden ``(B, T, dim)`` to the same shape."""

    def __init__(self, style: str, dim: int, inplace_act: bool) -> None:
        super().__init__()
        self.style = style
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.f, self.g = mlp(dim, inplace_act), mlp(dim, inplace_act)

    def forward(self, x=None, *extra, scale=None, mask=None, hidden_states=None):
        s = self.style
        if s == "hidden_kw":
            x = hidden_states
        if s in ("pre_norm", "tuple", "list_out", "hidden_kw"):
            x = x + self.f(self.ln1(x))
            x = x + self.g(self.ln2(x))
        elif s == "post_norm":
            x = self.ln1(x + self.f(x))
            x = self.ln2(x + self.g(x))
        elif s == "kwargs":
            x = x + self.f(self.ln1(x)) * scale
            x = x + self.g(self.ln2(x)) * mask
        elif s == "extra_arg":
            x = x + self.f(self.ln1(x) + extra[0])
        elif s == "inplace":
            x += self.f(self.ln1(x))
        elif s == "torch_add_alpha":
            x = torch.add(x, self.f(self.ln1(x)), alpha=0.5)
            x = x.add(self.g(self.ln2(x)))
        elif s == "parallel":
            x = x + self.f(self.ln1(x)) + self.g(self.ln2(x))
        elif s == "unsplittable":
            x = torch.addcmul(x, self.f(x), torch.ones_like(x))
        elif s == "relu_after":
            x = F.relu(x + self.f(self.ln1(x)))
        elif s == "no_residual":
            x = self.f(self.ln1(x))
        if s == "list_out":
            return [x, None]
        return (x, x.detach().mean()) if s == "tuple" else x


SINGLE_TENSOR = ["pre_norm", "post_norm", "inplace", "torch_add_alpha", "parallel", "unsplittable", "relu_after"]
STYLES = [*SINGLE_TENSOR, "tuple", "list_out", "kwargs", "extra_arg", "hidden_kw", "no_residual"]
CONTAINERS = ["list", "sequential", "dict_of_list", "list_of_sequential", "two_lists", "list_run_twice"]


def call_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """How a model's loop calls one block of each style."""
    s = block.style
    if s in ("tuple", "list_out"):
        return block(x)[0]
    if s == "kwargs":
        return block(x, scale=0.5, mask=torch.ones_like(x))
    if s == "extra_arg":
        return block(x, torch.full_like(x, 0.1))
    if s == "hidden_kw":
        return block(hidden_states=x)
    return block(x)


class Tree(nn.Module):
    """``Linear -> stack(s) of blocks -> Linear`` with the stack held in one of several container layouts."""

    def __init__(self, container: str, styles: list[str], dim: int, inplace_act: bool) -> None:
        super().__init__()
        self.container = container
        self.embed, self.head = nn.Linear(IN, dim), nn.Linear(dim, OUT)
        blocks = [Block(s, dim, inplace_act) for s in styles]
        if container in ("list", "list_run_twice"):
            self.layers = nn.ModuleList(blocks)
        elif container == "sequential":
            self.layers = nn.Sequential(*blocks)
        elif container == "dict_of_list":
            self.stages = nn.ModuleDict({"stem": nn.Identity(), "enc": nn.ModuleList(blocks)})
        elif container == "list_of_sequential":
            self.trunk = nn.ModuleList([nn.Sequential(*blocks)])
        else:  # two lists: a short one, then a longer one
            self.first = nn.ModuleList([Block(styles[0], dim, inplace_act)])
            self.layers = nn.ModuleList(blocks)

    def stack_path(self) -> str:
        return {"dict_of_list": "stages.enc", "list_of_sequential": "trunk.0"}.get(self.container, "layers")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.container in ("sequential", "list_of_sequential"):
            h = (self.layers if self.container == "sequential" else self.trunk[0])(h)
        else:
            stack = tuple(self.get_submodule(self.stack_path()))
            for block in (*getattr(self, "first", ()), *stack, *(stack if self.container == "list_run_twice" else ())):
                h = call_block(block, h)
        return self.head(h)


class IdsStack(nn.Module):
    """Its only list of blocks runs on integer token ids, before the embedding: no hidden state for mHC."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Identity(), nn.Identity()])
        self.embed = nn.Embedding(64, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            ids = layer(ids)
        return self.embed(ids)


LIBRARY = {  # the block-style models of tests/block_styles.py and the input each takes
    "nanogpt": (lambda: NanoGPT(dim=16, depth=2), lm_batch),
    "llama": (lambda: LlamaLike(dim=16, depth=2), lm_batch),
    "vit": (lambda: TinyViT(dim=16, depth=2), lambda: image_batch()[0]),
    "inplace": (lambda: TokenStack(InplaceBlock, dim=16, depth=2), lm_batch),
    "parallel": (lambda: TokenStack(ParallelBlock, dim=16, depth=2), lm_batch),
    "unsplittable": (lambda: UnsplittableNet(dim=16, depth=2), lm_batch),
    "resnet": (lambda: ConvNet(BasicBlock, channels=8, depth=2), lambda: rgb_batch(size=4)),
    "convnext": (lambda: ConvNet(ConvNeXtBlock, channels=8, depth=2), lambda: rgb_batch(size=4)),
    "ids_stack": (IdsStack, lm_batch),
}


@st.composite
def models(draw) -> tuple[nn.Module, torch.Tensor, str]:
    """A random ``Tree`` (or now and then a block-style model of tests/block_styles.py), its input and stack path."""
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(sorted(LIBRARY)))
        build, example = LIBRARY[name]
        event(f"block_styles.{name}")
        return build(), example(), None
    container = draw(st.sampled_from(CONTAINERS))
    allowed = SINGLE_TENSOR if container in ("sequential", "list_of_sequential") else STYLES
    styles = [draw(st.sampled_from(allowed))] * draw(st.integers(2, 3))
    if draw(st.integers(0, 4)) == 0:  # now and then a stack of mixed block styles
        styles[-1] = draw(st.sampled_from(allowed))
    tree = Tree(container, styles, draw(st.sampled_from([8, 12])), inplace_act=draw(st.booleans()))
    shape = draw(st.sampled_from([(2, 5), (3,), (1, 1)]))
    x = torch.randn(*shape, IN, generator=torch.Generator().manual_seed(0))
    if draw(st.integers(0, 5)) == 0:
        tree, x = tree.double(), x.double()
        event("float64 model")
    if draw(st.integers(0, 5)) == 0:
        tree.get_submodule(tree.stack_path())[0].requires_grad_(False)
        event("first block frozen")
    event(f"{container} / {styles[0]}{' mixed' if len(set(styles)) > 1 else ''}")
    return tree, x, tree.stack_path()


@st.composite
def configs_for(draw, stack_path: str | None) -> MHCConfig:
    mode = draw(st.sampled_from(MODES))
    return MHCConfig(
        streams=draw(st.integers(1, 4)),
        mode=mode,
        blocks=stack_path if stack_path and draw(st.booleans()) else None,
        sinkhorn_iters=draw(st.sampled_from([1, 5, 20])),
        init=draw(st.none() | st.sampled_from(INITS if mode == "mhc" else ("paper",))),
        gate_init=0.0,
        readout=draw(st.sampled_from(READOUTS)),
        granularity=draw(st.sampled_from(GRANULARITIES)),
        kernels="torch",
        recompute=draw(st.booleans()),
    )


@st.composite
def cases(draw) -> tuple[nn.Module, torch.Tensor, MHCConfig, object]:
    """A model, its input, a config and the input as ``apply_mhc`` takes it: a tensor, tuple, dict or callable."""
    model, x, stack_path = draw(models())
    how = draw(st.sampled_from(["tensor", "tuple", "dict", "callable"]))
    name = next(iter(inspect.signature(model.forward).parameters))
    example = {"tensor": x, "tuple": (x,), "dict": {name: x}, "callable": lambda m: m(x)}[how]
    return model, x, draw(configs_for(stack_path)), example


def _trains(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether a copy of the original model runs a training forward and backward (``x += f(ln(x))`` does not)."""
    model = copy.deepcopy(model).train()
    try:
        model(x).float().square().mean().backward()
    except RuntimeError as error:
        assert "modified by an inplace operation" in str(error), error
        return False
    return True


def _raised_by_lightning_mhc(error: BaseException) -> bool:
    return "lightning_mhc" in traceback.extract_tb(error.__traceback__)[-1].filename


@settings(max_examples=TREE_EXAMPLES, **SETTINGS)
@given(cases())
def test_apply_mhc_injects_and_trains_or_raises_a_documented_error(case):
    tree, x, config, example = case
    reference = copy.deepcopy(tree).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "wraps ... whole as one branch" is expected for some styles
            report = apply_mhc(tree, config, example_input=example)
    except ValueError as error:
        assert _raised_by_lightning_mhc(error), f"ValueError from inside torch: {error!r}"
        event(f"refused: {str(error).split(':')[0][:60]}")
        return
    event(f"injected ({'sublayer' if any(b.granularity == 'sublayer' for b in report.blocks) else 'block'})")
    tree.eval()
    with torch.no_grad():
        out, expected = tree(x), reference(x)
    assert out.shape == expected.shape
    if config.readout != "sum" or config.stream_count == 1:  # sum readout multiplies by n: not the original
        # one stream with a learned readout starts at sigmoid(10) = 1 - 4.5e-5, not 1 (StreamReadout)
        tolerance = 1e-4 if config.readout == "learned" and config.stream_count == 1 else 1e-5
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)
    if not _trains(reference, x):
        event("the original model cannot train (in-place change of a tensor autograd saved): training not checked")
        return
    tree.train()
    optimizer = torch.optim.SGD(tree.parameters(), lr=0.1)
    loss = tree(x).float().square().mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, p in tree.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
        assert torch.isfinite(p).all(), name
    assert torch.isfinite(tree(x)).all()
