"""Plasticity diagnostics of the continual-learning papers.

* :func:`effective_rank` -- Roy and Vetterli (2007), as in Dohare et al. (2024,
  "Loss of plasticity in deep continual learning"): ``p_i = sigma_i / sum_j sigma_j``
  (L1 normalisation of the singular values), ``erank = exp(-sum_i p_i log p_i)``
  with ``0 log 0 = 0``.
* :func:`srank` -- Kumar et al. (2021), Dohare's CIFAR "stable rank":
  the smallest ``k`` with ``sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta``.
  NOT WeightWatcher's stable rank ``||A||_F^2 / ||A||_2^2`` (that one lives in
  :mod:`dynascope.diagnostics.weights`).
* :func:`dead_fraction` -- fraction of units whose activation is exactly zero on
  every example (and every spatial position); Dohare et al.'s variant (a).
* :func:`dormant_fraction` -- Sokar et al. (2023, ReDo): ``s_i = mean|h_i| /
  (mean_k mean|h_k| + 1e-9)``; a unit is tau-dormant iff ``s_i <= tau``.
* :func:`weight_magnitude` -- mean ``|theta|`` per layer and over the network.

``features`` / ``activations`` are ``(examples, units)`` or ``(examples,
channels, *spatial)`` tensors; for the latter every spatial position counts as
an example and the channels are the units (the matrix is ``(N*H*W, C)``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.checks import check_mode, set_mode
from ..core.guard import preserved_state
from ..core.outputs import first_tensor
from . import _dist
from ._batch import default_forward, model_device_dtype, move_to

__all__ = [
    "effective_rank",
    "srank",
    "dead_fraction",
    "dormant_fraction",
    "weight_magnitude",
    "plasticity_metrics",
    "PlasticityResult",
    "LayerPlasticity",
    "select_modules",
    "ACTIVATION_TYPES",
]

# Default layers whose outputs are "the representation": the nonlinearities.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Hardswish, nn.Hardtanh, nn.Hardsigmoid,
)

DORMANT_EPS = 1e-9  # Sokar et al.'s constant in the denominator


def _as_matrix(x: torch.Tensor) -> torch.Tensor:
    """``(examples, units)`` view: ``(N, C, *S)`` becomes ``(N*prod(S), C)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(
            f"expected a (examples, units) or (examples, channels, ...) tensor, got shape {tuple(x.shape)}")
    x = x.detach()
    if x.ndim > 2:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x


