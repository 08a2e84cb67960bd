"""The coverage report: what a run hooked and recorded, what it could not, and why."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

import dynascope


class ArgMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(8, 8)  # never called
        self.head = nn.Linear(8, 3)
        self.pick = ArgMax()  # an integer output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(torch.relu(self.frozen(self.fc(x))))
        self.last_pick = self.pick(h)
        return h


def test_coverage_names_what_is_not_recorded_and_why(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([model.fc.weight, model.fc.bias, model.unused.weight], lr=0.1)  # head: no optimizer
    with dynascope.probe(model, opt, tmp_path / "r", every=1) as run:
        before = run.coverage()
        assert set(before.columns) == {"kind", "name", "recorded", "reason", "probe"}
        for _ in range(2):
            loss = model(torch.randn(4, 6)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
        live = run.coverage().set_index(["kind", "name"])
    data = dynascope.load_run(tmp_path / "r")
    cov = data.coverage().set_index(["kind", "name"])
    for df in (live, cov):
        assert bool(df.loc[("module", "fc"), "recorded"])
        assert not bool(df.loc[("module", "pick"), "recorded"])
        assert "not a floating tensor (torch.int64)" in df.loc[("module", "pick"), "reason"]
        assert not bool(df.loc[("module", "unused"), "recorded"])
        assert "not called" in df.loc[("module", "unused"), "reason"]
        assert "frozen" in df.loc[("parameter", "frozen.weight"), "reason"]
        assert "no gradient at any recording step" in df.loc[("parameter", "unused.weight"), "reason"]
        assert "no optimizer owns it" in df.loc[("parameter", "head.weight"), "reason"]
        assert "1-D parameter" in df.loc[("metric", "update.*@fc.bias"), "reason"]
    # before the first step the hooked modules count as recorded (nothing revealed yet)
    assert bool(before.set_index(["kind", "name"]).loc[("module", "pick"), "recorded"])
    out = subprocess.run([sys.executable, "-m", "dynascope", "ls", str(tmp_path / "r")], capture_output=True,
                         text=True, check=True).stdout
    assert "coverage:" in out and "module pick: its output is not a floating tensor (torch.int64)" in out
    page = dynascope.report([tmp_path / "r"], tmp_path / "report.html", progress=False).read_text()
    assert "<th>coverage</th>" in page and "module pick: its output is not a floating tensor (torch.int64)" in page


def test_coverage_without_optimizer_says_no_update_metrics(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3))
    with dynascope.probe(model, None, tmp_path / "r", every=1) as run:
        model(torch.randn(2, 3)).sum().backward()
        run.step()
    cov = dynascope.load_run(tmp_path / "r").coverage().set_index(["kind", "name"])
    assert "no optimizer given" in cov.loc[("metric", "update.*"), "reason"]
