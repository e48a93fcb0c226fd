"""The ``lightning-mhc`` command: every example config parses, the tiny ones fit through it, checkpoints reload."""

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_mhc import load_from_checkpoint
from lightning_mhc.cli import main
from lightning_mhc.mhc_block import MHCBlock
from lightning_mhc.models import MoETransformerLM

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
ALL_CONFIGS = sorted(path.name for path in CONFIGS.glob("*.yaml"))
SMALL_RUN = [
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.batch_size=4",
    "--data.init_args.max_bytes=100000",
    "--data.init_args.max_val_windows=4",
]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    """``main(args)`` reads ``args``, not pytest's own command line."""
    monkeypatch.setattr(sys, "argv", ["lightning-mhc"])


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exited:
        main(["fit", *args, "--print_config"])
    assert exited.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def fit(config: str, root: Path, *extra: str) -> Path:
    """Run ``lightning-mhc fit`` on a shrunken example config; return the run's log folder."""
    args = ["--config", str(CONFIGS / config), f"--trainer.default_root_dir={root}", *SMALL_RUN, *extra]
    assert main(["fit", *args]) == 0
    (log_dir,) = root.glob("*/version_0")
    return log_dir


def last_val_loss(log_dir: Path) -> float:
    with open(log_dir / "metrics.csv") as handle:
        return [float(row["val_loss"]) for row in csv.DictReader(handle) if row.get("val_loss")][-1]


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_every_example_config_parses(config, capsys):
    parsed = printed_config(capsys, "--config", str(CONFIGS / config))
    assert parsed["model"]["init_args"]["seq_len"] == parsed["data"]["init_args"]["seq_len"]


def test_a_command_line_override_reaches_interpolated_values(capsys, tmp_path):
    parsed = printed_config(
        capsys,
        "--config",
        str(CONFIGS / "tiny_moe_mhc.yaml"),
        "--data.init_args.seq_len=32",
        f"--trainer.default_root_dir={tmp_path}",
    )
    assert parsed["model"]["init_args"]["seq_len"] == 32
    assert parsed["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path)


def test_defaults_are_the_moe_model_on_byte_data(capsys):
    parsed = printed_config(capsys)
    assert parsed["model"]["class_path"] == "lightning_mhc.models.MoETransformerLM"
    assert parsed["data"]["class_path"] == "lightning_mhc.data.ByteLMDataModule"


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny_moe_hc.yaml", "tiny_moe_baseline.yaml", "dense_mhc.yaml"])
def test_tiny_config_fits_through_the_cli(config, tmp_path, capsys):
    log_dir = fit(config, tmp_path)
    summary = capsys.readouterr().out
    assert "validation loss" in summary and "unigram entropy" in summary and str(log_dir) in summary
    assert (log_dir / "checkpoints" / "last.ckpt").exists()
    assert last_val_loss(log_dir) > 0
    with open(log_dir / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert ("moe/max_over_mean" in columns) == ("moe" in config)
    assert any(column.startswith("mhc/") for column in columns) == (config != "tiny_moe_baseline.yaml")


@pytest.mark.slow
def test_mhc_fit_then_validate_and_reload_from_its_checkpoint(tmp_path):
    config = "tiny_moe_mhc.yaml"
    log_dir = fit(config, tmp_path / "fit", "--data.init_args.seq_len=32")
    checkpoint = log_dir / "checkpoints" / "last.ckpt"
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert stored["hyper_parameters"]["seq_len"] == 32  # --data.init_args.seq_len reached ${data.init_args.seq_len}

    args = ["--config", str(CONFIGS / config), f"--trainer.default_root_dir={tmp_path / 'validate'}", *SMALL_RUN]
    assert main(["validate", *args, "--data.init_args.seq_len=32", f"--ckpt_path={checkpoint}"]) == 0
    (validate_dir,) = (tmp_path / "validate").glob("*/version_0")
    assert last_val_loss(validate_dir) == pytest.approx(last_val_loss(log_dir), abs=1e-5)

    model = load_from_checkpoint(MoETransformerLM, str(checkpoint))
    assert sum(isinstance(block, MHCBlock) for block in model.layers) == 4
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, stored["state_dict"][name], rtol=0, atol=0, msg=name)


def test_report_subcommand_dispatches_to_lightning_mhc_report():
    if importlib.util.find_spec("lightning_mhc.report") is None:
        with pytest.raises(ModuleNotFoundError, match="lightning_mhc.report"):
            main(["report", "--help"])
    else:
        with pytest.raises(SystemExit) as exited:
            main(["report", "--help"])
        assert exited.value.code in (0, None)


@pytest.mark.slow
def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "lightning_mhc.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning-mhc" in result.stdout and "report" in result.stdout
