"""Cockpit's per-example quantities (dynascope.gradient_tests) against Cockpit's formulas written out here on
per-example gradients from an autograd loop over the examples (BackPACK's convention: batch_grad = (1/B) grad l_i
for a mean loss) and the diagonal of a dense Hessian; Cockpit itself is not needed. Tiny MLP, CNN and Pre-LN
transformers (float64) over 5 SGD steps; the BatchNorm fallbacks; the scheduled recorder in a session."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import dynascope
from dynascope.diagnostics.gradient_tests import gradient_tests
from dynascope.diagnostics.per_example import per_example_gradients

QUANTITIES = ("gsnr", "norm_test", "inner_test", "ortho_test", "cabs", "eb_criterion", "tic_trace", "tic_diag")


def _flat_grads(loss: torch.Tensor, ps: list[torch.Tensor]) -> torch.Tensor:
    gs = torch.autograd.grad(loss, ps, allow_unused=True)
    return torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1) for p, g in zip(ps, gs)])


def _dense_hessian_diag(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ps = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in ps]

    def f(flat):
        chunks = torch.split(flat, sizes)
        return loss_fn(functional_call(model, {n: c.reshape(p.shape) for n, c, p in zip(names, chunks, ps)}, (x,)),
                       y)

    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
        h = torch.autograd.functional.hessian(f, torch.cat([p.reshape(-1) for p in ps]), vectorize=True)
    return torch.diagonal(h)


def cockpit_reference(model: nn.Module, loss_fn, x, y, lr: float) -> dict:
    """Cockpit 1.0.2's formulas (cockpit/quantities/*.py) on BackPACK-style per-example gradients from a loop."""
    ps = [p for p in model.parameters() if p.requires_grad]
    B = x.shape[0]
    loss = loss_fn(model(x), y)
    grad = _flat_grads(loss, ps)
    batch_grad = torch.stack([_flat_grads(loss_fn(model(x[i:i + 1]), y[i:i + 1]), ps) for i in range(B)]) / B
    sgs = (batch_grad**2).sum(0)  # BatchGradTransformsHook_SumGradSquared
    batch_l2 = (batch_grad**2).sum(1)  # BatchGradTransformsHook_BatchL2Grad
    batch_dot = batch_grad @ batch_grad.T  # BatchGradTransformsHook_BatchDotGrad
    grad_sq = grad**2
    grad_l2 = grad_sq.sum()
    out = {}
    out["gsnr"] = (grad_sq / (B * sgs - grad_sq + 1e-5)).mean()  # MeanGSNR
    var_l1 = (1 / (B - 1)) * (B**2 * batch_l2.sum() - B * grad_l2)  # NormTest
    out["norm_test"] = (var_l1 / B / grad_l2).sqrt()
    proj = B * batch_dot.sum(1)  # InnerTest
    var_p = (1 / (B - 1)) * ((proj**2).sum() - B * grad_l2**2)
    out["inner_test"] = (var_p / B / grad_l2**2).sqrt()
    var_o = (1 / (B - 1)) * (B**2 * batch_dot.diag().sum() - (proj**2 / grad_l2).sum())  # OrthoTest
    out["ortho_test"] = (var_o / B / grad_l2).sqrt()
    sgs_c = B**2 * sgs  # CABS, EarlyStopping: "compensate BackPACK's 1/B scaling"
    out["cabs"] = lr * (sgs_c - B * grad_sq).sum() / (B * loss)
    diag_var = (sgs_c - B * grad_sq) / (B - 1)
    out["eb_criterion"] = 1 - B * (grad_sq / (diag_var + 1e-5)).mean()
    h = _dense_hessian_diag(model, loss_fn, x, y)  # BackPACK's DiagHessian: exact
    out["tic_diag"] = (B * sgs / (h + 1e-7)).sum()  # TICDiag
    out["tic_trace"] = B * sgs.sum() / (h.sum() + 1e-7)  # TICTrace
    out = {k: float(v.detach()) for k, v in out.items()}
    ig = B * batch_grad  # GradHist1d: individual gradients, clamped, torch.histc
    out["hist1d"] = torch.histc(ig.clamp(-2, 2), bins=100, min=-2, max=2).numpy()
    # GradHist2d (bins (40, 50), range ((-1, 1), (-2, 2))): clip to half a bin inside, Cockpit's histogram2d
    param = torch.cat([p.detach().reshape(-1) for p in ps]).expand(B, -1)
    xs = ig.clamp(-1 + 1 / 40, 1 - 1 / 40).reshape(-1)
    ys = param.clamp(-2 + 2 / 50, 2 - 2 / 50).reshape(-1)
    idx = 50 * ((xs + 1) / (2 / 40)).long() + ((ys + 2) / (4 / 50)).long()
    hist = torch.zeros(40 * 50, dtype=torch.long)
    hist.put_(idx, torch.ones_like(idx), accumulate=True)
    out["hist2d"] = hist.reshape(40, 50).numpy()
    return out