def _singular_values(features: torch.Tensor) -> torch.Tensor:
    """Singular values (float64, descending) of the ``(examples, units)`` matrix.

    Computed as ``sqrt`` of the eigenvalues of the smaller Gram matrix
    (``A^T A`` or ``A A^T``) in float64, several times faster than an SVD; the
    relative error of a singular value ``sigma_i`` is about
    ``1e-16 * (sigma_max / sigma_i)^2``, far below what erank / srank resolve.
    """
    a = _as_matrix(features).to(torch.float64)
    m, n = a.shape
    if m == 0 or n == 0:
        raise ValueError(f"features have an empty dimension: shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("features contain NaN or inf")
    gram = a.T @ a if m >= n else a @ a.T
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().flip(0)


def effective_rank(features: torch.Tensor) -> float:
    """Roy-Vetterli effective rank ``exp(-sum p_i log p_i)``, ``p = sigma / ||sigma||_1``.

    Variant: L1-normalised singular values (Dohare et al. 2024's
    ``compute_effective_rank``), ``0 log 0 = 0``. Ranges from 1 (rank one) to
    ``min(examples, units)`` (all singular values equal). Returns 0.0 for an
    all-zero matrix.
    """
    return _erank_from_sv(_singular_values(features))


def _erank_from_sv(sv: torch.Tensor) -> float:
    total = sv.sum()
    if total <= 0:
        return 0.0
    p = sv / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def srank(features: torch.Tensor, delta: float = 0.01) -> int:
    """``srank_delta`` (Kumar et al. 2021): smallest ``k`` with
    ``sum_{i<=k} sigma_i / sum_i sigma_i >= 1 - delta`` (singular values descending).

    Dohare et al.'s CIFAR "stable rank"; not ``||A||_F^2/||A||_2^2``. Returns 0
    for an all-zero matrix.
    """
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    return _srank_from_sv(_singular_values(features), delta)


def _srank_from_sv(sv: torch.Tensor, delta: float) -> int:
    total = sv.sum()
    if total <= 0:
        return 0
    cum = torch.cumsum(sv, 0) / total
    # tolerance so that e.g. an exact share of 0.99 counts as reaching 0.99
    k = int((cum < (1.0 - delta) - 1e-12).sum()) + 1
    return min(k, sv.numel())


def dead_fraction(activations: torch.Tensor, min_active: float | None = None) -> float:
    """Fraction of units that are dead on the given batch.

    Default variant (Dohare et al. 2024, (a)): a unit is dead when its
    activation is exactly zero on every example and every spatial position.
    ``min_active=0.01`` gives variant (b): a unit is dead when it is non-zero on
    fewer than that fraction of examples (and positions).
    """
    a = _as_matrix(activations)
    if a.shape[0] == 0:
        raise ValueError("activations have no examples")
    active = (a != 0).sum(0)
    if min_active is None:
        dead = active == 0
    else:
        if not 0.0 <= min_active <= 1.0:
            raise ValueError(f"min_active must be a fraction in [0, 1], got {min_active!r}")
        dead = active.to(torch.float64) / a.shape[0] < min_active
    return float(dead.to(torch.float64).mean())


def dormant_scores(activations: torch.Tensor) -> torch.Tensor:
    """Sokar et al.'s normalised score per unit: ``s_i = mean|h_i| / (mean_k mean|h_k| + 1e-9)``."""
    a = _as_matrix(activations).to(torch.float64)
    score = a.abs().mean(0)
    return score / (score.mean() + DORMANT_EPS)


def dormant_fraction(activations: torch.Tensor, tau: float = 0.025) -> float:
    """Fraction of tau-dormant units (Sokar et al. 2023, ReDo): ``s_i <= tau``
    with ``s_i = mean|h_i| / (mean_k mean|h_k| + 1e-9)``; the mean runs over
    examples and spatial positions. ``tau = 0`` counts units that are zero everywhere.
    """
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    s = dormant_scores(activations)
    return float((s <= tau).to(torch.float64).mean())


def weight_magnitude(model: nn.Module) -> dict[str, float]:
    """Average weight magnitude ``mean |theta|`` (Dohare et al. 2024).

    Keys: the name of every module that owns parameters directly (mean over all
    its own parameters, weights and biases together), and ``""`` for the whole
    network (mean over every parameter entry, so large layers weigh more).
    """
    out: dict[str, float] = {}
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.is_floating_point() or p.is_complex()]
        if not params:
            continue
        s = sum(_dist.full(p).abs().to(torch.float64).sum().cpu() for p in params)  # FSDP2: whole parameters
        n = sum(p.numel() for p in params)
        if n:
            out[name] = float(s / n)
            total = total + s
            count += n
    if count == 0:
        raise ValueError("the model has no floating-point parameters")
    out[""] = float(total / count)
    return out


# -- all metrics from one forward pass ----------------------------------------------------------------

LayerSpec = None | type | str | Sequence[Any]


