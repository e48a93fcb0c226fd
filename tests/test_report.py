from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lit_models import LitLM, token_loader, trainer

from lightning_mhc import MHCCallback
from lightning_mhc.report import find_runs, last_depth_profile, main

PNGS = {"loss.png", "grad_norm.png", "composite_gain.png", "composite_gain_by_depth.png"}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for mode, logger in (("mhc", CSVLogger), ("hc", TensorBoardLogger)):
        torch.manual_seed(0)
        run = trainer(
            max_steps=4,
            log_every_n_steps=1,
            logger=logger(root / mode, name="", version=""),
            callbacks=[MHCCallback(streams=4, mode=mode, log_every_n_steps=1)],
        )
        run.fit(LitLM(depth=2), token_loader())
    return root


def test_reads_csv_and_tensorboard_runs_with_depth_profiles(two_runs):
    runs = find_runs([two_runs / "mhc", two_runs / "hc"])
    assert len(runs) == 2
    for run in runs.values():
        assert [s for s, _ in run["mhc/gain_fwd_composite"]] == [0, 1, 2, 3]
        assert [d for d, _ in last_depth_profile(run, "bwd")] == [0, 1, 2, 3]
        assert "train_loss" in run


def test_report_writes_the_plots(two_runs, tmp_path):
    written = main([str(two_runs / "mhc"), str(two_runs / "hc"), "--out", str(tmp_path)])
    assert {p.name for p in written} == PNGS
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000


def test_report_on_a_folder_without_logs_says_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match="CSVLogger or TensorBoardLogger"):
        main([str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main([str(Path(tmp_path) / "missing")])
