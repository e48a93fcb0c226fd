"""apply_mhc on the real libraries: Hugging Face transformers (GPT-2, Llama, Qwen3-MoE, Gemma 2, Falcon, BLOOM) and
litgpt.

Tiny configs built here with random weights (nothing is downloaded). Every check compares the injected model with a
reference computed in the test: the original model (at ``gate_init=0`` the injected model computes exactly it), or
the same injected model without the feature under test (activation checkpointing, a KV cache).
"""

import copy
import functools
import importlib.util
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from block_styles import NanoGPTBlock
from lightning.pytorch.callbacks import ModelCheckpoint
from lit_models import token_loader, trainer
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint

from lightning_mhc import MHCCallback, MHCConfig, apply_mhc, load_from_checkpoint
from lightning_mhc.carry import carried_streams
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.mhc_block import MHCBlock

transformers = pytest.importorskip("transformers")

VOCAB = 64
DIM = 32
STREAMS = 4
WRAPPER_PREFIX = "_checkpoint_wrapped_module."


# ----------------------------------------------------------------------------------------------------------- models


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=DIM, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return transformers.Qwen3MoeForCausalLM(config)


def _gemma2():
    # sliding-window layers (window 6 < the 10-token batch), logit soft-capping, post-norms on every branch
    config = transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=6, max_position_embeddings=64, bos_token_id=1,
        eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return transformers.Gemma2ForCausalLM(config)


def _falcon():
    # attention and MLP in parallel on one LayerNorm: one residual branch per layer
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, parallel_attn=True,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    return transformers.FalconForCausalLM(config)


def _bloom():
    # ALiBi; each residual sum is formed inside a helper (dropout_add)
    config = transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=DIM, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=0
    )
    return transformers.BloomForCausalLM(config)


# name: (builder, dotted path of the decoder-layer stack, attribute holding the attention module, branches per layer).
# Every layer's arguments include a KV cache that the layer extends as it runs (use_cache defaults to True).
HF_MODELS = {
    "gpt2": (_gpt2, "transformer.h", "attn", 2),
    "llama": (_llama, "model.layers", "self_attn", 2),
    "qwen3_moe": (_qwen3_moe, "model.layers", "self_attn", 2),
    "gemma2": (_gemma2, "model.layers", "self_attn", 2),
    "falcon": (_falcon, "transformer.h", "self_attention", 1),
    "bloom": (_bloom, "transformer.h", "self_attention", 2),
}


def _hf_model(name, seed=0):
    torch.manual_seed(seed)
    return HF_MODELS[name][0]()


def _hf_batch(seed=0, batch=2, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, seq), generator=g)
    return ids, torch.ones_like(ids)


def _inject_hf(model, gate_init, ids, mask):
    report = apply_mhc(
        model, MHCConfig(streams=STREAMS, gate_init=gate_init), example_input={"input_ids": ids, "attention_mask": mask}
    )
    return report


def _hf_loss(ids, mask):
    def run(model):
        return model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss

    return run


