"""Large outputs are reduced a block of their first dimension at a time (dynascope.probes.activations
BLOCK_ELEMENTS): the statistics equal a float64 reference and the whole-output path."""

from __future__ import annotations

import pytest
import torch

import dynascope.probes.activations as act


@pytest.mark.parametrize("shape,dims", [((64, 50, 16), (0, 1)), ((8, 4, 10, 10), (0, 2, 3)), ((33, 40), (0,))],
                         ids=["tokens", "nchw", "rows"])
def test_blocked_shifted_sums_equal_float64(monkeypatch, shape, dims):
    torch.manual_seed(0)
    x = torch.randn(shape) * 0.5 + 300.0  # |mean| / std = 600: a float32 E[x^2] - E[x]^2 would cancel
    ref_var, ref_mean = torch.var_mean(x.double(), dim=dims, correction=0)
    whole_var, whole_mean = act.shifted_var_mean(x, dims)
    monkeypatch.setattr(act, "BLOCK_ELEMENTS", 700)  # several blocks, the last one short
    var, mean = act.shifted_var_mean(x, dims)
    assert var.shape == ref_var.shape and mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(var, whole_var, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(mean, whole_mean, rtol=1e-6, atol=0)


def test_blocked_count_of_nonzeros(monkeypatch):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(300, 200))
    monkeypatch.setattr(act, "BLOCK_ELEMENTS", 7000)
    assert int(act._count_nonzero(x)) == int(torch.count_nonzero(x))
