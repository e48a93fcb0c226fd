import functools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from block_styles import VOCAB, LlamaLike, NanoGPT, TinyViT, UnsplittableNet, image_batch, lm_batch
from lit_models import LitLM, token_loader, trainer

from lightning_mhc import MHCCallback, MHCConfig, apply_mhc
from lightning_mhc.capture import StreamCapture
from lightning_mhc.mhc_block import MHCBlock, attach_capture
from lightning_mhc.recompute import formula_elements, recompute_layers, retained_bytes

STYLES = {
    "nanogpt": (NanoGPT, lambda: lm_batch()),
    "llama": (LlamaLike, lambda: lm_batch()),
    "vit": (TinyViT, lambda: image_batch()[0]),
}
SUBLAYERS = 6  # three blocks of two branches in every style


def _pair(style, recompute_layers_, depth=3, **config):
    """The same injected model twice: without and with recomputation, identical weights."""
    build, example = STYLES[style]
    models = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = build(depth=depth)
        cfg = MHCConfig(streams=4, gate_init=0.3, recompute=recompute, recompute_layers=recompute_layers_, **config)
        apply_mhc(model, cfg, example_input=example())
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    return models


def _loss(style, model, seed=1):
    if style == "vit":
        images, labels = image_batch(seed)
        return F.cross_entropy(model(images), labels)
    tokens = lm_batch(seed)
    return F.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _assert_same_training_signal(style, plain, recomputed, atol=1e-6, rtol=0.0):
    loss_plain, loss_recomputed = _loss(style, plain), _loss(style, recomputed)
    loss_plain.backward()
    loss_recomputed.backward()
    torch.testing.assert_close(loss_recomputed, loss_plain, rtol=rtol, atol=atol)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("layers", [1, 2, None, SUBLAYERS + 3])
def test_recompute_gives_the_same_loss_and_gradients(style, layers):
    plain, recomputed = _pair(style, layers)
    _assert_same_training_signal(style, plain, recomputed)


@pytest.mark.slow
@pytest.mark.parametrize(("style", "layers"), [("nanogpt", 1), ("nanogpt", None), ("llama", 2), ("vit", SUBLAYERS)])
def test_recompute_with_triton_kernels_gives_the_same_gradients(style, layers):
    plain, recomputed = _pair(style, layers, depth=2, kernels="triton")
    _assert_same_training_signal(style, plain, recomputed)


@pytest.mark.parametrize(
    ("style", "kernels"),
    [*((style, "torch") for style in STYLES), pytest.param("llama", "triton", marks=pytest.mark.slow)],
)
def test_recompute_under_bf16_autocast_gives_the_same_gradients(style, kernels):
    plain, recomputed = _pair(style, 2, depth=2, kernels=kernels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same_training_signal(style, plain, recomputed, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("config", [dict(mode="hc"), dict(granularity="block"), dict(readout="learned")])
def test_recompute_covers_hc_mode_whole_blocks_and_the_learned_readout(config):
    plain, recomputed = _pair("nanogpt", 2, **config)
    _assert_same_training_signal("nanogpt", plain, recomputed)


def test_unsplittable_blocks_recompute_too():
    models = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = UnsplittableNet()
        config = MHCConfig(gate_init=0.3, recompute=recompute, recompute_layers=2)
        with pytest.warns(UserWarning, match="whole as one branch"):
            apply_mhc(model, config, example_input=lm_batch())
        models.append(model)
    tokens = lm_batch(1)
    losses = [F.cross_entropy(m(tokens).reshape(-1, VOCAB), tokens.reshape(-1)) for m in models]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6)


def test_interleaved_forwards_and_repeated_backward_give_the_same_gradients():
    """Gradient accumulation keeps two graphs alive at once; retain_graph replays a group a second time."""
    plain, recomputed = _pair("nanogpt", 2)
    for model in (plain, recomputed):
        first, second = _loss("nanogpt", model, seed=1), _loss("nanogpt", model, seed=2)
        second.backward(retain_graph=True)
        first.backward()
        second.backward()
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)


def test_capture_is_not_repeated_by_the_recomputation():
    plain, recomputed = _pair("llama", 1)
    captures = []
    for model in (plain, recomputed):
        capture = StreamCapture()
        attach_capture(model, capture)
        _loss("llama", model).backward()
        attach_capture(model, None)
        captures.append(capture)
    assert [len(f) for f in captures[1].forwards] == [SUBLAYERS]
    for a, b in zip(captures[0].forwards[0], captures[1].forwards[0]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_no_grad_forward_takes_the_plain_path_and_agrees():
    plain, recomputed = _pair("vit", 2)
    images = image_batch(3)[0]
    with torch.no_grad():
        torch.testing.assert_close(recomputed(images), plain(images), rtol=0, atol=0)


def test_default_group_size_is_the_papers_optimum_and_groups_span_blocks():
    assert recompute_layers(MHCConfig(streams=4), 24) == 4  # sqrt(4 * 24 / 6)
    assert recompute_layers(MHCConfig(streams=4), 6) == 2
    assert recompute_layers(MHCConfig(streams=8), 60) == round(math.sqrt(8 * 60 / 10))
    assert recompute_layers(MHCConfig(streams=4, recompute_layers=5), 24) == 5
    assert recompute_layers(MHCConfig(streams=4), 1) == 1
    _, recomputed = _pair("nanogpt", 3)
    blocks = [m for m in recomputed.modules() if isinstance(m, MHCBlock)]
    assert [(b.first_sublayer, b.recompute_layers) for b in blocks] == [(0, 3), (2, 3), (4, 3)]
    assert "recompute_layers=3" in repr(blocks[0])


def test_recompute_layers_must_be_a_positive_integer():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="recompute_layers"):
            MHCConfig(recompute=True, recompute_layers=bad)


