"""The recipes people run: gradient clipping, warmup + cosine, AdamW with param groups, accumulation and
GradScaler. The recorded gradient is the one the loss produced (architecture invariant 9): after
accumulation and unscaling, before clipping, equal to what ``clip_grad_norm_`` returns; how much clipping
changed it is recorded beside it (``grad.clip_coef``); training stays bit-identical."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dynascope

STEPS = 40


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 4))


def _adamw(model: nn.Module, lr: float = 3e-3) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr)


def _warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _train(run_factory=None, *, clip: float | None = 0.5, accumulate: int = 1, scaler: bool = False,
           lr_jump: tuple[int, float] | None = None, steps: int = STEPS):
    """The recipe; returns (what clip_grad_norm_ returned per step, the reference norm per step (after
    unscaling, before clipping), the final state)."""
    model = _model()
    opt = _adamw(model)
    sched = _warmup_cosine(opt, 10, steps)
    gs = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 4, generator=g)
    returned, reference = [], []
    run = run_factory(model, opt) if run_factory is not None else None
    if run is not None:
        run.start()
    try:
        for step in range(steps):
            if lr_jump is not None and step == lr_jump[0]:
                for group in opt.param_groups:
                    group["initial_lr"] = group.get("initial_lr", group["lr"])
                sched.base_lrs = [b * lr_jump[1] for b in sched.base_lrs]
            opt.zero_grad()
            total = 0.0
            for _ in range(accumulate):
                x = torch.randn(32, 16, generator=g)
                y = (x @ w).argmax(1)
                loss = nn.functional.cross_entropy(model(x), y) / accumulate
                (gs.scale(loss) if gs is not None else loss).backward()
                total += float(loss.detach())
            if gs is not None:
                gs.unscale_(opt)
            with torch.no_grad():
                reference.append(float(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))))
            if clip is not None:
                returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            if gs is not None:
                gs.step(opt)
                gs.update()
            else:
                opt.step()
            sched.step()
            if run is not None:
                run.step(loss=total)
    finally:
        if run is not None:
            run.close()
    state = [p.detach().clone() for p in model.parameters()] + \
        [v.clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return returned, reference, state


@pytest.mark.parametrize("accumulate,scaler", [(1, False), (2, False), (2, True)])
def test_recorded_gradient_norm_is_the_one_before_clipping(tmp_path, accumulate, scaler):
    _, _, plain = _train(accumulate=accumulate, scaler=scaler)
    returned, reference, got = _train(lambda m, o: dynascope.probe(m, o, tmp_path / "r", every=1),
                                      accumulate=accumulate, scaler=scaler)
    for a, b in zip(got, plain):
        assert torch.equal(a, b)  # training bit-identical
    assert max(returned) > 0.5, "the recipe must clip for this test to mean anything"
    data = dynascope.load_run(tmp_path / "r")
    gn = data.scalars("grad.global_norm").sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(gn, returned, rtol=1e-5)
    np.testing.assert_allclose(gn, reference, rtol=1e-5)
    coef = data.scalars("grad.clip_coef").sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(coef, np.minimum(1.0, 0.5 / (np.array(returned) + 1e-6)), rtol=1e-6)
    assert (coef < 1).any() and (coef == 1).any()


def test_without_clipping_the_gradient_is_read_at_the_step_unscaled(tmp_path):
    returned, reference, _ = _train(lambda m, o: dynascope.probe(m, o, tmp_path / "r", every=1), clip=None,
                                    scaler=True)
    assert returned == []
    data = dynascope.load_run(tmp_path / "r")
    gn = data.scalars("grad.global_norm").sort_values("step")["value"].to_numpy()
    np.testing.assert_allclose(gn, reference, rtol=1e-5)
    assert "grad.clip_coef" not in data.metrics()


def test_the_sentinel_sees_a_learning_rate_jump_under_clipping(tmp_path):
    """With the learning rate x100 from step 60, the gradient norm before clipping leaps; the clipped one
    stays at the clip threshold. The sentinel watches the first: an event within 5 steps."""
    _train(lambda m, o: dynascope.probe(m, o, tmp_path / "r", every=10), lr_jump=(60, 100.0), steps=90)
    ev = dynascope.load_run(tmp_path / "r").events()
    after = ev[ev["step"] >= 60]
    assert not after.empty and int(after["step"].min()) <= 65, ev
    spikes = after[after["kind"] == "grad_spike"]  # impossible on clipped norms, which stay at the threshold
    assert not spikes.empty and int(spikes["step"].min()) <= 65, ev
    assert ev[ev["step"] < 60].empty, ev


def test_clipping_is_restored_when_the_session_closes(tmp_path):
    import torch.nn.utils.clip_grad as clip_grad

    original = clip_grad._clip_grads_with_norm_
    model = _model()
    with dynascope.probe(model, _adamw(model), tmp_path / "r"):
        assert clip_grad._clip_grads_with_norm_ is not original
    assert clip_grad._clip_grads_with_norm_ is original
    assert torch.nn.utils.clip_grads_with_norm_ is original


# -- the language-model recipe: a tiny GPT-2, AdamW with decay / no-decay groups, warmup + cosine, clipping ----
GPT_STEPS = 200
GPT_FAULT = 150


def _gpt2_recipe(path, fault: str, clip: float | None = 1.0):
    """Returns (run, what clip_grad_norm_ returned per step)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from dynascope.datasets import load_digits

    x, _ = load_digits()
    tokens = (x * 16).round().long()  # each 8x8 digit as 64 intensity tokens
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=17, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    groups: dict[str, list] = {}
    for n, p in model.named_parameters():
        unit = "h.1" if ".h.1." in n else "rest"  # one block's groups apart, so its lr can be faulted
        groups.setdefault(f"{unit}.{'decay' if p.ndim >= 2 else 'no_decay'}", []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "name": k, "weight_decay": 0.1 if k.endswith(".decay") else 0.0}
                             for k, ps in groups.items()], lr=1e-3)
    sched = _warmup_cosine(opt, 20, GPT_STEPS)
    g = torch.Generator().manual_seed(0)
    returned = []
    with dynascope.probe(model, opt, path, sentinel=dynascope.Sentinel(announce=False)) as run:
        for step in range(GPT_STEPS):
            b = tokens[torch.randint(0, len(tokens), (32,), generator=g)]
            loss = model(input_ids=b, labels=b).loss
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                returned.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            base = [group["lr"] for group in opt.param_groups]
            for group in opt.param_groups:
                if step >= GPT_FAULT and (fault == "global" or group["name"].startswith("h.1.")):
                    group["lr"] *= 100.0
            opt.step()
            for group, lr in zip(opt.param_groups, base):
                group["lr"] = lr
            sched.step()
            run.step(loss=loss.detach())
    return dynascope.load_run(path), returned


