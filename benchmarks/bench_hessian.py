"""Curvature speed: dynascope against PyHessian 0.1, side by side in one process.

Same ~100k-parameter CNN (BatchNorm, eval mode), same batch of 256, CPU, 2
threads. Accuracy is matched: each method's tolerance is the loosest on a
ladder whose result is within ``--rel`` (default 1e-4) relative error of a
float64 reference for every requested eigenvalue; then each is timed
(median of ``--repeats``). HVP counts are printed beside the times.

    python benchmarks/bench_hessian.py            # top-1, top-5, trace
    python benchmarks/bench_hessian.py --hvp      # HVP implementations only
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, linearize

from dynascope.diagnostics.hessian import HessianOperator, hessian_eigenvalues, hessian_trace


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
    )


def make_problem(seed: int = 0, n: int = 256, train_steps: int = 30):
    """CNN trained a few SGD steps on a random-teacher task (so the spectrum has
    its usual outliers), and a fixed batch of ``n`` 3x16x16 images."""
    model = make_cnn(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, 16, 16, generator=g)
    teacher = nn.Linear(3 * 16 * 16, 10)
    with torch.no_grad():
        y = teacher(x.flatten(1)).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(train_steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, loss_fn, x, y


def interleaved(fns: list, repeats: int) -> list[tuple[float, object]]:
    """Median wall time of each function, the functions run alternately in each
    repeat (other processes on a shared machine then slow them alike)."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), o) for t, o in zip(times, outs)]


# --------------------------------------------------------------------------- HVP implementations
def bench_hvp(model, loss_fn, x, y, repeats: int, n_prod: int = 10) -> None:
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    n_total = sum(p.numel() for p in params.values())
    torch.manual_seed(0)
    vs = [{n: torch.randn_like(p) for n, p in params.items()} for _ in range(n_prod)]

    def f(ps):
        return loss_fn(functional_call(model, {**ps, **buffers}, (x,)), y)

    op = HessianOperator(model, loss_fn, (x, y), cache_graph=True)
    flat = [torch.cat([v[n].reshape(-1) for n in op.names]) for v in vs]
    op_re = HessianOperator(model, loss_fn, (x, y), cache_graph=False)

    def retained():
        for v in flat:
            op.matvec(v)

    def recompute():
        for v in flat:
            op_re.matvec(v)

    def fwd_over_rev():
        for v in vs:
            jvp(grad(f), (params,), (v,))

    def batched(b: int = 8):
        grads, keep = op._graphs[0]
        for i in range(0, n_prod, b):
            V = torch.stack(flat[i : i + b])
            parts = [V[:, op.offsets[j] : op.offsets[j + 1]].reshape(len(V), *op.shapes[j]) for j in keep]
            torch.autograd.grad(grads, [op.leaves[j] for j in keep], grad_outputs=parts, retain_graph=True,
                                is_grads_batched=True)

    t_lin0 = time.perf_counter()
    _, jvp_fn = linearize(grad(f), params)
    t_lin = time.perf_counter() - t_lin0

    def linearized():
        for v in vs:
            jvp_fn(v)

    print(f"HVP implementations: {n_total} parameters, batch {len(x)}, {torch.get_num_threads()} threads, "
          f"median of {repeats} x {n_prod} products")
    rows = [("double backward, retained graph", retained), ("double backward, recomputed", recompute),
            ("torch.func jvp(grad) (fwd-over-rev)", fwd_over_rev), ("autograd.grad is_grads_batched (8)", batched),
            ("torch.func.linearize(grad)", linearized)]
    for _, fn in rows:
        fn()  # warm-up
    results = interleaved([fn for _, fn in rows], repeats)
    base = None
    for (name, _), (t, _) in zip(rows, results):
        per = 1000 * t / n_prod
        base = base or per
        extra = f"  (+{t_lin:.2f} s to trace)" if "linearize" in name else ""
        print(f"  {name:40s} {per:8.1f} ms/product   x{per / base:5.2f}{extra}")


# --------------------------------------------------------------------------- PyHessian
class PyHessianCounter:
    """Counts PyHessian's Hessian-vector products by wrapping its module function."""

    def __init__(self) -> None:
        import sys

        import pyhessian  # noqa: F401  (its __init__ shadows the module name with the class)

        ph = sys.modules["pyhessian.hessian"]
        self.ph = ph
        self.orig = ph.hessian_vector_product
        self.count = 0

        def counted(*a, **kw):
            self.count += 1
            return self.orig(*a, **kw)

        ph.hessian_vector_product = counted

    def make(self, model, loss_fn, x, y):
        model.zero_grad(set_to_none=True)
        h = self.ph.hessian(model, loss_fn, data=(x, y), cuda=False)
        return h


def pyhessian_eigs(counter, model, loss_fn, x, y, k, tol, max_iter=1000):
    h = counter.make(model, loss_fn, x, y)
    counter.count = 0
    vals, _ = h.eigenvalues(top_n=k, maxIter=max_iter, tol=tol)
    n = counter.count
    model.zero_grad(set_to_none=True)
    return np.array(vals), n


def pyhessian_trace(counter, model, loss_fn, x, y, n):
    h = counter.make(model, loss_fn, x, y)
    counter.count = 0
    vals = h.trace(maxIter=n, tol=0.0)  # tol=0: never stop early, exactly n samples
    model.zero_grad(set_to_none=True)
    return np.array(vals), counter.count


