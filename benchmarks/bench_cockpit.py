"""Side by side with Cockpit (Schneider, Dangel and Hennig 2021; ``cockpit-for-pytorch`` 1.0.2 on BackPACK 1.7.1).

Run with a Python that has Cockpit installed, in its own environment (Cockpit needs ``pkg_resources``, i.e.
``setuptools<81``, and must not touch the main environment)::

    python -m venv /tmp/cockpit-env
    /tmp/cockpit-env/bin/pip install torch==2.13.0 cockpit-for-pytorch backpack-for-pytorch "setuptools<81" tqdm
    /tmp/cockpit-env/bin/pip uninstall -y torchvision
    /tmp/cockpit-env/bin/pip install -e . --no-deps
    /tmp/cockpit-env/bin/python benchmarks/bench_cockpit.py            # the tables in docs/benchmarks.md
    /tmp/cockpit-env/bin/python benchmarks/bench_cockpit.py --quick    # a fast smoke run

Without Cockpit it prints how to install it and exits 0.

**Values.** An MLP (tanh) and a small CNN (ReLU, max-pool; no BatchNorm: BackPACK's supported layers) train
with SGD (lr 0.1, no momentum: CABS assumes plain SGD) on fixed synthetic batches of 128. At each of the
first ``--steps`` steps Cockpit's quantities are computed inside its context on the step's batch at the
step's weights; dynascope's functions are called on a plain copy of the same weights with the same batch
(before the step). Printed per quantity: the largest relative difference over the steps. Where Cockpit
approximates (its power iteration ``HessMaxEV``) both are compared with a float64 reference instead
(dynascope's Lanczos in float64 to 1e-10); the trace: Cockpit's ``HessTrace`` (BackPACK's exact Hessian
diagonal, float32), dynascope's exact trace (float32 and float64 products), Hutch++ at a 2% relative
standard error, and the Hutchinson estimate with 50 vectors (dynascope <= 0.2's default), against the trace
of the dense float64 Hessian (``torch.autograd.functional.hessian``).

**Cost.** Per training step, relative to the bare step: Cockpit's "economy" configuration (Alpha, Distance,
GradHist1d, GradNorm, InnerTest, Loss, NormTest, OrthoTest, UpdateSize) at every step and every 10th step,
against dynascope's economy-equivalent set: ``dynascope.probe`` with the sentinel (loss, gradient norm,
update size every step; "no sentinel": ``sentinel=False``, so loss, gradient norm and update size are
recorded only at the recording steps, as Cockpit's economy every 10th step does), the ``gradients``/``updates``
probes and ``distance`` (distance from init), and
``GradientTests(hist2d=False, tic=False)`` (GSNR, norm/inner/orthogonality tests, 1D histogram, on the
step's batch size) at the same schedule. Blocks of ``--cost-steps`` steps run interleaved in one process,
the order rotated each repeat; the table gives the median over ``--repeats`` of each block's time per step
divided by the bare block's of the same repeat. Cockpit's set-up and dynascope's opening and closing of the
run directory (once per run) are outside the timed region; dynascope's flushes inside it.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import backpack  # noqa: F401
        import cockpit
        from backpack import extend
        from cockpit import quantities
        from cockpit.utils import schedules
        from cockpit.utils.configuration import configuration
except ImportError as exc:  # pragma: no cover - depends on the environment
    cockpit = None
    _IMPORT_ERROR = exc

import dynascope  # noqa: E402
from dynascope.diagnostics.hessian import hessian_eigenvalues, hessian_trace  # noqa: E402

B = 128
LR = 0.1


# ----------------------------------------------------------------------------- models and data
def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 10))


MODELS = {"MLP": mlp, "CNN": cnn}


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 1, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g)) for _ in range(n)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """tr H of the mean cross-entropy from the dense float64 Hessian (an independent reference)."""
    from torch.func import functional_call

    m = copy.deepcopy(model).double()
    named = list(m.named_parameters())
    sizes, shapes = [p.numel() for _, p in named], [p.shape for _, p in named]

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = {n: t.view(s) for (n, _), t, s in zip(named, flat.split(sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(m, parts, (x.double(),)), y)

    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    return float(torch.trace(torch.autograd.functional.hessian(f, flat, vectorize=True)))


# ----------------------------------------------------------------------------- values
COCKPIT_TESTS = {"gsnr": "MeanGSNR", "norm_test": "NormTest", "inner_test": "InnerTest", "ortho_test": "OrthoTest",
                 "cabs": "CABS", "eb_criterion": "EarlyStopping", "tic_diag": "TICDiag", "tic_trace": "TICTrace"}


def _cockpit_step(cp: Any, model: nn.Module, loss_fn: nn.Module, per_example: nn.Module,
                  opt: torch.optim.Optimizer, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """One SGD step inside Cockpit's context (its quantities computed in the backward pass)."""
    opt.zero_grad()
    out = model(x)
    loss = loss_fn(out, y)
    losses = per_example(out, y)
    with cp(step, info={"batch_size": B, "individual_losses": losses, "loss": loss, "optimizer": opt}):
        loss.backward(create_graph=cp.create_graph(step))
    opt.step()


