"""``dynascope.load_run``: a run directory as a :class:`Run`, the store's
:class:`~dynascope.store.RunData` plus what needs the layers above the store:
its events and forensics (:mod:`dynascope.analysis.forensics`), its snapshots
(:mod:`dynascope.capture.snapshot`) and its notebook display
(:mod:`dynascope.reports.inline`). The store itself knows none of them."""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from .store import RunData

__all__ = ["Run", "load_run"]


class Run(RunData):
    """A recorded run (see :class:`~dynascope.store.RunData` for its data)."""

    def _repr_html_(self) -> str:
        """The run in a notebook: run table, recorded metrics, findings (dynascope.reports.inline)."""
        from .reports.inline import run_html

        return run_html(self)

    def events(self, *, detect: bool | None = None) -> pd.DataFrame:
        """Events (loss spikes, non-finite losses, ...): columns step, kind, value, threshold, source.

        The stored ``event.<kind>`` rows, or events detected from the recorded loss when none is stored
        (see :func:`dynascope.analysis.forensics.run_events` and docs/forensics.md).
        """
        from .analysis.forensics import run_events

        return run_events(self, detect=detect)

    def forensics(self, step: int, **kwargs: Any) -> pd.DataFrame:
        """Modules ranked by when they left their running band before the event at ``step``: columns
        module, metric, first_step, ratio, ... (see :func:`dynascope.analysis.forensics.forensics`)."""
        from .analysis.forensics import forensics

        return forensics(self, step, **kwargs)


    def snapshots(self) -> pd.DataFrame:
        """The model/optimizer/RNG snapshots the run wrote on events (``snapshot_every``): columns step,
        event, event_step, nbytes, file (see :mod:`dynascope.capture.snapshot`)."""
        from .capture.snapshot import snapshots

        return snapshots(self)

    def snapshot(self, step: int | None = None) -> Any:
        """The snapshot taken at ``step`` (default: the last one) as a :class:`dynascope.capture.snapshot.Snapshot`;
        ``.restore(model, optimizer)`` puts it back for a replay."""
        from .capture.snapshot import load_snapshot

        return load_snapshot(self, step)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Open a run directory for reading; raises :class:`~dynascope.store.RunStoreError` (one line naming
    the file and the problem) for a path that is not a readable run."""
    return Run(path)
