"""Checkpoints are untrusted input: tampered, truncated and foreign files fail with a clear error, run no code, and
leave the model they were meant for unchanged; what mHC stores is plain data that ``weights_only=True`` loads."""

import copy
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from lit_models import LitLM, token_loader, trainer
from torch import nn

from lightning_mhc import MHCCallback, load_from_checkpoint
from lightning_mhc.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A full checkpoint of a 2-block nanoGPT trained one step with MHCCallback(streams=2)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    run = trainer(max_steps=1, callbacks=[MHCCallback(streams=2)])
    run.fit(LitLM(depth=2), token_loader())
    run.save_checkpoint(path)
    return path


def _tampered(tmp_path: Path, good: Path, change) -> Path:
    checkpoint = torch.load(good, weights_only=True)
    change(checkpoint)
    path = tmp_path / "tampered.ckpt"
    torch.save(checkpoint, path)
    return path


class RunsCode:
    """Unpickling this would create ``marker``: what a malicious checkpoint does instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _plain_types(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_types(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_types(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def test_stored_mhc_metadata_is_plain_data_that_weights_only_loads(good_checkpoint):
    checkpoint = torch.load(good_checkpoint, weights_only=True)  # the whole file, optimizer states included
    stored = checkpoint["mhc"]
    assert set(stored) == {"config", "plan", "format"}
    assert _plain_types(stored)
    assert stored["plan"]["blocks"] == [{"granularity": "sublayer", "branches": 2}] * 2


def test_lightning_resume_reads_with_weights_only_and_resumes(good_checkpoint):
    torch.manual_seed(1)
    model = LitLM(depth=2)
    run = trainer(max_steps=2, callbacks=[MHCCallback(streams=2)])
    run.fit(model, token_loader(), ckpt_path=good_checkpoint, weights_only=True)
    assert run.global_step == 2
    reloaded = load_from_checkpoint(LitLM, str(good_checkpoint))
    assert run.global_step == 2 and reloaded.mhc_report.plan() == model.mhc_report.plan()


def test_pickled_object_is_refused_unread(tmp_path, good_checkpoint):
    marker = tmp_path / "code_ran"
    path = _tampered(tmp_path, good_checkpoint, lambda c: c["mhc"].update(config=RunsCode(marker)))
    with pytest.raises(ValueError, match=r"other than tensors and plain containers.*weights_only=True") as info:
        load_from_checkpoint(LitLM, str(path))
    assert "changed or written by other code" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["mhc"]["config"].update(streams="4"), r"MHCConfig\.streams='4' is not allowed; pass an integer"),
        (lambda c: c["mhc"]["config"].update(mode="mHC"), r"MHCConfig\.mode='mHC' is not allowed; pass one of"),
        (lambda c: c["mhc"]["config"].update(shell="rm -rf"), r"Unknown MHCConfig field\(s\) 'shell'"),
        (lambda c: c["mhc"].update(config=[4, "mhc"]), r"stored as a dict of its fields; got a list"),
        (lambda c: c["mhc"]["plan"].update(dim=-32), r"plan\['dim'\]=-32 is not allowed; pass an integer >= 1"),
        (lambda c: c["mhc"]["plan"].update(dim="32"), r"plan\['dim'\]='32' is not allowed"),
        (lambda c: c["mhc"]["plan"].update(blocks=[]), r"plan\['blocks'\]=\[\] is not allowed; pass a non-empty list"),
        (lambda c: c["mhc"]["plan"].pop("stack"), r"plan has keys .*missing \['stack'\]"),
        (
            lambda c: c["mhc"]["plan"]["blocks"][1].update(granularity="layer"),
            r"plan\['blocks'\]\[1\]\['granularity'\]='layer' is not allowed; pass one of 'sublayer', 'block'",
        ),
        (
            lambda c: c["mhc"]["plan"]["blocks"][0].update(branches=2.0),
            r"plan\['blocks'\]\[0\]\['branches'\]=2\.0 is not allowed; pass an integer >= 1",
        ),
        (
            lambda c: c["mhc"]["plan"]["blocks"][0].update(granularity="block"),
            r"plan\['blocks'\]\[0\]\['branches'\]=2 is not allowed with granularity 'block'",
        ),
        (lambda c: c["mhc"].update(format=99), r"format=99 is not one this lightning_mhc reads \(1 to 2\).*upgrade"),
        (lambda c: c["mhc"].update(format="2"), r"format='2' is not one this lightning_mhc reads"),
        (lambda c: c.update(mhc="streams=4"), r"mHC metadata \('mhc'\) is malformed"),
        (lambda c: c["mhc"].pop("plan"), r"mHC metadata \('mhc'\) is malformed"),
        (lambda c: c.update(state_dict=[1, 2]), r"not a Lightning checkpoint: a dict with a 'state_dict'"),
    ],
)
def test_tampered_metadata_names_what_is_wrong(tmp_path, good_checkpoint, change, expected):
    path = _tampered(tmp_path, good_checkpoint, change)
    with pytest.raises(ValueError, match=expected):
        load_from_checkpoint(LitLM, str(path))


def test_tampered_weights_name_the_tensor(tmp_path, good_checkpoint):
    def change(checkpoint):
        key = next(k for k in checkpoint["state_dict"] if k.endswith(".phi"))
        checkpoint["state_dict"][key] = torch.zeros(3)

    path = _tampered(tmp_path, good_checkpoint, change)
    with pytest.raises(
        ValueError, match=r"(?s)do not fit LitLM.*size mismatch for .*phi.*Load it with the class it was trained with"
    ):
        load_from_checkpoint(LitLM, str(path))


def test_truncated_random_and_missing_files(tmp_path, good_checkpoint):
    data = good_checkpoint.read_bytes()
    truncated, random = tmp_path / "truncated.ckpt", tmp_path / "random.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    random.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    for path in (truncated, random):
        with pytest.raises(ValueError, match=r"not a readable torch checkpoint \(truncated, or another file format\)"):
            load_from_checkpoint(LitLM, str(path))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_from_checkpoint(LitLM, str(tmp_path / "missing.ckpt"))
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor_file)
    with pytest.raises(ValueError, match="not a Lightning checkpoint.*got a Tensor"):
        read_checkpoint(tensor_file)


def test_plain_lightning_checkpoint_points_to_the_plain_loader(tmp_path):
    run = trainer(max_steps=1)
    run.fit(LitLM(depth=2), token_loader())
    run.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"has no mHC.*LitLM\.load_from_checkpoint"):
        load_from_checkpoint(LitLM, str(tmp_path / "plain.ckpt"))


class OtherLM(L.LightningModule):
    """Another model class: a stack of linear layers under ``layers``."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(4))


