"""Byte-level language-modelling data: a text file, a folder of text files, or a memory-mapped token file.

With no path the corpus is the running interpreter's standard-library ``.py`` sources: embedded, offline, a few MB
of real text that a small model learns visibly in a few hundred CPU steps. (It differs between Python versions, so
numbers are comparable only on one interpreter.)
"""

from __future__ import annotations

import math
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_mhc.config import check_choice, check_float, check_int

DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.py", "*.json", "*.csv", "*.tex", "*.html", "*.xml", "*.yaml")
TOKEN_DTYPES = ("uint8", "uint16")
_SKIPPED_DIRS = ("site-packages", "dist-packages", "__pycache__")
_COUNT_CHUNK = 1 << 24


def _walk_sorted(root: Path) -> list[Path]:
    """Files under ``root`` sorted by relative path (symlinked directories not followed; ``site-packages`` skipped)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        files.extend(Path(dirpath) / name for name in filenames)
    return sorted(files, key=lambda file: file.relative_to(root).as_posix())


def _matches(relative: Path, patterns: tuple[str, ...]) -> bool:
    posix = PurePosixPath(relative.as_posix())
    return any(posix.match(pattern) for pattern in patterns)


def _read_capped(files: list[Path], max_bytes: Optional[int]) -> np.ndarray:
    """Concatenated bytes of ``files`` in order, stopping after ``max_bytes`` (``None`` = all)."""
    parts: list[bytes] = []
    total = 0
    for file in files:
        if max_bytes is not None and total >= max_bytes:
            break
        with open(file, "rb") as handle:
            data = handle.read() if max_bytes is None else handle.read(max_bytes - total)
        parts.append(data)
        total += len(data)
    return np.frombuffer(b"".join(parts), dtype=np.uint8)


def stdlib_source_files() -> list[Path]:
    """The interpreter's standard-library ``.py`` files in sorted order, without ``site-packages``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [file for file in _walk_sorted(root) if file.suffix == ".py"]


