"""Data-free weight checks: norms, singular values, stable rank, power-law alpha
(validated on samples drawn from known power laws), angular change."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dynascope.diagnostics.weights import (
    angular_change,
    power_law_alpha,
    singular_values,
    stable_rank,
    weight_norms,
    weight_spectra,
)


def test_stable_rank_identity_and_rank_one() -> None:
    assert stable_rank(torch.eye(6)) == pytest.approx(6.0)
    assert stable_rank(torch.outer(torch.ones(5), torch.arange(1.0, 4.0))) == pytest.approx(1.0)
    # diag(3, 1): (9 + 1) / 9
    assert stable_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(10 / 9)
    assert math.isnan(stable_rank(torch.zeros(3, 3)))


def test_stable_rank_from_singular_values_equals_from_matrix() -> None:
    w = torch.randn(20, 7, generator=torch.Generator().manual_seed(0))
    assert stable_rank(singular_values(w)) == pytest.approx(stable_rank(w))
    fro = float(torch.linalg.matrix_norm(w.double()) ** 2)
    assert stable_rank(w) == pytest.approx(fro / float(torch.linalg.matrix_norm(w.double(), 2) ** 2))


def test_conv_weight_is_flattened_per_output_unit() -> None:
    w = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(singular_values(w), torch.linalg.svdvals(w.double().reshape(4, 12)).numpy())


def test_weight_norms_parameters_only() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    norms = weight_norms(model)
    assert set(norms) == {"0.weight", "0.bias", "1.weight", "1.bias"}  # no running stats
    assert norms["0.weight"] == pytest.approx(float(model[0].weight.detach().double().norm()))
    sd_norms = weight_norms(model.state_dict())
    assert "1.running_var" in sd_norms


@pytest.mark.parametrize("alpha", [1.6, 2.0, 2.5, 3.5, 5.0])
def test_power_law_alpha_recovers_known_exponent(alpha: float) -> None:
    """Tail of Pareto samples p(x) ~ x^-alpha above xmin = 1, mixed with a uniform
    body below it: the MLE with KS-chosen xmin recovers alpha and xmin."""
    rng = np.random.default_rng(int(alpha * 10))
    n_tail = 3000
    tail = (1 - rng.random(n_tail)) ** (-1 / (alpha - 1))
    body = rng.random(1500) * 0.9
    fit = power_law_alpha(rng.permutation(np.r_[tail, body]))
    # MLE standard error is (alpha - 1) / sqrt(n): allow ~4 of them plus xmin choice
    assert fit.alpha == pytest.approx(alpha, abs=4 * (alpha - 1) / math.sqrt(n_tail) + 0.03)
    assert 0.85 <= fit.xmin <= 1.6  # KS tends to pick xmin at or a little above the true one
    assert fit.n_tail >= 0.6 * n_tail


def test_power_law_alpha_exact_mle_without_body() -> None:
    # with xmin fixed at the smallest value, alpha = 1 + n / sum log(x / xmin)
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    fit = power_law_alpha(x, min_tail=6, min_evals=6)
    assert fit.xmin == 1.0
    assert fit.alpha == pytest.approx(1 + 6 / (np.log(x).sum()))


def test_power_law_alpha_needs_enough_eigenvalues() -> None:
    assert math.isnan(power_law_alpha(np.array([1.0, 2.0, 3.0])).alpha)
    assert math.isnan(power_law_alpha(np.zeros(50)).alpha)


def test_heavy_tailed_layer_has_smaller_alpha_than_random() -> None:
    g = torch.Generator().manual_seed(3)
    random_w = torch.randn(300, 150, generator=g)
    # heavy-tailed entries (Student t with 1.5 dof) give a power-law spectral tail
    t = torch.distributions.StudentT(1.5).sample((300, 150))
    spectra = weight_spectra({"random": random_w, "heavy": t})
    assert spectra["heavy"].alpha < 4 < spectra["random"].alpha
    assert spectra["random"].stable_rank > spectra["heavy"].stable_rank
    assert set(spectra) == {"random", "heavy"}


def test_angular_change_exact_angles() -> None:
    a = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([[1.0, 1.0]]), "z": torch.zeros(2)}
    b = {"w": torch.tensor([0.0, 2.0]), "v": torch.tensor([[2.0, 2.0]]), "z": torch.ones(2)}
    ang = angular_change(a, b)
    assert ang["w"] == pytest.approx(math.pi / 2)
    assert ang["v"] == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(ang["z"])
    # all tensors together: a = (1, 0, 1, 1, 0, 0), b = (0, 2, 2, 2, 1, 1)
    va, vb = np.array([1, 0, 1, 1, 0, 0.0]), np.array([0, 2, 2, 2, 1, 1.0])
    expected = math.acos(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb))
    assert ang[""] == pytest.approx(expected, rel=1e-12)


def test_angular_change_tiny_angle_is_accurate() -> None:
    a = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    b = {"w": torch.tensor([1.0, 1e-9], dtype=torch.float64)}
    assert angular_change(a, b)["w"] == pytest.approx(1e-9, rel=1e-6)  # arccos would give ~0 or 2e-8


def test_angular_change_skips_missing_and_reshaped() -> None:
    ang = angular_change({"a": torch.ones(2), "b": torch.ones(3)}, {"a": torch.ones(2), "b": torch.ones(4)})
    assert set(ang) == {"a", ""}