def _assert_matches(res, ref: dict, rel: float, tic: bool = True) -> None:
    for q in QUANTITIES:
        if not tic and q.startswith("tic"):
            continue
        assert getattr(res, q) == pytest.approx(ref[q], rel=rel), q
    np.testing.assert_array_equal(res.hist1d.counts, ref["hist1d"])
    np.testing.assert_array_equal(res.hist2d.counts, ref["hist2d"])
    assert res.hist1d.counts.sum() == ref["hist1d"].sum()
    np.testing.assert_allclose(res.hist1d.edges, np.linspace(-2, 2, 101), atol=1e-12)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Sigmoid(),
                         nn.Flatten(), nn.Linear(16, 3))


class PreLN(nn.Module):
    """A one-block Pre-LN transformer: token and position embeddings, LayerNorm, causal attention (own q/k/v
    projections, or nn.MultiheadAttention, whose weights its forward uses directly), an MLP, a final LayerNorm."""

    def __init__(self, mha: bool = False, vocab: int = 7, d: int = 4, t: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Parameter(0.1 * torch.randn(t, d))
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.mha = mha
        if mha:
            self.att = nn.MultiheadAttention(d, 2, batch_first=True)
        else:
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)
        self.d = d

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx) + self.pos[: idx.shape[1]]
        z = self.ln1(h)
        n, t = idx.shape
        if self.mha:
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            a = self.att(z, z, z, attn_mask=mask, need_weights=False)[0]
        else:
            q, k, v = (u.reshape(n, t, 2, self.d // 2).transpose(1, 2) for u in self.qkv(z).chunk(3, -1))
            a = self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, -1))
        h = h + a
        h = h + self.ff(self.ln2(h))
        return self.head(self.lnf(h))


def lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _image_data(g: torch.Generator, n: int = 10):
    return torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _tabular_data(g: torch.Generator, n: int = 12):
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def _token_data(g: torch.Generator, n: int = 6):
    return torch.randint(0, 7, (n, 4), generator=g), torch.randint(0, 7, (n, 4), generator=g)


CASES = {"mlp": (_mlp, _tabular_data, F.cross_entropy), "cnn": (_cnn, _image_data, F.cross_entropy),
         "transformer": (PreLN, _token_data, lm_loss), "transformer_mha": (lambda: PreLN(mha=True), _token_data,
                                                                           lm_loss)}
STEPS = {"mlp": 5, "cnn": 5, "transformer": 3, "transformer_mha": 2}  # the dense reference Hessians cost


@pytest.mark.parametrize("case", list(CASES))
def test_each_quantity_equals_cockpits_formula_over_training_steps(case):
    make, data, loss_fn = CASES[case]
    torch.manual_seed(0)
    model = make().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS[case]):
        x, y = data(g)
        res = gradient_tests(model, loss_fn, (x, y), lr=0.3, mode="train")
        ref = cockpit_reference(model, loss_fn, x, y, lr=0.3)
        _assert_matches(res, ref, rel=1e-8)
        assert res.notes == ()  # every hook-covered parameter's gradient rebuilt exactly: no fallback taken
        assert "torch.func" not in {v for k, v in res.methods.items() if "att." not in k and k != "pos"}
        assert res.loss == pytest.approx(float(loss_fn(model(x), y).detach()), rel=1e-12)
        # without histograms the hooks never build per-example gradients where a shortcut exists (Goodfellow's
        # factors for one position, the Gram form's norms): the same numbers
        bare = gradient_tests(model, loss_fn, (x, y), lr=0.3, mode="train", hist1d=False, hist2d=False, tic=False)
        for q in QUANTITIES[:6]:
            assert getattr(bare, q) == pytest.approx(ref[q], rel=1e-8), q
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    if case == "transformer":  # every parameter but the position table by module hooks
        assert res.methods["qkv.weight"] == "linear" and res.methods["emb.weight"] == "embedding"
        assert res.methods["ln1.weight"] == "layernorm" and res.methods["pos"] == "torch.func"
    if case == "transformer_mha":  # the attention's weights are used outside a module call: torch.func
        assert res.methods["att.in_proj_weight"] == "torch.func"
        assert res.methods["att.out_proj.weight"] == "torch.func"
    if case == "cnn":
        assert res.methods["0.weight"] == "conv2d"