def _loss_and_grads(model, run):
    """``run(model)``'s loss after backward, and every parameter's gradient by name (checkpoint wrappers' prefix
    dropped, so names match those of a model without them)."""
    model.zero_grad(set_to_none=True)
    loss = run(model)
    loss.backward()
    grads = {n.replace(WRAPPER_PREFIX, ""): p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads


def _assert_same_loss_and_grads(got, expected):
    loss, grads = got
    ref_loss, ref_grads = expected
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    mhc = [n for n in grads if ".hyper." in n]
    assert mhc, "no mHC parameters among the model's parameters"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    # the mHC gradients are not all zero (gate_init > 0 makes the mHC maps matter)
    assert all(grads[n].abs().sum() > 0 for n in mhc if n.endswith(".phi"))


class CallCounter:
    """Counts forward calls of the given modules (a recomputing checkpoint runs each twice per step)."""

    def __init__(self, modules):
        self.calls = [0] * len(modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i):
        def hook(module, args, out):
            self.calls[i] += 1

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _inner_attention(model, name):
    _, path, attn, _ = HF_MODELS[name]
    return [getattr(layer.block, attn) for layer in model.get_submodule(path)]


# ------------------------------------------------------------------------------------- 1. gate 0 is the original


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_gate_zero_is_the_original_model(name):
    original = _hf_model(name).eval()
    model = copy.deepcopy(original)
    ids, mask = _hf_batch()
    report = _inject_hf(model, 0.0, ids, mask)
    model.eval()
    _, path, _, branches = HF_MODELS[name]
    assert report.stack == path
    stack = model.get_submodule(path)
    assert all(isinstance(layer, MHCBlock) for layer in stack)
    assert [(b.granularity, b.branches) for b in report.blocks] == [("sublayer", branches)] * len(stack)

    # every injected block returns a hidden state of the original shape; the streams ride on it
    outputs = {}
    handles = [
        layer.register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, out)) for i, layer in enumerate(stack)
    ]
    with torch.no_grad():
        ref = original(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for h in handles:
        h.remove()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for got, expected in zip(out.hidden_states, ref.hidden_states):
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for i in range(len(stack)):
        hidden = outputs[i][0] if isinstance(outputs[i], tuple) else outputs[i]
        assert hidden.shape == (*ids.shape, DIM)
        if i < len(stack) - 1:
            streams = carried_streams(hidden, f"layer {i}")
            assert streams is not None and streams.shape == (*ids.shape, STREAMS, DIM)
            torch.testing.assert_close(streams.mean(-2), hidden)


@pytest.mark.parametrize("name", list(HF_MODELS))
@pytest.mark.parametrize("use_cache", [True, False])
def test_hf_generate_matches_the_original(name, use_cache):
    original = _hf_model(name).eval()
    model = copy.deepcopy(original)
    ids, mask = _hf_batch()
    _inject_hf(model, 0.0, ids, mask)
    model.eval()
    kwargs = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
        use_cache=use_cache, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    ref = original.generate(**kwargs)
    got = model.generate(**kwargs)
    assert ref.sequences.shape == (2, ids.shape[1] + 4)
    assert torch.equal(got.sequences, ref.sequences)
    assert len(got.logits) == len(ref.logits) == 4
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- 2. HF gradient checkpointing


@pytest.mark.parametrize("name", list(HF_MODELS))
@pytest.mark.parametrize("reentrant", [None, True], ids=["default", "use_reentrant=True"])
def test_hf_gradient_checkpointing_matches_no_checkpointing(name, reentrant):
    ids, mask = _hf_batch()
    model = _hf_model(name)
    _inject_hf(model, 0.01, ids, mask)
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        if reentrant is None:
            model.gradient_checkpointing_enable()
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert model.is_gradient_checkpointing
    model.train()
    plain.train()
    counter = CallCounter(_inner_attention(model, name))
    got = _loss_and_grads(model, _hf_loss(ids, mask))
    counter.remove()
    assert counter.calls == [2] * len(counter.calls), "checkpointing did not recompute the layers in backward"
    _assert_same_loss_and_grads(got, _loss_and_grads(plain, _hf_loss(ids, mask)))


# ------------------------------------------------------------------------ 3. attributes read and write through


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_wrapped_layer_attributes_reach_the_original_layer(name):
    model = _hf_model(name)
    _, path, attn_name, _ = HF_MODELS[name]
    inner = model.get_submodule(path)[0]
    attention = getattr(inner, attn_name)
    ids, mask = _hf_batch()
    _inject_hf(model, 0.0, ids, mask)
    layer = model.get_submodule(path)[0]
    assert isinstance(layer, MHCBlock) and layer.block is inner
    assert getattr(layer, attn_name) is attention
    assert layer.gradient_checkpointing is False

    # a plain attribute written through the wrapper lands on the original layer
    layer.gradient_checkpointing = True
    assert inner.gradient_checkpointing is True
    assert "gradient_checkpointing" not in layer.__dict__
    layer.gradient_checkpointing = False

    # a submodule assigned through the wrapper replaces the original layer's, and the layer runs it
    replacement = copy.deepcopy(attention)
    setattr(layer, attn_name, replacement)
    assert getattr(inner, attn_name) is replacement
    assert getattr(layer, attn_name) is replacement
    assert attn_name not in layer._modules
    counter = CallCounter([replacement])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    counter.remove()
    assert counter.calls == [1]


# ----------------------------------------------------------------- 6. torch's apply_activation_checkpointing


@pytest.mark.parametrize("name", list(HF_MODELS))
@pytest.mark.parametrize(
    "impl", [CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT], ids=["no_reentrant", "reentrant"]
)
def test_hf_apply_activation_checkpointing_after_injection(name, impl):
    ids, mask = _hf_batch()
    model = _hf_model(name)
    layer_type = type(model.get_submodule(HF_MODELS[name][1])[0])
    _inject_hf(model, 0.01, ids, mask)
    plain = copy.deepcopy(model)
    wrapper = functools.partial(checkpoint_wrapper, checkpoint_impl=impl)
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, layer_type))
    stack = model.get_submodule(HF_MODELS[name][1])
    assert all(isinstance(layer, MHCBlock) and isinstance(layer.block, CheckpointWrapper) for layer in stack)
    model.train()
    plain.train()
    attention = [getattr(layer.block._checkpoint_wrapped_module, HF_MODELS[name][2]) for layer in stack]
    counter = CallCounter(attention)
    got = _loss_and_grads(model, _hf_loss(ids, mask))
    counter.remove()
    assert counter.calls == [2] * len(counter.calls), "checkpointing did not recompute the layers in backward"
    _assert_same_loss_and_grads(got, _loss_and_grads(plain, _hf_loss(ids, mask)))


