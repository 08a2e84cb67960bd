"""Figure helpers and the equilibrium-angle formulas behind the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _synthetic import make_run

from dynascope import load_run
from dynascope.diagnostics.scale import equilibrium_angle, equilibrium_angle_from_hyperparameters
from dynascope.reports.figures._helpers import decimate, pick_layers
from dynascope.store import RunStore
from dynascope.store.query import depth_modules


def test_equilibrium_angle_reference_values():
    # metrics reference: AdamW eta=1e-3, lambda=0.1, beta1=0.9 -> 3.244e-3; SGD 0.1, 5e-4, 0.9 -> 7.255e-3
    assert equilibrium_angle("AdamW", 1e-3, 0.1, beta1=0.9) == pytest.approx(3.244e-3, rel=1e-3)
    assert equilibrium_angle("SGD", 0.1, 5e-4, momentum=0.9) == pytest.approx(7.255e-3, rel=1e-3)
    assert equilibrium_angle("torch.optim.SGD", 0.1, 5e-4) == pytest.approx(math.sqrt(2 * 0.1 * 5e-4))
    assert equilibrium_angle("SGD", 0.1, 0.0) is None
    assert equilibrium_angle("Adam", 1e-3, 0.1) is None  # L2 through the preconditioner: no closed form here
    with pytest.raises(ValueError, match="lr"):
        equilibrium_angle("SGD", -1.0, 0.1)
    with pytest.raises(ValueError, match="momentum"):
        equilibrium_angle("SGD", 0.1, 0.1, momentum=1.0)


def test_equilibrium_from_recorded_hyperparameters():
    hp = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8}
    assert equilibrium_angle_from_hyperparameters("AdamW", hp) == pytest.approx(3.244e-3, rel=1e-3)
    assert equilibrium_angle_from_hyperparameters("SGD", {"lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9}) == \
        pytest.approx(7.255e-3, rel=1e-3)
    assert equilibrium_angle_from_hyperparameters("SGD", {"weight_decay": 0.1}) is None


def test_decimate_keeps_spikes_and_order():
    x = np.arange(100_000)
    y = np.sin(x / 1000.0)
    y[54_321] = 50.0
    y[77_777] = -50.0
    xs, ys = decimate(x, y, 1000)
    assert len(xs) <= 1000 and np.all(np.diff(xs) > 0)
    assert 54_321 in xs and 77_777 in xs
    assert decimate(x[:10], y[:10])[0].tolist() == list(range(10))


def test_pick_layers():
    names = [f"l{i}" for i in range(100)]
    got = pick_layers(names, 8)
    assert len(got) == 8 and got[0] == "l0" and got[-1] == "l99"
    assert pick_layers(names[:5], 8) == names[:5]


def _run_with_modules(path, modules, blocks=None):
    store = RunStore(path)
    meta = {"modules": modules}
    if blocks:
        meta["blocks"] = blocks
    store.write_meta(meta)
    store.write_scalars((0, "act.var", m, 1.0) for m in modules)
    store.close()
    return load_run(path)


@pytest.mark.parametrize("modules, expected_pattern", [
    (["wte", "h.0", "h.0.ln_1", "h.0.attn", "h.0.mlp", "h.0.mlp.0", "h.0.mlp.1",
      "h.1", "h.1.ln_1", "h.1.attn", "h.1.mlp", "h.1.mlp.0", "h.1.mlp.1",
      "h.2", "h.2.ln_1", "h.2.attn", "h.2.mlp", "h.2.mlp.0", "h.2.mlp.1", "ln_f", "lm_head"], "h.#"),
    (["conv1", "bn1", "layer1.0", "layer1.0.conv1", "layer1.1", "layer1.1.conv1", "layer2.0", "layer2.0.conv1",
      "layer2.0.downsample.0", "layer2.1", "layer2.1.conv1", "fc"], "layer#.#"),
    (["0", "1", "2", "3", "4"], "#"),
])
def test_depth_heuristic(tmp_path, modules, expected_pattern):
    run = _run_with_modules(tmp_path / "r", modules)
    chosen, how = depth_modules(run, "act.var")
    assert f"'{expected_pattern}'" in how
    assert chosen == [m for m in modules if __import__("re").sub(r"\d+", "#", m) == expected_pattern]


def test_depth_prefers_marked_blocks_and_falls_back_to_top_level(tmp_path):
    run = _run_with_modules(tmp_path / "a", ["stem", "b1", "b2", "head"], blocks=["b1", "b2"])
    assert depth_modules(run, "act.var") == (["b1", "b2"], "depth = the residual blocks marked in the run "
                                                          "(meta 'blocks')")
    run = _run_with_modules(tmp_path / "b", ["stem", "body", "body.inner", "head"])
    chosen, how = depth_modules(run, "act.var")
    assert chosen == ["stem", "body", "head"] and "top-level" in how


@pytest.mark.parametrize("n_blocks", [3, 6, 30])
def test_layer_index_axes_have_integer_ticks(tmp_path, n_blocks):
    """A numeric layer / block index axis (two runs, or too many layers to name) ticks only integers."""
    from matplotlib.ticker import FixedLocator

    from dynascope.reports.figures import REGISTRY, all_figures

    all_figures()  # imports every figure module into the registry
    runs = [load_run(make_run(tmp_path / f"r{k}", n_blocks=n_blocks, steps=12, seed=k, massive=True))
            for k in range(2)]
    index_labels = ("layer index", "block depth")
    seen = 0
    for key in ("signal_propagation", "hidden_variance_depth", "massive_activations", "grad_norm_depth"):
        fig = REGISTRY[key].fn(runs)
        assert fig is not None, key
        fig.canvas.draw()
        for ax in fig.axes:
            if not ax.get_visible() or ax.get_xlabel() not in index_labels:
                continue
            assert not isinstance(ax.xaxis.get_major_locator(), FixedLocator), key  # numeric, not named
            lo, hi = sorted(ax.get_xlim())
            ticks = [t for t in ax.get_xticks() if lo - 1e-9 <= t <= hi + 1e-9]
            assert len(ticks) >= 2, (key, ticks)
            assert all(float(t).is_integer() for t in ticks), f"{key}: fractional layer ticks {ticks}"
            seen += 1
    assert seen >= 6
