"""Planted faults whose cause is known: the sentinel fires within a few steps, forensics rank the cause first,
and a healthy run with warmup stays quiet. The recipe: a residual LayerNorm MLP, AdamW with one param group
per block, linear warmup and cosine decay, optionally gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dynascope

STEPS = 110
FAULT = 80


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.poison = False  # a NaN produced in this block's output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(self.norm(x))
        if self.poison:
            h = h * float("nan")
        return x + torch.nn.functional.gelu(h)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), Block(32), Block(32), Block(32), nn.Linear(32, 4))


def _run(path, fault: str | None, *, clip: float | None = 1.0, every: int = 10, steps: int = STEPS):
    model = _model()
    opt = torch.optim.AdamW([{"params": m.parameters()} for m in model], lr=2e-3, weight_decay=0.05)
    warmup = 20

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=g)
    with dynascope.probe(model, opt, path, every=every, sentinel=dynascope.Sentinel(announce=False)) as run:
        for step in range(steps):
            x = torch.randn(64, 16, generator=g)
            y = (x @ w).argmax(1)
            if fault == "batch" and step == FAULT:
                x = x * 100.0  # a corrupted batch
            model[2].poison = fault == "nan" and step == FAULT
            factors = [1.0] * len(opt.param_groups)
            if fault == "layer_lr" and step == FAULT:
                factors[2] = 100.0
            if fault == "global_lr" and step >= FAULT:
                factors = [100.0] * len(factors)
            base = [group["lr"] for group in opt.param_groups]
            for group, f in zip(opt.param_groups, factors):
                group["lr"] = group["lr"] * f
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            for group, b in zip(opt.param_groups, base):
                group["lr"] = b
            sched.step()
            run.step(loss=loss)
    return dynascope.load_run(path)


def _first_event(run) -> int:
    ev = run.events()
    assert not ev.empty, "no event"
    return int(ev["step"].min())


@pytest.mark.parametrize("clip", [1.0, None])
def test_one_layers_learning_rate(tmp_path, clip):
    run = _run(tmp_path / "r", "layer_lr", clip=clip)
    first = _first_event(run)
    assert FAULT <= first <= FAULT + 5, run.events()
    table = run.forensics(first)
    # the cause: the learning rate of block 2's param group, then block 2's update, above every other module
    assert (table.iloc[0]["metric"], table.iloc[0]["module"]) == ("optim.lr", "2"), table.head()
    assert table.iloc[0]["ratio"] >= 50, table.head()
    modules = table[table["metric"] != "optim.lr"]
    assert modules.iloc[0]["module"].startswith("2") and modules.iloc[0]["metric"].startswith("update."), table.head()


def test_global_learning_rate_under_clipping(tmp_path):
    run = _run(tmp_path / "r", "global_lr", clip=1.0)
    first = _first_event(run)
    assert FAULT <= first <= FAULT + 5, run.events()
    top = run.forensics(first).iloc[0]
    # x100 against the recent median of a cosine-decaying lr (5-15% higher a few steps before)
    assert top["metric"] == "optim.lr" and 50 <= top["ratio"] <= 100, run.forensics(first)
    # a finding names the learning-rate change; no architecture rule blames the model for it
    found = dynascope.findings(run)
    lr = found[found["rule"] == "learning_rate_jumps"]
    assert len(lr) == 1 and lr.iloc[0]["step"] == FAULT and "Learning rate jumped at step 80" in lr.iloc[0]["message"]
    arch = found[found["rule"].isin(["variance_grows_with_depth", "grad_norm_depth_ratio"])]
    assert (arch["step"] < FAULT).all(), arch  # judged on the model before the event, not on what the jump did


def test_corrupted_batch(tmp_path):
    run = _run(tmp_path / "r", "batch")
    first = _first_event(run)
    assert FAULT <= first <= FAULT + 5, run.events()
    top = run.forensics(first).iloc[0]
    assert top["module"] == "0", run.forensics(first).head()  # the layer that reads the batch


def test_nan_produced_in_one_layer(tmp_path):
    run = _run(tmp_path / "r", "nan", every=1)
    ev = run.events()
    assert "loss_nonfinite" in set(ev["kind"]) and _first_event(run) == FAULT, ev
    top = run.forensics(FAULT).iloc[0]
    assert top["direction"] == "non-finite" and top["metric"].startswith("act."), run.forensics(FAULT).head()
    assert top["module"] in ("2", "2.fc"), run.forensics(FAULT).head()


def test_a_healthy_run_with_warmup_has_no_event(tmp_path):
    run = _run(tmp_path / "r", None)
    assert run.events().empty, run.events()
    found = dynascope.findings(run)
    assert "learning_rate_jumps" not in set(found["rule"]), found  # warmup and cosine are not jumps
