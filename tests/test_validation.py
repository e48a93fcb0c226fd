"""Validation audit: every public constructor and the CLI reject a bad value when they are built, with a message
naming the field, the value and what is allowed. One row per (constructor, field, bad value)."""

import math
import subprocess
import sys

import pytest
import torch
from block_styles import NanoGPT, lm_batch

from lightning_mhc import MHCConfig, apply_mhc
from lightning_mhc.cli import main
from lightning_mhc.data import ByteLMDataModule
from lightning_mhc.metrics import AmaxGain, ExpertLoad, LossSpikes
from lightning_mhc.models import DenseTransformerLM, MoETransformerLM
from lightning_mhc.models.layers import FeedForward
from lightning_mhc.moe import MoEConfig, build_moe


def moe_config(**kwargs):
    return MoEConfig(**{"hidden_size": 8, "ffn_hidden_size": 16, **kwargs})


def inject(**kwargs):
    return apply_mhc(**{"module": NanoGPT(depth=2), "example_input": lm_batch(), **kwargs})


# (constructor, field as the message prints it, bad value[, the keyword arguments when not {field: value}])
ROWS = [
    (MHCConfig, "streams", 0),
    (MHCConfig, "streams", 2.5),
    (MHCConfig, "streams", True),
    (MHCConfig, "streams", "4"),
    (MHCConfig, "mode", "mHC"),
    (MHCConfig, "mode", None),
    (MHCConfig, "blocks", ""),
    (MHCConfig, "blocks", 3),
    (MHCConfig, "sinkhorn_iters", 0),
    (MHCConfig, "init", "lucidrains"),
    (MHCConfig, "gate_init", -0.1),
    (MHCConfig, "gate_init", math.nan),
    (MHCConfig, "gate_init", "0.01"),
    (MHCConfig, "res_init", math.inf),
    (MHCConfig, "readout", "max"),
    (MHCConfig, "granularity", "layer"),
    (MHCConfig, "kernels", "cuda"),
    (MHCConfig, "recompute", "yes"),
    (MHCConfig, "recompute_layers", 0),
    (MHCConfig, "log_every_n_steps", 0),
    (moe_config, "hidden_size", 0),
    (moe_config, "ffn_hidden_size", -1),
    (moe_config, "num_experts", 0),
    (moe_config, "top_k", 9),
    (moe_config, "mlp_type", "swiglu"),
    (moe_config, "shared_expert_hidden_size", -1),
    (moe_config, "balancing", "aux"),
    (moe_config, "aux_loss_weight", -1.0),
    (moe_config, "bias_update_rate", math.nan),
    (moe_config, "activation", "relu"),
    (moe_config, "normalize_expert_weights", 1),
    (moe_config, "init_std", 0.0),
    (build_moe, "backend", "jax", {"config": MoEConfig(8, 16), "backend": "jax"}),
    (build_moe, "config", {"hidden_size": 8}),
    (MoETransformerLM, "vocab_size", 0),
    (MoETransformerLM, "d_model", 1),
    (MoETransformerLM, "n_layers", 0),
    (MoETransformerLM, "n_heads", 3),
    (MoETransformerLM, "seq_len", 0),
    (MoETransformerLM, "dense_layers", 5),
    (MoETransformerLM, "dense_ffn_size", 0),
    (MoETransformerLM, "num_experts", 0),
    (MoETransformerLM, "top_k", 9),
    (MoETransformerLM, "expert_ffn_size", 0),
    (MoETransformerLM, "shared_expert_size", -1),
    (MoETransformerLM, "mlp_type", "relu"),
    (MoETransformerLM, "balancing", "loss"),
    (MoETransformerLM, "aux_loss_weight", -0.1),
    (MoETransformerLM, "bias_update_rate", math.inf),
    (MoETransformerLM, "normalize_expert_weights", "no"),
    (MoETransformerLM, "moe_backend", "cuda"),
    (MoETransformerLM, "tie_embeddings", "yes"),
    (MoETransformerLM, "rope_theta", 0.5),
    (MoETransformerLM, "init_std", 0.0),
    (MoETransformerLM, "lr", 0.0),
    (MoETransformerLM, "weight_decay", -1.0),
    (MoETransformerLM, "betas", (0.9,)),
    (MoETransformerLM, "betas[1]", 1.0, {"betas": (0.9, 1.0)}),
    (MoETransformerLM, "warmup_steps", -1),
    (MoETransformerLM, "min_lr_ratio", 2.0),
    (DenseTransformerLM, "ffn_size", 0),
    (DenseTransformerLM, "mlp_type", "moe"),
    (DenseTransformerLM, "d_model", 0),
    (DenseTransformerLM, "n_heads", 0),
    (FeedForward, "mlp_type", "relu", {"d_model": 8, "ffn_size": 16, "mlp_type": "relu"}),
    (ByteLMDataModule, "path", 123),
    (ByteLMDataModule, "path", "/no/such/corpus"),
    (ByteLMDataModule, "seq_len", 0),
    (ByteLMDataModule, "batch_size", 0),
    (ByteLMDataModule, "val_fraction", 1.0),
    (ByteLMDataModule, "val_fraction", 0),
    (ByteLMDataModule, "num_workers", -1),
    (ByteLMDataModule, "max_bytes", 0),
    (ByteLMDataModule, "seed", -1),
    (ByteLMDataModule, "train_samples_per_epoch", 0),
    (ByteLMDataModule, "max_val_windows", 0),
    (ByteLMDataModule, "patterns", "*.txt"),
    (ByteLMDataModule, "token_dtype", "int32"),
    (AmaxGain, "AmaxGain.num_layers", 0, {"num_layers": 0}),
    (ExpertLoad, "ExpertLoad.num_experts", -1, {"num_experts": -1}),
    (LossSpikes, "LossSpikes.threshold", 1.0, {"threshold": 1.0}),
    (LossSpikes, "LossSpikes.window", 0, {"window": 0}),
    (LossSpikes, "LossSpikes.min_history", 0, {"min_history": 0}),
    (inject, "module", "model", {"module": "model"}),
    (inject, "config", {"streams": 4}),
    (inject, "config", 4),
    (inject, "plan['dim']", 0, {"plan": {"stack": "transformer.h", "dim": 0, "blocks": [{}]}}),
]


