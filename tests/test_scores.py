"""EL2N and GraNd (Paul, Ganguli and Dziugaite 2021): against hand formulas and a per-example gradient loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynascope
from dynascope.diagnostics.scores import example_scores


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 5))
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            m(torch.randn(64, 7) * 2 + 1)
    return m


def _data(n: int = 70, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 7, generator=g), torch.randint(0, 5, (n,), generator=g)


def _loop_grand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    model.eval()
    out = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        out.append(float(torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()))))
    model.zero_grad()
    return np.array(out)


def test_grand_equals_a_per_example_loop():
    model = _net()
    x, y = _data()
    res = example_scores(model, F.cross_entropy, (x, y), "grand", batch_size=16, progress=False)
    ref = _loop_grand(_net(), x, y)
    assert res.kind == "grand" and len(res) == 70
    np.testing.assert_allclose(res.scores, ref, rtol=1e-5)
    assert res.scores.min() > 0


def test_grand_counts_only_trainable_parameters():
    model = _net()
    model[0].weight.requires_grad_(False)
    x, y = _data(20)
    res = example_scores(model, F.cross_entropy, (x, y), "grand", progress=False)
    model.eval()
    ref = []
    for i in range(20):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref.append(float(torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters()
                                        if p.requires_grad))))
    np.testing.assert_allclose(res.scores, ref, rtol=1e-5)


def test_el2n_hand_formula_and_chunking():
    model = _net()
    x, y = _data()
    model.eval()
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1).numpy()
    onehot = np.eye(5)[y.numpy()]
    ref = np.sqrt(((p - onehot) ** 2).sum(1))
    for bs in (1, 16, 1000):
        res = example_scores(_net(), None, (x, y), "el2n", batch_size=bs, progress=False)
        np.testing.assert_allclose(res.scores, ref, rtol=1e-6)
    # dynascope's scores within 0 <= EL2N <= sqrt(2), and near both ends where the model is sure: a linear
    # model with huge logits, one example right (EL2N ~ 0) and one wrong (~ sqrt 2), against the expansion
    # |p - e_y|^2 = sum p^2 - 2 p_y + 1 in float64
    assert (res.scores >= 0).all() and (res.scores <= np.sqrt(2)).all()
    sure = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        sure.weight.copy_(torch.tensor([[40.0, 0.0], [0.0, 40.0], [0.0, 0.0]]))
    xs, ys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.3, 0.2]]), torch.tensor([0, 1, 2])
    got = example_scores(sure, None, (xs, ys), "el2n", progress=False).scores
    p = torch.softmax(sure(xs).double(), 1).detach().numpy()
    expanded = np.sqrt((p**2).sum(1) - 2 * p[np.arange(3), ys.numpy()] + 1)
    np.testing.assert_allclose(got, expanded, rtol=1e-6, atol=1e-7)
    assert got[0] < 1e-6 and got[1] == pytest.approx(np.sqrt(2), rel=1e-6)


def test_dataloader_list_of_pairs_and_state_restored():
    model = _net()
    x, y = _data(50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = example_scores(model, F.cross_entropy, DataLoader(TensorDataset(x, y), batch_size=12), "grand",
                       progress=False)
    b = example_scores(model, F.cross_entropy, [(x[:20], y[:20]), (x[20:], y[20:])], "grand", batch_size=7,
                       progress=False)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_summary_quantiles():
    s = dynascope.example_scores(_net(), F.cross_entropy, _data(), "el2n", progress=False)
    q = s.summary()
    assert set(q) == {"q10", "q50", "q90", "mean"}
    assert q["q10"] == pytest.approx(np.quantile(s.scores, 0.1)) and q["mean"] == pytest.approx(s.scores.mean())
    assert q["q10"] <= q["q50"] <= q["q90"]


def test_progress_bar_writes_to_stderr(capsys):
    example_scores(_net(), F.cross_entropy, _data(), "el2n", progress=True)
    assert "el2n scores" in capsys.readouterr().err
    example_scores(_net(), F.cross_entropy, _data(), "el2n", progress=False)
    assert capsys.readouterr().err == ""


def test_bad_arguments():
    m, d = _net(), _data()
    with pytest.raises(ValueError, match="kind"):
        example_scores(m, F.cross_entropy, d, "forgetting")
    with pytest.raises(TypeError, match="loss_fn"):
        example_scores(m, None, d, "grand")
    with pytest.raises(ValueError, match="batch_size"):
        example_scores(m, F.cross_entropy, d, batch_size=0)
    with pytest.raises(ValueError, match="BatchNorm"):
        example_scores(m, F.cross_entropy, d, "grand", mode="train")
    with pytest.raises(TypeError, match="integer class indices"):
        example_scores(m, None, (d[0], d[1].float()), "el2n", progress=False)


# -- dynascope analyze --scores ------------------------------------------------------------------------------

def test_analyze_records_quantiles_and_per_example_scores(tmp_path, capsys):
    from test_analyze import MODEL_SRC, _write_checkpoints

    from dynascope.commands.cli import main

    (tmp_path / "usermodel.py").write_text(MODEL_SRC)
    _write_checkpoints(tmp_path / "ck", steps=(0, 40))
    out = tmp_path / "run"
    model_arg = ["--model", f"{tmp_path / 'usermodel.py'}:make"]
    rc = main(["analyze", str(tmp_path / "ck"), *model_arg, "--data", f"{tmp_path / 'usermodel.py'}:data",
               "--scores", "el2n", "grand", "-o", str(out), "--no-progress", "--report", str(tmp_path / "r.html")])
    assert rc == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "el2n" in header and "grand" in header
    run = dynascope.load_run(out)
    ns: dict = {}
    exec(MODEL_SRC, ns)
    x, y = ns["data"]()
    for step in (0, 40):
        model = ns["make"]()
        model.load_state_dict(torch.load(tmp_path / "ck" / f"ckpt_{step}.pt", weights_only=True)["model_state_dict"])
        for kind in ("el2n", "grand"):
            ref = example_scores(model, F.cross_entropy, (x, y), kind, progress=False)
            table = run.pivot(f"scores.{kind}")
            assert sorted(table.columns) == ["mean", "q10", "q50", "q90"]
            for name, value in ref.summary().items():
                assert table.loc[step, name] == pytest.approx(value, rel=1e-6), (kind, step, name)
            arrays, meta = run.load_artifact(f"scores.{kind}", step)
            np.testing.assert_allclose(arrays["scores"], ref.scores, rtol=1e-6)
            assert meta["n"] == 64
    # training lowers the typical EL2N of the training batch
    el2n = run.pivot("scores.el2n")
    assert el2n.loc[40, "q50"] < el2n.loc[0, "q50"]
    assert "Example difficulty scores per checkpoint" in (tmp_path / "r.html").read_text()


def test_analyze_scores_needs_data_and_a_known_kind(tmp_path, capsys):
    from test_analyze import MODEL_SRC, _write_checkpoints

    from dynascope.commands.cli import main

    (tmp_path / "usermodel.py").write_text(MODEL_SRC)
    _write_checkpoints(tmp_path / "ck", steps=(0,))
    model_arg = ["--model", f"{tmp_path / 'usermodel.py'}:make"]
    rc = main(["analyze", str(tmp_path / "ck"), *model_arg, "--scores", "el2n", "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "--scores needs --data" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(tmp_path / "ck"), *model_arg, "--scores", "forgetting", "-o", str(tmp_path / "run")])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
