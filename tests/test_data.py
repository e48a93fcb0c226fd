"""ByteLMDataModule: default corpus, splits, batches, memmap and folder sources, errors, unigram entropy."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_mhc.data import ByteLMDataModule, RandomWindowSampler, stdlib_source_files

SMALL = 200_000


def _first_batch(loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    return next(iter(loader))


def test_default_corpus_is_stdlib_sources_offline_and_deterministic():
    files = stdlib_source_files()
    assert files and all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    a = ByteLMDataModule(max_bytes=SMALL, seq_len=32, batch_size=4)
    b = ByteLMDataModule(max_bytes=SMALL, seq_len=32, batch_size=4)
    tokens = a.load_tokens()
    assert len(tokens) == SMALL and tokens.dtype == np.uint8
    assert tokens[:64].tobytes() == files[0].read_bytes()[:64]
    assert np.array_equal(tokens, b.load_tokens())
    for x_a, x_b in zip(_first_batch(a.train_dataloader()), _first_batch(b.train_dataloader())):
        assert torch.equal(x_a, x_b)


def test_split_is_disjoint_and_covers_the_stream():
    dm = ByteLMDataModule(max_bytes=SMALL, seq_len=64, val_fraction=0.1)
    dm.setup("fit")
    assert len(dm.val_tokens) == math.ceil(SMALL * 0.1)
    assert len(dm.train_tokens) + len(dm.val_tokens) == SMALL
    assert np.array_equal(np.concatenate([dm.train_tokens, dm.val_tokens]), dm.load_tokens())
    starts = dm.val_starts()
    assert len(starts) == 256 and np.all(np.diff(starts) >= dm.seq_len)  # capped, non-overlapping
    assert starts[-1] + dm.seq_len + 1 <= len(dm.val_tokens)
    sampler = dm.train_dataloader().sampler
    assert max(sampler) + dm.seq_len + 1 <= len(dm.train_tokens)


def test_batches_have_shapes_and_shifted_targets():
    dm = ByteLMDataModule(max_bytes=SMALL, seq_len=48, batch_size=5, train_samples_per_epoch=20)
    dm.setup("fit")
    for loader, tokens in ((dm.train_dataloader(), dm.train_tokens), (dm.val_dataloader(), dm.val_tokens)):
        x, y = _first_batch(loader)
        assert x.shape == y.shape == (5, 48) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])
        sampler = loader.sampler
        start = next(iter(sampler)) if isinstance(sampler, RandomWindowSampler) else int(dm.val_starts()[0])
        assert torch.equal(x[0], torch.from_numpy(tokens[start : start + 48].astype(np.int64)))
    assert len(dm.train_dataloader()) == 4


def test_train_windows_are_seeded_and_change_per_epoch():
    sampler = RandomWindowSampler(num_starts=10_000, num_samples=50, seed=7)
    first = list(sampler)
    assert first == list(RandomWindowSampler(10_000, 50, seed=7))
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert list(RandomWindowSampler(10_000, 50, seed=8)) != first


def test_memmap_token_file(tmp_path: Path):
    tokens = (np.arange(5_000) * 7 % 1_000).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    dm = ByteLMDataModule(path=str(path), token_dtype="uint16", seq_len=16, batch_size=3, val_fraction=0.2)
    dm.setup()
    assert isinstance(dm.train_tokens, np.memmap) and dm.vocab_size == 65536
    assert np.array_equal(dm.val_tokens, tokens[4_000:])
    x, y = _first_batch(dm.val_dataloader())
    assert torch.equal(x[0], torch.from_numpy(tokens[4_000:4_016].astype(np.int64)))
    assert torch.equal(y[0], torch.from_numpy(tokens[4_001:4_017].astype(np.int64)))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="token_dtype"):
        ByteLMDataModule(path=str(odd), token_dtype="uint16", seq_len=1).setup()


def test_text_file_and_folder(tmp_path: Path):
    root = tmp_path / "corpus"
    (root / "b_dir").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha " * 200)
    (root / "b_dir" / "c.md").write_bytes(b"gamma " * 200)
    (root / "b_dir" / "skip.png").write_bytes(b"\x89PNG" * 100)
    (root / "z.py").write_bytes(b"zeta " * 200)
    dm = ByteLMDataModule(path=str(root), seq_len=8, batch_size=2)
    expected = b"alpha " * 200 + b"gamma " * 200 + b"zeta " * 200
    assert dm.load_tokens().tobytes() == expected
    only_py = ByteLMDataModule(path=str(root), seq_len=8, patterns=["*.py"])
    assert only_py.load_tokens().tobytes() == b"zeta " * 200
    single = ByteLMDataModule(path=str(root / "a.txt"), seq_len=8, max_bytes=100)
    assert single.load_tokens().tobytes() == (b"alpha " * 200)[:100]
    x, _ = _first_batch(dm.train_dataloader())
    assert x.shape == (2, 8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": "/no/such/corpus.txt"}, "does not exist"),
        ({"seq_len": 0}, "seq_len=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"val_fraction": 1.0}, "val_fraction=1.0"),
        ({"token_dtype": "int32"}, "token_dtype"),
        ({"max_bytes": 0}, "max_bytes=0"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ByteLMDataModule(**kwargs)


def test_too_small_corpus_and_empty_folder_raise(tmp_path: Path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_bytes(b"x" * 300)
    with pytest.raises(ValueError, match="smaller seq_len"):
        ByteLMDataModule(path=str(tiny), seq_len=64, val_fraction=0.05).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="patterns"):
        ByteLMDataModule(path=str(tmp_path / "empty")).setup()


def test_unigram_entropy(tmp_path: Path):
    same = tmp_path / "same.txt"
    same.write_bytes(b"a" * 4_000)
    assert ByteLMDataModule(path=str(same), seq_len=8).unigram_entropy() == 0.0
    uniform = tmp_path / "uniform.bin"
    uniform.write_bytes(bytes(range(256)) * 40)
    dm = ByteLMDataModule(path=str(uniform), seq_len=8, val_fraction=0.5)
    assert dm.unigram_entropy("train", unit="bits") == pytest.approx(8.0)
    assert dm.unigram_entropy("val") == pytest.approx(math.log(256))
    stdlib = ByteLMDataModule(max_bytes=SMALL, seq_len=8).unigram_entropy(unit="bits")
    assert 4.0 < stdlib < 5.5  # English-like source code
    with pytest.raises(ValueError, match="'nats' or 'bits'"):
        dm.unigram_entropy(unit="bytes")


def test_typed_init_args_parse_like_lightning_cli():
    parser = ArgumentParser()
    parser.add_class_arguments(ByteLMDataModule, "data")
    cfg = parser.parse_args(["--data.seq_len=64", '--data.patterns=["*.txt", "*.md"]', "--data.max_bytes=null"])
    dm = ByteLMDataModule(**cfg.data.as_dict())
    assert dm.seq_len == 64 and dm.patterns == ("*.txt", "*.md") and dm.max_bytes is None


class _Recorder(L.LightningModule):
    """Smallest module that trains on the datamodule and records the first input of every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, 256)
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, int(x[0, 0])))
        return torch.nn.functional.cross_entropy(self.embed(x).flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.embed(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_runs_and_epochs_draw_new_windows():
    dm = ByteLMDataModule(max_bytes=SMALL, seq_len=16, batch_size=4, train_samples_per_epoch=16, max_val_windows=8)
    model = _Recorder()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    epoch0 = [first for epoch, first in model.seen if epoch == 0]
    epoch1 = [first for epoch, first in model.seen if epoch == 1]
    assert len(epoch0) == len(epoch1) == 4 and epoch0 != epoch1
    assert "val_loss" in trainer.callback_metrics
