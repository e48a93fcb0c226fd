import pytest
import torch
from torch import nn

from lightning_mhc import HyperConnection, MHCConfig, StreamReadout, expand_streams

DIM = 24


def _branches(depth, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(
        nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
        for _ in range(depth)
    )


def _plain_stack(branches, h):
    for f in branches:
        h = h + f(h)
    return h


def _mhc_stack(branches, h, config, seed=1):
    torch.manual_seed(seed)
    hcs = nn.ModuleList(HyperConnection(DIM, config) for _ in branches)
    readout = StreamReadout(config.stream_count, config.readout)

    def run(h):
        x = expand_streams(h, config.stream_count)
        for hc, f in zip(hcs, branches):
            x = hc(x, f)
        return readout(x), x

    return hcs, readout, run


def _hidden(seed=2):
    return torch.randn(3, 5, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [MHCConfig(streams=1), MHCConfig(streams=1, mode="hc"), MHCConfig(mode="residual")])
def test_one_stream_and_residual_mode_are_exactly_the_plain_residual(config):
    branches = _branches(4)
    hcs, _, run = _mhc_stack(branches, None, config)
    h = _hidden()
    assert sum(p.numel() for p in hcs.parameters()) == 0
    out, _ = run(h)
    assert torch.equal(out, _plain_stack(branches, h))


@pytest.mark.parametrize("mode", ["mhc", "hc"])
@pytest.mark.parametrize("streams", [2, 4])
def test_gate_zero_preserves_the_wrapped_function(mode, streams):
    branches = _branches(6)
    _, _, run = _mhc_stack(branches, None, MHCConfig(streams=streams, mode=mode, gate_init=0.0))
    h = _hidden()
    out, _ = run(h)
    # The default (onehot) input gates sum to 1 up to fp32 rounding.
    torch.testing.assert_close(out, _plain_stack(branches, h), rtol=0, atol=2e-6)


def test_paper_gate_is_a_small_perturbation():
    # Measured: max |mHC - plain| over the output is ~1e-2 of the output's scale with gate_init=0.01
    # (6 branches, n=4, the paper's random phi); it grows with the gate, which is what makes it a gate.
    branches = _branches(6)
    h = _hidden()
    plain = _plain_stack(branches, h)
    diffs = {}
    for gate in (0.01, 0.1):
        _, _, run = _mhc_stack(branches, None, MHCConfig(init="paper", gate_init=gate))
        diffs[gate] = ((run(h)[0] - plain).abs().max() / plain.abs().max()).item()
    assert 0 < diffs[0.01] < 0.05
    assert diffs[0.1] > 3 * diffs[0.01]


def test_parameter_count_matches_the_formula():
    n, c = 4, DIM
    mhc = HyperConnection(DIM, MHCConfig(streams=n))
    assert sum(p.numel() for p in mhc.parameters()) == n * c * (n * n + 2 * n) + 3 + (n * n + 2 * n)
    hc = HyperConnection(DIM, MHCConfig(streams=n, mode="hc"))
    assert sum(p.numel() for p in hc.parameters()) == c * (n + 2) + 3 + (n * n + 2 * n)


def test_symmetry_between_streams_breaks_with_training():
    branches = _branches(4)
    config = MHCConfig(streams=4)
    hcs, readout, run = _mhc_stack(branches, None, config)

    def stream_gap():
        _, streams = run(_hidden())
        return ((streams[..., 0, :] - streams[..., 1, :]).abs().mean() / streams.abs().mean()).item()

    before = stream_gap()
    params = [*hcs.parameters(), *branches.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    target = nn.Linear(DIM, DIM)
    for _ in range(20):
        h = torch.randn(8, 4, DIM, generator=gen)
        loss = (run(h)[0] - target(h).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    # Measured: the relative gap between streams 0 and 1 grows from ~0.003 to ~0.04 in 20 steps.
    assert stream_gap() > max(0.02, 5 * before)


def test_mhc_res_is_doubly_stochastic_and_hc_res_is_not():
    x = expand_streams(_hidden(), 4) + 0.5 * torch.randn(3, 5, 4, DIM)
    mhc = HyperConnection(DIM, MHCConfig(streams=4, gate_init=1.0))
    res = mhc.coefficients(x).h_res
    assert (res.sum(-1) - 1).abs().max() < 1e-6
    assert (res.sum(-2) - 1).abs().max() < 5e-3
    hc = HyperConnection(DIM, MHCConfig(streams=4, mode="hc", gate_init=1.0))
    res = hc.coefficients(x).h_res
    assert (res.sum(-1) - 1).abs().max() > 0.1
    assert (res < 0).any()


def test_coefficients_stay_fp32_under_bf16_autocast():
    hc = HyperConnection(DIM, MHCConfig(streams=4))
    x = expand_streams(_hidden(), 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coeffs = hc.coefficients(x)
        h, _ = hc.read(x)
    assert all(c.dtype == torch.float32 for c in coeffs)
    assert h.dtype == torch.bfloat16
    assert (coeffs.h_res.sum(-1) - 1).abs().max() < 1e-6


def test_learned_readout_starts_as_the_mean():
    x = torch.randn(2, 3, 4, DIM)
    torch.testing.assert_close(StreamReadout(4, "learned")(x), x.mean(-2))
    torch.testing.assert_close(StreamReadout(4, "sum")(x), x.sum(-2))
