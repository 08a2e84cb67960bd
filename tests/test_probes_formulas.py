"""Every live metric against an independent float64 reference computed in the
test from tensors captured separately (own forward hooks, copies of the
gradients and of the weights before and after ``optimizer.step()``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynascope
from dynascope.core.names import clean_name, select_modules

ACT = ("act.mean", "act.var", "act.channel_sq_mean", "act.channel_var", "act.absmax", "act.zero_frac")


# ----------------------------------------------------------------------------- models
class Block(nn.Module):
    """A composite residual block: its own output appears as a layer too."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.conv(x)))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)  # modifies bn's output after its hook ran
        self.blocks = nn.Sequential(Block(6), Block(6))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24, 7)
        self.shared = nn.Linear(7, 7)  # called twice per forward
        self.head = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.relu(self.bn(self.stem(x))))
        h = self.fc(self.pool(h).flatten(1))
        h = self.shared(torch.tanh(self.shared(h)))
        return self.head(h)


class SeqNet(nn.Module):
    """Sequence outputs (N, L, D): channel dim last; Conv1d output (N, C, L): channel dim 1."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.out = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.ln(x))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.out(F.gelu(h)).mean(1)


def ref_channel_dim(name: str, module: nn.Module, x: torch.Tensor) -> int:
    if x.ndim == 4 or isinstance(module, (nn.Conv1d, nn.BatchNorm1d)) and x.ndim == 3:
        return 1
    return x.ndim - 1


# ----------------------------------------------------------------------------- harness
def train_with_reference(model, opt, batches, run_dir, every=1, probes=("activations", "gradients", "updates"),
                         **options):
    """Train, probing with dynascope, while capturing float64 copies of
    activations, grads and weights before/after each step independently."""
    names = dict(select_modules(model))
    outs: dict[str, list[torch.Tensor]] = {}

    def capture(name):
        def hook(mod, inp, out):
            outs.setdefault(name, []).append(out.detach().double().clone())
        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in names.items()]
    refs = []
    params = list(model.named_parameters())
    with dynascope.probe(model, opt, run_dir, every=every, probes=probes, **options) as run:
        for x, y in batches:
            outs.clear()
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            before = {n: p.detach().double().clone() for n, p in params}
            grads = {n: p.grad.detach().double().clone() for n, p in params if p.grad is not None}
            lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
            opt.step()
            after = {n: p.detach().double().clone() for n, p in params}
            refs.append(dict(acts={k: list(v) for k, v in outs.items()}, before=before, grads=grads, after=after,
                             loss=float(loss), lrs={n: lrs[id(p)] for n, p in params}))
            run.step(loss=loss, extra=2.5 * len(refs))
    for h in handles:
        h.remove()
    return dynascope.load_run(run_dir), refs, names


def value(data, metric, layer, step):
    df = data.scalars(metric, layer)
    got = df[df["step"] == step]["value"].to_numpy()
    assert len(got) == 1, f"{metric}/{layer} at step {step}: {len(got)} rows"
    return float(got[0])


def ref_act(module, name, xs):
    cdim = ref_channel_dim(name, module, xs[0])
    rows = np.concatenate([np.moveaxis(x.numpy(), cdim, -1).reshape(-1, x.shape[cdim]) for x in xs], axis=0)
    mu = rows.mean(0)
    var = rows.var(0)  # ddof=0
    allv = rows.reshape(-1)
    return {
        "act.mean": allv.mean(), "act.var": allv.var(), "act.channel_sq_mean": (mu ** 2).mean(),
        "act.channel_var": var.mean(), "act.absmax": np.abs(allv).max(), "act.zero_frac": (allv == 0).mean(),
    }


def close(got, want, rtol=2e-5, atol=1e-6, what=""):
    assert got == pytest.approx(want, rel=rtol, abs=atol), f"{what}: got {got!r}, reference {want!r}"


def conv_batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, 5, 5, generator=g) * 2 + 0.5, torch.randint(0, 5, (6,), generator=g)) for _ in range(n)]


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", ["conv", "seq"])
def test_activation_statistics_match_float64_reference(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "conv":
        model, batches = ConvNet(), conv_batches()
    else:
        model = SeqNet()
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randn(4, 5, 8, generator=g) * 3 - 1, torch.randint(0, 3, (4,), generator=g))
                   for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data, refs, names = train_with_reference(model, opt, batches, tmp_path / "r")
    layers = set(data.layers("act.mean"))
    assert layers == set(names), f"activation layers {sorted(layers)} != non-container modules {sorted(names)}"
    if kind == "conv":
        assert {"blocks.0", "blocks.1", "shared", "relu"} <= layers and "blocks" not in layers and "" not in layers
        assert len(refs[0]["acts"]["shared"]) == 2  # called twice: merged exactly (Chan)
    for step, ref in enumerate(refs):
        for name, xs in ref["acts"].items():
            want = ref_act(names[name], name, xs)
            for m in ACT:
                close(value(data, m, name, step), want[m], what=f"{m}/{name}@{step}")
    if kind == "conv":  # the in-place ReLU zeroes part of bn's output: the bn hook saw it before
        assert value(data, "act.zero_frac", "bn", 0) == 0.0
        assert value(data, "act.zero_frac", "relu", 0) > 0.2


def test_shared_module_two_calls_different_scales(tmp_path):
    """Chan's merge of two calls with very different means is exact (no raw sum-of-squares cancellation)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lin(x) + self.lin(x * 0.001 + 1000.0) * 1e-3)

    torch.manual_seed(0)
    model = Twice()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g))]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data, refs, names = train_with_reference(model, opt, batches, tmp_path / "r")
    want = ref_act(names["lin"], "lin", refs[0]["acts"]["lin"])
    for m in ACT:
        close(value(data, m, "lin", 0), want[m], rtol=1e-4, what=m)


