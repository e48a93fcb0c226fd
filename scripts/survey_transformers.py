"""Inject mHC into tiny random-weight models of many Hugging Face transformers architectures and check each.

Per architecture: injection at ``gate_init=0`` must leave the logits and greedy generation (with the KV cache) equal
to the original model's; then a training step at ``gate_init=0.01`` must give every hyper-connection's ``phi`` a
gradient. Prints one row per architecture: the stack found, the distinct (granularity, branches) of its layers, the
largest logit difference, and what was refused or warned. Nothing is downloaded.

    .venv/bin/python scripts/survey_transformers.py [model_type ...]
"""

from __future__ import annotations

import copy
import sys
import warnings

import torch
import transformers

from lightning_mhc import MHCConfig, apply_mhc

VOCAB, DIM = 64, 32
TOKENS = dict(bos_token_id=1, eos_token_id=1, pad_token_id=0)
LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=64, **TOKENS,
)  # fmt: skip
GPT_LIKE = dict(vocab_size=VOCAB, n_embd=DIM, n_layer=2, n_head=2, n_positions=64, **TOKENS)
HEADS_16 = dict(LLAMA_LIKE, head_dim=16)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# label: (model_type, config keyword arguments[, blocks]): ``blocks`` names the stack where the automatic search
# cannot (Jamba interleaves Mamba and attention layers, two block types in one list).
ARCHITECTURES = {
    "gpt_neox": ("gpt_neox", dict(LLAMA_LIKE, num_key_value_heads=2, use_parallel_residual=True)),
    "gpt_neox (sequential)": ("gpt_neox", dict(LLAMA_LIKE, num_key_value_heads=2, use_parallel_residual=False)),
    "phi": ("phi", dict(LLAMA_LIKE, num_key_value_heads=2)),
    "phi3": ("phi3", dict(LLAMA_LIKE, num_key_value_heads=2)),
    "gemma": ("gemma", HEADS_16),
    "gemma2": ("gemma2", dict(HEADS_16, sliding_window=6)),
    "gemma3_text": ("gemma3_text", HEADS_16),
    "mistral": ("mistral", LLAMA_LIKE),
    "qwen2": ("qwen2", LLAMA_LIKE),
    "qwen3": ("qwen3", HEADS_16),
    "olmo2": ("olmo2", LLAMA_LIKE),
    "granite": ("granite", dict(LLAMA_LIKE, residual_multiplier=0.5)),
    "cohere": ("cohere", LLAMA_LIKE),
    "stablelm": ("stablelm", dict(LLAMA_LIKE, num_key_value_heads=2)),
    "starcoder2": ("starcoder2", LLAMA_LIKE),
    "mixtral": ("mixtral", dict(LLAMA_LIKE, **MOE)),
    "olmoe": ("olmoe", dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": (
        "deepseek_v3",
        dict(
            LLAMA_LIKE,
            moe_intermediate_size=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    ),  # fmt: skip
    "gpt_oss": ("gpt_oss", dict(HEADS_16, **MOE, layer_types=["full_attention", "sliding_attention"])),
    "llama4_text": ("llama4_text", dict(HEADS_16, num_local_experts=4, num_experts_per_tok=1)),
    "smollm3": ("smollm3", LLAMA_LIKE),
    "glm": ("glm", LLAMA_LIKE),
    "exaone4": ("exaone4", LLAMA_LIKE),
    "ernie4_5": ("ernie4_5", LLAMA_LIKE),
    "nemotron": ("nemotron", LLAMA_LIKE),
    "falcon": ("falcon", dict(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2, **TOKENS)),
    "bloom": ("bloom", dict(vocab_size=VOCAB, hidden_size=DIM, n_layer=2, n_head=2, **TOKENS)),
    "gptj": ("gptj", dict(GPT_LIKE, rotary_dim=8)),
    "codegen": ("codegen", dict(GPT_LIKE, n_ctx=64, rotary_dim=8)),
    "gpt_bigcode": ("gpt_bigcode", GPT_LIKE),
    "opt": (
        "opt",
        dict(
            vocab_size=VOCAB,
            hidden_size=DIM,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=DIM,
            max_position_embeddings=64,
            dropout=0.0,
            **TOKENS,
        ),
    ),  # fmt: skip
    "mpt": ("mpt", dict(vocab_size=VOCAB, d_model=DIM, n_layers=2, n_heads=2, max_seq_len=64)),
    "jamba": ("jamba", dict(LLAMA_LIKE, num_experts=2, attn_layer_period=2, attn_layer_offset=1), "model.layers"),
}


def survey(label: str, model_type: str, kwargs: dict, blocks: str | None = None) -> str:
    """One row: what injection did to this architecture and whether the model is still the original one."""
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kwargs))
    original.eval()
    ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model = copy.deepcopy(original)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = apply_mhc(model, MHCConfig(streams=4, gate_init=0.0, blocks=blocks), example_input=batch)
    except (ValueError, RuntimeError) as err:
        return f"| {label} | refused: {err} |" + " |" * 5
    notes = sorted({str(w.message).split(": ", 1)[1].rstrip(".") for w in caught if "mHC wraps" in str(w.message)})
    if blocks:
        notes.insert(0, f"blocks={blocks!r} passed")
    model.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - original(**batch).logits).abs().max().item()
        same_generation = torch.equal(
            model.generate(**batch, max_new_tokens=5, do_sample=False),
            original.generate(**batch, max_new_tokens=5, do_sample=False),
        )
    trained = copy.deepcopy(original).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same warnings as above
        apply_mhc(trained, MHCConfig(streams=4, gate_init=0.01, blocks=blocks), example_input=batch)
    trained(**batch, labels=ids).loss.backward()
    phis = [p.grad for name, p in trained.named_parameters() if name.endswith(".phi")]
    reached = sum(g is not None and bool(g.abs().sum() > 0) for g in phis)
    layout = sorted({(b.granularity, b.branches) for b in report.blocks})
    return (
        f"| {label} | `{report.stack}` | {layout} | {diff:.1e} | {'equal' if same_generation else 'DIFFERENT'} "
        f"| {reached}/{len(phis)} | {'; '.join(notes)} |"
    )


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    wanted = sys.argv[1:] or list(ARCHITECTURES)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print("| architecture | stack | (granularity, branches) | max logit diff at gate 0 | greedy generation "
          "| phi with gradient | notes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label in wanted:
        print(survey(label, *ARCHITECTURES[label]), flush=True)


if __name__ == "__main__":
    main()
