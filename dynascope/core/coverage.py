"""What a run recorded and what it could not: the coverage report.

Each row says, for one module, parameter or metric, whether dynascope records
it and, if not, why (an output that is not a floating tensor, a parameter no
optimizer owns or that never had a gradient at a recording step, a metric with
no formula for that optimizer, ...). Probes contribute their rows
(``Probe.coverage()``); the session writes them into ``meta.json``
(``coverage``) at start and again at close (what only the run revealed), and
``RunData.coverage()`` returns them all.

``dynascope ls``, the report's run table and the notebook view show only what a
user would act on (:func:`triage`): a module with parameters whose output was
never seen, an output that is not a floating tensor, a parameter with no
gradient while it requires one, modules a compiled graph hid. What is missing by
design is one line per kind: parameter-free modules never called and
pass-through modules (``Dropout``, ``Identity``), frozen parameters, 1-D
parameters the weight/update metrics leave out, optimizers without an
effective-learning-rate formula, a module its parent calls through its weights
(``MultiheadAttention.out_proj``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

__all__ = ["CoverageRow", "coverage_frame", "summarize", "triage"]

COLUMNS = ("kind", "name", "recorded", "reason", "probe")


@dataclass(frozen=True)
class CoverageRow:
    """``kind``: "module", "parameter" or "metric"; ``name``: its qualified name
    (``metric@layer`` for a metric); ``recorded``: whether values are written;
    ``reason``: why not (or what is recorded instead); ``probe``: who says so."""

    kind: str
    name: str
    recorded: bool
    reason: str = ""
    probe: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def coverage_frame(rows: Iterable[CoverageRow | dict[str, object]]) -> pd.DataFrame:
    """Rows (dataclasses or their dicts from meta.json) as a DataFrame."""
    recs = [r.as_dict() if isinstance(r, CoverageRow) else dict(r) for r in rows]
    return pd.DataFrame(recs, columns=list(COLUMNS))


# modules whose output is their input (or a masked copy of it): nothing of their own to record
PASS_THROUGH = ("Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def triage(df: pd.DataFrame, module_types: Mapping[str, str] | None = None,
           parameters: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Split what a run did not record into what a user would act on (the rows, returned as they are) and
    what is missing by design (one summary line per kind, e.g. "12 modules without statistics by design
    (parameter-free: not called, or passing their input through): 10 Dropout, 2 Identity").

    ``module_types``: module name -> class name (meta.json ``module_types``; without it modules are counted
    as "module"); ``parameters``: the model's parameter names (meta.json ``parameters``; default: the
    parameter rows of ``df``), which tell the parameter-free modules."""
    if df.empty:
        return df, []
    types = dict(module_types or {})
    recorded = df["recorded"].astype(bool)
    params = list(parameters) if parameters is not None else list(df.loc[df["kind"] == "parameter", "name"])
    with_grad = set(df.loc[(df["kind"] == "parameter") & recorded, "name"])
    owned: dict[str, list[str]] = {}  # module -> its parameters (its own and its children's)
    for p in params:
        parts = str(p).split(".")
        for i in range(len(parts)):
            owned.setdefault(".".join(parts[:i]), []).append(str(p))
    keep = []
    free: dict[str, int] = {}
    functional: dict[str, int] = {}
    frozen = flat = 0
    no_lr: dict[str, int] = {}
    for idx, r in df[~recorded].iterrows():
        kind, name, reason = r["kind"], str(r["name"]), str(r["reason"])
        if kind == "module":
            typ = types.get(name, "module")
            mine = owned.get(name, [])
            if (not mine and reason.startswith("not called")) or typ in PASS_THROUGH:
                free[typ] = free.get(typ, 0) + 1
                continue
            if mine and reason.startswith("not called") and all(p in with_grad for p in mine):
                functional[typ] = functional.get(typ, 0) + 1
                continue
        elif kind == "parameter" and reason.startswith("frozen"):
            frozen += 1
            continue
        elif kind == "metric" and reason.startswith("1-D parameter"):
            flat += 1
            continue
        elif kind == "metric" and reason.startswith("no published effective-learning-rate formula for "):
            opt = reason.rsplit(" ", 1)[-1]
            no_lr[opt] = no_lr.get(opt, 0) + 1
            continue
        keep.append(idx)
    lines = []
    if free:
        n = sum(free.values())
        lines.append(f"{n} module{'s' if n != 1 else ''} without statistics by design (parameter-free: not called, "
                     f"or passing their input through): {_counted(free)}")
    if functional:
        n = sum(functional.values())
        lines.append(f"{n} module{'s' if n != 1 else ''} without statistics by design (their parent uses their "
                     f"weights without calling them; their gradients are recorded): {_counted(functional)}")
    if frozen:
        lines.append(f"{frozen} frozen parameter{'s' if frozen != 1 else ''} without gradient statistics by design "
                     "(requires_grad=False)")
    if flat:
        lines.append(f"{flat} 1-D parameter{'s' if flat != 1 else ''} without update statistics by design "
                     "(all_params=True records them)")
    for opt, n in no_lr.items():
        lines.append(f"{n} parameter{'s' if n != 1 else ''} without lr.effective by design: no published "
                     f"effective-learning-rate formula for {opt}")
    return df.loc[keep], lines


def summarize(df: pd.DataFrame, limit: int = 20, module_types: Mapping[str, str] | None = None,
              parameters: Sequence[str] | None = None) -> list[str]:
    """Plain-text lines: recorded counts, then what is not recorded and why, then what is missing by design,
    one line per kind (:func:`triage`)."""
    if df.empty:
        return ["coverage: not recorded by this run (dynascope < 0.2)"]
    counts = []
    for kind in ("module", "parameter"):
        grp = df[df["kind"] == kind]
        if len(grp):
            counts.append(f"{kind}s: {int(grp['recorded'].astype(bool).sum())} of {len(grp)} recorded")
    lines = ["  " + "; ".join(counts)] if counts else []
    missing, by_design = triage(df, module_types, parameters)
    for _, r in missing.head(limit).iterrows():
        lines.append(f"  - {r['kind']} {r['name']}: {r['reason']}")
    if len(missing) > limit:
        lines.append(f"  ... {len(missing) - limit} more (RunData.coverage())")
    lines += [f"  {line}" for line in by_design]
    return lines


def merge(rows: Sequence[CoverageRow]) -> list[CoverageRow]:
    """One row per (kind, name): a later row replaces an earlier one."""
    out: dict[tuple[str, str], CoverageRow] = {}
    for r in rows:
        out[(r.kind, r.name)] = r
    return list(out.values())
