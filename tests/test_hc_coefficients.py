"""HC mode's dynamic maps follow the mHC paper's Eq. 5: ``H_res = alpha * tanh(theta_res RMSNorm(x)^T) + b``.

With ``x~`` the per-stream RMSNorm of the ``n x C`` stream state and ``theta_res`` of shape ``n x C``, entry
``H_res[i, j] = alpha * tanh(theta_res[i] . x~_j) + b[i, j]``: column ``j`` is driven by stream ``j``'s content,
and the merge ``x'_i = sum_j H_res[i, j] x_j`` weighs stream ``j`` by a function of stream ``j`` itself.
"""

from __future__ import annotations

import pytest
import torch

from lightning_mhc import HyperConnection, MHCConfig
from lightning_mhc.kernels import reference

C = 24


def _inputs(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, n, C, generator=gen, dtype=torch.float64)
    theta = torch.randn(C, n + 2, generator=gen, dtype=torch.float64) / C**0.5
    alpha = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    bias = torch.randn(n * n + 2 * n, generator=gen, dtype=torch.float64)
    return x, theta, alpha, bias


def _hc_coefficients(x, theta, alpha, bias):
    n = x.shape[-2]
    return reference.coefficients_from_logits(reference.hc_logits(x, theta, alpha, bias), n, "hc", 20)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_hc_maps_equal_the_papers_eq5_written_out(n):
    """Against Eq. 5 written with explicit matrices in float64 (``theta_pre``: 1 x C, ``theta_res``: n x C)."""
    x, theta, alpha, bias = _inputs(n, n)
    normed = x / torch.sqrt(x.square().mean(-1, keepdim=True) + reference.RMS_EPS)  # (T, n, C)
    theta_pre, theta_post, theta_res = theta[:, 0][None], theta[:, 1][None], theta[:, 2:].T  # (1,C) (1,C) (n,C)
    b_pre, b_post, b_res = bias[:n], bias[n : 2 * n], bias[2 * n :].reshape(n, n)
    x_t = normed.transpose(-1, -2)  # (T, C, n) = x~^T
    want_pre = alpha[0] * torch.tanh(theta_pre @ x_t).squeeze(-2) + b_pre
    want_post = alpha[1] * torch.tanh(theta_post @ x_t).squeeze(-2) + b_post
    want_res = alpha[2] * torch.tanh(theta_res @ x_t) + b_res
    got = _hc_coefficients(x, theta, alpha, bias)
    torch.testing.assert_close(got.h_pre, want_pre, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.h_post, want_post, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.h_res, want_res, rtol=1e-12, atol=1e-12)


def _changed_entries(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return ((after - before).abs() > 1e-9).any(0)  # over tokens


@pytest.mark.parametrize("n", [3, 4])
def test_perturbing_stream_j_changes_only_column_j_of_h_res(n):
    x, theta, alpha, bias = _inputs(n, 10 + n)
    before = _hc_coefficients(x, theta, alpha, bias)
    for j in range(n):
        bumped = x.clone()
        bumped[:, j] += torch.randn(bumped[:, j].shape, generator=torch.Generator().manual_seed(j), dtype=x.dtype)
        after = _hc_coefficients(bumped, theta, alpha, bias)
        expected = torch.zeros(n, n, dtype=torch.bool)
        expected[:, j] = True
        assert torch.equal(_changed_entries(before.h_res, after.h_res), expected), f"stream {j}"
        one_hot = torch.arange(n) == j
        assert torch.equal(_changed_entries(before.h_pre, after.h_pre), one_hot)
        assert torch.equal(_changed_entries(before.h_post, after.h_post), one_hot)


def test_row_i_of_h_res_is_driven_by_its_own_weight_vector():
    """Changing ``theta_res[i]`` (theta's column ``2 + i``) moves row ``i`` of ``H_res`` and nothing else."""
    n = 4
    x, theta, alpha, bias = _inputs(n, 3)
    before = _hc_coefficients(x, theta, alpha, bias)
    for i in range(n):
        bumped = theta.clone()
        bumped[:, 2 + i] += 0.5
        after = _hc_coefficients(x, bumped, alpha, bias)
        expected = torch.zeros(n, n, dtype=torch.bool)
        expected[i] = True
        assert torch.equal(_changed_entries(before.h_res, after.h_res), expected), f"row {i}"


def test_hyper_connection_in_hc_mode_builds_h_res_column_by_stream():
    """The module the package injects, not just the reference function: stream ``j`` drives column ``j``."""
    torch.manual_seed(0)
    n = 4
    hc = HyperConnection(C, MHCConfig(streams=n, mode="hc", gate_init=1.0, kernels="torch"))
    x = torch.randn(6, n, C)
    with torch.no_grad():
        before = hc.coefficients(x, capture=False).h_res
        bumped = x.clone()
        bumped[:, 1] = torch.randn(6, C)
        after = hc.coefficients(bumped, capture=False).h_res
    changed = ((after - before).abs() > 1e-6).any(0)
    expected = torch.zeros(n, n, dtype=torch.bool)
    expected[:, 1] = True
    assert torch.equal(changed, expected)
