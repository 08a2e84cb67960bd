"""Rotational equilibrium of scale-invariant weights (pure functions).

With weight decay, the expected per-row angular update of a scale-invariant
weight converges to a value set by the optimizer's hyper-parameters alone
(Kosson, Messmer, Jaggi 2024, "Rotational Equilibrium: How Weight Decay
Balances Learning Across Neural Networks"; code: epfml/REQ
``rotational_wrapper.py``):

- AdamW (decoupled weight decay):
  ``sqrt(2 * eta * lambda * (1 - beta1) / (1 + beta1))``
- SGD with momentum ``alpha`` (PyTorch style, L2 added to the gradient):
  ``sqrt(2 * eta * lambda / (1 + alpha))``; plain SGD (``alpha = 0``):
  ``sqrt(2 * eta * lambda)``

The probes record the measured per-row angle as ``update.angle_row``; the
report draws :func:`equilibrium_angle` beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["equilibrium_angle", "equilibrium_angle_from_hyperparameters", "equilibrium_angles",
           "EQUILIBRIUM_OPTIMIZERS"]

#: optimizer class names (case-insensitive) for which a closed form is known
EQUILIBRIUM_OPTIMIZERS = ("AdamW", "SGD")


def _check_nonnegative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def equilibrium_angle(
    optimizer_class: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.0,
    beta1: float = 0.9,
) -> float | None:
    """Expected equilibrium angular update per step (radians) of a scale-invariant weight.

    ``optimizer_class`` is the class name (``"AdamW"``, ``"SGD"``; a module
    path such as ``"torch.optim.AdamW"`` is accepted). Returns ``None`` where
    the rotational equilibrium is not defined by this formula: no weight decay
    (``weight_decay == 0``, the weight norm grows without bound and the angle
    decays), or an optimizer without a closed form here (e.g. Adam, whose
    ``weight_decay`` is an L2 term scaled by the preconditioner).

    >>> round(equilibrium_angle("AdamW", 1e-3, 0.1, beta1=0.9), 6)
    0.003244
    >>> round(equilibrium_angle("SGD", 0.1, 5e-4, momentum=0.9), 6)
    0.007255
    """
    if not isinstance(optimizer_class, str) or not optimizer_class:
        raise ValueError(f"optimizer_class must be a non-empty class name, got {optimizer_class!r}")
    lr = _check_nonnegative("lr", lr)
    weight_decay = _check_nonnegative("weight_decay", weight_decay)
    momentum = _check_nonnegative("momentum", momentum)
    beta1 = _check_nonnegative("beta1", beta1)
    if momentum >= 1:
        raise ValueError(f"momentum must be < 1, got {momentum!r}")
    if beta1 >= 1:
        raise ValueError(f"beta1 must be < 1, got {beta1!r}")
    name = optimizer_class.rsplit(".", 1)[-1].lower()
    if weight_decay == 0 or lr == 0:
        return None
    if name == "adamw":
        return math.sqrt(2.0 * lr * weight_decay * (1.0 - beta1) / (1.0 + beta1))
    if name == "sgd":
        return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))
    return None


def equilibrium_angle_from_hyperparameters(optimizer_class: str, hyperparameters: Mapping[str, Any]) -> float | None:
    """:func:`equilibrium_angle` from one param group's hyper-parameters (as recorded in meta.json).

    Reads ``lr``, ``weight_decay``, ``momentum`` (SGD) and ``betas[0]`` (AdamW);
    returns ``None`` when ``lr`` is missing or not a number.
    """
    try:
        lr = float(hyperparameters["lr"])
    except (KeyError, TypeError, ValueError):
        return None
    wd = hyperparameters.get("weight_decay", 0.0) or 0.0
    momentum = hyperparameters.get("momentum", 0.0) or 0.0
    betas = hyperparameters.get("betas") or (0.9, 0.999)
    try:
        return equilibrium_angle(optimizer_class, lr, float(wd), float(momentum), float(betas[0]))
    except (TypeError, ValueError):
        return None


def equilibrium_angles(optimizer_class: str, hyperparameters: Mapping[str, Any], lrs: Any) -> Any:
    """:func:`equilibrium_angle` at each learning rate of ``lrs`` (an array: the lr of every step, e.g. under
    warmup and decay), with the weight decay and momentum / beta1 of ``hyperparameters`` (one param group as
    recorded in meta.json; its own ``lr`` is ignored). The angle grows as sqrt(lr) for both formulas.
    Returns a float array (NaN where an lr is not a finite number >= 0), or ``None`` where the equilibrium is
    not defined (no weight decay, no closed form for the optimizer).

    >>> [round(float(a), 6) for a in equilibrium_angles("AdamW", {"weight_decay": 0.1}, [2.5e-5, 1e-3])]
    [0.000513, 0.003244]
    """
    import numpy as np

    unit = equilibrium_angle_from_hyperparameters(optimizer_class, {**hyperparameters, "lr": 1.0})
    if unit is None:
        return None
    lr = np.asarray(lrs, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(lr) & (lr >= 0), unit * np.sqrt(np.abs(lr)), np.nan)