class RandomWindowSampler(Sampler[int]):
    """``num_samples`` window start offsets drawn uniformly from ``range(num_starts)``, reseeded per epoch.

    Epoch ``e`` draws from ``numpy.random.default_rng((seed, e))``: the same on every rank and run. Lightning calls
    ``set_epoch`` at each epoch start (also through its distributed wrapper, which then shards the offsets).
    """

    def __init__(self, num_starts: int, num_samples: int, seed: int = 0) -> None:
        self.num_starts = num_starts
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose offsets ``__iter__`` yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        return iter(rng.integers(0, self.num_starts, size=self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


class TokenWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens of a 1-D token array, returned as ``(input_ids, targets)`` shifted by one.

    Index ``i`` is the window starting at ``starts[i]``, or at offset ``i`` when ``starts`` is ``None`` (every
    offset, used with :class:`RandomWindowSampler`).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, starts: Optional[np.ndarray] = None) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.starts = starts

    def __len__(self) -> int:
        if self.starts is not None:
            return len(self.starts)
        return max(len(self.tokens) - self.seq_len, 0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index]) if self.starts is not None else int(index)
        window = torch.from_numpy(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        return window[:-1], window[1:]


class ByteLMDataModule(L.LightningDataModule):
    """Byte-level LM batches ``(input_ids, targets)``, both ``LongTensor [batch_size, seq_len]``, targets shifted by 1.

    The token stream is split once: the first ``1 - val_fraction`` is training data, the last ``val_fraction`` is
    validation data (deterministic, disjoint). Training draws ``train_samples_per_epoch`` windows at uniformly random
    offsets (seeded by ``seed`` and the epoch, so runs repeat exactly and epochs differ); validation uses contiguous
    non-overlapping windows (every validation byte is predicted at most once), at most ``max_val_windows`` of them
    spread evenly over the split.

    Args:
        path: ``None`` for the Python standard-library sources; a text file; a folder (files matching ``patterns``,
            recursive, sorted by path); or a ``.bin`` token file read as a numpy memmap of ``token_dtype``.
        seq_len: tokens per training example.
        batch_size: examples per batch.
        val_fraction: share of the stream kept for validation, in (0, 1).
        num_workers: DataLoader worker processes.
        max_bytes: cap on the bytes read from text sources (``None`` = all); ``.bin`` files are mapped whole.
        seed: seed of the training window offsets.
        train_samples_per_epoch: training windows per epoch.
        max_val_windows: cap on validation windows (``None`` = all).
        patterns: file-name globs for folders (default: common text formats, :data:`DEFAULT_PATTERNS`).
        token_dtype: ``"uint8"`` or ``"uint16"``, the element type of a ``.bin`` token file.

    Example::

        dm = ByteLMDataModule(seq_len=128, batch_size=16)   # stdlib sources, offline
        trainer.fit(model, datamodule=dm)
        print(dm.unigram_entropy("val"))                       # nats/byte, the floor a unigram model reaches
    """

    def __init__(
        self,
        path: Optional[str] = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        max_bytes: Optional[int] = 8_000_000,
        seed: int = 0,
        train_samples_per_epoch: int = 20_000,
        max_val_windows: Optional[int] = 256,
        patterns: Optional[list[str]] = None,
        token_dtype: str = "uint8",
    ) -> None:
        super().__init__()
        for name, value, minimum in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("seed", seed, 0),
            ("train_samples_per_epoch", train_samples_per_epoch, 1),
        ):
            check_int(name, value, minimum)
        if max_bytes is not None:
            check_int("max_bytes", max_bytes, 1)
        if max_val_windows is not None:
            check_int("max_val_windows", max_val_windows, 1)
        check_float("val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_choice("token_dtype", token_dtype, TOKEN_DTYPES)
        if patterns is not None and (
            not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) and p for p in patterns)
        ):
            raise ValueError(
                f"patterns={patterns!r} is not allowed; pass a list of file-name globs such as ['*.txt', '*.md'], "
                "or None for the defaults."
            )
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ValueError(
                f"path={path!r} is not allowed; pass a file or folder path (str), or None for the bundled corpus."
            )
        if path is not None and not Path(path).exists():
            raise ValueError(
                f"path={path!r} does not exist; pass a text file, a folder of text files, a .bin token file, "
                "or None for the bundled Python standard-library corpus."
            )
        self.save_hyperparameters()
        self.path = path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.num_workers = num_workers
        self.max_bytes = max_bytes
        self.seed = seed
        self.train_samples_per_epoch = train_samples_per_epoch
        self.max_val_windows = max_val_windows
        self.patterns = tuple(patterns) if patterns else DEFAULT_PATTERNS
        self.token_dtype = token_dtype
        self.train_tokens: Optional[np.ndarray] = None
        self.val_tokens: Optional[np.ndarray] = None
        self.vocab_size = 256 if token_dtype == "uint8" else 65536

    def load_tokens(self) -> np.ndarray:
        """The whole token stream (1-D numpy array or memmap) of the configured source."""
        if self.path is None:
            return _read_capped(stdlib_source_files(), self.max_bytes)
        path = Path(self.path)
        if path.is_dir():
            files = [file for file in _walk_sorted(path) if _matches(file.relative_to(path), self.patterns)]
            if not files:
                raise ValueError(
                    f"path={self.path!r} has no files matching patterns={list(self.patterns)}; pass patterns= "
                    "that match your files."
                )
            return _read_capped(files, self.max_bytes)
        if path.suffix == ".bin":
            if path.stat().st_size % np.dtype(self.token_dtype).itemsize:
                raise ValueError(
                    f"{self.path!r} has {path.stat().st_size} bytes, not a whole number of {self.token_dtype} "
                    "tokens; pass the token_dtype it was written with."
                )
            return np.memmap(path, dtype=self.token_dtype, mode="r")
        return _read_capped([path], self.max_bytes)

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the stream once and split it into training and validation parts."""
        if self.train_tokens is not None:
            return
        tokens = self.load_tokens()
        n_val = math.ceil(len(tokens) * self.val_fraction)
        n_train = len(tokens) - n_val
        if n_val < self.seq_len + 1 or n_train < self.seq_len + 1:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens: {n_train} for training and {n_val} for validation, but one "
                f"window needs seq_len + 1 = {self.seq_len + 1} in each; pass a smaller seq_len, a val_fraction "
                "nearer 0.5, a larger max_bytes, or a larger corpus."
            )
        self.train_tokens = tokens[:n_train]
        self.val_tokens = tokens[n_train:]

    def _split(self, split: str) -> np.ndarray:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r} is not allowed; pass 'train' or 'val'.")
        self.setup()
        tokens = self.train_tokens if split == "train" else self.val_tokens
        assert tokens is not None
        return tokens

    def val_starts(self) -> np.ndarray:
        """Start offsets of the validation windows: non-overlapping, evenly spread when capped."""
        count = (len(self._split("val")) - 1) // self.seq_len
        starts = np.arange(count, dtype=np.int64) * self.seq_len
        if self.max_val_windows is not None and count > self.max_val_windows:
            starts = starts[np.linspace(0, count - 1, self.max_val_windows).round().astype(np.int64)]
        return starts

    def train_dataloader(self) -> DataLoader:
        """Random windows of the training split, reproducible from ``seed`` and the epoch."""
        dataset = TokenWindows(self._split("train"), self.seq_len)
        sampler = RandomWindowSampler(len(dataset), self.train_samples_per_epoch, self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Contiguous non-overlapping windows of the validation split, in order."""
        dataset = TokenWindows(self._split("val"), self.seq_len, self.val_starts())
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def unigram_entropy(self, split: str = "train", unit: str = "nats") -> float:
        """Entropy of the split's token frequencies, per token: ``"nats"`` (the unit of the cross-entropy training
        loss) or ``"bits"`` (bits per byte). A model whose validation loss is below this has learned more than
        token frequencies."""
        if unit not in ("nats", "bits"):
            raise ValueError(f"unit={unit!r} is not allowed; pass 'nats' or 'bits'.")
        tokens = self._split(split)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for begin in range(0, len(tokens), _COUNT_CHUNK):
            counts += np.bincount(np.asarray(tokens[begin : begin + _COUNT_CHUNK]), minlength=self.vocab_size)
        probs = counts[counts > 0] / counts.sum()
        entropy = max(float(-(probs * np.log(probs)).sum()), 0.0)
        return entropy / math.log(2) if unit == "bits" else entropy
