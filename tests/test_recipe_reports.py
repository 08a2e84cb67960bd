"""Right answers on real recipes: the rotational equilibrium under warmup, `dynascope analyze` on a Hugging Face
causal LM and its labels and progress, an evaluation loss that got worse across checkpoints."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import dynascope
from dynascope.analysis.findings import findings as rule_findings
from dynascope.commands.cli import main
from dynascope.store import RunStore, load_run

GPT2_SRC = '''
import torch
from transformers import GPT2Config, GPT2LMHeadModel

def make():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=16))

def ids():
    return torch.randint(0, 20, (4, 12), generator=torch.Generator().manual_seed(3))

def data():
    return ids(), None

def data_labels():
    x = ids()
    return {"input_ids": x, "labels": x}, None
'''


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gpt2")
    (d / "lm.py").write_text(GPT2_SRC)
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_for_test", d / "lm.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    model = lm.make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = lm.ids()
    (d / "ck").mkdir()
    for step in range(3):
        torch.save(model.state_dict(), d / "ck" / f"step_{step * 10}.pt")
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return d


def _hand_losses(d: Path) -> list[float]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lm_hand", d / "lm.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    model, x = lm.make(), lm.ids()
    out = []
    for step in (0, 10, 20):
        model.load_state_dict(torch.load(d / "ck" / f"step_{step}.pt"))
        model.eval()
        with torch.no_grad():
            logits = model(x).logits
        out.append(float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 20), x[:, 1:].reshape(-1))))
    return out


@pytest.mark.parametrize("data", ["data", "data_labels"])
def test_analyze_hf_causal_lm_default_loss(gpt2_dir: Path, data: str, tmp_path: Path) -> None:
    """The default loss of a causal LM: its .loss with labels, else the shifted next-token cross entropy of the
    logits against the input ids (it failed: "must be Tensor, not CausalLMOutputWithCrossAttentions")."""
    out = tmp_path / "run"
    rc = main(["analyze", str(gpt2_dir / "ck"), "--model", f"{gpt2_dir / 'lm.py'}:make",
               "--data", f"{gpt2_dir / 'lm.py'}:{data}", "-o", str(out), "--no-progress"])
    assert rc == 0
    s, v = load_run(out).series("loss")
    assert s.tolist() == [0, 10, 20]
    np.testing.assert_allclose(v, _hand_losses(gpt2_dir), rtol=1e-5)
    assert v[0] > v[-1]  # the checkpoints trained on this batch


def test_default_loss_rejects_what_it_cannot_read() -> None:
    from dynascope.diagnostics._batch import default_loss

    with pytest.raises(TypeError, match="pass a loss function"):
        default_loss({"x": 1}, None)
    assert float(default_loss(torch.zeros(3, 5), torch.tensor([0, 1, 2]))) == pytest.approx(math.log(5))


MLP_SRC = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

def make_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))

def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randint(0, 4, (64,), generator=g)
'''


def _mlp_checkpoints(d: Path, factory: str, n: int = 3) -> Path:
    import importlib.util

    (d / "mlp.py").write_text(MLP_SRC)
    spec = importlib.util.spec_from_file_location(f"mlp_{factory}", d / "mlp.py")
    um = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(um)
    model = getattr(um, factory)()
    x, y = um.data()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ck = d / f"ck_{factory}"
    ck.mkdir()
    for step in range(n):
        torch.save({"model_state_dict": model.state_dict(), "global_step": step * 100}, ck / f"ckpt_{step}.pt")
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ck


def _figure_text(fig) -> str:
    from matplotlib.text import Text

    return " | ".join(t.get_text() for t in fig.findobj(Text))


@pytest.mark.parametrize("factory,label", [("make", "eval mode, batch 64"), ("make_bn", "BN eval, batch 64")])
def test_analyze_labels_bn_only_with_batchnorm(tmp_path: Path, factory: str, label: str) -> None:
    """The landscape figures said "BN eval" for a model without BatchNorm; the coverage line said "run
    written before dynascope 0.2" for a fresh analyze run (under version 0.1.0)."""
    from dynascope.reports.html import _summary

    ck = _mlp_checkpoints(tmp_path, factory)
    out = tmp_path / "run"
    assert main(["analyze", str(ck), "--model", f"{tmp_path / 'mlp.py'}:{factory}", "--data",
                 f"{tmp_path / 'mlp.py'}:data", "--interpolate", "--resolution", "5", "-o", str(out),
                 "--no-progress"]) == 0
    run = dynascope.load_run(out)
    text = _figure_text(dynascope.figure("landscape_interpolation", run))
    assert label in text
    if factory == "make":
        assert "BN " not in text
    coverage = dict(_summary([run]))["coverage"][0]
    assert "before dynascope 0.2" not in coverage
    assert coverage == "not recorded (run written by dynascope analyze: checkpoints, no live probes)"


