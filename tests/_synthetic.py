"""Synthetic run directories written through RunStore, for report and findings tests.

``make_run`` writes a run that looks like what the live probes record for a
small residual MLP (stem, ``n_blocks`` residual blocks with two Linear layers,
a head, and a module whose name is an HTML/JS payload), with switches that
plant each phenomenon a finding rule looks for. Every switch is off by
default, so the default run must trigger no finding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dynascope.store import RunStore

XSS = "<script>alert(1)</script>"


def module_names(n_blocks: int) -> list[str]:
    mods = ["stem"]
    for i in range(n_blocks):
        mods += [f"blocks.{i}", f"blocks.{i}.fc1", f"blocks.{i}.act", f"blocks.{i}.fc2"]
    mods += ["head", XSS]
    return mods


def parameter_names(n_blocks: int) -> list[str]:
    params = ["stem.weight", "stem.bias"]
    for i in range(n_blocks):
        params += [f"blocks.{i}.fc1.weight", f"blocks.{i}.fc1.bias", f"blocks.{i}.fc2.weight", f"blocks.{i}.fc2.bias"]
    params += ["head.weight", "head.bias"]
    return params


def make_run(
    path: str | Path,
    *,
    name: str | None = None,
    n_blocks: int = 6,
    steps: int = 200,
    every: int = 1,
    seed: int = 0,
    optimizer: str | None = "SGD",
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    mark_blocks: bool = True,
    with_branches: bool = True,
    nan_at: int | None = None,
    inf_grad_at: int | None = None,
    var_growth: bool = False,
    massive: bool = False,
    grad_growth: float = 1.0,
    scale_invariant: bool = False,
    eff_lr_decay: float = 1.0,
    loss_spike_at: int | None = None,
    grad_spike: bool = True,
    hessian: str | None = None,
    dead_frac: float | None = None,
    dormant_frac: float | None = None,
    erank_drop: float | None = None,
    user_scalars: bool = True,
    status: str = "finished",
) -> Path:
    """Write a synthetic run to ``path`` and return the path.

    Phenomenon switches: ``nan_at`` (NaN loss and activations from that step),
    ``inf_grad_at`` (an infinite gradient norm), ``var_growth`` (act.var doubles per block,
    growing with block depth), ``massive`` (one block with |act| = 5000),
    ``grad_growth`` (gradient norms grow geometrically by this factor from the first to the last weight),
    ``scale_invariant`` + ``eff_lr_decay`` (effective LR falls by that factor),
    ``loss_spike_at`` (a loss spike, with a gradient norm spike when
    ``grad_spike``), ``hessian`` (``"below"`` / ``"above"`` the 2/eta
    threshold), ``dead_frac`` / ``dormant_frac`` / ``erank_drop`` (plasticity).
    """
    path = Path(path)
    rng = np.random.default_rng(seed)
    store = RunStore(path, mode="new")
    mods = module_names(n_blocks)
    params = parameter_names(n_blocks)
    blocks = [f"blocks.{i}" for i in range(n_blocks)]
    branches = [f"blocks.{i}.fc2" for i in range(n_blocks)]
    step_ids = np.arange(0, steps, every)
    T = len(step_ids)
    frac = step_ids / max(steps - 1, 1)

    hp: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if optimizer == "SGD":
        hp.update(momentum=momentum, dampening=0, nesterov=False)
    elif optimizer in ("Adam", "AdamW"):
        hp.update(betas=[0.9, 0.999], eps=1e-8, amsgrad=False)
    meta: dict[str, Any] = {
        "name": name or path.name,
        "model": {"class": "ResMLP", "n_parameters": 12345, "n_trainable": 12345, "summary": "ResMLP(...)"},
        "optimizer": None if optimizer is None else {"class": optimizer, "hyperparameters": [hp]},
        "torch_version": "2.13.0+cpu",
        "dynascope_version": "0.1.0",
        "seed": seed,
        "start_time": "2026-11-27T01:00:00+0000",
        "end_time": "2026-11-27T01:05:00+0000",
        "wall_time_s": 300.0,
        "every": every,
        "probes": ["activations", "gradients", "updates"],
        "modules": mods,
        "parameters": params,
        "status": status,
        "device": "cpu",
    }
    if mark_blocks:
        meta["blocks"] = blocks
        if with_branches:
            meta["branches"] = branches
    store.write_meta(meta)

    cols: dict[str, list[np.ndarray]] = {"step": [], "metric": [], "layer": [], "value": []}

    def add(metric: str, layer: str, values: np.ndarray) -> None:
        cols["step"].append(step_ids)
        cols["metric"].append(np.full(T, metric, dtype=object))
        cols["layer"].append(np.full(T, layer, dtype=object))
        cols["value"].append(np.asarray(values, dtype=float))

    # -- loss and user scalars
    loss = 2.3 * np.exp(-3 * frac) + 0.1 + 0.02 * rng.standard_normal(T)
    gnorm_global = 1.0 + 0.1 * rng.standard_normal(T)
    if loss_spike_at is not None:
        k = int(np.searchsorted(step_ids, loss_spike_at))
        loss[k] *= 8.0
        if grad_spike:
            gnorm_global[k] *= 20.0
    if nan_at is not None:
        loss[step_ids >= nan_at] = np.nan
    add("loss", "", loss)
    if user_scalars:
        add("accuracy", "", np.clip(1 - loss / 2.5, 0, 1))
    add("grad.global_norm", "", gnorm_global)

    # -- activations per module
    for m in mods:
        depth = 0
        if m.startswith("blocks."):
            depth = int(m.split(".")[1]) + 1
        elif m in ("head", XSS):
            depth = n_blocks + 1
        var0 = 2.0**depth if var_growth else 1.0
        var = var0 * (1 + 0.3 * frac) * (1 + 0.02 * rng.standard_normal(T))
        mean = 0.05 * rng.standard_normal(T)
        absmax = 4.0 * np.sqrt(var) * (1 + 0.05 * rng.random(T))
        if massive and m == f"blocks.{n_blocks // 2}":
            absmax = np.full(T, 5000.0) * (1 + 0.01 * rng.random(T))
        zero = np.full(T, 0.5 if m.endswith(".act") else 0.0)
        if nan_at is not None and m.startswith("blocks."):
            for arr in (var, mean, absmax):
                arr[step_ids >= nan_at] = np.nan
        add("act.mean", m, mean)
        add("act.var", m, var)
        add("act.channel_sq_mean", m, mean**2 + 0.01 * depth)
        add("act.channel_var", m, 0.9 * var)
        add("act.absmax", m, absmax)
        add("act.zero_frac", m, zero)

    # -- gradients, weights, updates per parameter
    n_w = sum(p.endswith(".weight") for p in params)
    wi = 0
    mod_grad: dict[str, np.ndarray] = {}
    for p in params:
        is_w = p.endswith(".weight")
        pos = wi / max(n_w - 1, 1)
        g = grad_growth**pos * (1 + 0.1 * rng.standard_normal(T)) * np.exp(-frac)
        g = np.abs(g) * (1.0 if is_w else 0.3)
        if inf_grad_at is not None and p == "blocks.0.fc1.weight":
            g[step_ids == inf_grad_at] = np.inf
        add("grad.norm", p, g)
        owner = p.rsplit(".", 1)[0]
        mod_grad[owner] = np.sqrt(mod_grad.get(owner, 0.0) ** 2 + g**2)
        if not is_w:
            continue
        wi += 1
        si = scale_invariant and (".fc1." in p)
        rows = 32
        if si and eff_lr_decay > 1:
            wnorm = 5.0 * np.sqrt(1 + (eff_lr_decay - 1) * frac)  # lr/||w||^2 falls by eff_lr_decay
        else:
            wnorm = 5.0 * (1 + 0.05 * frac)
        add("weight.norm", p, wnorm)
        ang = 0.01 + 0.002 * rng.standard_normal(T) + 0.02 * np.exp(-5 * frac)
        add("update.angle", p, np.abs(ang) * 0.9)
        add("update.angle_row", p, np.abs(ang))
        add("update.relative", p, np.abs(ang))
        thr = 0.1 / math.sqrt(rows)
        cos_row = (thr * 0.05 if si else thr * 5) * (1 + 0.1 * rng.random(T))
        add("grad.weight_cos", p, cos_row / 3 * np.sign(rng.standard_normal(T)))
        add("grad.weight_cos_rowmax", p, cos_row)
        add("grad.weight_cos_threshold", p, np.full(T, thr))
        add("scale_invariant", p, np.full(T, 1.0 if si else 0.0))
        add("lr.effective", p, lr / wnorm**2 if optimizer != "AdamW" else lr / wnorm)
    for owner, g in mod_grad.items():
        add("grad.norm", owner, g)
    for b in blocks:
        add("grad.norm", b, np.sqrt(mod_grad[f"{b}.fc1"] ** 2 + mod_grad[f"{b}.fc2"] ** 2))

    # -- scheduled diagnostics (recorded every 10th recorded step)
    sched = step_ids[:: max(T // 10, 1)]

    def add_sched(metric: str, layer: str, values: np.ndarray) -> None:
        store.write_scalars(zip(sched.tolist(), [metric] * len(sched), [layer] * len(sched), values.tolist()))

    if hessian is not None:
        thr = 2.0 / lr
        ramp = np.linspace(0.2, 1.5 if hessian == "above" else 0.6, len(sched))
        add_sched("hessian.eig", "1", thr * ramp)
        add_sched("hessian.eig", "2", thr * ramp * 0.5)
        add_sched("hessian.threshold", "", np.full(len(sched), thr))
    for metric, target in (("plasticity.dead", dead_frac), ("plasticity.dormant", dormant_frac)):
        if target is not None:
            for b in blocks:
                add_sched(metric, f"{b}.act", np.linspace(0.0, target, len(sched)))
    if erank_drop is not None:
        for b in blocks:
            add_sched("plasticity.erank", f"{b}.act", np.linspace(30.0, 30.0 * erank_drop, len(sched)))

    step_col = np.concatenate(cols["step"]).tolist()
    store.write_scalars(zip(step_col, np.concatenate(cols["metric"]).tolist(),
                            np.concatenate(cols["layer"]).tolist(), np.concatenate(cols["value"]).tolist()))
    store.mark(int(step_ids[T // 2]), "note", "halfway")
    store.write_artifact("weights.spectrum", int(step_ids[-1]), {"eig": rng.random(10)}, {"layer": "head.weight"})
    store.close()
    return path