def _row_id(row):
    return f"{getattr(row[0], '__name__', row[0])}-{row[1]}={row[2]!r}"


@pytest.mark.parametrize("row", ROWS, ids=[_row_id(r) for r in ROWS])
def test_bad_value_is_rejected_at_construction_naming_field_value_and_what_is_allowed(row):
    build, field, value, *extra = row
    kwargs = extra[0] if extra else {field.split(".")[-1]: value}
    with pytest.raises(ValueError) as info:
        build(**kwargs)
    message = str(info.value)
    name = f"MHCConfig.{field}" if build is MHCConfig else f"MoEConfig.{field}" if build is moe_config else field
    assert f"{name}={value!r}" in message
    assert "; pass " in message


def test_every_field_of_the_configs_has_a_row():
    covered = {(build, field) for build, field, *_ in ROWS}
    for build, config in ((MHCConfig, MHCConfig()), (moe_config, moe_config())):
        missing = [f for f in vars(config) if (build, f) not in covered]
        assert not missing, f"{build.__name__} fields without a bad-value row: {missing}"


@pytest.fixture
def command_line(monkeypatch):
    """``main(args)`` reads ``args``, not pytest's own command line."""
    monkeypatch.setattr(sys, "argv", ["lightning-mhc"])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.d_model=0"], "d_model=0 is not allowed; pass an integer >= 2."),
        (["--model.init_args.top_k=9"], "top_k=9 is not allowed; pass an integer between 1 and num_experts=8."),
        (["--data.init_args.val_fraction=2"], "val_fraction=2.0 is not allowed; pass a finite number > 0.0 and < 1.0"),
        (
            ["--trainer.callbacks+=lightning_mhc.MHCCallback", "--trainer.callbacks.readout=max"],
            "MHCConfig.readout='max' is not allowed; pass one of 'mean', 'sum', 'learned'.",
        ),
        (["--trainer.max_steps=-5"], "`max_steps` must be a non-negative integer or -1"),
    ],
)
def test_cli_bad_value_exits_with_the_message(command_line, capsys, tmp_path, args, expected):
    with pytest.raises(SystemExit) as exited:
        main(["fit", f"--trainer.default_root_dir={tmp_path}", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: invalid configuration: {expected}" in err
    assert "Traceback" not in err


def test_console_command_rejects_a_bad_yaml_value_without_a_traceback(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n"
        f"  default_root_dir: {tmp_path}\n"
        "  callbacks:\n"
        "    - class_path: lightning_mhc.MHCCallback\n"
        "      init_args: {streams: 0}\n"
        "model:\n"
        "  init_args: {d_model: 32}\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "lightning_mhc.cli", "fit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "error: invalid configuration: MHCConfig.streams=0 is not allowed; pass an integer >= 1." in run.stderr
    assert "Traceback" not in run.stderr


def test_wrongly_typed_cli_value_is_reported_by_the_parser(command_line, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--model.init_args.d_model=abc"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert 'Parser key "d_model"' in err and "Got value: abc" in err
    assert "Traceback" not in err


def test_moe_layer_modules_take_only_a_checked_config():
    with pytest.raises(ValueError, match=r"MoEConfig\.top_k=3 is not allowed; pass an integer between 1 and"):
        build_moe(MoEConfig(8, 16, num_experts=2, top_k=3))
    assert build_moe(MoEConfig(8, 16), backend="torch")(torch.randn(2, 8)).shape == (2, 8)