# ------------------------------------------------------------------- 5. checkpointing in a model's own loop


class CheckpointedLoop(nn.Module):
    """nanoGPT-style blocks run by the model's own loop, optionally each under ``torch.utils.checkpoint``."""

    def __init__(self, dim=DIM, depth=3, seq=12):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.wpe = nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(NanoGPTBlock(dim) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.use_reentrant = None  # None: no checkpointing

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x) if self.use_reentrant is None else checkpoint(blk, x, use_reentrant=self.use_reentrant)
        return self.head(self.ln_f(x))


def _loop_loss(ids):
    def run(model):
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    return run


def _injected_loop(ids):
    torch.manual_seed(0)
    model = CheckpointedLoop()
    apply_mhc(model, MHCConfig(streams=STREAMS, gate_init=0.01), example_input=ids)
    return model.train()


def test_loop_level_checkpointing_matches_no_checkpointing():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _injected_loop(ids)
    assert all(isinstance(b, MHCBlock) for b in model.blocks)
    plain = copy.deepcopy(model)
    model.use_reentrant = False
    counter = CallCounter([b.block.attn for b in model.blocks])
    got = _loss_and_grads(model, _loop_loss(ids))
    counter.remove()
    assert counter.calls == [2] * len(model.blocks)
    _assert_same_loss_and_grads(got, _loss_and_grads(plain, _loop_loss(ids)))


def test_loop_level_reentrant_checkpointing_is_refused():
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model = _injected_loop(ids)
    model.use_reentrant = True
    with pytest.raises(RuntimeError, match="use_reentrant"):
        _loop_loss(ids)(model).backward()


# ------------------------------------------------------------------------------------------------- 4. litgpt


def _litgpt():
    return pytest.importorskip("litgpt")


LITGPT_STYLES = {
    # GPT-NeoX / Pythia: x + attn(norm_1(x)) + mlp(norm_2(x)); the MLP does not read the attention's output
    "neox_parallel": dict(
        parallel_residual=True, shared_attention_norm=False, norm_class_name="LayerNorm",
        mlp_class_name="GptNeoxMLP", intermediate_size=64, bias=True, rotary_percentage=0.25,
    ),
    # Llama: x = x + attn(norm_1(x)); x = x + mlp(norm_2(x))
    "llama_sequential": dict(
        parallel_residual=False, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=64,
        bias=False, n_query_groups=1, rotary_percentage=1.0,
    ),
}  # fmt: skip


def _litgpt_model(style, seed=0):
    litgpt = _litgpt()
    config = litgpt.Config(
        n_layer=2, n_head=2, n_embd=DIM, block_size=32, vocab_size=VOCAB, padded_vocab_size=VOCAB,
        **LITGPT_STYLES[style],
    )  # fmt: skip
    torch.manual_seed(seed)
    model = litgpt.GPT(config)
    model.apply(model._init_weights)
    return model


def _litgpt_ids(seed=0, batch=2, seq=12):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _inject_litgpt(model, gate_init, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # parallel-residual blocks are wrapped whole, with a warning
        return apply_mhc(model, MHCConfig(streams=STREAMS, gate_init=gate_init), example_input=ids)


@pytest.mark.parametrize("style", list(LITGPT_STYLES))
def test_litgpt_gate_zero_is_the_original_model(style):
    original = _litgpt_model(style).eval()
    model = copy.deepcopy(original)
    ids = _litgpt_ids()
    report = _inject_litgpt(model, 0.0, ids)
    model.eval()
    assert report.stack == "transformer.h"
    assert all(isinstance(b, MHCBlock) for b in model.transformer.h)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), original(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("style", "layout"), [("neox_parallel", ("block", 1)), ("llama_sequential", ("sublayer", 2))])
def test_litgpt_granularity(style, layout):
    """A parallel-residual block's second branch reads the block input, not the first branch's sum: wrapped whole."""
    model = _litgpt_model(style)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_mhc(model, MHCConfig(streams=STREAMS, gate_init=0.0), example_input=_litgpt_ids())
    assert [(b.granularity, b.branches) for b in report.blocks] == [layout] * 2
    # a block wrapped whole is named in a warning; a split one is not
    named = [any(f"transformer.h.{i}" in str(w.message) for w in caught) for i in range(2)]
    assert named == [layout[0] == "block"] * 2


