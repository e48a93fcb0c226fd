import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from block_styles import (
    VOCAB,
    LlamaLike,
    NanoGPT,
    TinyViT,
    UnsplittableNet,
    image_batch,
    lm_batch,
    param_formula,
)
from torch import nn

from lightning_mhc import MHCConfig, apply_mhc
from lightning_mhc.carry import carried_streams
from lightning_mhc.inject import MARKER_KEY
from lightning_mhc.mhc_block import MHCBlock

STYLES = {
    "nanogpt": (NanoGPT, "transformer.h", lambda: lm_batch()),
    "llama": (LlamaLike, "layers", lambda: lm_batch()),
    "vit": (TinyViT, "blocks", lambda: image_batch()[0]),
}


def _model(style, seed=0):
    torch.manual_seed(seed)
    return STYLES[style][0]()


@pytest.mark.parametrize("style", list(STYLES))
def test_auto_finds_the_stack_and_splits_every_block(style):
    model = _model(style)
    _, stack, example = STYLES[style]
    report = apply_mhc(model, MHCConfig(streams=4), example_input=example())
    assert report.stack == stack
    assert [(b.granularity, b.branches) for b in report.blocks] == [("sublayer", 2)] * 3
    assert all(isinstance(b, MHCBlock) for b in model.get_submodule(stack))
    assert "sublayer" in str(report) and stack in str(report)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("mode", ["mhc", "hc"])
def test_parameter_count_matches_the_formula(style, mode):
    model = _model(style)
    before = sum(p.numel() for p in model.parameters())
    report = apply_mhc(model, MHCConfig(streams=4, mode=mode, readout="learned"), example_input=STYLES[style][2]())
    after = sum(p.numel() for p in model.parameters())
    expected = param_formula(32, 4, branches=6, mode=mode, readout="learned")
    assert after - before == report.params_added == expected


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("streams", [1, 4])
def test_gate_zero_injection_preserves_the_model(style, streams):
    model = _model(style)
    example = STYLES[style][2]()
    reference = copy.deepcopy(model)
    apply_mhc(model, MHCConfig(streams=streams, gate_init=0.0), example_input=example)
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(example), reference(example), rtol=0, atol=1e-5)


def _loss(style, model, seed):
    if style == "vit":
        images, labels = image_batch(seed)
        return F.cross_entropy(model(images), labels)
    tokens = lm_batch(seed)
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("style", list(STYLES))
def test_loss_falls_when_training_the_injected_model(style):
    model = _model(style)
    apply_mhc(model, MHCConfig(streams=4), example_input=STYLES[style][2]())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = _loss(style, model, seed=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None for n, p in model.named_parameters() if ".hyper." in n)


def test_llama_style_passes_extra_arguments_and_keeps_tuple_outputs():
    model = _model("llama")
    apply_mhc(model, MHCConfig(streams=2, gate_init=0.0), example_input=lm_batch())
    layer = model.layers[0]
    hidden = torch.randn(2, 16, 32)
    mask = torch.full((16, 16), float("-inf")).triu(1)
    out = layer(hidden, attention_mask=mask, position_embeddings=model.rotary(16), use_cache=False)
    assert isinstance(out, tuple) and out[1] is None
    assert out[0].shape == (2, 16, 32)
    assert carried_streams(out[0], "next").shape == (2, 16, 2, 32)


def test_unsplittable_block_is_wrapped_whole_with_a_warning_naming_it():
    torch.manual_seed(0)
    model = UnsplittableNet()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"layers\.0 \(Unsplittable\)"):
        report = apply_mhc(model, MHCConfig(streams=4, gate_init=0.0), example_input=lm_batch())
    assert [b.granularity for b in report.blocks] == ["block"] * 3
    x = lm_batch(1)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_block_granularity_is_one_branch_per_block():
    model = _model("nanogpt")
    report = apply_mhc(model, MHCConfig(granularity="block"), example_input=lm_batch())
    assert [(b.granularity, b.branches) for b in report.blocks] == [("block", 1)] * 3


def test_explicit_blocks_path_and_stored_plan_reinject_identically():
    model = _model("nanogpt")
    config = MHCConfig(streams=4, blocks="transformer.h")
    report = apply_mhc(model, config, example_input=lm_batch())
    replica = _model("nanogpt", seed=1)
    apply_mhc(replica, config, plan=report.plan())
    replica.load_state_dict(model.state_dict())
    x = lm_batch(2)
    torch.testing.assert_close(replica(x), model(x))


