"""Injection into real ``timm`` models (tiny configs, random weights, no download).

``timm`` needs ``torchvision``, which cannot be installed beside the CPU torch build of the test set-up (DESIGN §4),
so these tests skip there; they run where both import (the GPU machine's image, through
``benchmarks/gpu_check.sh``). The look-alikes in ``tests/block_styles.py`` cover the same block styles everywhere.
"""

import copy

import pytest
import torch

from lightning_mhc import MHCConfig, apply_mhc

timm = pytest.importorskip("timm", reason="timm needs torchvision, absent beside the CPU torch build")


def _inject(model: torch.nn.Module, images: torch.Tensor, blocks: str):
    reference = copy.deepcopy(model).eval()
    report = apply_mhc(model, MHCConfig(streams=4, blocks=blocks, gate_init=0.0), example_input=images)
    return reference, model.eval(), report


def _trains_one_step(model: torch.nn.Module, images: torch.Tensor) -> None:
    model.train()
    loss = model(images).square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    hyper = [p for n, p in model.named_parameters() if "hyper" in n or "phi" in n]
    assert hyper and all(p.grad is not None and torch.isfinite(p.grad).all() for p in hyper)


@pytest.mark.parametrize(
    ("name", "kwargs", "blocks", "channels_first"),
    [
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3), "blocks", False),
        ("convnext_atto", dict(depths=(2, 2, 2, 2)), "stages.1.blocks", True),
        ("resnet18", dict(), "layer1", True),
    ],
)
def test_timm_models_keep_their_function_and_train(name, kwargs, blocks, channels_first):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    images = torch.randn(2, 3, 32, 32)
    reference, model, report = _inject(model, images, blocks)
    assert report.channels_first is channels_first
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=0, atol=1e-5)
    _trains_one_step(model, images)


def test_timm_forward_intermediates_equal_the_original():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3)
    images = torch.randn(2, 3, 32, 32)
    reference, model, _ = _inject(model, images, "blocks")
    with torch.no_grad():
        got = model.forward_intermediates(images, intermediates_only=True)
        expected = reference.forward_intermediates(images, intermediates_only=True)
    assert len(got) == len(expected) == 3
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
