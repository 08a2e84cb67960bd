"""Example difficulty scores (Paul, Ganguli and Dziugaite 2021, "Deep Learning on a Data Diet").

For a classifier ``f`` with parameters ``theta`` and an example ``(x, y)``:

* EL2N (error L2 norm): ``||softmax(f(x)) - onehot(y)||_2``;
* GraNd (gradient norm): ``||grad_theta loss(f(x), y)||_2``, the norm of the
  example's own loss gradient over every trainable parameter.

The paper scores examples early in training (and averages over several
initialisations); high scores mark the hard or mislabelled examples that
matter most, low scores the ones a pruned data set can drop.

GraNd is computed with per-sample gradients, ``torch.func.vmap`` over
``torch.func.grad`` of ``torch.func.functional_call``, in chunks of
``batch_size`` examples; the model runs in eval mode by default (BatchNorm
with running statistics: a per-example gradient is only defined when an
example's loss does not depend on the rest of the batch).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..core.checks import check_mode, set_mode
from ..core.guard import preserved_state
from ._batch import Forward, LossFn, as_pairs, default_forward, take_examples
from ._batch import batch_size as _n_examples

__all__ = ["example_scores", "ExampleScores", "SCORE_KINDS", "QUANTILES"]

SCORE_KINDS = ("el2n", "grand")
QUANTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class ExampleScores:
    """One score per example, in data order (``scores``, float64), of ``kind`` ("el2n" or "grand")."""

    kind: str
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.size)

    def summary(self) -> dict[str, float]:
        """``q10``, ``q50``, ``q90`` (linear-interpolation quantiles) and ``mean`` of the finite scores."""
        s = self.scores[np.isfinite(self.scores)]
        if s.size == 0:
            return {**{f"q{round(q * 100)}": float("nan") for q in QUANTILES}, "mean": float("nan")}
        qs = np.quantile(s, QUANTILES)
        return {**{f"q{round(q * 100)}": float(v) for q, v in zip(QUANTILES, qs)}, "mean": float(s.mean())}


def _logits(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor, ``.logits`` (Hugging Face), ``["logits"]`` or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def _chunks(data: Any, size: int) -> Iterable[tuple[Any, Any]]:
    for inputs, targets in as_pairs(data) if not _is_lazy(data) else data:
        n = _n_examples(inputs)
        for i in range(0, n, size):
            yield take_examples(inputs, i, min(i + size, n)), take_examples(targets, i, min(i + size, n))


def _is_lazy(data: Any) -> bool:
    """A DataLoader or generator: iterate it once instead of listing it (as_pairs would)."""
    return not isinstance(data, (tuple, list)) and isinstance(data, Iterable)


def _total(data: Any) -> int | None:
    if _is_lazy(data):
        ds = getattr(data, "dataset", None)
        try:
            return len(ds) if ds is not None else None
        except TypeError:
            return None
    try:
        return sum(_n_examples(x) for x, _ in as_pairs(data))
    except (TypeError, ValueError):
        return None


def example_scores(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    kind: Literal["el2n", "grand"] = "el2n",
    *,
    batch_size: int = 64,
    forward: Forward | None = None,
    mode: Literal["eval", "train", "current"] = "eval",
    progress: bool | None = None,
) -> ExampleScores:
    """EL2N or GraNd score of every example of ``data`` (an ``(inputs, targets)`` pair, a list of pairs, or a
    DataLoader yielding pairs), in data order.

    ``loss_fn(outputs, targets)`` is the training loss (mean over the batch;
    GraNd differentiates it on single examples; EL2N does not use it). Targets
    are integer class indices. ``batch_size``: examples per chunk (GraNd holds
    one gradient per example of a chunk). ``progress``: a tqdm bar on stderr
    (default: only when stderr is a terminal). The model, its gradients,
    buffers, modes and the RNG are restored.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"example_scores: kind must be one of {SCORE_KINDS}, got {kind!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"example_scores: batch_size must be an integer >= 1, got {batch_size!r}")
    check_mode(mode, "example_scores")
    if kind == "grand" and not callable(loss_fn):
        raise TypeError("example_scores: kind='grand' needs a loss_fn(outputs, targets)")
    if kind == "grand" and mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                   for m in model.modules()):
        raise ValueError("example_scores: GraNd in train mode is undefined with BatchNorm (an example's loss would "
                         "depend on its batch); use mode='eval'")
    from tqdm.auto import tqdm

    fwd = forward or default_forward
    out: list[np.ndarray] = []
    show = sys.stderr.isatty() if progress is None else progress
    with preserved_state(model, params=False), tqdm(total=_total(data), desc=f"{kind} scores", unit="ex",
                                                    disable=not show, file=sys.stderr, leave=False) as bar:
        set_mode(model, mode)
        if kind == "el2n":
            with torch.no_grad():
                for x, y in _chunks(data, batch_size):
                    out.append(_el2n(_logits(fwd(model, x)), y))
                    bar.update(_n_examples(x))
        else:
            step = _grand_fn(model, loss_fn, fwd)  # type: ignore[arg-type]
            for x, y in _chunks(data, batch_size):
                out.append(step(x, y))
                bar.update(_n_examples(x))
    scores = np.concatenate(out) if out else np.zeros(0)
    if scores.size == 0:
        raise ValueError("example_scores: data holds no examples")
    return ExampleScores(kind, scores)


def _check_targets(logits: torch.Tensor, y: Any) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.ndim != 1:
        raise TypeError("example_scores: targets must be a 1-d tensor of integer class indices, got "
                        f"{getattr(y, 'dtype', type(y).__name__)} of shape {tuple(getattr(y, 'shape', ()))}")
    if logits.ndim != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"example_scores: logits must be (examples, classes) matching {y.shape[0]} targets, got "
                         f"{tuple(logits.shape)}")
    return y.to(logits.device)


def _el2n(logits: torch.Tensor, y: Any) -> np.ndarray:
    y = _check_targets(logits, y)
    p = torch.softmax(logits.detach().to(torch.float64), dim=1)
    p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
    return torch.linalg.vector_norm(p, dim=1).cpu().numpy()


class _Forward(nn.Module):
    """``forward(model, inputs)`` as a module, so that ``functional_call`` can swap its parameters in."""

    def __init__(self, model: nn.Module, fwd: Forward) -> None:
        super().__init__()
        self.model = model
        self.fwd = fwd

    def forward(self, inputs: Any) -> Any:
        return self.fwd(self.model, inputs)


def _grand_fn(model: nn.Module, loss_fn: LossFn, fwd: Forward):
    from torch.func import functional_call, grad, vmap

    wrapper = _Forward(model, fwd)
    params = {"model." + n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("example_scores: the model has no trainable parameters for GraNd")
    buffers = {"model." + n: b.detach() for n, b in model.named_buffers()}

    def one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: Any, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(wrapper, (p, b), (_unsqueeze(x),))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad(one), in_dims=(None, None, 0, 0), randomness="different")

    def step(x: Any, y: Any) -> np.ndarray:
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"example_scores: targets must be a tensor, got {type(y).__name__}")
        g = per_example(params, buffers, x, y)
        sq = sum(v.detach().to(torch.float64).flatten(1).square().sum(1) for v in g.values())
        return torch.sqrt(sq).cpu().numpy()

    return step


def _unsqueeze(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return {k: _unsqueeze(v) for k, v in x.items()}
    return x