def test_wrapped_blocks_keep_their_original_state_dict_names():
    plain = _model("nanogpt")
    model = copy.deepcopy(plain)
    apply_mhc(model, MHCConfig(), example_input=lm_batch())
    keys = set(model.state_dict())
    assert set(plain.state_dict()) <= keys
    assert all(".hyper." in k or ".readout." in k or k == MARKER_KEY for k in keys - set(plain.state_dict()))
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(".hyper." in k for k in result.missing_keys)


def test_loading_into_the_plain_module_names_the_loader_first():
    model = _model("nanogpt")
    apply_mhc(model, MHCConfig(), example_input=lm_batch())
    with pytest.raises(
        RuntimeError, match=r'Unexpected key\(s\) in state_dict: "mhc_injected__load_with__lightning_mhc'
    ):
        _model("nanogpt").load_state_dict(model.state_dict())


def test_wrong_blocks_path_lists_the_candidates():
    model = _model("nanogpt")
    with pytest.raises(ValueError, match=r"blocks='transformer\.layers' does not exist.*'transformer\.h'"):
        apply_mhc(model, MHCConfig(blocks="transformer.layers"), example_input=lm_batch())
    with pytest.raises(ValueError, match=r"is a Linear.*'transformer\.h'"):
        apply_mhc(model, MHCConfig(blocks="lm_head"), example_input=lm_batch())