def rel_err(est: np.ndarray, ref: np.ndarray) -> float:
    est = np.sort(np.asarray(est))[::-1][: len(ref)]
    return float(np.max(np.abs(est - ref) / np.abs(ref)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rel", type=float, default=1e-4, help="matched accuracy: max relative error to float64")
    ap.add_argument("--hvp", action="store_true", help="only compare HVP implementations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-cache", default=None, help="file (.npy) to keep the float64 reference eigenvalues in")
    ap.add_argument("--ph-tol", type=float, default=None, help="skip PyHessian's calibration: use this tol")
    ap.add_argument("--ds-tol", type=float, default=None, help="skip dynascope's calibration: use this tol")
    ap.add_argument("--skip-arpack", action="store_true", help="skip the Lanczos-vs-ARPACK HVP count")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    model, loss_fn, x, y = make_problem(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    if args.hvp:
        bench_hvp(model, loss_fn, x, y, args.repeats)
        return
    print(f"CNN with {n_params} parameters, batch {len(x)}, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} repeats, matched accuracy: relative error <= {args.rel:g} to float64",
          flush=True)

    t0 = time.perf_counter()
    cache = Path(args.ref_cache) if args.ref_cache else None
    if cache is not None and cache.exists():
        ref = SimpleNamespace(eigenvalues=np.load(cache), n_hvp="cached")
    else:
        ref = hessian_eigenvalues(model, loss_fn, (x, y), k=5, tol=1e-8, dtype=torch.float64, max_iter=300)
        if cache is not None:
            np.save(cache, ref.eigenvalues)
    print(f"float64 reference top-5: {np.array2string(ref.eigenvalues, precision=6)} "
          f"(Lanczos, residual <= 1e-8 |lambda|, {ref.n_hvp} HVPs, {time.perf_counter() - t0:.1f} s)", flush=True)
    # Lanczos against ARPACK at the same residual criterion, float32 operator
    for tol in (1e-4, 1e-6) if not args.skip_arpack else ():
        la = hessian_eigenvalues(model, loss_fn, (x, y), k=5, tol=tol)
        ar = hessian_eigenvalues(model, loss_fn, (x, y), k=5, tol=tol, method="eigsh", max_iter=3000)
        print(f"top-5 at tol {tol:g}: Lanczos {la.n_hvp} HVPs (rel err {rel_err(la.eigenvalues, ref.eigenvalues):.1e}),"
              f" ARPACK eigsh {ar.n_hvp} HVPs (rel err {rel_err(ar.eigenvalues, ref.eigenvalues):.1e})", flush=True)
    counter = PyHessianCounter()
    ladder_ph = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8]
    ladder_ds = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6]

    for k in (1, 5):
        target = ref.eigenvalues[:k]
        # calibrate: loosest tolerance that meets the accuracy
        ph_tol = ph_err = None
        for tol in [args.ph_tol] if args.ph_tol else ladder_ph:
            vals, _ = pyhessian_eigs(counter, model, loss_fn, x, y, k, tol)
            ph_err, ph_tol = rel_err(vals, target), tol
            print(f"  (calibrating top-{k}: PyHessian tol {tol:g} -> rel err {ph_err:.1e})", flush=True)
            if ph_err <= args.rel:
                break
        ds_tol = ds_err = None
        for tol in [args.ds_tol] if args.ds_tol else ladder_ds:
            r = hessian_eigenvalues(model, loss_fn, (x, y), k=k, tol=tol)
            ds_err, ds_tol = rel_err(r.eigenvalues, target), tol
            print(f"  (calibrating top-{k}: dynascope tol {tol:g} -> rel err {ds_err:.1e})", flush=True)
            if ds_err <= args.rel:
                break
        (t_ph, (vals, n_ph)), (t_ds, r) = interleaved(
            [lambda k=k, t=ph_tol: pyhessian_eigs(counter, model, loss_fn, x, y, k, t),
             lambda k=k, t=ds_tol: hessian_eigenvalues(model, loss_fn, (x, y), k=k, tol=t)], args.repeats)
        ok_ph = "" if ph_err <= args.rel else "  (MISSES the accuracy even at the tightest tol)"
        print(f"top-{k}: PyHessian tol={ph_tol:g}: {t_ph:7.2f} s, {n_ph:4d} HVPs, rel err {rel_err(vals, target):.1e}"
              f"{ok_ph}")
        print(f"        dynascope tol={ds_tol:g}: {t_ds:7.2f} s, {r.n_hvp:4d} HVPs, "
              f"rel err {rel_err(r.eigenvalues, target):.1e}")
        print(f"        speed-up x{t_ph / t_ds:.2f}, HVP ratio {r.n_hvp / n_ph:.3f}", flush=True)

    # trace at equal standard error: same number of Rademacher samples
    n_tr = 60
    (t_ph, (vals, n_ph)), (t_ds, tr) = interleaved(
        [lambda: pyhessian_trace(counter, model, loss_fn, x, y, n_tr),
         lambda: hessian_trace(model, loss_fn, (x, y), n_samples=n_tr, seed=1)], args.repeats)
    se_ph = float(np.std(vals, ddof=1) / np.sqrt(len(vals)))
    print(f"trace ({n_tr} samples): PyHessian {t_ph:6.2f} s, {n_ph} HVPs, {np.mean(vals):.4g} +- {se_ph:.3g}")
    print(f"                      dynascope {t_ds:6.2f} s, {tr.n_hvp} HVPs, {tr.trace:.4g} +- {tr.stderr:.3g}")
    print(f"                      time ratio dynascope/PyHessian {t_ds / t_ph:.2f}")


if __name__ == "__main__":
    main()
