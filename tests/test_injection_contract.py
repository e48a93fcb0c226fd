"""What user and library code sees of an injected model: per-block outputs, attributes, in-place and parallel
blocks, channels-first conv stacks, sharded blocks. One minimal model per case (tests/block_styles.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from block_styles import (
    BasicBlock,
    ConvNet,
    ConvNeXtBlock,
    InplaceBlock,
    NanoGPT,
    NanoGPTBlock,
    ParallelBlock,
    TokenStack,
    lm_batch,
    rgb_batch,
)
from torch import nn

from lightning_mhc import MHCConfig, apply_mhc
from lightning_mhc.mhc_block import MHCBlock
from lightning_mhc.monitor import total_grad_norm


def _injected(model, example, **config):
    reference = copy.deepcopy(model)
    report = apply_mhc(model, MHCConfig(streams=4, gate_init=0.0, **config), example_input=example)
    return reference.eval(), model.eval(), report


def _block_outputs(model, block_type, run):
    outputs = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
        for m in model.modules()
        if type(m) is block_type
    ]
    with torch.no_grad():
        run(model)
    for handle in handles:
        handle.remove()
    return outputs


def test_hooks_on_the_block_class_see_the_original_hidden_states():
    torch.manual_seed(0)
    reference, model, _ = _injected(NanoGPT(), lm_batch())
    x = lm_batch(1)
    seen = _block_outputs(model, NanoGPTBlock, lambda m: m(x))
    expected = _block_outputs(reference, NanoGPTBlock, lambda m: m(x))
    assert [o.shape for o in seen] == [o.shape for o in expected] == [(4, 16, 32)] * 3
    for a, b in zip(seen, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_intermediate_features_of_a_channels_first_stack_keep_their_shape_and_values():
    torch.manual_seed(0)
    reference, model, report = _injected(ConvNet(ConvNeXtBlock), rgb_batch())
    assert report.channels_first and report.dim == 16
    assert [b.granularity for b in report.blocks] == ["sublayer"] * 3
    images = rgb_batch(1)
    with torch.no_grad():
        for a, b in zip(model.forward_intermediates(images), reference.forward_intermediates(images)):
            assert a.shape == b.shape == (2, 16, 8, 8)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_channels_first_stack_runs_at_another_resolution_and_trains():
    torch.manual_seed(0)
    model = ConvNet(ConvNeXtBlock)
    apply_mhc(model, MHCConfig(streams=4), example_input=rgb_batch(size=8))
    logits = model(rgb_batch(2, size=12))
    F.cross_entropy(logits, torch.tensor([1, 2])).backward()
    # phi and the biases learn from the first step; alpha's gradient is 0 until phi leaves 0 (onehot preset)
    grads = [p.grad for n, p in model.named_parameters() if n.endswith(("phi", "bias")) and ".hyper." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


class AuxBlock(nn.Module):
    """Returns its hidden state and a statistic computed after its residual sum."""

    def __init__(self, dim):
        super().__init__()
        self.ln, self.mlp = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x):
        x = x + self.mlp(self.ln(x))
        return x, x.square().mean()


class AuxNet(nn.Module):
    def __init__(self, dim=32, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(AuxBlock(dim) for _ in range(depth))

    def forward(self, x):
        stats = []
        for layer in self.layers:
            x, stat = layer(x)
            stats.append(stat)
        return x, torch.stack(stats)


def test_outputs_computed_after_the_last_residual_sum_see_the_hidden_state():
    torch.manual_seed(0)
    reference, model, _ = _injected(AuxNet(), torch.randn(2, 5, 32))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        for a, b in zip(model(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("granularity", ["auto", "block"])
def test_in_place_residual_blocks_keep_their_function(granularity):
    torch.manual_seed(0)
    reference, model, report = _injected(TokenStack(InplaceBlock), lm_batch(), granularity=granularity)
    assert report.blocks[0].clone_input == (granularity == "block")
    x = lm_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_resnet_basic_block_is_wrapped_whole_keeps_its_function_and_trains():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"blocks\.0 \(BasicBlock\) whole"):
        reference, model, report = _injected(ConvNet(BasicBlock), rgb_batch())
    assert [b.granularity for b in report.blocks] == ["block"] * 3 and report.channels_first
    images = rgb_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-5)
    model.train()
    F.cross_entropy(model(rgb_batch(2, size=12)), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".hyper." in n)


def test_parallel_branches_are_one_branch_and_every_map_learns():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="parallel"):
        reference, model, report = _injected(TokenStack(ParallelBlock), lm_batch())
    assert [(b.granularity, b.branches) for b in report.blocks] == [("block", 1)] * 3
    x = lm_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)
    trained = TokenStack(ParallelBlock)
    with pytest.warns(UserWarning, match="parallel"):
        apply_mhc(trained, MHCConfig(streams=4, gate_init=0.01), example_input=lm_batch())
    F.cross_entropy(trained(x).flatten(0, 1), x.flatten()).backward()
    for name, p in trained.named_parameters():
        if name.endswith("phi"):
            assert p.grad.abs().sum() > 0, name


def test_attributes_of_a_wrapped_block_are_read_and_written_through():
    torch.manual_seed(0)
    model = NanoGPT()
    inner = model.transformer.h[0]
    attn = inner.attn
    apply_mhc(model, MHCConfig(streams=4), example_input=lm_batch())
    wrapped = model.transformer.h[0]
    assert isinstance(wrapped, MHCBlock) and wrapped.block is inner
    assert wrapped.attn is attn and wrapped.ln_1 is inner.ln_1
    replacement = nn.LayerNorm(32)
    wrapped.ln_1 = replacement
    assert inner.ln_1 is replacement and "ln_1" not in wrapped._modules
    wrapped.attn.heads = 4
    assert attn.heads == 4
    wrapped.note = "mine"
    assert wrapped.note == "mine" and not hasattr(inner, "note")


class ScalingLoop(nn.Module):
    """Changes the hidden state in place between blocks."""

    def __init__(self, dim=32):
        super().__init__()
        self.layers = nn.ModuleList(NanoGPTBlock(dim) for _ in range(3))
        self.scale_in_place = False

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
            if self.scale_in_place:
                x.mul_(0.5)
        return x


def test_hidden_state_changed_in_place_between_blocks_is_refused():
    model = ScalingLoop()
    apply_mhc(model, MHCConfig(streams=4), example_input=torch.randn(2, 8, 32))
    model.scale_in_place = True
    with torch.no_grad(), pytest.raises(RuntimeError, match="modified in place"):
        model(torch.randn(2, 8, 32))


def test_block_called_on_a_foreign_hidden_state_is_refused():
    model = NanoGPT()
    apply_mhc(model, MHCConfig(streams=4), example_input=lm_batch())
    with pytest.raises(RuntimeError, match="no injected block returned"):
        model.transformer.h[1](torch.randn(2, 16, 32))


def test_save_pretrained_of_an_injected_hugging_face_model_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    apply_mhc(model, MHCConfig(streams=4), example_input=torch.randint(0, 64, (1, 8)))
    with pytest.raises(RuntimeError, match="load_from_checkpoint"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("shard", ["inner blocks", "injected blocks"])
def test_fully_sharded_blocks_give_the_unsharded_gradients(gloo_group, shard):
    """FSDP2 hands a sharded module views of its inputs and gathers its weights from hooks on its outputs."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = NanoGPT()
    apply_mhc(model, MHCConfig(streams=4, gate_init=0.01), example_input=lm_batch())
    reference = copy.deepcopy(model)
    target = NanoGPTBlock if shard == "inner blocks" else MHCBlock
    for module in [m for m in model.modules() if isinstance(m, target)]:
        fully_shard(module)
    fully_shard(model)
    x = lm_batch(1)
    for m in (model, reference):
        F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=0, atol=0, msg=name)
    assert total_grad_norm(model) == pytest.approx(total_grad_norm(reference), rel=1e-6)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def _sharded_grad_norm_worker(rank, world, init_file, results):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = NanoGPT()
        apply_mhc(model, MHCConfig(streams=4, gate_init=0.01), example_input=lm_batch())
        for block in model.transformer.h:  # the blocks only: DTensor and plain gradients side by side
            fully_shard(block)
        x = lm_batch(1)  # the same batch on both ranks: the mean gradient is the one-process gradient
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        norm = total_grad_norm(model)
        if rank == 0:
            torch.save(norm, results)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_grad_norm_of_sharded_gradients_is_the_global_norm(tmp_path):
    import torch.multiprocessing as mp

    results = str(tmp_path / "norm.pt")
    mp.spawn(_sharded_grad_norm_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    torch.manual_seed(0)
    model = NanoGPT()
    apply_mhc(model, MHCConfig(streams=4, gate_init=0.01), example_input=lm_batch())
    x = lm_batch(1)
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    assert torch.load(results) == pytest.approx(total_grad_norm(model), rel=1e-5)
