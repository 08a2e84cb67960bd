"""Loss of plasticity on a sequence of digit tasks (Dohare et al. 2024, in small).

Each task re-shuffles the 10 labels of the bundled digits data (a new random
permutation of the classes), so the network must learn a new input-output map
from where the previous task left it. A ReLU MLP trained with SGD + momentum
gradually loses the ability to learn: more and more units die, the effective
rank of its representation falls, its weights grow, and the accuracy reached
per task drops. The same network with LayerNorm keeps most of its plasticity;
L2 (weight decay) stops the weight growth and keeps somewhat more.

Run it (about a minute on 2 CPU cores)::

    python examples/continual_digits.py            # 15 tasks, three variants
    python examples/continual_digits.py --tasks 30 --out runs/continual

It records each variant through ``dynascope.probe(..., plasticity=
dynascope.Plasticity(...))`` with a ``run.mark("task", t)`` at each task
boundary, prints the per-task table, writes ``docs/img/continual_digits.png``
and, when ``dynascope.report`` is available, an HTML report of the three runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynascope.datasets import load_digits
from dynascope.diagnostics.plasticity import plasticity_metrics

VARIANTS = ("plain", "l2", "layernorm")


def make_mlp(variant: str, width: int = 128, depth: int = 3) -> nn.Sequential:
    """64 -> width (x depth, ReLU; LayerNorm before each ReLU for ``layernorm``) -> 10."""
    layers: list[nn.Module] = []
    d = 64
    for _ in range(depth):
        layers.append(nn.Linear(d, width))
        if variant == "layernorm":
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
        d = width
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def _summary(model: nn.Module, probe: torch.Tensor) -> dict[str, float]:
    res = plasticity_metrics(model, probe)
    units = sum(lp.units for lp in res.layers.values())
    return {
        "dead": sum(lp.dead * lp.units for lp in res.layers.values()) / units,        # fraction of all hidden units
        "dormant": sum(lp.dormant * lp.units for lp in res.layers.values()) / units,
        "erank": sum(lp.erank for lp in res.layers.values()) / len(res.layers),       # mean over hidden layers
        "magnitude": res.weight_magnitude[""],
    }


def run_sequence(
    variant: str = "plain",
    n_tasks: int = 15,
    epochs: int = 5,
    lr: float = 0.02,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    seed: int = 0,
    run_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one network through ``n_tasks`` label-reshuffled digit tasks.

    Returns ``{"variant", "tasks": [{task, accuracy, dead, dormant, erank,
    magnitude}, ...]}`` measured at the end of each task (accuracy on the
    task's training data, plasticity metrics on a fixed probe batch of 512
    images). ``weight_decay`` applies to the ``l2`` variant only. With
    ``run_dir`` the run is also recorded with dynascope (task marks included).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    x, y = load_digits()
    model = make_mlp(variant)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay if variant == "l2" else 0.0)
    g = torch.Generator().manual_seed(seed)
    probe_inputs = x[torch.randperm(len(x), generator=g)[:512]]
    steps_per_task = epochs * ((len(x) + batch_size - 1) // batch_size)

    session: Any = contextlib.nullcontext()
    if run_dir is not None:
        import dynascope

        session = dynascope.probe(
            model, opt, run_dir=run_dir, every=25, overwrite=True, name=f"continual-{variant}",
            plasticity=dynascope.Plasticity(every=steps_per_task // 2, batch=probe_inputs),
            meta={"example": "continual_digits", "variant": variant, "lr": lr, "momentum": momentum,
                  "weight_decay": weight_decay if variant == "l2" else 0.0, "epochs_per_task": epochs},
        )
    tasks = []
    t0 = time.monotonic()
    with session as run:
        for task in range(n_tasks):
            labels = torch.randperm(10, generator=g)[y]  # this task's class permutation
            if run is not None:
                run.mark("task", task)
            for _ in range(epochs):
                order = torch.randperm(len(x), generator=g)
                for i in range(0, len(x), batch_size):
                    idx = order[i:i + batch_size]
                    loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    if run is not None:
                        run.step(loss=loss)
            with torch.no_grad():
                acc = float((model(x).argmax(1) == labels).float().mean())
            rec = {"task": task, "accuracy": acc, **_summary(model, probe_inputs)}
            tasks.append(rec)
            if progress:
                print(f"  {variant:9s} task {task:2d}: acc {acc:.3f}  dead {rec['dead']:.1%}  "
                      f"dormant {rec['dormant']:.1%}  erank {rec['erank']:5.1f}  |w| {rec['magnitude']:.4f}  "
                      f"({time.monotonic() - t0:.0f}s)", file=sys.stderr)
    return {"variant": variant, "tasks": tasks}


def plot(results: list[dict[str, Any]], path: str | Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    colors = {"plain": "#d62728", "l2": "#1f77b4", "layernorm": "#2ca02c"}
    labels = {"plain": "ReLU MLP, SGD", "l2": "+ L2 (weight decay)", "layernorm": "+ LayerNorm"}
    panels = [("accuracy", "training accuracy at the end of the task", 1.0),
              ("dead", "% dead units (zero on the whole probe batch)", 100.0),
              ("erank", "effective rank (mean over hidden layers)", 1.0),
              ("magnitude", "average weight magnitude", 1.0)]
    for ax, (key, title, scale) in zip(axes, panels):
        for res in results:
            t = [r["task"] for r in res["tasks"]]
            v = [r[key] * scale for r in res["tasks"]]
            ax.plot(t, v, marker="o", markersize=3, color=colors[res["variant"]], label=labels[res["variant"]])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("task")
        ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize=9)
    fig.suptitle("Loss of plasticity on label-reshuffled digits (3x128 ReLU MLP, SGD lr 0.02, momentum 0.9)",
                 fontsize=11)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/continual", help="folder for the three runs")
    parser.add_argument("--figure", default=str(Path(__file__).resolve().parents[1] / "docs/img/continual_digits.png"))
    parser.add_argument("--report", default=None, help="HTML report path (default OUT/report.html)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results = []
    for variant in VARIANTS:
        results.append(run_sequence(variant, n_tasks=args.tasks, epochs=args.epochs, seed=args.seed,
                                    run_dir=Path(args.out) / variant))
    print(f"{'variant':10s} {'task':>4s} {'acc':>6s} {'dead':>6s} {'dormant':>8s} {'erank':>6s} {'|w|':>7s}")
    for res in results:
        for r in (res["tasks"][0], res["tasks"][-1]):
            print(f"{res['variant']:10s} {r['task']:4d} {r['accuracy']:6.3f} {r['dead']:6.1%} {r['dormant']:8.1%} "
                  f"{r['erank']:6.1f} {r['magnitude']:7.4f}")
    plot(results, args.figure)
    print(f"figure: {args.figure}")
    try:
        import dynascope

        report = dynascope.report
    except (ImportError, AttributeError):
        print("dynascope.report is not available: skipping the HTML report")
    else:
        out = args.report or str(Path(args.out) / "report.html")
        report([str(Path(args.out) / v) for v in VARIANTS], out)
        print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
