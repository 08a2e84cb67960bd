"""Short real training runs on the bundled digits data, for the forensics / comparison / check tests.

``train`` records the demo's plain MLP (no normalization) with one optimizer param group per module
that owns parameters (group ``name`` = the module's name), and can change one group's learning rate
from a step on (``lr_change = (module, first_step, factor, n_steps)``): the known fault the tests look for.
"""

from __future__ import annotations

from pathlib import Path

import torch

import dynascope
from dynascope.commands.demo import make_mlp
from dynascope.datasets import load_digits


def train(path: str | Path, *, steps: int, every: int = 1, optimizer: str = "sgd", lr: float = 0.05,
          lr_change: tuple[str, int, float, int] | None = None, seed: int = 0, data_seed: int = 0,
          probes: tuple[str, ...] = ("gradients", "updates")) -> Path:
    x, y = load_digits()
    torch.manual_seed(seed)
    model = make_mlp(False)
    groups = [{"params": list(m.parameters(recurse=False)), "name": n} for n, m in model.named_modules()
              if list(m.parameters(recurse=False))]
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(groups, lr=lr)
    g = torch.Generator().manual_seed(data_seed)
    with dynascope.probe(model, opt, path, every=every, probes=probes, name=Path(path).name) as run:
        for s in range(steps):
            if lr_change is not None:
                name, start, factor, n = lr_change
                for grp in opt.param_groups:
                    grp["lr"] = lr * factor if grp["name"] == name and start <= s < start + n else lr
            idx = torch.randint(0, len(x), (64,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.step(loss=loss)
    return Path(path)


def edited_copy(src: str | Path, dst: str | Path, edits: dict[tuple[str, str], tuple[list[int], float | None]]
                ) -> Path:
    """Copy a run's scalars and meta into ``dst`` through the public API (RunData -> RunStore), changing
    ``edits[(metric, layer)] = (steps, factor)``: the values at those steps times ``factor``, or NaN when
    ``factor`` is None. Store-format independent (no SQL on the store's tables)."""
    import numpy as np

    from dynascope.store import RunStore, load_run

    run = load_run(src)
    store = RunStore(dst)
    store.write_meta(dict(run.meta, name=Path(dst).name))
    rows = []
    for metric in run.metrics():
        df = run.scalars(metric)
        values = df["value"].to_numpy(dtype=float).copy()
        for (m, layer), (steps, factor) in edits.items():
            if m != metric:
                continue
            hit = (df["layer"] == layer).to_numpy() & df["step"].isin(steps).to_numpy()
            values[hit] = np.nan if factor is None else values[hit] * factor
        rows += list(zip(df["step"].astype(int).tolist(), [metric] * len(df), df["layer"].tolist(), values.tolist()))
    store.write_scalars(rows)
    store.close()
    return Path(dst)