def test_gradient_weight_update_metrics_sgd(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    data, refs, _ = train_with_reference(model, opt, conv_batches(4), tmp_path / "r")
    check_param_metrics(model, data, refs, adam=False)


def test_gradient_weight_update_metrics_adamw(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    data, refs, _ = train_with_reference(model, opt, conv_batches(4), tmp_path / "r", all_params=True)
    check_param_metrics(model, data, refs, adam=True, all_params=True)


def ref_angle(a: np.ndarray, b: np.ndarray) -> float:
    """arccos-free float64 angle: 2 atan2(||a^ - b^||, ||a^ + b^||)."""
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(2 * math.atan2(np.linalg.norm(ua - ub), np.linalg.norm(ua + ub)))


def adamp_scale_invariant(grad: torch.Tensor, w: torch.Tensor, delta=0.1, eps=1e-8) -> float:
    """clovaai/AdamP ``_projection``: channel view then layer view."""
    for view in (lambda t: t.view(t.size(0), -1), lambda t: t.view(1, -1)):
        cos = F.cosine_similarity(view(grad), view(w), dim=1, eps=eps).abs()
        if cos.max() < delta / math.sqrt(view(w).size(1)):
            return 1.0
    return 0.0


def check_param_metrics(model, data, refs, adam: bool, all_params: bool = False):
    names = [n for n, _ in model.named_parameters()]
    tracked = [n for n, p in model.named_parameters() if p.ndim >= 2 or all_params]
    assert set(data.layers("weight.norm")) == set(tracked)
    n_invariant = 0
    for step, ref in enumerate(refs):
        gsq = 0.0
        for n in names:
            g = ref["grads"][n].numpy()
            gsq += float((g ** 2).sum())
            close(value(data, "grad.norm", n, step), np.linalg.norm(g), what=f"grad.norm/{n}")
        close(value(data, "grad.global_norm", "", step), math.sqrt(gsq), what="grad.global_norm")
        for mname, _module in select_modules(model):
            ps = [n for n, _ in model.named_parameters() if n.startswith(mname + ".")]
            if ps:
                want = math.sqrt(sum(float((ref["grads"][n].numpy() ** 2).sum()) for n in ps))
                close(value(data, "grad.norm", mname, step), want, what=f"grad.norm/{mname}")
        assert value(data, "loss", "", step) == pytest.approx(ref["loss"], rel=1e-6)
        assert value(data, "extra", "", step) == 2.5 * (step + 1)
        for n in tracked:
            w0, w1, g = ref["before"][n], ref["after"][n], ref["grads"][n]
            a, b, gg = w0.numpy().reshape(-1), w1.numpy().reshape(-1), g.numpy().reshape(-1)
            wn = np.linalg.norm(a)
            close(value(data, "weight.norm", n, step), wn, what=f"weight.norm/{n}")
            rows0 = w0.reshape(w0.shape[0], -1).numpy() if w0.ndim >= 2 else a[None]
            rows1 = w1.reshape(w1.shape[0], -1).numpy() if w1.ndim >= 2 else b[None]
            row_angles = [ref_angle(r0, r1) for r0, r1 in zip(rows0, rows1) if np.linalg.norm(r0) > 0]
            if row_angles:
                close(value(data, "update.angle_row", n, step), float(np.mean(row_angles)), rtol=1e-4, atol=1e-7,
                      what=f"update.angle_row/{n}")
            else:  # an all-zero weight (a BN bias at init): no direction, recorded as NaN
                assert math.isnan(value(data, "update.angle_row", n, step))
            if wn == 0:
                assert math.isnan(value(data, "update.angle", n, step))
                assert math.isinf(value(data, "lr.effective", n, step))
                continue
            close(value(data, "update.relative", n, step), np.linalg.norm(b - a) / wn, rtol=1e-4,
                  what=f"update.relative/{n}")
            close(value(data, "update.angle", n, step), ref_angle(a, b), rtol=1e-4, atol=1e-7,
                  what=f"update.angle/{n}")
            lr = ref["lrs"][n]
            close(value(data, "lr.effective", n, step), lr / wn if adam else lr / wn ** 2, rtol=1e-5,
                  what=f"lr.effective/{n}")
            # eps-clamped norms (AdamP's cosine_similarity, eps=1e-8): a BN-cancelled bias has ||g|| ~ 1e-9
            cos = float(gg @ a / (max(np.linalg.norm(gg), 1e-8) * max(wn, 1e-8)))
            close(value(data, "grad.weight_cos", n, step), cos, rtol=1e-4, atol=1e-6, what=f"grad.weight_cos/{n}")
            g_rows = g.reshape(g.shape[0], -1).numpy() if g.ndim >= 2 else gg[None]
            rowmax = max(abs(float(gr @ wr)) / (max(np.linalg.norm(gr), 1e-8) * max(np.linalg.norm(wr), 1e-8))
                         for gr, wr in zip(g_rows, rows0))
            close(value(data, "grad.weight_cos_rowmax", n, step), rowmax, rtol=1e-4, atol=1e-6,
                  what=f"grad.weight_cos_rowmax/{n}")
            close(value(data, "grad.weight_cos_threshold", n, step), 0.1 / math.sqrt(rows0.shape[1]), what="thr")
            want_inv = adamp_scale_invariant(g, w0)
            assert value(data, "scale_invariant", n, step) == want_inv, f"scale_invariant/{n}@{step}"
            n_invariant += want_inv
    # the BN-fed convolutions are scale-invariant, the head is not: the test separates them
    assert value(data, "scale_invariant", "blocks.0.conv.weight", 0) == 1.0
    assert value(data, "scale_invariant", "head.weight", 0) == 0.0
    assert n_invariant > 0


@pytest.mark.parametrize("angle", [1e-4, 3e-3, 0.5])
def test_update_angle_accurate_for_tiny_rotations(tmp_path, angle):
    """A 1e-4 rad rotation of a float32 weight: the probe matches the float64
    arccos-free angle of the tensors actually stored (arccos in float32 could not)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 32, bias=False)
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    w = lin.weight.detach().clone()
    # per row: rotate by `angle` in the plane of w_row and a random orthogonal direction (norm preserved)
    r = torch.randn_like(w)
    r = r - (r * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
    r = r / r.norm(dim=1, keepdim=True) * w.norm(dim=1, keepdim=True)
    target = math.cos(angle) * w + math.sin(angle) * r
    with dynascope.probe(model, opt, tmp_path / "r", every=1) as run:
        lin.weight.grad = (w - target)  # SGD lr=1: w <- w - grad = target
        w0 = lin.weight.detach().double().clone()
        opt.step()
        w1 = lin.weight.detach().double().clone()
        run.step()
    data = dynascope.load_run(tmp_path / "r")
    want = ref_angle(w0.numpy().ravel(), w1.numpy().ravel())
    assert abs(want - angle) < 1e-5 * max(angle, 1e-3) * 100
    got = value(data, "update.angle", "0.weight", 0)
    assert got == pytest.approx(want, rel=1e-3), (got, want)
    rows = [ref_angle(a, b) for a, b in zip(w0.numpy(), w1.numpy())]
    assert value(data, "update.angle_row", "0.weight", 0) == pytest.approx(np.mean(rows), rel=1e-3)
    # float32 arccos of the cosine is far off for 1e-4 rad: the reference is not trivially met
    if angle == 1e-4:
        c = F.cosine_similarity(w0.float().ravel(), w1.float().ravel(), dim=0)
        assert abs(float(torch.arccos(c.clamp(-1, 1))) - want) > 1e-5


def test_every_n_records_probes_on_due_steps_and_scalars_every_step(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data, refs, _ = train_with_reference(model, opt, conv_batches(7), tmp_path / "r", every=3)
    assert list(data.steps("loss")) == list(range(7))
    assert list(data.steps("extra")) == list(range(7))
    for m in ("act.mean", "grad.norm", "update.angle", "lr.effective", "scale_invariant"):
        assert list(data.steps(m)) == [0, 3, 6], m
    # the recorded step's values are that step's (not a neighbour's)
    for s in (3, 6):
        close(value(data, "grad.global_norm", "", s),
              math.sqrt(sum(float((g.numpy() ** 2).sum()) for g in refs[s]["grads"].values())), what="gn")


def test_module_filter_and_probe_subset(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    # sentinel=False: the always-on sentinel would add its update.norm rows (tests/test_sentinel.py)
    with dynascope.probe(model, opt, tmp_path / "r", every=1, probes=("activations",), modules=nn.Conv2d,
                         sentinel=False) as run:
        for x, y in conv_batches(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    data = dynascope.load_run(tmp_path / "r")
    assert set(data.layers("act.mean")) == {"stem", "blocks.0.conv", "blocks.1.conv"}
    assert not any(m.startswith(("grad.", "update.", "weight.")) for m in data.metrics())
    with dynascope.probe(model, opt, tmp_path / "r2", every=1, modules="blocks.*") as run:
        x, y = conv_batches(1)[0]
        F.cross_entropy(model(x), y).backward()
        opt.step()
        run.step()
    assert set(dynascope.load_run(tmp_path / "r2").layers("act.mean")) == {
        "blocks.0", "blocks.0.conv", "blocks.0.bn", "blocks.0.act", "blocks.1", "blocks.1.conv", "blocks.1.bn",
        "blocks.1.act"}


def test_no_optimizer_records_gradients_at_step(tmp_path):
    torch.manual_seed(0)
    model = ConvNet()
    x, y = conv_batches(1)[0]
    with dynascope.probe(model, None, tmp_path / "r", every=1) as run:
        F.cross_entropy(model(x), y).backward()
        run.step()
    data = dynascope.load_run(tmp_path / "r")
    want = model.head.weight.grad.double().norm().item()
    close(value(data, "grad.norm", "head.weight", 0), want, what="grad.norm")
    assert not any(m.startswith(("update.", "lr.")) for m in data.metrics())


# ----------------------------------------------------------------------------- names
def test_clean_name_strips_wrapper_segments():
    assert clean_name("_orig_mod.layer1.0.conv") == "layer1.0.conv"
    assert clean_name("module.layer1.weight", wrapped=True) == "layer1.weight"
    assert clean_name("module.layer1.weight") == "module.layer1.weight"  # a user module named `module` stays
    assert clean_name("_fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.fc") == "blocks.0.fc"
    assert clean_name("module._orig_mod.fc.weight", wrapped=True) == "fc.weight"


class DistributedDataParallel(nn.Module):
    """Stand-in with DDP's class name and child attribute (a real DDP needs a process group)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *a, **k):
        return self.module(*a, **k)


@pytest.mark.parametrize("wrapper", ["ddp", "compile"])
def test_wrapped_model_records_the_inner_names(tmp_path, wrapper):
    torch.manual_seed(0)
    inner = ConvNet()
    if wrapper == "ddp":
        model = DistributedDataParallel(inner)
    else:
        model = torch.compile(inner, backend="eager")  # eager backend: the wrapper, no C++ compiler needed
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with dynascope.probe(model, opt, tmp_path / "r", every=1) as run:
        for x, y in conv_batches(2):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    data = dynascope.load_run(tmp_path / "r")
    want_params = {n for n, p in inner.named_parameters() if p.ndim >= 2}
    assert set(data.layers("weight.norm")) == want_params
    assert set(data.layers("grad.norm")) >= {n for n, _ in inner.named_parameters()}
    if wrapper == "ddp":  # hooks fire on the inner modules in eager mode
        assert set(data.layers("act.mean")) == {n for n, _ in select_modules(inner)}
    for layers in (data.layers("grad.norm"), data.layers("weight.norm")):
        assert not any(n.startswith(("module.", "_orig_mod")) for n in layers), layers


def test_large_activations_with_large_mean(tmp_path):
    """Outputs above 32k entries take the shifted-sums path on CPU; a mean 200x the
    standard deviation must not cancel (raw float32 sums of squares would lose ~1e-2)."""

    class Offset(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.lin = nn.Linear(16, 16)
            self.head = nn.Linear(4, 2)
            self.mid = nn.Linear(16, 800)  # (8, 800) = 6400 entries: the float64-sums band
            with torch.no_grad():
                self.conv.bias.fill_(200.0)  # conv output (8, 4, 40, 40): 51200 entries, mean/std ~ 200

        def forward(self, x):
            h = self.conv(x)
            s = self.lin(h.flatten(2)[..., :16])  # (8, 4, 16), inputs ~ 200: a large mean per channel
            return self.head(h.mean((2, 3)) + s.mean(-1) + self.mid(s.mean(1)).mean(-1, keepdim=True))

    torch.manual_seed(0)
    model = Offset()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 40, 40, generator=g), torch.randint(0, 2, (8,), generator=g))]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    data, refs, names = train_with_reference(model, opt, batches, tmp_path / "r")
    conv_out = refs[0]["acts"]["conv"][0]
    assert conv_out.numel() > 32768
    assert conv_out.mean() / conv_out.std() > 100
    assert refs[0]["acts"]["mid"][0].numel() == 6400
    for name in ("conv", "lin", "mid"):
        want = ref_act(names[name], name, refs[0]["acts"][name])
        for m in ACT:
            close(value(data, m, name, 0), want[m], rtol=1e-4, what=f"{m}/{name}")