def test_float32_model_agrees_with_the_float64_reference():
    torch.manual_seed(3)
    model = _cnn()
    x, y = _image_data(torch.Generator().manual_seed(2), n=16)
    res = gradient_tests(model, F.cross_entropy, (x.float(), y), lr=0.1, hist1d=False, hist2d=False, tic=False)
    ref = cockpit_reference(model.double(), F.cross_entropy, x, y, lr=0.1)
    for q in ("gsnr", "norm_test", "inner_test", "ortho_test", "cabs", "eb_criterion"):
        assert getattr(res, q) == pytest.approx(ref[q], rel=1e-4), q
    assert math.isnan(res.tic_diag) and res.hist1d is None and res.hist2d is None


@pytest.mark.parametrize("case", ["mlp", "transformer"])
def test_the_engines_agree(case):
    """Module hooks (Goodfellow / Gram forms), torch.func and the autograd loop give the same statistics."""
    make, data, loss_fn = CASES[case]
    torch.manual_seed(4)
    model = make().double()
    x, y = data(torch.Generator().manual_seed(5))
    runs = {e: per_example_gradients(model, loss_fn, (x, y), engine=e) for e in ("auto", "func", "loop")}
    for e in ("func", "loop"):
        torch.testing.assert_close(runs["auto"].sq_norms, runs[e].sq_norms, rtol=1e-10, atol=0)
        torch.testing.assert_close(runs["auto"].dots, runs[e].dots, rtol=1e-10, atol=1e-15)
        for a, b in zip(runs["auto"].second_moment, runs[e].second_moment):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-15)
    assert set(runs["loop"].methods.values()) == {"loop"}


def test_a_parameter_selection_counts_only_those_parameters():
    torch.manual_seed(14)
    model = PreLN().double()
    x, y = _token_data(torch.Generator().manual_seed(15))
    sel = ["ff", "pos", "ln2.weight"]
    part = per_example_gradients(model, lm_loss, (x, y), params=sel)
    assert set(part.names) == {n for n, _ in model.named_parameters() if n.startswith(("ff.", "pos", "ln2.weight"))}
    g = torch.stack([_flat_grads(lm_loss(model(x[i:i + 1]), y[i:i + 1]), [dict(model.named_parameters())[n]
                                                                          for n in part.names])
                     for i in range(len(x))])
    torch.testing.assert_close(part.sq_norms, g.square().sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(part.dots, g @ g.mean(0), rtol=1e-10, atol=1e-15)


def test_sequence_inputs_use_the_gram_form_when_no_second_moment_is_asked():
    torch.manual_seed(6)
    model = PreLN().double()
    x, y = _token_data(torch.Generator().manual_seed(7))
    gram = per_example_gradients(model, lm_loss, (x, y), second_moment=False)
    loop = per_example_gradients(model, lm_loss, (x, y), engine="loop")
    torch.testing.assert_close(gram.sq_norms, loop.sq_norms, rtol=1e-10, atol=0)
    assert gram.second_moment is None


def test_a_tied_weight_goes_to_torch_func_and_stays_exact():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.tanh(self.emb(idx)))

    torch.manual_seed(8)
    model = Tied().double()
    x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6, 3))
    res = per_example_gradients(model, lm_loss, (x, y))
    loop = per_example_gradients(model, lm_loss, (x, y), engine="loop")
    assert res.methods["emb.weight"] == "torch.func" and res.notes
    torch.testing.assert_close(res.sq_norms, loop.sq_norms, rtol=1e-10, atol=0)


def test_a_sum_loss_is_refused_where_it_would_give_a_wrong_number():
    torch.manual_seed(9)
    model = PreLN().double()  # the position table goes through torch.func, which checks the mean
    x, y = _token_data(torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match="MEAN"):
        gradient_tests(model, lambda o, t: lm_loss(o, t) * t.shape[0], (x, y))