def test_checkpoint_of_another_model_class_says_which_class_to_use(good_checkpoint):
    with pytest.raises(ValueError, match=r"do not fit OtherLM.*'model\.transformer\.h' does not exist"):
        load_from_checkpoint(OtherLM, str(good_checkpoint))
    with pytest.raises(ValueError, match="module_class=.*pass the LightningModule class"):
        load_from_checkpoint(LitLM(), str(good_checkpoint))


def _pickled(tmp_path, good):
    return _tampered(tmp_path, good, lambda c: c.update(extra=RunsCode(tmp_path / "code_ran")))


def _truncated(tmp_path, good):
    path = tmp_path / "truncated.ckpt"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_config(tmp_path, good):
    return _tampered(tmp_path, good, lambda c: c["mhc"]["config"].update(sinkhorn_iters=-1))


def _plain(tmp_path, good):
    return _tampered(tmp_path, good, lambda c: c.pop("mhc"))


def _malformed(tmp_path, good):
    return _tampered(tmp_path, good, lambda c: c.update(mhc="streams=2"))


def _newer_format(tmp_path, good):
    return _tampered(tmp_path, good, lambda c: c["mhc"].update(format=99))


@pytest.mark.parametrize(
    ("make", "error", "expected"),
    [
        (_pickled, pickle.UnpicklingError, "Weights only load failed"),
        (_truncated, RuntimeError, "failed finding central directory"),
        (_bad_config, ValueError, r"MHCConfig\.sinkhorn_iters=-1 is not allowed"),
        (_plain, ValueError, "holds mHC weights but not the mHC config"),
        (_malformed, ValueError, r"cannot be resumed: its mHC metadata \('mhc'\) is malformed"),
        (_newer_format, ValueError, r"cannot be resumed: its mHC metadata format=99 .*upgrade"),
    ],
)
def test_resume_from_a_bad_file_fails_before_the_weights_change(tmp_path, good_checkpoint, make, error, expected):
    """``trainer.fit(ckpt_path=...)`` on Lightning 2.6 passes ``weights_only=None`` to ``torch.load``, whose default
    (torch >= 2.6) is ``weights_only=True``: pickled objects are refused there; MHCCallback checks the rest."""
    path = make(tmp_path, good_checkpoint)
    torch.manual_seed(1)
    model = LitLM(depth=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=expected):
        trainer(max_steps=2, callbacks=[MHCCallback(streams=2)]).fit(model, token_loader(), ckpt_path=path)
    after = model.state_dict()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    assert not (tmp_path / "code_ran").exists()