def values(name: str, steps: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    torch.manual_seed(seed)
    plain = MODELS[name]().to(dtype)
    model = extend(copy.deepcopy(plain))
    data = [(x.to(dtype), y) for x, y in batches(steps, seed + 1)]
    loss_fn = extend(nn.CrossEntropyLoss())
    per_example = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = schedules.linear(1)
    quants = [quantities.Loss(sched), quantities.GradNorm(sched),
              *([quantities.HessMaxEV(sched)] if dtype == torch.float32 else []),  # its power iteration: float32 only
              quantities.HessTrace(sched), quantities.MeanGSNR(sched), quantities.NormTest(sched),
              quantities.InnerTest(sched), quantities.OrthoTest(sched), quantities.CABS(sched),
              quantities.EarlyStopping(sched), quantities.TICDiag(sched), quantities.TICTrace(sched)]
    cp = cockpit.Cockpit(model.parameters(), quantities=quants)
    have_tests = hasattr(dynascope, "gradient_tests")
    rows: dict[str, list[Any]] = {k: [] for k in ("loss", "grad_norm", "eig_ref", "eig_ds", "trace_ref", "trace_ds32",
                                                  "trace_ds64", "hpp", "hpp_se", "hpp_hvp", "hutch", "hutch_se",
                                                  "trace_hvp", "tests")}
    ref = copy.deepcopy(plain)
    ce = nn.CrossEntropyLoss()
    for step, (x, y) in enumerate(data):
        ref.load_state_dict({k.removeprefix(""): v for k, v in model.state_dict().items()})
        with torch.enable_grad():
            out = ref(x)
            loss = ce(out, y)
            grads = torch.autograd.grad(loss, list(ref.parameters()))
        rows["loss"].append(float(loss.detach()))
        rows["grad_norm"].append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads))))
        rows["eig_ref"].append(float(hessian_eigenvalues(ref, ce, (x, y), k=1, tol=1e-10, dtype=torch.float64,
                                                         progress=False).eigenvalues[0]))
        rows["eig_ds"].append(float(hessian_eigenvalues(ref, ce, (x, y), k=1, tol=1e-6,
                                                        progress=False).eigenvalues[0]))
        rows["trace_ref"].append(dense_trace(ref, x, y))
        t0 = time.perf_counter()
        ex = hessian_trace(ref, ce, (x, y), method="exact")
        rows["trace_hvp"].append((ex.n_hvp, time.perf_counter() - t0))
        rows["trace_ds32"].append(ex.trace)
        rows["trace_ds64"].append(hessian_trace(ref, ce, (x, y), method="exact", dtype=torch.float64).trace)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            t0 = time.perf_counter()
            pp = hessian_trace(ref, ce, (x, y), method="hutch++", seed=step, n_samples=2000)
            rows["hpp_hvp"].append((pp.n_hvp, time.perf_counter() - t0))
            hu = hessian_trace(ref, ce, (x, y), method="hutchinson", n_samples=50, seed=step)
        rows["hpp"].append(pp.trace)
        rows["hpp_se"].append(pp.stderr)
        rows["hutch"].append(hu.trace)
        rows["hutch_se"].append(hu.stderr)
        if have_tests:
            rows["tests"].append(dynascope.gradient_tests(ref, ce, (x, y), lr=LR, hist2d=False))
        _cockpit_step(cp, model, loss_fn, per_example, opt, step, x, y)  # on the same weights and batch
    got = cp.get_output()
    return {"rows": rows, "cockpit": got, "n": n_params(plain), "steps": steps, "have_tests": have_tests}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def print_values(name: str, res: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows, got, steps = res["rows"], res["cockpit"], res["steps"]

    def ck(key: str) -> list[float]:
        out = []
        for s in range(steps):
            v = got[s][key]
            out.append(float(np.sqrt(np.sum(np.square(v)))) if key == "GradNorm" else
                       float(np.sum(v)) if isinstance(v, (list, tuple)) else float(v))
        return out

    table: list[tuple[str, str, str]] = []
    loss_c = ck("Loss")
    table.append(("loss", f"{max(_rel(a, b) for a, b in zip(rows['loss'], loss_c)):.1e}", "identical inputs"))
    gn = ck("GradNorm")
    table.append(("gradient norm", f"{max(_rel(a, b) for a, b in zip(rows['grad_norm'], gn)):.1e}", ""))
    e_d = max(_rel(a, b) for a, b in zip(rows["eig_ds"], rows["eig_ref"]))
    if "HessMaxEV" in got[0]:
        e_c = max(_rel(a, b) for a, b in zip(ck("HessMaxEV"), rows["eig_ref"]))
        table.append(("Hessian max eigenvalue vs float64", f"Cockpit {e_c:.1e}, dynascope {e_d:.1e}",
                      "Cockpit: power iteration to 1e-3"))
    tr_c = ck("HessTrace")
    ref = rows["trace_ref"]
    table.append(("Hessian trace: Cockpit HessTrace vs dense float64",
                  f"{max(_rel(a, b) for a, b in zip(tr_c, ref)):.1e}", "BackPACK DiagHessian, float32"))
    table.append(("Hessian trace: dynascope exact (float32) vs dense float64",
                  f"{max(_rel(a, b) for a, b in zip(rows['trace_ds32'], ref)):.1e}",
                  f"{rows['trace_hvp'][0][0]} products, {statistics.median(t for _, t in rows['trace_hvp']):.2f} s"))
    table.append(("Hessian trace: dynascope exact (float64) vs dense float64",
                  f"{max(_rel(a, b) for a, b in zip(rows['trace_ds64'], ref)):.1e}", ""))
    table.append(("Hessian trace: dynascope exact (float32) vs Cockpit HessTrace",
                  f"{max(_rel(a, b) for a, b in zip(rows['trace_ds32'], tr_c)):.1e}", ""))
    z = [abs(a - b) / s for a, b, s in zip(rows["hpp"], ref, rows["hpp_se"])]
    rel_se = [s / abs(a) for a, s in zip(rows["hpp"], rows["hpp_se"])]
    table.append(("Hessian trace: Hutch++ (2% target) vs dense float64",
                  f"{max(_rel(a, b) for a, b in zip(rows['hpp'], ref)):.1e}",
                  f"rel. stderr <= {max(rel_se):.3f}, |err|/stderr <= {max(z):.2f}, "
                  f"{statistics.median(h for h, _ in rows['hpp_hvp']):.0f} products, "
                  f"{statistics.median(t for _, t in rows['hpp_hvp']):.2f} s"))
    zh = [abs(a - b) / s for a, b, s in zip(rows["hutch"], ref, rows["hutch_se"])]
    table.append(("Hessian trace: Hutchinson, 50 vectors (dynascope <= 0.2)",
                  f"{max(_rel(a, b) for a, b in zip(rows['hutch'], ref)):.1e}",
                  f"|err|/stderr <= {max(zh):.2f}"))
    if res["have_tests"]:
        for field, key in COCKPIT_TESTS.items():
            if key not in got[0]:
                continue
            mine = [float(getattr(t, field)) for t in rows["tests"]]
            theirs = ck(key)
            finite = [(a, b) for a, b in zip(mine, theirs) if math.isfinite(a) and math.isfinite(b)]
            worst = max((_rel(a, b) for a, b in finite), default=float("nan"))
            table.append((f"{field} vs Cockpit {key}", f"{worst:.1e}", f"{len(finite)} steps"))
    print(f"\n{name}: {res['n']} parameters, batch {B}, {steps} steps (max relative difference over the steps)")
    print("| quantity | max rel. difference | note |\n|---|---|---|")
    for q, d, note in table:
        print(f"| {q} | {d} | {note} |")
    return table


# ----------------------------------------------------------------------------- cost
def _cost_block(kind: str, name: str, data: list[tuple[torch.Tensor, torch.Tensor]], every: int,
                tmp: Path) -> float:
    torch.manual_seed(0)
    plain = MODELS[name]()
    ce = nn.CrossEntropyLoss()
    if kind == "bare":
        opt = torch.optim.SGD(plain.parameters(), lr=LR)
        t0 = time.perf_counter()
        for x, y in data:
            opt.zero_grad()
            ce(plain(x), y).backward()
            opt.step()
        return (time.perf_counter() - t0) / len(data)
    if kind == "cockpit":
        model = extend(plain)
        loss_fn = extend(nn.CrossEntropyLoss())
        per_example = nn.CrossEntropyLoss(reduction="none")
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        cp = cockpit.Cockpit(model.parameters(), quantities=configuration("economy", schedules.linear(every)))
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(data):
            _cockpit_step(cp, model, loss_fn, per_example, opt, step, x, y)
        return (time.perf_counter() - t0) / len(data)
    opt = torch.optim.SGD(plain.parameters(), lr=LR)
    scheduled = []
    if hasattr(dynascope, "GradientTests"):
        scheduled.append(dynascope.GradientTests(every=every, batch=data[0], loss_fn=ce, lr=LR, hist2d=False,
                                                 tic=False))
    run_dir = tmp / f"{kind}-{name}-{every}-{time.perf_counter_ns()}"
    with dynascope.probe(plain, opt, run_dir, every=every, probes=("gradients", "updates", "distance"),
                         scheduled=scheduled, sentinel=kind != "dynascope-lean") as run:
        # the steps and a final flush (one transfer, one SQLite transaction) are timed; opening the run
        # directory and closing it (once per run, not per step) are not, as Cockpit's set-up is not
        t0 = time.perf_counter()
        for x, y in data:
            opt.zero_grad()
            loss = ce(plain(x), y)
            loss.backward()
            opt.step()
            run.step(loss)
        run.flush()
        dt = (time.perf_counter() - t0) / len(data)
    shutil.rmtree(run_dir, ignore_errors=True)
    return dt


def cost(name: str, steps: int, repeats: int) -> dict[str, float]:
    data = batches(steps, 7)
    configs = [("bare", 1), ("cockpit", 1), ("cockpit", 10), ("dynascope", 1), ("dynascope", 10),
               ("dynascope-lean", 10)]
    ratios: dict[str, list[float]] = {f"{k} every {e}": [] for k, e in configs[1:]}
    bare_times = []
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _cost_block("cockpit", name, data[:3], 1, Path(d))  # warm-up
        _cost_block("dynascope", name, data[:3], 1, Path(d))
        for r in range(repeats):
            order = configs[r % len(configs):] + configs[:r % len(configs)]
            times = {cfg: _cost_block(cfg[0], name, data, cfg[1], Path(d)) for cfg in order}
            bare = times[("bare", 1)]
            bare_times.append(bare)
            for (k, e), t in times.items():
                if k != "bare":
                    ratios[f"{k} every {e}"].append(t / bare)
    out = {key: statistics.median(v) for key, v in ratios.items()}
    out["bare ms"] = 1e3 * statistics.median(bare_times)
    return out


def histogram_ms(name: str, repeats: int) -> float:
    """Milliseconds one ``gradient_tests`` call spends on the 1D histogram (Cockpit's ``GradHist1d``: every one
    of the ``B x P`` per-example gradient elements built and binned): a call with it minus one without, the two
    interleaved, median over ``repeats`` of 10 calls each."""
    torch.manual_seed(0)
    model = MODELS[name]()
    batch = batches(1, 7)[0]
    ce = nn.CrossEntropyLoss()
    diffs = []
    for _ in range(repeats):
        times = []
        for hist in (True, False):
            dynascope.gradient_tests(model, ce, batch, lr=LR, hist1d=hist, hist2d=False, tic=False)  # warm
            t0 = time.perf_counter()
            for _ in range(10):
                dynascope.gradient_tests(model, ce, batch, lr=LR, hist1d=hist, hist2d=False, tic=False)
            times.append((time.perf_counter() - t0) / 10)
        diffs.append(times[0] - times[1])
    return 1e3 * statistics.median(diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="steps compared for the values")
    ap.add_argument("--cost-steps", type=int, default=40, help="training steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats of the timed blocks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="5 steps, 20-step blocks, 3 repeats")
    ap.add_argument("--no-cost", action="store_true")
    ap.add_argument("--no-values", action="store_true")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--float64", action="store_true", help="values with float64 models and data on both sides")
    args = ap.parse_args()
    if cockpit is None:
        print(f"bench_cockpit: Cockpit is not importable here ({_IMPORT_ERROR}); run it with a Python that has "
              "cockpit-for-pytorch and backpack-for-pytorch installed (see this file's docstring). Skipped.")
        return
    warnings.simplefilter("ignore", UserWarning)  # BackPACK's hooks and create_graph notices
    if args.quick:
        args.steps, args.cost_steps, args.repeats = 5, 20, 3
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, cockpit-for-pytorch {getattr(cockpit, '__version__', '?')}, "
          f"{args.threads} threads; dynascope.gradient_tests: "
          f"{'yes' if hasattr(dynascope, 'gradient_tests') else 'not available in this checkout'}")
    if not args.no_values:
        if args.float64:
            print("values with float64 models and data on both sides (Cockpit's HessMaxEV left out: its power "
                  "iteration compares against float32 constants; the notes' 'float32' labels are the default run's)")
        for name in args.models:
            print_values(name, values(name, args.steps, dtype=torch.float64 if args.float64 else torch.float32))
    if not args.no_cost:
        print(f"\nCost per training step relative to the bare step (median of {args.repeats} interleaved repeats of "
              f"{args.cost_steps}-step blocks, batch {B})")
        print("Added cost = (time per step - bare) / (Cockpit economy every 10th - bare); the histogram floor: the "
              "1D histogram alone (ms per call, every 10th step) as a share of Cockpit's added cost")
        print("| model | bare step | Cockpit economy every step | every 10th | dynascope equivalent every step | "
              "every 10th | every 10th, no sentinel | every 10th: added cost dynascope / Cockpit (no sentinel) | "
              "1D histogram per call | histogram floor |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for name in args.models:
            c = cost(name, args.cost_steps, args.repeats)
            hist = histogram_ms(name, args.repeats)
            added = (c["cockpit every 10"] - 1) * c["bare ms"]  # Cockpit's added ms per step, every 10th
            print(f"| {name} | {c['bare ms']:.2f} ms | {c['cockpit every 1']:.1f}x | {c['cockpit every 10']:.1f}x | "
                  f"{c['dynascope every 1']:.2f}x | {c['dynascope every 10']:.2f}x | "
                  f"{c['dynascope-lean every 10']:.2f}x | "
                  f"{(c['dynascope every 10'] - 1) / (c['cockpit every 10'] - 1):.2f} "
                  f"({(c['dynascope-lean every 10'] - 1) / (c['cockpit every 10'] - 1):.2f}) | {hist:.2f} ms | "
                  f"{hist / 10 / added:.2f} |", flush=True)


if __name__ == "__main__":
    main()
