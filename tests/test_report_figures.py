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


# ---------------------------------------------------------------------------------------------- the registry
def _small_run(path, rows):
    store = RunStore(path)
    store.write_scalars(rows)
    store.close()
    return load_run(path)


def test_registry_calls_a_figure_only_with_the_runs_that_recorded_its_metrics(tmp_path, monkeypatch):
    import inspect

    from dynascope.reports import figures as figmod

    monkeypatch.setattr(figmod, "REGISTRY", dict(figmod.REGISTRY))
    plain = _small_run(tmp_path / "plain", [(s, "loss", "", 1.0) for s in range(3)])
    other = _small_run(tmp_path / "other", [(0, "loss", "", 1.0), (0, "my.b", "", 3.0)])
    rich = _small_run(tmp_path / "rich", [(s, "my.a", "x", float(s)) for s in range(3)])
    calls = []

    @figmod.register("test_only_filtered", section="Tests", title="t", source="none", metrics=("my.a", "my.b"))
    def filtered(runs, have, *, scale: float = 1.0):
        calls.append(([r.name for r in runs], [(i, r.name) for i, r in have], scale))
        return "drawn"

    @figmod.register("test_only_specific", section="Tests", title="t", source="none", metrics=("my.a", "my.b"),
                     needs="my.a")
    def specific(runs, have):
        calls.append(("specific", [(i, r.name) for i, r in have]))
        return "drawn"

    @figmod.register("test_only_plain", section="Tests", title="t", source="none", metrics="my.a")
    def one_argument(runs):  # the older form: only runs, all of them (after the same check)
        calls.append(("plain", [r.name for r in runs]))
        return "drawn"

    spec = figmod.REGISTRY["test_only_filtered"]
    assert spec.needs == ("my.a", "my.b") and spec.draw is filtered.__wrapped__ and spec.fn is filtered
    assert list(inspect.signature(spec.fn).parameters) == ["runs", "scale"]  # `have` is the registry's
    # no run recorded any declared metric: None, the function is not called
    assert spec.fn([plain]) is None and figmod.REGISTRY["test_only_plain"].fn([plain, other]) is None
    assert calls == []
    # one run has them: called with every run (colours by index) and the kept ones with their index
    assert spec.fn([plain, rich], scale=2.0) == "drawn"
    assert calls[-1] == (["plain", "rich"], [(1, "rich")], 2.0)
    assert filtered([other, plain, rich]) == "drawn"  # the module's name is the filtered figure too
    assert calls[-1] == (["other", "plain", "rich"], [(0, "other"), (2, "rich")], 1.0)  # ANY declared metric
    # needs= narrows it to a specific metric
    assert figmod.REGISTRY["test_only_specific"].fn([other]) is None
    assert figmod.REGISTRY["test_only_specific"].fn([other, rich]) == "drawn"
    assert calls[-1] == ("specific", [(1, "rich")])
    assert figmod.REGISTRY["test_only_plain"].fn([plain, rich]) == "drawn"
    assert calls[-1] == ("plain", ["plain", "rich"])


def test_registry_counts_an_artifact_as_recorded(tmp_path, monkeypatch):
    from dynascope.reports import figures as figmod

    monkeypatch.setattr(figmod, "REGISTRY", dict(figmod.REGISTRY))
    store = RunStore(tmp_path / "art")
    store.write_scalars([(0, "loss", "", 1.0)])
    store.write_artifact("my.array", 5, {"a": np.arange(3)})
    store.close()
    art = load_run(tmp_path / "art")
    plain = _small_run(tmp_path / "plain", [(0, "loss", "", 1.0)])
    seen = []

    @figmod.register("test_only_artifact", section="Tests", title="t", source="none", metrics="my.array")
    def uses_artifact(runs, have):
        seen.append([i for i, _ in have])
        return "drawn"

    assert uses_artifact([plain]) is None and seen == []
    assert uses_artifact([plain, art]) == "drawn" and seen == [[1]]


def test_a_declared_per_layer_figure_draws_one_panel_per_chosen_layer(tmp_path, monkeypatch):
    from dynascope.reports import figures as figmod
    from dynascope.reports.figures._helpers import CAPTION_ATTR
    from dynascope.reports.figures._panels import MAX_LAYERS, LayerFigure, register_layers

    monkeypatch.setattr(figmod, "REGISTRY", dict(figmod.REGISTRY))
    names = [f"blocks.{k}.weight" for k in range(12)]
    rows = [(s, m, lay, 1.0 + s + k) for s in range(5) for k, lay in enumerate(names)
            for m in ("my.norm", "my.bound")]
    run = _small_run(tmp_path / "r", rows)
    without = _small_run(tmp_path / "none", [(0, "loss", "", 1.0)])
    fn = register_layers("test_only_layers", LayerFigure(
        "my.norm", "norm", caption="My norm. ", companion=("my.bound", "bound", "--"), layers_option=True),
        section="Tests", title="t", source="none")
    assert figmod.REGISTRY["test_only_layers"].metrics == ("my.norm",)
    assert fn([without]) is None

    def panels(fig):
        return [ax.get_title() for ax in fig.axes if ax.get_visible()]

    chosen = [names[1], names[4], names[9]]
    fig = fn([without, run], layers=chosen)
    assert panels(fig) == chosen
    for ax in fig.axes[:3]:
        assert len(ax.get_lines()) == 2  # the metric and its companion, of the one run that has them
        assert ax.get_lines()[0].get_color() == figmod.run_colors([without, run])[1]  # its colour by its index
    assert getattr(fig, CAPTION_ATTR).startswith("My norm. All 3 layers: ")
    default = fn([run])
    assert panels(default) == pick_layers(names, MAX_LAYERS)
    assert [h.get_label() for h in default.legends[0].legend_handles] == ["r", "bound"]
    with pytest.raises(ValueError, match="was not recorded for"):
        fn([run], layers=["nope"])