@pytest.mark.parametrize("style", list(LITGPT_STYLES))
def test_litgpt_kv_cache_decode_matches_the_original(style):
    original = _litgpt_model(style).eval()
    model = copy.deepcopy(original)
    ids = _litgpt_ids(seq=12)
    _inject_litgpt(model, 0.0, ids)
    model.eval()
    prefill = 8
    logits = {}
    for key, m in (("original", original), ("injected", model)):
        m.set_kv_cache(batch_size=2)
        assert all(block.attn.kv_cache is not None for block in m.transformer.h)
        steps = []
        with torch.no_grad():
            steps.append(m(ids[:, :prefill], input_pos=torch.arange(prefill), input_pos_maxp1=prefill))
            for t in range(prefill, ids.shape[1]):
                steps.append(m(ids[:, t : t + 1], input_pos=torch.tensor([t]), input_pos_maxp1=t + 1))
        logits[key] = torch.cat(steps, dim=1)
        m.clear_kv_cache()
    # the cache is on the original attention modules, and the decode is the model's full forward
    assert all(isinstance(b, MHCBlock) and b.attn is b.block.attn for b in model.transformer.h)
    torch.testing.assert_close(logits["injected"], logits["original"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits["injected"], model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", list(LITGPT_STYLES))
def test_litgpt_training_step_reaches_every_hyper_connection(style):
    model = _litgpt_model(style)
    ids = _litgpt_ids()
    _inject_litgpt(model, 0.01, ids)
    model.train()
    logits = model(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    mhc = {n: p for n, p in model.named_parameters() if ".hyper." in n}
    assert mhc
    for name, p in mhc.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    hypers = [(n, m) for n, m in model.named_modules() if isinstance(m, HyperConnection)]
    # H_pre = sigmoid(... + b_pre): a branch that reads its H_pre mix gives b_pre (bias[:n]) a gradient
    no_pre = [n for n, m in hypers if m.bias.grad[:STREAMS].abs().sum() == 0]
    assert not no_pre, f"H_pre gets no gradient in {no_pre}: the branch does not read its mHC input"
    assert all(m.phi.grad.abs().sum() > 0 for _, m in hypers)


# ------------------------------------------------------------- 7. the architecture survey (scripts/)


def test_architecture_survey_rows_report_the_original_model():
    path = Path(__file__).parents[1] / "scripts" / "survey_transformers.py"
    spec = importlib.util.spec_from_file_location("survey_transformers", path)
    survey = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(survey)
    rows = {label: survey.survey(label, *survey.ARCHITECTURES[label]) for label in ("cohere", "jamba")}
    for row in rows.values():
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[4] == "equal" and float(cells[3]) < 1e-5, row
        reached, total = map(int, cells[5].split("/"))
        assert reached == total > 0, row
    assert "run in parallel" in rows["cohere"]  # wrapped whole, and the row says why
    assert "blocks='model.layers' passed" in rows["jamba"]


# ------------------------------------------------- 8. the user's path: MHCCallback on a Hugging Face model


class HFLitLM(L.LightningModule):
    """A LightningModule around a transformers causal LM, as a user writes one (no mHC in it)."""

    def __init__(self, name: str = "gemma2", lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.model = _hf_model(name)

    def training_step(self, batch, batch_idx):
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


@pytest.mark.parametrize("name", ["gemma2", "falcon"])
def test_callback_on_a_hugging_face_model_resumes_exactly_and_reloads(name, tmp_path):
    torch.manual_seed(0)
    whole = HFLitLM(name)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer(max_steps=8, enable_checkpointing=True, callbacks=[MHCCallback(streams=STREAMS), saver]).fit(
        whole, token_loader()
    )
    assert isinstance(whole.model.get_submodule(HF_MODELS[name][1])[0], MHCBlock)

    torch.manual_seed(123)
    resumed = HFLitLM(name)
    trainer(max_steps=8, callbacks=[MHCCallback(streams=STREAMS)]).fit(
        resumed, token_loader(), ckpt_path=tmp_path / "epoch=0-step=4.ckpt"
    )
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=key)

    reloaded = load_from_checkpoint(HFLitLM, tmp_path / "epoch=1-step=8.ckpt").eval()
    ids, mask = _hf_batch()
    with torch.no_grad():
        expected = whole.eval().model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(reloaded.model(input_ids=ids, attention_mask=mask).logits, expected)