def test_fast_nonzero_count_matches_count_nonzero_on_large_cpu_outputs():
    from dynascope.probes.activations import _count_nonzero

    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(8, 16, 32, 32, generator=g))  # about half exact zeros, > _SMALL_NUMEL entries
    x[0, 0, 0, :3] = torch.tensor([float("inf"), -float("inf"), -0.0])
    assert int(_count_nonzero(x)) == int(torch.count_nonzero(x))


def test_zero_fraction_of_an_output_with_nan_is_nan_on_every_path(tmp_path):
    for width in (8, 16384):  # count_nonzero path and the fast CPU path
        model = nn.Sequential(nn.Linear(4, width), nn.ReLU())
        x = torch.randn(2, 4)
        x[0, 0] = float("nan")
        with dynascope.probe(model, None, tmp_path / f"w{width}", every=1) as run:
            model(x)
            run.step(loss=0.0)
        zf = dynascope.load_run(tmp_path / f"w{width}").scalars("act.zero_frac")
        assert zf["value"].isna().all() and len(zf) == 2


# ----------------------------------------------------------------------------- zero rows, AdamP views
class PaddedEmbedding(nn.Module):
    """A BERT-style token embedding: the ``padding_idx`` row is zero and gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8, padding_idx=0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x).mean(1))


def test_update_angle_row_leaves_the_zero_padding_row_out(tmp_path):
    torch.manual_seed(0)
    model = PaddedEmbedding()
    assert float(model.emb.weight.detach()[0].abs().sum()) == 0.0
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randint(1, 12, (4, 6), generator=g)
        x[:, 4:] = 0  # padded positions
        batches.append((x, torch.randint(0, 3, (4,), generator=g)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    data, refs, _ = train_with_reference(model, opt, batches, tmp_path / "r")
    for step, ref in enumerate(refs):
        w0, w1 = ref["before"]["emb.weight"].numpy(), ref["after"]["emb.weight"].numpy()
        assert not w0[0].any() and not w1[0].any()  # the padding row stays zero
        want = np.mean([ref_angle(a, b) for a, b in zip(w0[1:], w1[1:])])
        got = value(data, "update.angle_row", "emb.weight", step)
        assert math.isfinite(got), f"update.angle_row/emb.weight@{step} is {got}: the zero row was averaged in"
        close(got, float(want), rtol=1e-4, atol=1e-7, what=f"update.angle_row@{step}")
        close(value(data, "update.angle", "emb.weight", step), ref_angle(w0.ravel(), w1.ravel()), rtol=1e-4,
              atol=1e-7, what="update.angle")


def _probe_given_gradient(tmp_path, w: torch.Tensor, g: torch.Tensor):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = nn.Sequential(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with dynascope.probe(model, opt, tmp_path, every=1) as run:
        lin.weight.grad = g.clone()
        opt.step()
        run.step()
    data = dynascope.load_run(tmp_path)
    return {m: value(data, m, "0.weight", 0) for m in ("scale_invariant", "grad.weight_cos", "grad.weight_cos_rowmax")}


def test_scale_invariance_channel_view_alone_passes(tmp_path):
    """Every row nearly orthogonal to its weight row (the channel view passes) but all tilted the same way, so
    the whole-layer cosine is above delta / sqrt(numel) (the layer view fails): invariant by the channel view."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 16, 25
    w = torch.randn(rows, cols, generator=g)
    r = torch.randn(rows, cols, generator=g)
    r = r - (r * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w  # orthogonal to each row
    target_cos = 0.5 * 0.1 / math.sqrt(cols)  # half the channel threshold
    grad = r / r.norm(dim=1, keepdim=True) + target_cos / math.sqrt(1 - target_cos ** 2) * w / w.norm(dim=1,
                                                                                                          keepdim=True)
    ws, gs = w.double(), grad.double()
    row_cos = (F.cosine_similarity(gs, ws, dim=1)).abs()
    layer_cos = float(F.cosine_similarity(gs.ravel(), ws.ravel(), dim=0))
    assert row_cos.max() < 0.1 / math.sqrt(cols) and abs(layer_cos) > 0.1 / math.sqrt(rows * cols)
    assert adamp_scale_invariant(grad, w) == 1.0
    got = _probe_given_gradient(tmp_path / "r", w, grad)
    assert got["scale_invariant"] == 1.0
    close(got["grad.weight_cos_rowmax"], float(row_cos.max()), rtol=1e-4, what="rowmax")
    close(got["grad.weight_cos"], layer_cos, rtol=1e-4, what="cos")


def test_scale_invariance_layer_view_alone_passes(tmp_path):
    """One row's gradient is parallel to its weight row (the channel view fails), another row's anti-parallel
    so that <g, w> = 0 over the layer (the layer view passes): invariant by the layer view."""
    g = torch.Generator().manual_seed(1)
    rows, cols = 6, 10
    w = torch.randn(rows, cols, generator=g)
    grad = torch.zeros(rows, cols)
    grad[0] = w[0]
    grad[1] = -w[1] * (w[0] @ w[0]) / (w[1] @ w[1])
    ws, gs = w.double(), grad.double()
    assert float(F.cosine_similarity(gs, ws, dim=1).abs().max()) > 0.999
    assert abs(float(F.cosine_similarity(gs.ravel(), ws.ravel(), dim=0))) < 1e-6
    assert adamp_scale_invariant(grad, w) == 1.0
    got = _probe_given_gradient(tmp_path / "r", w, grad)
    assert got["scale_invariant"] == 1.0
    assert got["grad.weight_cos_rowmax"] == pytest.approx(1.0, rel=1e-5)
    # neither view passes once the cancelling row is gone
    grad[1] = 0.0
    assert adamp_scale_invariant(grad, w) == 0.0
    assert _probe_given_gradient(tmp_path / "r2", w, grad)["scale_invariant"] == 0.0
