"""The user's path on a GPU: Lightning training with the Triton kernels, and the kernels inside real models.

Marked ``cuda`` and skipped without a CUDA device; ``benchmarks/gpu_check.sh`` runs them on the GPU machine. Each
test compares with a reference computed in the test: the torch kernels on the same device, or the same checkpoint
reloaded on the CPU.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from block_styles import VOCAB, NanoGPT, lm_batch
from lit_models import trainer

from lightning_mhc import MHCCallback, MHCConfig, apply_mhc, load_from_checkpoint
from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.hyper_connection import HyperConnection
from lightning_mhc.kernels.dispatch import resolve_backend
from lightning_mhc.models import MoETransformerLM

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TINY_MOE = dict(d_model=64, n_layers=3, n_heads=4, seq_len=64, dense_layers=1, num_experts=4, top_k=2)


def check_fit_then_reload_on_cpu(root, accelerator: str) -> None:
    """bf16-mixed fit with the callback's default kernels; the checkpoint reloads on the CPU to the same outputs."""
    torch.manual_seed(0)
    model = MoETransformerLM(**TINY_MOE, moe_backend="torch")
    data = ByteLMDataModule(seq_len=64, batch_size=8, max_bytes=200_000, max_val_windows=16)
    run = trainer(
        accelerator=accelerator, precision="bf16-mixed", max_steps=30, val_check_interval=15, limit_val_batches=2,
        enable_checkpointing=True, default_root_dir=root, callbacks=[MHCCallback(streams=4)], log_every_n_steps=10,
    )  # fmt: skip
    run.fit(model, data)
    device = next(model.parameters()).device
    hyper = [m for m in model.modules() if isinstance(m, HyperConnection)]
    expected = "triton" if device.type == "cuda" else "torch"
    assert hyper and all(resolve_backend(m.kernels, device) == expected for m in hyper)
    assert torch.isfinite(run.callback_metrics["val_loss"])

    reloaded = load_from_checkpoint(MoETransformerLM, run.checkpoint_callback.best_model_path, map_location="cpu")
    tokens = torch.randint(0, 256, (2, 64))
    with torch.no_grad():
        trained = model.eval().float()(tokens.to(device)).cpu()
        on_cpu = reloaded.eval()(tokens)
    torch.testing.assert_close(on_cpu, trained, rtol=1e-3, atol=2e-3)


def test_bf16_mixed_fit_on_cuda_uses_triton_and_the_checkpoint_reloads_on_cpu(tmp_path):
    check_fit_then_reload_on_cpu(tmp_path, "gpu")


def _gpt2(device: str) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=128, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).to(device)


def _logits_and_grads(base, tokens, dtype, **config):
    model = copy.deepcopy(base)
    mhc = MHCConfig(streams=4, blocks="transformer.h", init="paper", gate_init=0.5, **config)
    torch.manual_seed(1)  # the same random phi for both kernel backends
    apply_mhc(model, mhc, example_input=tokens[:1])
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        logits = model(tokens).logits
    logits.float().logsumexp(-1).mean().backward()
    return logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def check_triton_equals_torch_in_gpt2(device: str, dtype: torch.dtype, recompute: bool) -> None:
    """Logits and every gradient of an injected GPT-2: Triton kernels (optionally recomputed) vs torch kernels."""
    base = _gpt2(device)
    tokens = torch.randint(0, 128, (4, 64), device=device)
    ref_logits, ref_grads = _logits_and_grads(base, tokens, dtype, kernels="torch")
    logits, grads = _logits_and_grads(base, tokens, dtype, kernels="triton", recompute=recompute)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(logits, ref_logits, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        scale = ref_grads[name].abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads[name] / scale, ref_grads[name] / scale, **tol, msg=name)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_in_a_real_model_equal_the_torch_kernels(recompute, dtype):
    check_triton_equals_torch_in_gpt2("cuda", dtype, recompute)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_a_training_step_never_waits_for_the_gpu(kernels, recompute):
    # A host sync in a layer's forward or backward (.item(), repeat_interleave with a tensor of repeats, ...) stalls
    # the launch queue once per layer; torch's sync debug mode turns each into an error.
    torch.manual_seed(0)
    model = NanoGPT(dim=64, depth=3).cuda()
    tokens = lm_batch().cuda()
    apply_mhc(model, MHCConfig(streams=4, kernels=kernels, recompute=recompute), example_input=tokens)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens)
        F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens.reshape(-1)).backward()

    step()  # compiles the kernels and warms the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