def test_one_stream_needs_no_recomputation():
    torch.manual_seed(0)
    model = NanoGPT()
    apply_mhc(model, MHCConfig(streams=1, recompute=True), example_input=lm_batch())
    assert all(b.recompute_layers is None for b in model.modules() if isinstance(b, MHCBlock))


DIM, DEPTH, STREAMS, BATCH, SEQ = 64, 8, 4, 2, 16


@functools.cache
def _retained(recompute, layers, kernels="torch"):
    torch.manual_seed(0)
    model = NanoGPT(dim=DIM, depth=DEPTH, seq=SEQ)
    config = MHCConfig(streams=STREAMS, recompute=recompute, recompute_layers=layers, kernels=kernels)
    apply_mhc(model, config, example_input=lm_batch(batch=1, seq=SEQ))
    tokens = lm_batch(seed=1, batch=BATCH, seq=SEQ)
    loss, kept = retained_bytes(lambda: F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)))
    loss.backward()
    return kept


@pytest.mark.parametrize("layers", [1, 2, 4, 2 * DEPTH])
def test_memory_saved_matches_the_papers_accounting(layers):
    """Without recomputation every sublayer keeps x_l (nC), its branch input (C) and a few (n^2 + 2n) coefficient
    tensors; with it, ceil(L / L_r) stream states (nC) are kept instead. Per token, in fp32 bytes."""
    sublayers, tokens, n, c = 2 * DEPTH, BATCH * SEQ, STREAMS, DIM
    saved = (_retained(False, None) - _retained(True, layers)) / (4 * tokens)
    kept, _ = formula_elements(n, c, sublayers, layers)
    streams_and_inputs = sublayers * (n * c + c) - kept
    coefficients = sublayers * 5 * (n * n + 2 * n)
    # The first group's x_l0 is the expanded input (C, not nC), and the plain path copies it once (nC).
    assert streams_and_inputs <= saved <= streams_and_inputs + coefficients + n * c


def _ddp_worker(rank, world, init_file, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, model = _pair("nanogpt", 2)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        tokens = lm_batch(seed=1, batch=4)[rank * 2 : rank * 2 + 2]
        F.cross_entropy(ddp(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, results)
        # Let gloo's worker threads release the gradient all-reduces (they take the GIL to) before DDP's reducer
        # and the process group are destroyed: destroying them under the GIL while a release is pending deadlocks.
        dist.barrier()
        del ddp
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_with_recompute_averages_to_the_single_process_gradient(tmp_path):
    results = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    plain, _ = _pair("nanogpt", 2)
    _loss("nanogpt", plain).backward()
    grads = torch.load(results)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lightning_gradient_accumulation_with_recompute_matches_without():
    def fit(recompute):
        torch.manual_seed(0)
        model = LitLM()
        callback = MHCCallback(streams=4, recompute=recompute, recompute_layers=2, log_every_n_steps=1)
        trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[callback]).fit(model, token_loader(samples=8))
        blocks = [m for m in model.modules() if isinstance(m, MHCBlock)]
        assert [b.recompute_layers for b in blocks] == [2 if recompute else None] * 3
        return model.state_dict()

    plain, recomputed = fit(False), fit(True)
    for name, value in plain.items():
        torch.testing.assert_close(recomputed[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_nothing_outlives_backward():
    """Groups, their stored F and the recomputed caches are all released with the graph."""
    plain, recomputed = _pair("nanogpt", 2)
    kept = []
    for model in (plain, recomputed):
        _, after = retained_bytes(lambda model=model: _loss("nanogpt", model).backward())
        kept.append(after)
    assert kept[1] == kept[0]


class CheckpointedNanoGPT(NanoGPT):
    """The user's own activation checkpointing around every block."""

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return self.lm_head(self.transformer.ln_f(x))


def test_recompute_under_the_users_checkpointing_keeps_no_more_memory_and_the_same_gradients():
    kept, grads = [], []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = CheckpointedNanoGPT(dim=DIM, depth=DEPTH, seq=SEQ)
        config = MHCConfig(streams=STREAMS, gate_init=0.3, recompute=recompute, recompute_layers=2)
        apply_mhc(model, config, example_input=lm_batch(batch=1, seq=SEQ))
        tokens = lm_batch(seed=1, batch=BATCH, seq=SEQ)
        loss, retained = retained_bytes(
            lambda m=model, t=tokens: F.cross_entropy(m(t).flatten(0, 1), t.flatten())
        )
        loss.backward()
        kept.append(retained)
        grads.append([p.grad for p in model.parameters()])
    assert kept[1] == kept[0]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
