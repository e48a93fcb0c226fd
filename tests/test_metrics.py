"""Tests of lightning_mhc.metrics: hand-computed values, and DDP sync equal to one process on the union."""

from __future__ import annotations

import math
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_mhc.metrics import AmaxGain, ExpertLoad, LossSpikes, SinkhornError, StreamDiversity


def _doubly_stochastic(tokens: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(tokens, n, n)`` random convex combinations of permutation matrices (Birkhoff's theorem)."""
    out = torch.zeros(tokens, n, n, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    for t in range(tokens):
        weights = torch.rand(3, generator=generator, dtype=torch.float64)
        for w in weights / weights.sum():
            out[t] += w * eye[torch.randperm(n, generator=generator)]
    return out


def _gains_of_product(layers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fwd/bwd gains of ``H_{L-1} ... H_0 I``, with the product taken by ``multi_dot``."""
    eye = torch.eye(layers[0].shape[-1], dtype=layers[0].dtype)
    tokens = range(layers[0].shape[0])
    products = torch.stack([torch.linalg.multi_dot([*(h[t] for h in reversed(layers)), eye]) for t in tokens])
    a = products.abs()
    return a.sum(-1).amax(-1), a.sum(-2).amax(-1)


# --- AmaxGain -----------------------------------------------------------------------------------------------


def test_amax_gain_identity_is_one_everywhere() -> None:
    metric = AmaxGain()
    metric.update([torch.eye(4).expand(2, 3, 4, 4)] * 5)
    out = metric.compute()
    for key in ("fwd_composite", "bwd_composite", "fwd_layer_max", "bwd_layer_max"):
        assert out[key].item() == pytest.approx(1.0), key
    for key in ("fwd_composite_per_depth", "bwd_composite_per_depth", "fwd_layer", "bwd_layer"):
        torch.testing.assert_close(out[key], torch.ones(5), msg=key)


def test_amax_gain_of_known_matrix_uses_absolute_row_and_column_sums() -> None:
    positive = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # rows sum to 3, 7; columns to 4, 6
    signed = torch.tensor([[1.0, -2.0], [-3.0, 4.0]])  # signed sums are -1, 1 / -2, 2: abs must be taken
    for m in (positive, signed):
        metric = AmaxGain(num_layers=1)
        metric.update([m])
        out = metric.compute()
        assert out["fwd_layer_max"].item() == pytest.approx(7.0)
        assert out["bwd_layer_max"].item() == pytest.approx(6.0)
        assert out["fwd_composite"].item() == pytest.approx(7.0)
        assert out["bwd_composite"].item() == pytest.approx(6.0)


def test_amax_gain_per_depth_and_layer_max() -> None:
    eye = torch.eye(3)
    metric = AmaxGain()
    metric.update([2 * eye, 0.5 * eye, 3 * eye])
    out = metric.compute()
    torch.testing.assert_close(out["fwd_layer"], torch.tensor([2.0, 0.5, 3.0]))
    torch.testing.assert_close(out["bwd_layer"], torch.tensor([2.0, 0.5, 3.0]))
    torch.testing.assert_close(out["fwd_composite_per_depth"], torch.tensor([2.0, 1.0, 3.0]))
    assert out["fwd_layer_max"].item() == pytest.approx(3.0)
    assert out["fwd_composite"].item() == pytest.approx(3.0)


def test_amax_gain_composite_matches_independent_product_in_depth_order() -> None:
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(6, 4, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    fwd, bwd = _gains_of_product(layers)
    reversed_fwd, _ = _gains_of_product(layers[::-1])
    assert not torch.allclose(fwd.mean(), reversed_fwd.mean()), "the data must tell the two orders apart"

    metric = AmaxGain(num_layers=4)
    metric.update(layers)
    out = metric.compute()
    assert out["fwd_composite"].item() == pytest.approx(fwd.mean().item(), rel=1e-5)
    assert out["bwd_composite"].item() == pytest.approx(bwd.mean().item(), rel=1e-5)
    for depth in range(4):
        fwd_d, bwd_d = _gains_of_product(layers[: depth + 1])
        assert out["fwd_composite_per_depth"][depth].item() == pytest.approx(fwd_d.mean().item(), rel=1e-5)
        assert out["bwd_composite_per_depth"][depth].item() == pytest.approx(bwd_d.mean().item(), rel=1e-5)


def test_amax_gain_averages_over_every_token_seen() -> None:
    eye = torch.eye(2)
    metric = AmaxGain()
    metric.update([torch.stack([eye, 3 * eye])])  # one layer, tokens with gains 1 and 3
    assert metric.compute()["fwd_layer_max"].item() == pytest.approx(2.0)
    metric.update([(5 * eye).expand(2, 2, 2, 2)])  # four more tokens of gain 5: mean (1 + 3 + 20) / 6
    assert metric.compute()["bwd_composite"].item() == pytest.approx(4.0)


def test_amax_gain_of_doubly_stochastic_products_is_one() -> None:
    g = torch.Generator().manual_seed(1)
    layers = [_doubly_stochastic(8, 4, g) for _ in range(12)]
    metric = AmaxGain()
    metric.update(layers)
    out = metric.compute()
    torch.testing.assert_close(out["fwd_composite_per_depth"], torch.ones(12))
    torch.testing.assert_close(out["bwd_composite_per_depth"], torch.ones(12))

    unconstrained = AmaxGain()
    unconstrained.update([1.1 * h for h in layers])
    assert unconstrained.compute()["fwd_composite"].item() == pytest.approx(1.1**12, rel=1e-5)


def test_amax_gain_stacked_tensor_equals_sequence_and_forward_accumulates() -> None:
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(3, 5, 4, 4, generator=g) for _ in range(2)]
    from_list, stacked, called = AmaxGain(), AmaxGain(), AmaxGain()
    for batch in batches:
        from_list.update(list(batch))
        stacked.update(batch)
        batch_value = called(batch)
        single = AmaxGain()
        single.update(batch)
        torch.testing.assert_close(batch_value, single.compute())
    torch.testing.assert_close(stacked.compute(), from_list.compute())
    torch.testing.assert_close(called.compute(), from_list.compute())


def test_amax_gain_reset_keeps_layer_count() -> None:
    metric = AmaxGain()
    metric.update([torch.eye(2)] * 3)
    metric.reset()
    metric.update([2 * torch.eye(2)] * 3)
    torch.testing.assert_close(metric.compute()["fwd_layer"], torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="expects 3 H_res tensors"):
        metric.update([torch.eye(2)] * 2)


def test_amax_gain_rejects_bad_input_with_what_it_expected() -> None:
    with pytest.raises(ValueError, match=r"expects 2 H_res tensors .* got 3"):
        AmaxGain(num_layers=2).update([torch.eye(2)] * 3)
    with pytest.raises(ValueError, match=r"h_res_layers\[1\] must have shape \(\.\.\., n, n\)"):
        AmaxGain().update([torch.eye(2), torch.ones(2, 3)])
    with pytest.raises(ValueError, match=r"shape of h_res_layers\[0\], \(2, 2\); h_res_layers\[1\] has \(3, 3\)"):
        AmaxGain().update([torch.eye(2), torch.eye(3)])
    with pytest.raises(ValueError, match="empty sequence"):
        AmaxGain().update([])
    with pytest.raises(ValueError, match="integer >= 1"):
        AmaxGain(num_layers=0)
    with (
        pytest.raises(RuntimeError, match="needs num_layers"),
        pytest.warns(UserWarning, match="before the ``update``"),
    ):
        AmaxGain().compute()


# --- SinkhornError ------------------------------------------------------------------------------------------


def test_sinkhorn_error_of_known_row_and_column_sums() -> None:
    m = torch.tensor([[0.5, 0.7], [0.5, 0.2]])  # rows 1.2, 0.7 -> 0.3; columns 1.0, 0.9 -> 0.1
    metric = SinkhornError()
    metric.update(m)
    out = metric.compute()
    assert out["row"].item() == pytest.approx(0.3)
    assert out["col"].item() == pytest.approx(0.1)
    assert out["max"].item() == pytest.approx(0.3)

    metric.update([torch.eye(2), torch.tensor([[0.6, 0.4], [0.8, 0.2]])])  # columns 1.4, 0.6 -> 0.4
    out = metric.compute()
    assert out["row"].item() == pytest.approx(0.3)
    assert out["col"].item() == pytest.approx(0.4)
    assert out["max"].item() == pytest.approx(0.4)


def test_sinkhorn_error_of_doubly_stochastic_is_zero() -> None:
    metric = SinkhornError()
    metric.update(_doubly_stochastic(5, 4, torch.Generator().manual_seed(3)))
    assert metric.compute()["max"].item() == pytest.approx(0.0, abs=1e-6)


def test_sinkhorn_error_rejects_non_square() -> None:
    with pytest.raises(ValueError, match=r"h_res must have shape \(\.\.\., n, n\) with n >= 1; got \(2, 3\)"):
        SinkhornError().update(torch.ones(2, 3))


# --- StreamDiversity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("streams", "expected"),
    [
        (torch.tensor([[1.0, 2.0, 3.0]] * 4), 0.0),  # identical: collapsed
        (torch.tensor([[1.0, 2.0], [5.0, 10.0]]), 0.0),  # same direction, different scale
        (torch.eye(3), 1.0),  # orthogonal
        (torch.tensor([[1.0, -2.0], [-1.0, 2.0]]), 2.0),  # opposite
        (torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 2.0 / 3.0),  # pair distances 0, 1, 1
        (torch.tensor([[3.0, 1.0]]), 0.0),  # n == 1
    ],
)
def test_stream_diversity_known_values(streams: torch.Tensor, expected: float) -> None:
    metric = StreamDiversity()
    metric.update(streams)
    assert metric.compute().item() == pytest.approx(expected, abs=1e-6)


def test_stream_diversity_averages_over_tokens() -> None:
    metric = StreamDiversity()
    metric.update(torch.stack([torch.ones(2, 3), torch.eye(3)[:2]]))  # tokens at 0 and 1
    metric.update(torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]] * 2))  # two tokens at 2: (0 + 1 + 4) / 4
    assert metric.compute().item() == pytest.approx(1.25)


def test_stream_diversity_merged_state_computes_without_warning_and_is_not_stale() -> None:
    merged, part = StreamDiversity(), StreamDiversity()
    merged.update(torch.eye(3)[None])  # one token at 1
    assert merged.compute().item() == pytest.approx(1.0)
    part.update(torch.ones(1, 2, 3))  # one token at 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged.merge_state(part)
        assert merged.compute().item() == pytest.approx(0.5)
    fresh = StreamDiversity()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.merge_state(part)
        assert fresh.compute().item() == pytest.approx(0.0, abs=1e-6)


def test_stream_diversity_rejects_a_vector() -> None:
    with pytest.raises(ValueError, match=r"shape \(\.\.\., n, C\); got \(4,\)"):
        StreamDiversity().update(torch.ones(4))


# --- ExpertLoad ---------------------------------------------------------------------------------------------


def test_expert_load_balanced_and_skewed() -> None:
    balanced = ExpertLoad()
    balanced.update(torch.tensor([4, 0, 0, 0]))
    balanced.update(torch.tensor([0, 4, 4, 4]))  # accumulated counts are balanced
    out = balanced.compute()
    assert out["max_over_mean"].item() == pytest.approx(1.0)
    assert out["cv"].item() == pytest.approx(0.0)

    skewed = ExpertLoad(num_experts=4)
    skewed.update(torch.tensor([6, 2, 2, 2]))  # mean 3, max 6, population std sqrt(3)
    out = skewed.compute()
    assert out["max_over_mean"].item() == pytest.approx(2.0)
    assert out["cv"].item() == pytest.approx(math.sqrt(3) / 3)
    assert math.isnan(out["router_entropy"].item())


def test_expert_load_router_entropy() -> None:
    metric = ExpertLoad()
    metric.update(torch.tensor([1, 1, 1, 1, 1, 1, 1, 1]), torch.full((2, 3, 8), 1 / 8))
    assert metric.compute()["router_entropy"].item() == pytest.approx(math.log(8))
    metric.update(torch.zeros(8), torch.eye(8)[:6])  # six confident rows: mean (6 log 8 + 0) / 12
    assert metric.compute()["router_entropy"].item() == pytest.approx(math.log(8) / 2)


def test_expert_load_rejects_bad_shapes() -> None:
    metric = ExpertLoad(num_experts=4)
    with pytest.raises(ValueError, match=r"shape \[4\] .* got \[3\]"):
        metric.update(torch.ones(3))
    with pytest.raises(ValueError, match=r"tokens_per_expert of shape \[E\]; got \(2, 4\)"):
        metric.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"router_probs of shape \(\.\.\., 4\); got \(5, 3\)"):
        metric.update(torch.ones(4), torch.ones(5, 3))


def _expert_load_inputs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Counts whose sums bf16 cannot hold (257, 1000 + ...; bf16 has 8 significant bits) and bf16 router rows."""
    g = torch.Generator().manual_seed(7)
    inputs = []
    for step in range(40):
        counts = torch.tensor([1000 + step, 257, 3, 1])
        probs = torch.softmax(torch.randn(33, 4, generator=g), dim=-1).to(torch.bfloat16)
        inputs.append((counts, probs))
    return inputs


def _fp32_expert_load(inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    reference = ExpertLoad(num_experts=4)
    for counts, probs in inputs:
        reference.update(counts, probs)
    return reference.compute()


def _assert_fp32_states(metric: ExpertLoad) -> None:
    for name in ("counts", "entropy_sum"):
        assert getattr(metric, name).dtype == torch.float32, name
        assert metric._defaults[name].dtype == torch.float32, name
    assert metric.rows.dtype == torch.long


@pytest.mark.parametrize("num_experts", [4, None])
def test_expert_load_states_stay_float32_under_bf16_true(num_experts: int | None) -> None:
    from lightning.pytorch.plugins.precision import HalfPrecision

    precision = HalfPrecision("bf16-true")
    with precision.module_init_context():  # torch's default dtype is bf16 here, as in trainer.init_module()
        model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4), "load": ExpertLoad(num_experts=num_experts)})
    precision.convert_module(model)
    metric = model["load"]
    assert model["proj"].weight.dtype == torch.bfloat16
    _assert_fp32_states(metric)
    inputs = _expert_load_inputs()
    for _ in range(2):  # the second round after reset()
        with precision.forward_context():  # the first update sizes `counts` under the bf16 default dtype
            for counts, probs in inputs:
                metric.update(counts, probs)
        _assert_fp32_states(metric)
        got, expected = metric.compute(), _fp32_expert_load(inputs)
        for key, value in expected.items():
            assert torch.equal(got[key], value), key
        metric.reset()
    _assert_fp32_states(metric)
    metric.set_dtype(torch.float64)  # a wider dtype asked for explicitly is kept
    assert metric.counts.dtype == torch.float64


def test_expert_load_in_a_bf16_true_lightning_run_equals_fp32() -> None:
    import lightning as L
    from lit_models import trainer

    inputs = _expert_load_inputs()

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 1)
            self.load = ExpertLoad(num_experts=4)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            assert self.proj.weight.dtype == torch.bfloat16
            for counts, probs in inputs[batch_idx * 10 : (batch_idx + 1) * 10]:
                self.load.update(counts, probs)
            return self.proj(batch[0]).float().square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    run = trainer(max_steps=4, precision="bf16-true")
    with run.init_module():
        module = Module()
    run.fit(module, data)
    _assert_fp32_states(module.load)
    got, expected = module.load.compute(), _fp32_expert_load(inputs)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# --- LossSpikes ---------------------------------------------------------------------------------------------


def _noisy_losses(steps: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (2.0 + 0.1 * torch.randn(steps, generator=g)).tolist()


def test_loss_spikes_counts_exactly_the_planted_spike() -> None:
    losses = _noisy_losses(40, seed=4)
    losses[2] = 9.0  # during warm-up: not counted
    losses[25] = 5.0  # the planted spike
    metric = LossSpikes(threshold=1.5, window=10, min_history=5)
    flags = [bool(metric(torch.tensor(loss))) for loss in losses]
    assert [i for i, flag in enumerate(flags) if flag] == [25]
    assert metric.compute().item() == 1


def test_loss_spikes_ignores_a_falling_loss_and_counts_non_finite() -> None:
    metric = LossSpikes(window=20, min_history=5)
    for step in range(60):
        metric.update(10.0 * 0.9**step)
    assert metric.compute().item() == 0
    metric.update(float("nan"))
    metric.update(float("inf"))
    metric.update(10.0 * 0.9**60)  # neither poisoned the median
    assert metric.compute().item() == 2


def test_loss_spikes_reset_clears_count_but_keeps_history() -> None:
    metric = LossSpikes(window=10, min_history=5)
    for loss in [*_noisy_losses(10, seed=5), 6.0]:
        metric.update(loss)
    assert metric.compute().item() == 1
    metric.reset()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute().item() == 0
    metric.update(6.0)  # the median is still warm, so this counts at once
    assert metric.compute().item() == 1


def test_loss_spikes_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="number > 1"):
        LossSpikes(threshold=1.0)
    with pytest.raises(ValueError, match=r"integer in \[1, window=10\]"):
        LossSpikes(window=10, min_history=11)
    with pytest.raises(ValueError, match="one scalar loss per step"):
        LossSpikes().update(torch.ones(2))


# --- DDP: two gloo processes, each with its half of the data -------------------------------------------------


def _ddp_data() -> list[dict[str, Any]]:
    """Uneven halves (so a mean of per-rank means would be wrong) for each metric."""
    g = torch.Generator().manual_seed(6)
    token_shapes = [(3,), (2, 4)]
    losses = _noisy_losses(30, seed=7)
    losses[20] = 6.0  # the same losses on both ranks, as for an all-reduced loss
    halves = []
    for tokens in token_shapes:
        halves.append(
            {
                "h_res": [torch.randn(*tokens, 3, 3, generator=g) for _ in range(4)],
                "streams": torch.randn(*tokens, 4, 8, generator=g),
                "counts": torch.randint(0, 10, (5,), generator=g),
                "probs": torch.softmax(torch.randn(*tokens, 5, generator=g), dim=-1),
                "losses": losses,
            }
        )
    return halves


def _fed_metrics(parts: list[dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """Compute every metric after feeding ``parts``; the layer count of AmaxGain is fixed by the first update."""
    gains, sinkhorn, diversity, load = AmaxGain(), SinkhornError(), StreamDiversity(), ExpertLoad(num_experts=5)
    spikes = LossSpikes(window=10, min_history=5)
    for part in parts:
        gains.update(part["h_res"])
        sinkhorn.update(part["h_res"])
        diversity.update(part["streams"])
        load.update(part["counts"], part["probs"])
        for loss in part["losses"]:
            spikes.update(loss)
    return {
        "gains": gains.compute(),
        "sinkhorn": sinkhorn.compute(),
        "diversity": {"value": diversity.compute()},
        "load": load.compute(),
        "spikes": {"value": spikes.compute()},
    }


def _union(halves: list[dict[str, Any]]) -> dict[str, Any]:
    """Both halves as one batch: tokens concatenated per layer."""

    def tokens(t: torch.Tensor, keep: int) -> torch.Tensor:
        return t.reshape(-1, *t.shape[-keep:])

    return {
        "h_res": [torch.cat([tokens(a, 2), tokens(b, 2)]) for a, b in zip(halves[0]["h_res"], halves[1]["h_res"])],
        "streams": torch.cat([tokens(h["streams"], 2) for h in halves]),
        "counts": halves[0]["counts"] + halves[1]["counts"],
        "probs": torch.cat([tokens(h["probs"], 1) for h in halves]),
        "losses": halves[0]["losses"],
    }


def _ddp_worker(rank: int, world_size: int, store: str, data_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        part = torch.load(data_path)[rank]
        torch.save(_fed_metrics([part]), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ddp_sync_equals_one_process_on_the_union(tmp_path: Path) -> None:
    halves = _ddp_data()
    torch.save(halves, tmp_path / "data.pt")
    world_size = 2
    context = mp.start_processes(
        _ddp_worker,
        args=(world_size, str(tmp_path / "store"), str(tmp_path / "data.pt"), str(tmp_path)),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):  # raises ProcessRaisedException / ProcessExitedException on a child failure
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish within 120 s")

    expected = _fed_metrics([_union(halves)])
    assert expected["spikes"]["value"].item() == 1  # a sum over the two ranks would give 2
    for rank in range(world_size):
        synced = torch.load(tmp_path / f"rank{rank}.pt")
        for metric, values in expected.items():
            for key, value in values.items():
                torch.testing.assert_close(synced[metric][key], value, msg=f"rank {rank}: {metric}[{key!r}]")


def test_logging_step_capture_keeps_no_stream_state_alive():
    """The final n·C stream state is reduced to its diversity statistics during the forward."""
    from block_styles import NanoGPT, lm_batch

    from lightning_mhc import MHCConfig, apply_mhc
    from lightning_mhc.capture import StreamCapture
    from lightning_mhc.mhc_block import attach_capture
    from lightning_mhc.recompute import retained_bytes

    torch.manual_seed(0)
    model = NanoGPT(dim=64, seq=64)
    apply_mhc(model, MHCConfig(streams=4), example_input=lm_batch(batch=1, seq=64))
    tokens = lm_batch(1, batch=8, seq=64)
    kept = []
    for capture in (None, StreamCapture()):
        attach_capture(model, capture)
        loss, retained = retained_bytes(lambda: model(tokens).square().mean())
        kept.append(retained)
        loss.backward()
    final_state = tokens.numel() * 4 * 64 * 4  # tokens x n x C fp32
    # The capture holds one 4x4 H_res per token and sublayer and a few statistics, never a stream state.
    assert kept[1] - kept[0] < final_state / 2
    assert capture.diversity is not None and float(capture.diversity.compute()) >= 0
