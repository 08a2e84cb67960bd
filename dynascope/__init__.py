"""dynascope: see what happens inside a PyTorch training run.

Wrap a training loop in :func:`probe`, read the run back with
:func:`load_run`, and draw the papers' figures with :func:`report`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .store import RunData, load_run  # noqa: E402

__all__ = ["__version__", "RunData", "load_run"]

from .probes.base import Collected, Probe  # noqa: E402
from .session import Session, probe  # noqa: E402

__all__ += ["Collected", "Probe", "Session", "probe"]