def select_modules(model: nn.Module, layers: LayerSpec = None) -> list[tuple[str, nn.Module]]:
    """Modules whose outputs are measured.

    ``layers``: None (every activation module: ReLU, GELU, Tanh, ...), a module
    type or tuple of types, a name pattern (``fnmatch``, e.g. ``"encoder.*.act"``;
    an exact name also matches), or a list mixing these. Raises ValueError when
    nothing matches, naming what was asked.
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if layers is None:
        specs: list[Any] = [ACTIVATION_TYPES]
    elif isinstance(layers, (str, type)) or (
        isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
    ):
        specs = [layers]
    else:
        specs = list(layers)
    chosen: list[tuple[str, nn.Module]] = []
    for spec in specs:
        if isinstance(spec, type) or (isinstance(spec, tuple) and all(isinstance(t, type) for t in spec)):
            hits = [(n, m) for n, m in named if isinstance(m, spec)]
        elif isinstance(spec, str):
            hits = [(n, m) for n, m in named if n == spec or fnmatch.fnmatchcase(n, spec)]
        else:
            raise TypeError(f"layers entries must be module types or name patterns, got {spec!r}")
        if not hits and layers is not None:
            raise ValueError(f"layers={spec!r} matches no module of {type(model).__name__}; "
                             f"modules: {[n for n, _ in named][:10]}")
        chosen.extend(h for h in hits if all(h[1] is not c[1] for c in chosen))
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no activation module (nn.ReLU, nn.GELU, ...); it may use functional "
            "activations: pass layers= with module types or name patterns whose outputs are the features"
        )
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(chosen, key=lambda nm: order[nm[0]])


@dataclass
class LayerPlasticity:
    """Plasticity metrics of one layer's output on the probe batch."""

    dead: float      # fraction of units zero on every example and position (variant a)
    dormant: float   # fraction of tau-dormant units (Sokar et al.)
    erank: float     # Roy-Vetterli effective rank, L1-normalised singular values
    srank: int       # Kumar et al. srank_delta
    units: int
    examples: int    # rows of the matrix: examples x spatial positions


@dataclass
class PlasticityResult:
    layers: dict[str, LayerPlasticity]
    weight_magnitude: dict[str, float]
    tau: float
    delta: float
    mode: str
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[tuple[str, float, str]]:
        """``(metric, value, layer)`` rows under the recorded metric names."""
        out: list[tuple[str, float, str]] = []
        for name, lp in self.layers.items():
            out += [
                ("plasticity.dead", lp.dead, name),
                ("plasticity.dormant", lp.dormant, name),
                ("plasticity.erank", lp.erank, name),
                ("plasticity.srank", float(lp.srank), name),
            ]
        out += [("weight.magnitude", v, name) for name, v in self.weight_magnitude.items()]
        return out


def plasticity_metrics(
    model: nn.Module,
    inputs: Any,
    layers: LayerSpec = None,
    tau: float = 0.025,
    delta: float = 0.01,
    mode: str = "eval",
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> PlasticityResult:
    """Dead and dormant fractions, effective rank and srank of the selected
    layers' outputs, plus weight magnitude, from one forward pass on ``inputs``.

    Forward hooks are registered and removed inside the call; the pass runs
    under ``torch.no_grad`` and :func:`preserved_state` (``params=False``), so
    buffers, train/eval modes and the RNG are restored. ``mode`` is the mode of
    the pass: ``"eval"`` (default: dropout off, BatchNorm running statistics) or
    ``"train"``. A module called several times in one forward gets one entry per
    call, named ``name``, ``name@1``, ``name@2``...
    """
    check_mode(mode, choices=("eval", "train"))
    model = _dist.unwrap(model)  # DDP: the module itself, whose names one process would record
    modules = select_modules(model, layers)
    device, _ = model_device_dtype(model)
    fwd = forward or default_forward
    captured: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
            t = first_tensor(output)
            if t is None:
                return
            i = calls.get(name, 0)
            calls[name] = i + 1
            captured[name if i == 0 else f"{name}@{i}"] = t.detach()

        return hook

    handles = []
    try:
        with preserved_state(model, params=False):
            for name, m in modules:
                handles.append(m.register_forward_hook(make_hook(name)))
            set_mode(model, mode)
            with torch.no_grad():
                fwd(model, move_to(inputs, device))
    finally:
        for h in handles:
            h.remove()
    if not captured:
        raise ValueError("none of the selected layers ran during the forward pass: "
                         f"{[n for n, _ in modules][:8]}")
    result: dict[str, LayerPlasticity] = {}
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    for name, out in captured.items():
        # torch.distributed: the rows of every rank's shard of the batch (one process on the global batch)
        (mat,) = _dist.gather_rows(_as_matrix(out))
        sv = _singular_values(mat)  # once per layer, for both ranks
        result[name] = LayerPlasticity(
            dead=dead_fraction(mat),
            dormant=dormant_fraction(mat, tau),
            erank=_erank_from_sv(sv),
            srank=_srank_from_sv(sv, delta),
            units=int(mat.shape[1]),
            examples=int(mat.shape[0]),
        )
    return PlasticityResult(result, weight_magnitude(model), tau, delta, mode)
