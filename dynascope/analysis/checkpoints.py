"""Changes across checkpoints that deserve a finding: an evaluation loss that got worse.

``dynascope analyze`` records ``loss`` at each checkpoint on the fixed ``--data`` batch: an evaluation loss.
A live run may log one too (``run.step(loss=..., val_loss=...)``: a run-level scalar whose name says
eval / val / validation / test and loss). :func:`eval_loss_regressions` compares the last recorded value of
each with its best (lowest) one; the findings rule ``eval_loss_worse`` (:mod:`.findings`) reports them.

Threshold: ``EVAL_LOSS_WORSE = 0.10``: the last value >= 1.10 x the best, with the best before the last.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ..store import RunData, query

__all__ = ["EVAL_LOSS_WORSE", "eval_loss_metrics", "eval_loss_regressions"]

EVAL_LOSS_WORSE = 0.10

_EVAL_NAME = re.compile(r"(^|[/._-])(eval|evaluation|val|valid|validation|test|heldout|held_out)[/._-]?(loss|nll)$"
                        r"|(^|[/._-])(loss|nll)[/._-](eval|evaluation|val|valid|validation|test|heldout)$",
                        re.IGNORECASE)


def eval_loss_metrics(run: RunData) -> list[str]:
    """The run-level metrics that are an evaluation loss: ``loss`` of a ``dynascope analyze`` run (measured
    on ``--data`` at each checkpoint), and scalars named like ``val_loss``, ``eval/loss``, ``loss_test``."""
    out = []
    if run.meta.get("source") == "analyze" and query.has(run, "loss"):
        out.append("loss")
    for m in query.metrics(run):
        if m not in out and _EVAL_NAME.search(m) and query.layers(run, m) == [""]:
            out.append(m)
    return out


def eval_loss_regressions(run: RunData, worse: float = EVAL_LOSS_WORSE) -> list[dict[str, Any]]:
    """One dict per evaluation loss whose last value is >= (1 + ``worse``) x its best (lowest) earlier value:
    ``metric``, ``step`` (the last), ``value`` (the last), ``best``, ``best_step``, ``ratio``, ``threshold``
    (the value that would have been flagged: (1 + worse) x best) and ``message`` (one sentence naming both
    values and their checkpoints / steps)."""
    found = []
    analyze = run.meta.get("source") == "analyze"
    for m in eval_loss_metrics(run):
        s, v = query.series(run, m)
        ok = np.isfinite(v)
        s, v = s[ok], v[ok]
        if len(v) < 2:
            continue
        i_best = int(np.argmin(v))
        best, last = float(v[i_best]), float(v[-1])
        if i_best == len(v) - 1 or not best > 0 or last < (1 + worse) * best:
            continue
        ratio = last / best
        if analyze and m == "loss":
            what = "Evaluation loss (dynascope analyze, on --data)"
            at_last = f"at the last checkpoint (step {int(s[-1])}, {len(v)} of {len(v)})"
            at_best = f"at checkpoint step {int(s[i_best])} ({i_best + 1} of {len(v)})"
        else:
            what = f"Evaluation loss {m}"
            at_last, at_best = f"at its last recorded step {int(s[-1])}", f"at step {int(s[i_best])}"
        found.append({
            "metric": m, "step": int(s[-1]), "value": last, "best": best, "best_step": int(s[i_best]),
            "ratio": ratio, "threshold": (1 + worse) * best,
            "message": f"{what} is {last:.4g} {at_last}, {100 * (ratio - 1):.0f}% worse than its best {best:.4g} "
                       f"{at_best} (threshold {100 * worse:.0f}% worse): the model got worse on held-out data "
                       "since then (overfitting, or a late instability); the best checkpoint is the one to keep."})
    return found