class ShapeChanger(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_block_that_changes_the_hidden_shape_is_named():
    with pytest.raises(ValueError, match=r"block 1 \(Linear\) changes the hidden shape from \(2, 8\) to \(2, 4\)"):
        apply_mhc(ShapeChanger(), MHCConfig(blocks="layers"), example_input=torch.randn(2, 8))


def test_no_example_input_says_what_to_pass():
    with pytest.raises(ValueError, match="example_input="):
        apply_mhc(_model("nanogpt"), MHCConfig())


def test_injecting_twice_raises():
    model = _model("nanogpt")
    apply_mhc(model, MHCConfig(), example_input=lm_batch())
    with pytest.raises(RuntimeError, match="already injected"):
        apply_mhc(model, MHCConfig(), example_input=lm_batch())


def test_probe_leaves_training_mode_and_gradients_alone():
    model = _model("vit")
    model.train()
    apply_mhc(model, MHCConfig(), example_input=image_batch()[0])
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_triton_kernels_in_an_injected_model_match_the_torch_reference():
    torch_model = _model("nanogpt")
    triton_model = copy.deepcopy(torch_model)
    apply_mhc(torch_model, MHCConfig(kernels="torch", gate_init=0.3), example_input=lm_batch())
    apply_mhc(triton_model, MHCConfig(kernels="triton", gate_init=0.3), example_input=lm_batch())
    triton_model.load_state_dict(torch_model.state_dict())
    x = lm_batch(1)
    out_torch, out_triton = torch_model(x), triton_model(x)
    torch.testing.assert_close(out_triton, out_torch, rtol=1e-5, atol=1e-5)
    out_torch.square().mean().backward()
    out_triton.square().mean().backward()
    for (name, a), b in zip(torch_model.named_parameters(), triton_model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


class Wrapper(nn.Module):
    """A block whose children are named like the mHC wrapper's own (block, hyper, readout)."""

    def __init__(self, dim=32):
        super().__init__()
        self.block, self.hyper = nn.Linear(dim, dim), nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.block(self.hyper(x))


class WrapperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Wrapper() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_blocks_with_children_named_like_the_wrapper_reload_strictly():
    model = WrapperNet()
    apply_mhc(model, MHCConfig(readout="learned"), example_input=torch.randn(2, 32))
    state = model.state_dict()
    assert "layers.0.block.weight" in state and "layers.0.hyper.weight" in state and "layers.0.hyper.0.phi" in state
    replica = WrapperNet()
    apply_mhc(replica, MHCConfig(readout="learned"), example_input=torch.randn(2, 32))
    replica.load_state_dict(state)
    x = torch.randn(2, 32)
    torch.testing.assert_close(replica(x), model(x))


class KeywordBlock(nn.Module):
    def __init__(self, dim=32):
        super().__init__()
        self.mlp = nn.Linear(dim, dim)

    def forward(self, attention_mask=None, hidden_states=None):
        return hidden_states + self.mlp(hidden_states) * attention_mask.mean()


class KeywordNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(KeywordBlock() for _ in range(2))

    def forward(self, x):
        mask = torch.ones(8, 8)
        for layer in self.layers:
            x = layer(attention_mask=mask, hidden_states=x)
        return x


def test_hidden_state_passed_by_keyword_is_found_by_name():
    model = KeywordNet()
    reference = copy.deepcopy(model)
    report = apply_mhc(model, MHCConfig(gate_init=0.0), example_input=torch.randn(2, 8, 32))
    assert [b.branches for b in report.blocks] == [1, 1]
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_dynamo_traces_an_injected_model_in_one_graph():
    model = _model("nanogpt")
    apply_mhc(model, MHCConfig(streams=4, kernels="torch"), example_input=lm_batch())
    explained = torch._dynamo.explain(model)(lm_batch(1))
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


class CachingBlock(nn.Module):
    """Appends its input to a per-forward cache list, as a KV cache grows, and refuses a cache of the wrong length."""

    def __init__(self, index, dim=16):
        super().__init__()
        self.index = index
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, x, cache, scale=None):
        if len(cache) != self.index:
            raise RuntimeError(f"block {self.index} got a cache of {len(cache)} entries")
        cache.append(x)
        branch = self.mlp(torch.stack(cache).mean(0))
        if scale is not None:
            with scale.lock:
                branch = scale.value * branch
        return x + branch


class CachingNet(nn.Module):
    def __init__(self, depth=3, dim=16):
        super().__init__()
        self.blocks = nn.ModuleList(CachingBlock(i, dim) for i in range(depth))

    def forward(self, x):
        cache = []
        for block in self.blocks:
            x = block(x, cache)
        return x


def test_probe_reruns_blocks_on_their_arguments_as_they_were_before_the_first_call():
    # the probe runs each block again; a block that extends an argument (a KV cache) must not see its own entries
    torch.manual_seed(0)
    _assert_injected_per_sublayer_and_unchanged(CachingNet())


def _assert_injected_per_sublayer_and_unchanged(model):
    x = torch.randn(2, 5, 16)
    original = copy.deepcopy(model)
    report = apply_mhc(model, MHCConfig(streams=4, gate_init=0.0), example_input=x)
    assert [(b.granularity, b.branches) for b in report.blocks] == [("sublayer", 1)] * 3
    torch.testing.assert_close(model(x), original(x))


class LockedScale:
    """An argument deepcopy refuses (it holds a lock)."""

    def __init__(self):
        self.lock, self.value = threading.Lock(), 0.5


def test_probe_copies_each_argument_it_can_and_passes_the_others_as_they_are():
    # one argument refuses deepcopy (a lock); the cache beside it is still copied for every re-run
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(CachingBlock(i) for i in range(3))

        def forward(self, x):
            cache, scale = [], LockedScale()
            for block in self.blocks:
                x = block(x, cache, scale)
            return x

    with pytest.raises(TypeError):
        copy.deepcopy(LockedScale())
    torch.manual_seed(0)
    _assert_injected_per_sublayer_and_unchanged(Net())


def test_probe_copies_share_tensors_and_modules_not_duplicate_them():
    # a KV cache's copy for block i would otherwise hold the K/V of layers 0..i-1 again: L^2/2 layers in all
    from lightning_mhc.inject import _Probe

    class Cache:
        def __init__(self):
            self.layers = [torch.randn(4, 8), torch.randn(4, 8)]
            self.norm = nn.LayerNorm(8)

    hidden, cache = torch.randn(2, 8), Cache()
    probe = _Probe((hidden,), {"cache": cache}, hidden)
    cache.layers.append(torch.randn(4, 8))  # the block extends the cache as it runs
    (got_hidden,), kwargs = probe.call_args()
    assert got_hidden is hidden
    assert kwargs["cache"] is not cache and len(kwargs["cache"].layers) == 2
    assert all(a is b for a, b in zip(kwargs["cache"].layers, cache.layers))
    assert kwargs["cache"].norm is cache.norm
    assert probe.call_args()[1]["cache"] is not kwargs["cache"]  # every re-run gets its own copy