@pytest.mark.slow
@pytest.mark.parametrize("fault,clip", [("global", 1.0), ("global", None), ("block", 1.0)])
def test_the_gpt2_recipe_with_a_learning_rate_fault(tmp_path, fault, clip):
    run, returned = _gpt2_recipe(tmp_path / "r", fault, clip)
    if clip is not None:  # the recorded gradient norm is clip_grad_norm_'s value (before clipping)
        gn = run.scalars("grad.global_norm").set_index("step")["value"]
        np.testing.assert_allclose(gn.to_numpy(), np.array(returned)[gn.index.to_numpy()], rtol=1e-5)
        assert max(returned) > 1.0
    ev = run.events()
    assert ev[ev["step"] < GPT_FAULT].empty, ev  # warmup and cosine are quiet
    first = int(ev["step"].min())
    assert GPT_FAULT <= first <= GPT_FAULT + 5, ev
    table = run.forensics(first)
    assert table.iloc[0]["metric"] == "optim.lr" and table.iloc[0]["ratio"] > 30, table.head()
    if fault == "block":
        assert table.iloc[0]["module"].startswith("h.1."), table.head()
        modules = table[table["metric"] != "optim.lr"]
        assert modules.iloc[0]["module"].startswith("transformer.h.1"), modules.head()
    found = dynascope.findings(run)
    lr = found[found["rule"] == "learning_rate_jumps"]
    assert len(lr) and int(lr.iloc[0]["step"]) == GPT_FAULT, found
    arch = found[found["rule"].isin(["variance_grows_with_depth", "grad_norm_depth_ratio"])]
    assert (arch["step"] < GPT_FAULT).all(), arch