def test_analyze_prints_progress_lines_when_piped(tmp_path: Path, capsys) -> None:
    """4 minutes of --hessian --landscape --interpolate printed nothing when stderr was piped: one line per
    checkpoint and diagnostic with its time (the bar stays for a terminal)."""
    ck = _mlp_checkpoints(tmp_path, "make")
    out = tmp_path / "run"
    assert main(["analyze", str(ck), "--model", f"{tmp_path / 'mlp.py'}:make", "--data",
                 f"{tmp_path / 'mlp.py'}:data", "--hessian", "--interpolate", "--resolution", "5",
                 "-o", str(out)]) == 0
    err = capsys.readouterr().err
    for i, step in ((1, 0), (2, 100), (3, 200)):
        for what in ("loading", "weights", "loss", "hessian", "landscape"):
            assert re.search(rf"^dynascope analyze: checkpoint {i}/3 \(step {step}\): {what} \d+\.\d s$", err, re.M), \
                (what, err)
    assert "\r" not in err  # no bar
    assert main(["analyze", str(ck), "--model", f"{tmp_path / 'mlp.py'}:make", "-o", str(tmp_path / "quiet"),
                 "--no-progress"]) == 0
    assert "checkpoint 1/3" not in capsys.readouterr().err


def _analyze_run(path: Path, losses: list[float], steps: list[int], source: str = "analyze",
                 metric: str = "loss") -> dynascope.Run:
    store = RunStore(path)
    store.write_meta({"name": path.name, "source": source, "status": "finished"})
    store.write_scalars([(s, metric, "", v) for s, v in zip(steps, losses)]
                        + [(s, "weight.norm", "0.bias", 1.0 + 0.5 * i) for i, s in enumerate(steps)])
    store.close()
    return load_run(path)


def test_worse_eval_loss_across_checkpoints_is_a_warning(tmp_path: Path) -> None:
    """An evaluation loss 28% worse at the last checkpoint (2.71 vs its best 2.11) was not flagged."""
    steps = [100, 200, 300, 400, 500, 600, 700, 800, 900]
    run = _analyze_run(tmp_path / "worse", [3.5, 2.9, 2.5, 2.3, 2.11, 2.2, 2.4, 2.6, 2.71], steps)
    found = [f for f in rule_findings([run]) if f.rule == "eval_loss_worse"]
    assert len(found) == 1
    df = dynascope.findings(run)
    assert df[df["rule"] == "eval_loss_worse"]["severity"].tolist() == ["warning"]
    f = found[0]
    assert f.severity == "warning" and f.metric == "loss" and f.step == 900
    assert f.value == pytest.approx(2.71) and f.threshold == pytest.approx(1.1 * 2.11)
    assert "2.71" in f.message and "2.11" in f.message and "28% worse" in f.message
    assert "step 900" in f.message and "step 500" in f.message
    # within 10% of the best, or best at the end: nothing
    assert not [f for f in rule_findings([_analyze_run(tmp_path / "ok", [3.0, 2.11, 2.3], steps[:3])])
                if f.rule == "eval_loss_worse"]
    # a live run's training loss is not an evaluation loss; its val_loss is
    assert not [f for f in rule_findings([_analyze_run(tmp_path / "live", [3.0, 2.11, 2.71], steps[:3],
                                                           source="probe")]) if f.rule == "eval_loss_worse"]
    val = _analyze_run(tmp_path / "val", [3.0, 2.11, 2.71], steps[:3], source="probe", metric="val_loss")
    found = [f for f in rule_findings([val]) if f.rule == "eval_loss_worse"]
    assert [(f.metric, f.step) for f in found] == [("val_loss", 300)] and "step 200" in found[0].message


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory):
    """AdamW (lr 1e-3, weight decay 0.1) under a 20-step linear warmup from 5e-5: a BatchNorm MLP whose two
    BN-fed weights are scale-invariant and whose head is not."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
                          nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    out = tmp_path_factory.mktemp("warmup") / "run"
    with dynascope.probe(model, opt, out, every=2, probes=("gradients", "updates")) as run:
        for _ in range(60):
            i = torch.randint(0, 256, (32,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            run.step(loss=loss)
    return load_run(out)


def test_equilibrium_line_follows_each_steps_lr_in_scale_invariant_panels(warmup_run) -> None:
    """The line was drawn at the FIRST learning rate (the warmup's 5e-5: 0.000725 rad, where the peak 1e-3
    gives 3.24e-3) and in every panel; now: at each recorded step's lr, only for scale-invariant weights."""
    from dynascope.diagnostics.scale import equilibrium_angle

    run = warmup_run
    assert run.meta["optimizer"]["hyperparameters"][0]["lr"] == pytest.approx(5e-5)  # what the meta holds
    fig = dynascope.figure("angular_update", run)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
    assert set(panels) == {"0.weight", "3.weight", "6.weight"}
    for lay, ax in panels.items():
        dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        if lay == "6.weight":  # not scale-invariant: no line
            assert dashed == []
            continue
        assert len(dashed) == 1
        steps, angle = (np.asarray(a, dtype=float) for a in dashed[0].get_data())
        assert len(steps) >= 25 and steps[0] == 0
        expected = [equilibrium_angle("AdamW", 1e-3 * min(1.0, (s + 1) / 20), 0.1, beta1=0.9) for s in steps]
        np.testing.assert_allclose(angle, expected, rtol=1e-4)
        assert angle[-1] == pytest.approx(3.244e-3, rel=1e-3)
    from dynascope.reports.figures._helpers import CAPTION_ATTR

    cap = getattr(fig, CAPTION_ATTR)
    assert "AdamW, from each recorded step's learning rate, up to 0.00324 rad, in the panels of 0.weight, 3.weight" \
        in cap and "0.000725" not in cap