class BNNet(nn.Module):
    def __init__(self, running: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3, track_running_stats=running)
        self.fc = nn.Linear(3 * 36, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_batchnorm_in_training_mode_reports_and_uses_its_fallback():
    torch.manual_seed(11)
    model = BNNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x, y = _image_data(torch.Generator().manual_seed(12))
    res = gradient_tests(model, F.cross_entropy, (x, y), lr=0.1, mode="train")
    assert any("BatchNorm" in n and "running statistics" in n and "bn" in n for n in res.notes)
    assert model.training and model.bn.training  # restored
    # the fallback is what it says: the same numbers as the per-example loop with BatchNorm on its running stats
    model.bn.eval()
    ref = cockpit_reference(model, F.cross_entropy, x, y, lr=0.1)
    model.bn.train()
    _assert_matches(res, ref, rel=1e-8)
    # batchnorm="loop": each example a batch of one, BatchNorm on its own statistics
    loop = gradient_tests(model, F.cross_entropy, (x, y), lr=0.1, mode="train", batchnorm="loop", tic=False)
    ref_loop = cockpit_reference(model, F.cross_entropy, x, y, lr=0.1)  # train mode: the loop uses batches of 1
    for q in ("norm_test", "inner_test", "ortho_test", "gsnr"):
        # the mean of the batch-of-one gradients is not the batch gradient here: compare with the loop's own mean
        assert math.isfinite(getattr(loop, q)), q
    assert any("batch of one" in n for n in loop.notes) and set(loop.methods.values()) == {"loop"}
    stats = per_example_gradients(model, F.cross_entropy, (x, y), mode="train", batchnorm="loop")
    per = torch.stack([_flat_grads(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
                       for i in range(len(x))])
    torch.testing.assert_close(stats.sq_norms, per.square().sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.dots, per @ per.mean(0), rtol=1e-10, atol=1e-15)
    assert math.isfinite(ref_loop["norm_test"])
    # no running statistics: no eval fallback, said so
    with pytest.raises(ValueError, match="running statistics"):
        gradient_tests(BNNet(running=False).double(), F.cross_entropy, (x, y), mode="train")


def test_model_and_rng_are_restored():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.BatchNorm1d(8), nn.Linear(8, 4))
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    F.cross_entropy(model(x), y).backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    res = gradient_tests(model, F.cross_entropy, (x, y), mode="train")  # dropout in the batch forward's masks
    assert res.methods["2.weight"] == "batchnorm" and math.isfinite(res.norm_test)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    # dropout and a parameter torch.func must do: other masks per example, refused rather than mixed
    model.add_module("scale", nn.Identity())
    model.register_parameter("free", nn.Parameter(torch.ones(())))
    with pytest.raises(ValueError, match="dropout"):
        gradient_tests(model, lambda o, t: F.cross_entropy(o * model.free, t), (x, y), mode="train")


def test_bad_arguments():
    model = _mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    with pytest.raises(ValueError, match="engine"):
        gradient_tests(model, F.cross_entropy, (x, y), engine="backpack")
    with pytest.raises(ValueError, match="at least 2"):
        gradient_tests(model, F.cross_entropy, (x[:1], y[:1]))
    with pytest.raises(ValueError, match="lr"):
        gradient_tests(model, F.cross_entropy, (x, y), lr=float("nan"))
    with pytest.raises(TypeError, match="loss_fn"):
        dynascope.GradientTests(every=2, batch=(x, y))
    res = gradient_tests(model, F.cross_entropy, (x, y), tic_max_params=10)
    assert math.isnan(res.tic_trace) and any("tic_max_params" in n for n in res.notes) and math.isnan(res.cabs)


def _train(run_dir, scheduled, steps: int = 7, refs_at: tuple[int, ...] = ()):
    torch.manual_seed(21)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(22)
    data = [(torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]
    ctx = dynascope.probe(model, opt, run_dir, every=2, scheduled=scheduled, on_diagnostic_error="raise") \
        if run_dir is not None else None
    run = ctx.__enter__() if ctx is not None else None
    refs = {}
    for s, (x, y) in enumerate(data):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if run is not None:
            run.step(loss=loss)
        if s in refs_at:
            refs[s] = gradient_tests(model, F.cross_entropy, HELD, lr=0.05)
    if ctx is not None:
        ctx.__exit__(None, None, None)
    return model, opt, refs


HELD = (torch.randn(12, 2, 6, 6, generator=torch.Generator().manual_seed(23)), torch.arange(12) % 3)


def test_recorder_rows_equal_the_function_and_training_is_bit_identical(tmp_path):
    plain, plain_opt, _ = _train(None, [])
    model, opt, refs = _train(tmp_path / "run", [dynascope.GradientTests(every=3, batch=HELD,
                                                                         loss_fn=F.cross_entropy)],
                              refs_at=(0, 3, 6))
    for a, b in zip(plain.parameters(), model.parameters()):
        assert torch.equal(a, b)
    data = dynascope.load_run(tmp_path / "run")
    for metric, attr in (("gradtest.gsnr", "gsnr"), ("gradtest.norm_test", "norm_test"),
                         ("gradtest.inner_test", "inner_test"), ("gradtest.ortho_test", "ortho_test"),
                         ("gradtest.cabs", "cabs"), ("gradtest.eb", "eb_criterion"),
                         ("gradtest.tic_trace", "tic_trace"), ("gradtest.tic_diag", "tic_diag"),
                         ("gradtest.grad_norm", "grad_norm")):
        df = data.scalars(metric)
        assert sorted(df["step"]) == [0, 3, 6], metric
        for s, v in zip(df["step"], df["value"]):
            assert v == pytest.approx(getattr(refs[s], attr), rel=1e-6), (metric, s)
    assert set(data.scalars("gradtest.batch_size")["value"]) == {12.0}
    assert not data.has("diagnostic.failed")
    assert sorted(data.artifacts("gradtest.hist1d")["step"]) == [0, 3, 6]
    for s in (0, 3, 6):
        h1, _ = data.load_artifact("gradtest.hist1d", s)
        np.testing.assert_array_equal(h1["counts"], refs[s].hist1d.counts)
        h2, _ = data.load_artifact("gradtest.hist2d", s)
        np.testing.assert_array_equal(h2["counts"], refs[s].hist2d.counts)
        assert h2["counts"].sum() == 12 * sum(p.numel() for p in model.parameters())


def test_report_figures_draw_the_recorded_values(tmp_path):
    from dynascope.reports.figures.gradient_tests import gradient_histogram_figure, gradient_tests_figure

    _train(tmp_path / "run", [dynascope.GradientTests(every=2, batch=HELD, loss_fn=F.cross_entropy, tic=False,
                                                      hist2d=False)], steps=5)
    run = dynascope.load_run(tmp_path / "run")
    fig = gradient_tests_figure([run])
    for ax, metric in zip(fig.axes, ("gradtest.norm_test", "gradtest.inner_test", "gradtest.ortho_test",
                                     "gradtest.gsnr")):
        np.testing.assert_allclose(ax.lines[0].get_ydata(), run.scalars(metric)["value"].to_numpy())
    hist = gradient_histogram_figure([run])
    arrays, _ = run.load_artifact("gradtest.hist1d", 4)
    (stairs,) = hist.axes[0].patches
    np.testing.assert_allclose(stairs.get_data().values, arrays["counts"] / arrays["counts"].sum())
    store_empty = tmp_path / "empty"
    from dynascope.store import RunStore

    st = RunStore(store_empty)
    st.write_scalars([(0, "loss", "", 1.0)])
    st.close()
    assert gradient_tests_figure([dynascope.load_run(store_empty)]) is None


def test_gradient_tests_on_the_steps_own_batch(tmp_path):
    """batch="step": each due step's minibatch (run.step(loss, batch=...)), measured at the weights after the
    step; equal to gradient_tests on that batch and those weights; a due step without a batch is recorded as
    failed and training goes on, bit-identical."""
    def train(run_dir, scheduled):
        torch.manual_seed(0)
        model = _mlp().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(3)
        batches = [(torch.randn(10, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g))
                   for _ in range(4)]
        want = {}
        ctx = dynascope.probe(model, opt, run_dir, scheduled=scheduled, sentinel=False) if scheduled else None
        run = ctx.__enter__() if ctx else None
        try:
            for step, (x, y) in enumerate(batches):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if run is None:
                    want[step] = gradient_tests(model, F.cross_entropy, (x, y), lr=0.1, hist1d=False, hist2d=False)
                elif step == 3:
                    run.step(loss)  # no batch
                else:
                    run.step(loss, batch=(x, y))
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
        return model, want

    base, want = train(None, None)
    with pytest.warns(RuntimeWarning, match="batch='step'"):
        model, _ = train(tmp_path / "r", [dynascope.GradientTests(every=1, batch="step", loss_fn=F.cross_entropy)])
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters()))
    data = dynascope.load_run(tmp_path / "r")
    for metric, attr in (("gradtest.gsnr", "gsnr"), ("gradtest.norm_test", "norm_test"),
                         ("gradtest.cabs", "cabs"), ("gradtest.eb", "eb_criterion")):
        got = data.scalars(metric)
        assert list(got["step"]) == [0, 1, 2]
        for s, v in zip(got["step"], got["value"]):
            assert v == pytest.approx(getattr(want[s], attr), rel=1e-6), (metric, s)
    failed = data.scalars("diagnostic.failed")
    assert list(failed["step"]) == [3] and list(failed["layer"]) == ["GradientTests"]
    with pytest.raises(ValueError, match="batch must be \\(inputs, targets\\) or 'step', got 'steps'"):
        dynascope.GradientTests(every=1, batch="steps", loss_fn=F.cross_entropy)
