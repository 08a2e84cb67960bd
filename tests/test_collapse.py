"""Neural collapse (Papyan, Han and Donoho 2020) against an independent float64 numpy implementation, and on
synthetic features with known collapse; the scheduled recorder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.diagnostics.collapse import neural_collapse
from dynascope.probes.collapse import feature_module


def _reference(h: np.ndarray, y: np.ndarray) -> dict:
    """Written from the paper's definitions with dense D x D matrices and numpy's pinv."""
    h = h.astype(np.float64)
    classes = np.unique(y)
    c = len(classes)
    mu_g = h.mean(0)
    means = np.stack([h[y == k].mean(0) for k in classes])
    sw = np.zeros((h.shape[1], h.shape[1]))
    for k, mu in zip(classes, means):
        d = h[y == k] - mu
        sw += d.T @ d
    sw /= len(h)
    m = means - mu_g
    sb = m.T @ m / c
    nc1 = np.trace(sw @ np.linalg.pinv(sb, rcond=1e-10, hermitian=True)) / c
    norms = np.linalg.norm(m, axis=1)
    cos = [m[i] @ m[j] / (norms[i] * norms[j]) for i in range(c) for j in range(c) if i != j]
    return {"nc1": nc1, "equinorm": norms.std() / norms.mean(), "equiangular": np.std(cos),
            "max_angle": np.mean(np.abs(np.array(cos) + 1 / (c - 1)))}


@pytest.mark.parametrize("n,d,c", [(300, 16, 5), (200, 64, 10), (90, 3, 6)])
def test_matches_the_numpy_reference(n, d, c):
    rng = np.random.default_rng(n + d)
    y = rng.integers(0, c, n)
    h = rng.normal(size=(n, d)) + 2.0 * rng.normal(size=(c, d))[y]
    res = neural_collapse(torch.from_numpy(h).float(), torch.from_numpy(y))
    ref = _reference(h.astype(np.float32), y)
    for k in ("nc1", "equinorm", "equiangular", "max_angle"):
        assert getattr(res, k) == pytest.approx(ref[k], rel=1e-8), k
    assert res.n_classes == c and res.dim == d and res.n == n


def _simplex_etf(c: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """C unit vectors in R^d with pairwise cosine -1/(C-1), randomly rotated."""
    m = np.eye(c) - 1.0 / c
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return m @ q[:c]


def test_collapsed_features_on_a_simplex_etf_give_zero():
    rng = np.random.default_rng(0)
    c, d = 8, 32
    means = 5.0 * _simplex_etf(c, d, rng)
    y = np.repeat(np.arange(c), 25)
    h = means[y] + 1e-4 * rng.normal(size=(len(y), d))
    res = neural_collapse(torch.from_numpy(h), torch.from_numpy(y))
    assert res.nc1 < 1e-8
    assert res.equinorm < 1e-4 and res.equiangular < 1e-4 and res.max_angle < 1e-4


def test_uncollapsed_features_do_not():
    rng = np.random.default_rng(1)
    c, d = 8, 32
    means = rng.normal(size=(c, d)) * rng.uniform(0.5, 3.0, size=(c, 1))  # unequal norms, random angles
    y = np.repeat(np.arange(c), 25)
    h = means[y] + rng.normal(size=(len(y), d))
    res = neural_collapse(torch.from_numpy(h), torch.from_numpy(y))
    assert res.nc1 > 0.1 and res.equinorm > 0.1 and res.equiangular > 0.05
    # NC1 falls as the within-class spread shrinks (scale-free: both covariances scale together otherwise)
    tighter = neural_collapse(torch.from_numpy(means[y] + 0.1 * rng.normal(size=(len(y), d))), torch.from_numpy(y))
    assert tighter.nc1 < res.nc1 / 50
    scaled = neural_collapse(torch.from_numpy(3.0 * h), torch.from_numpy(y))
    assert scaled.nc1 == pytest.approx(res.nc1, rel=1e-9)


def test_conv_features_are_flattened_and_absent_classes_ignored():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(60, 2, 3, 2))
    y = rng.choice([1, 4, 7], size=60)  # labels need not be 0..C-1
    res = neural_collapse(torch.from_numpy(h), torch.from_numpy(y))
    ref = _reference(h.reshape(60, -1), y)
    assert res.n_classes == 3 and res.nc1 == pytest.approx(ref["nc1"], rel=1e-9)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 2 classes"):
        neural_collapse(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match="10 feature rows but 9"):
        neural_collapse(torch.randn(10, 3), torch.zeros(9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        neural_collapse(torch.randn(10, 3), torch.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        neural_collapse(torch.full((4, 2), float("nan")), torch.tensor([0, 1, 0, 1]))


# -- the scheduled recorder ---------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.1))
        self.fc = nn.Linear(24, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_default_layer_is_the_input_of_the_last_linear():
    name, module, use_input = feature_module(Net(), None)
    assert (name, use_input) == ("fc", True) and isinstance(module, nn.Linear)
    assert feature_module(Net(), "body.2")[0::2] == ("body.2", False)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        feature_module(Net(), "nope")
    with pytest.raises(ValueError, match="no nn.Linear"):
        feature_module(nn.Sequential(nn.ReLU()), None)


def test_recorder_matches_the_function_on_the_penultimate_features(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g)
    y = x[:, :4].argmax(1)
    refs = {}
    probes = [dynascope.Collapse(every=3, batch=(x[:120], y[:120])),
              dynascope.Collapse(every=3, batch=[(x[:60], y[:60]), (x[60:120], y[60:120])], layer="body.0")]
    with dynascope.probe(model, opt, tmp_path / "run", every=4, scheduled=probes) as run:
        for s in range(7):
            idx = torch.randint(0, 200, (32,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
            if s % 3 == 0:
                model.eval()
                with torch.no_grad():
                    refs[s] = (neural_collapse(model.body(x[:120]), y[:120]),
                               neural_collapse(model.body[0](x[:120]), y[:120]))
                model.train()
    data = dynascope.load_run(tmp_path / "run")
    for metric in ("nc1", "equinorm", "equiangular"):
        df = data.scalars(f"collapse.{metric}")
        assert set(df["layer"]) == {"fc", "body.0"}
        for (s, lay), v in zip(zip(df["step"], df["layer"]), df["value"]):
            ref = refs[s][0 if lay == "fc" else 1]
            assert v == pytest.approx(getattr(ref, metric), rel=1e-9), (metric, s, lay)
        assert sorted(set(df["step"])) == [0, 3, 6]
    flags = data.pivot("collapse.input")
    assert (flags["fc"] == 1.0).all() and (flags["body.0"] == 0.0).all()


def test_recorder_arguments():
    with pytest.raises(ValueError, match="batch"):
        dynascope.Collapse(every=5)
    with pytest.raises(TypeError, match="layer"):
        dynascope.Collapse(every=5, batch=(torch.zeros(2, 2), torch.zeros(2)), layer=3)
