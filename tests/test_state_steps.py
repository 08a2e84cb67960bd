"""The step an optimizer took, from its state (dynascope.probes._steps) against w_{t+1} - w_t measured with a
float64 copy, for SGD, Adam and AdamW and each of their flags (1e-4 relative: the copy measures the update
rounded into float32 weights, the state gives the update the optimizer computed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynascope.probes._steps as steps_mod
from dynascope.probes._steps import steps_from_state, supports_state_steps, update_norms_from_state

CASES = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, weight_decay=0.05)),
    ("sgd", dict(lr=0.1, momentum=0.9)),
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=0.05, dampening=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("sgd", dict(lr=0.1, momentum=0.9, maximize=True, weight_decay=0.01)),
    ("sgd", dict(lr=0.1, weight_decay=0.05, maximize=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, foreach=False)),
    ("adam", dict(lr=1e-2)),
    ("adam", dict(lr=1e-2, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1)),
    ("adam", dict(lr=1e-2, maximize=True)),
    ("adam", dict(lr=1e-2, foreach=False)),
    ("adam", dict(lr=1e-2, fused=True)),
    ("adamw", dict(lr=1e-2)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("adamw", dict(lr=torch.tensor(1e-2), weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, fused=True)),
]


@pytest.mark.parametrize("chunk", [1 << 22, 100], ids=["one-chunk", "chunks-of-100"])
@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{'-'.join(kw)}" for k, kw in CASES])
def test_step_from_state_equals_the_copy(kind, kw, chunk, monkeypatch):
    import dynascope.probes._groups as groups_mod

    for mod in (steps_mod, groups_mod):  # several parameters per chunk, and slices of one
        monkeypatch.setattr(mod, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": kw["lr"] * 0.5}]
    opt = cls(groups, **kw)
    assert supports_state_steps(opt)
    x, y = torch.randn(64, 12), torch.randn(64, 3)
    for step in range(4):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.step()
        for group in opt.param_groups:
            ds = steps_from_state(opt, group, group["params"])
            assert ds is not None
            for p, d in zip(group["params"], ds):
                ref = p.detach().double() - before[[id(q) for q in model.parameters()].index(id(p))]
                err = (d.double() - ref).norm() / ref.norm()
                assert err < 1e-4, (step, float(err))
            # the norms in closed form, multi-tensor (the sentinel's path)
            norms = update_norms_from_state(opt, group, group["params"])
            assert norms is not None and norms.dtype == torch.float32 and norms.shape == (len(group["params"]),)
            for p, n in zip(group["params"], norms):
                ref = p.detach().double() - before[[id(q) for q in model.parameters()].index(id(p))]
                assert float(n) == pytest.approx(float(ref.norm()), rel=1e-4), step


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_update_norms_with_different_step_counts_per_parameter(kind):
    """A parameter that had no gradient at the first step has a smaller step count (its own bias correction)."""
    torch.manual_seed(1)
    a, b = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(7))
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    opt = cls([a, b], lr=0.05, weight_decay=0.1)
    for step in range(4):
        opt.zero_grad()
        loss = (a ** 2).sum() + ((b ** 3).sum() if step >= 2 else 0.0)
        loss.backward()
        before = [a.detach().double().clone(), b.detach().double().clone()]
        opt.step()
        ps = [a, b] if step >= 2 else [a]
        norms = update_norms_from_state(opt, opt.param_groups[0], ps)
        for p, n, w in zip(ps, norms, before):
            assert float(n) == pytest.approx(float((p.detach().double() - w).norm()), rel=1e-4)
    assert float(opt.state[a]["step"]) != float(opt.state[b]["step"])


def test_other_optimizers_are_not_covered():
    p = nn.Parameter(torch.randn(3))

    class MySGD(torch.optim.SGD):
        pass

    assert not supports_state_steps(torch.optim.RMSprop([p]))
    assert not supports_state_steps(MySGD([p], lr=0.1))
    assert not supports_state_steps(None)


def test_a_missing_state_returns_none():
    p = nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1)
    assert steps_from_state(opt, opt.param_groups[0], [p]) is None  # no step taken yet


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3),  # not covered: the sentinel keeps its copy
], ids=["adamw", "sgd-nesterov", "rmsprop"])
def test_the_sentinels_update_norms_without_a_copy(tmp_path, make, monkeypatch):
    import copy

    import dynascope

    monkeypatch.setattr(dynascope.Sentinel, "COPY_MAX_ELEMENTS", 0)  # the state formula for any size
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    opt = make(model.parameters())
    x, y = torch.randn(64, 12), torch.randn(64, 3)
    ref = []
    with dynascope.probe(model, opt, tmp_path / "r", every=1, probes=()) as run:
        for _ in range(4):
            before = copy.deepcopy(model)
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
            ref.append([float(torch.cat([(a.double() - b.double()).reshape(-1) for a, b in
                                         zip(m.parameters(), n.parameters())]).norm())
                        for m, n in zip(model[::2], before[::2])])
        copies = len(run.sentinel._snap)
    assert copies == (1 if isinstance(opt, torch.optim.RMSprop) else 0)  # a copy of the weights only there
    un = dynascope.load_run(tmp_path / "r").scalars("update.norm")
    for step, row in enumerate(ref):
        for name, r in zip(("0", "2"), row):
            got = float(un[(un["step"] == step) & (un["layer"] == name)]["value"].iloc[0])
            assert got == pytest.approx(r, rel=1e-4)


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.conv = nn.Conv1d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, tok: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(tok).transpose(1, 2)).relu()
        return self.head(h.mean(2))


def _probe_values(tmp_path, name, make, monkeypatch, chunk, from_state=True):
    import dynascope
    import dynascope.probes._groups as groups_mod
    import dynascope.probes.gradients as grad_mod
    import dynascope.probes.optimizer as opt_mod

    for mod in (steps_mod, groups_mod, grad_mod, opt_mod):
        monkeypatch.setattr(mod, "CHUNK_ELEMENTS", chunk)
    # the state formula for any size, or the copy for any size
    monkeypatch.setattr(opt_mod.UpdateProbe, "COPY_MAX_ELEMENTS", 0 if from_state else 1 << 40)
    torch.manual_seed(0)
    model = _Mixed()
    opt = make(model.parameters())
    tok, y = torch.randint(0, 50, (12, 7)), torch.randint(0, 5, (12,))
    with dynascope.probe(model, opt, tmp_path / name, every=1, probes=("gradients", "updates"), sentinel=False) as run:
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(tok), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    monkeypatch.undo()
    data = dynascope.load_run(tmp_path / name)
    out = {}
    for metric in ("weight.norm", "update.relative", "update.angle", "update.angle_row", "grad.weight_cos",
                   "grad.weight_cos_rowmax", "grad.norm"):
        out.update({(r.step, metric, r.layer): r.value for r in data.scalars(metric).itertuples()})
    return out


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
], ids=["adamw", "sgd-nesterov"])
def test_probes_in_row_blocks_equal_whole_tensors_and_the_copy(tmp_path, monkeypatch, make):
    """A weight larger than CHUNK_ELEMENTS is read a block of rows at a time (the embedding's 50 x 16 with a
    chunk of 64 elements: blocks of 4 rows) and weights of one shape a few at a time: the update and gradient
    metrics equal those of whole tensors, and those of the copy of w_t."""
    whole = _probe_values(tmp_path, "whole", make, monkeypatch, 1 << 22)
    blocks = _probe_values(tmp_path, "blocks", make, monkeypatch, 64)
    copy = _probe_values(tmp_path, "copy", make, monkeypatch, 1 << 22, from_state=False)
    assert whole.keys() == blocks.keys() == copy.keys() and len(whole) > 30
    assert any(k[1] == "update.angle_row" and k[2] == "emb.weight" for k in whole)
    for k, v in whole.items():
        assert blocks[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
        tol = 1e-3 if k[1].startswith("update.angle") else 1e-4  # small angles: the copy's rounding shows
        assert copy[k] == pytest.approx(v, rel=tol, abs=1e-7), k


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_a_zero_initialised_weight_stays_zero_before_its_first_step(tmp_path, kind, monkeypatch):
    """w_t solved from w_{t+1} and the step carries the step's rounding: entries at that level are zero, so a
    zero-initialised weight has weight.norm 0 and no angle at its first step, as with a copy of w_t."""
    import dynascope
    from dynascope.probes.optimizer import UpdateProbe

    monkeypatch.setattr(UpdateProbe, "COPY_MAX_ELEMENTS", 0)  # the state formula, whatever the size
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    nn.init.zeros_(model[2].weight)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if kind == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    with dynascope.probe(model, opt, tmp_path / "r", every=1, probes=("updates",), sentinel=False) as run:
        for _ in range(2):
            loss = ((model(x) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    data = dynascope.load_run(tmp_path / "r")
    wn = data.scalars("weight.norm")
    first = wn[(wn["step"] == 0) & (wn["layer"] == "2.weight")]["value"].iloc[0]
    assert first == 0.0
    ang = data.scalars("update.angle")
    at0 = ang[(ang["step"] == 0) & (ang["layer"] == "2.weight")]["value"]
    assert len(at0) == 1 and at0.isna().all()
    assert ang[(ang["step"] == 1) & (ang["layer"] == "2.weight")]["value"].iloc[0] > 0


def test_the_sentinel_copies_small_models_and_reads_large_ones_from_state(tmp_path, monkeypatch):
    """Below COPY_MAX_ELEMENTS weights the copy (3 passes) is the sentinel's and the update probe's way, above
    it the state."""
    import dynascope
    from dynascope.probes.optimizer import UpdateProbe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))  # 515 weights
    x, y = torch.randn(8, 12), torch.randn(8, 3)
    copies, probe_state = {}, {}
    for limit in (515, 514):
        monkeypatch.setattr(dynascope.Sentinel, "COPY_MAX_ELEMENTS", limit)
        monkeypatch.setattr(UpdateProbe, "COPY_MAX_ELEMENTS", limit)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        with dynascope.probe(model, opt, tmp_path / f"r{limit}", every=1, probes=("updates",)) as run:
            for _ in range(2):
                loss = ((model(x) - y) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.step(loss=loss)
            copies[limit] = len(run.sentinel._snap)
            probe_state[limit] = run.probes[0]._from_state(opt)
    assert copies == {515: 1, 514: 0}
    assert probe_state == {515: False, 514: True}


FUSED_CASES = [("adam", dict(lr=1e-2, weight_decay=0.1)),
               ("adamw", dict(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)),
               ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
               ("adamw", dict(lr=torch.tensor(1e-2), weight_decay=0.1))]


@pytest.mark.parametrize("kind,kw", FUSED_CASES, ids=[f"{k}-{'-'.join(kw)}" for k, kw in FUSED_CASES])
def test_compiled_update_norms_equal_the_copy_and_the_eager_formula(kind, kw):
    """The sentinel's compiled kernels (dynascope.probes._fused.adam_update_sq_norms, one read of m, v, w):
    1e-4 of the copy, 1e-5 of the eager formula, whatever the param groups' learning rates (a tensor too)."""
    from dynascope.probes._fused import FusedKernels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 3))
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    opt = cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": kw["lr"] * 0.5}], **kw)
    kernels = FusedKernels("on")
    x, y = torch.randn(64, 12), torch.randn(64, 3)
    for _ in range(3):
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        before = {id(p): p.detach().double().clone() for p in model.parameters()}
        opt.step()
        for group in opt.param_groups:
            got = update_norms_from_state(opt, group, group["params"], kernels)
            eager = update_norms_from_state(opt, group, group["params"])
            refs = torch.stack([(p.detach().double() - before[id(p)]).norm() for p in group["params"]])
            torch.testing.assert_close(got.double(), refs, rtol=1e-4, atol=0)
            torch.testing.assert_close(got, eager, rtol=1e-5, atol=0)
    assert kernels.compiled == 2 and not kernels.failures, kernels.describe()  # one per param group
    again = FusedKernels("auto")  # a later run in the same process: every layout compiled, nothing to wait for
    for group in opt.param_groups:
        torch.testing.assert_close(update_norms_from_state(opt, group, group["params"], again),
                                   update_norms_from_state(opt, group, group["params"]), rtol=1e-5, atol=0)
    assert again.compiled == 2 and again.compile_seconds < 0.5
