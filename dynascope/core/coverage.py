"""What a run recorded and what it could not: the coverage report.

Each row says, for one module, parameter or metric, whether dynascope records
it and, if not, why (an output that is not a floating tensor, a parameter no
optimizer owns or that never had a gradient at a recording step, a metric with
no formula for that optimizer, ...). Probes contribute their rows
(``Probe.coverage()``); the session writes them into ``meta.json``
(``coverage``) at start and again at close (what only the run revealed), and
``RunData.coverage()``, ``dynascope ls`` and the report show them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import pandas as pd

__all__ = ["CoverageRow", "coverage_frame", "summarize"]

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


def summarize(df: pd.DataFrame, limit: int = 20) -> list[str]:
    """Plain-text lines: counts per kind, then what is not recorded and why."""
    if df.empty:
        return ["coverage: not recorded by this run (dynascope < 0.2)"]
    lines = []
    for kind, grp in df.groupby("kind", sort=False):
        n_yes = int(grp["recorded"].sum())
        lines.append(f"  {kind}s: {n_yes} recorded, {len(grp) - n_yes} not")
    missing = df[~df["recorded"].astype(bool)]
    for _, r in missing.head(limit).iterrows():
        lines.append(f"  - {r['kind']} {r['name']}: {r['reason']}")
    if len(missing) > limit:
        lines.append(f"  ... {len(missing) - limit} more (RunData.coverage())")
    return lines


def merge(rows: Sequence[CoverageRow]) -> list[CoverageRow]:
    """One row per (kind, name): a later row replaces an earlier one."""
    out: dict[tuple[str, str], CoverageRow] = {}
    for r in rows:
        out[(r.kind, r.name)] = r
    return list(out.values())
