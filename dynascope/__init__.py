"""dynascope: see what happens inside a PyTorch training run.

Wrap a training loop in :func:`probe`, read the run back with
:func:`load_run`, and draw the papers' figures with :func:`report`::

    with dynascope.probe(model, optimizer, run_dir="runs/exp1", every=10) as run:
        for x, y in loader:
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            run.step(loss=loss)
    dynascope.report(["runs/exp1"], "report.html")

In a notebook a run shows itself (``load_run(path)`` as the cell's value),
``figures()`` lists the report's figures and ``figure(name, runs)`` returns one
as a matplotlib Figure.

The diagnostics (Hessian, landscapes, plasticity) and the scheduled
diagnostics that run them during training are imported on first use, so
``import dynascope`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from .capture.session import Session, probe  # noqa: E402
from .core.version import __version__  # noqa: E402
from .probes.base import Collected, Probe, ProbeContext, Stat  # noqa: E402
from .probes.scheduled import Scheduled, ScheduledContext  # noqa: E402
from .run import Run, load_run  # noqa: E402
from .store import RunData, RunStoreError  # noqa: E402

# public name -> module that defines it (imported lazily)
_LAZY: dict[str, str] = {
    "report": "dynascope.reports.html",
    "figures": "dynascope.reports.catalog",
    "figure": "dynascope.reports.catalog",
    "FigureDataError": "dynascope.reports.catalog",
    "Curvature": "dynascope.probes.curvature",
    "Landscape": "dynascope.probes.landscape",
    "Plasticity": "dynascope.probes.plasticity",
    "BNGap": "dynascope.probes.batchnorm",
    "hessian_eigenvalues": "dynascope.diagnostics.hessian",
    "hessian_trace": "dynascope.diagnostics.hessian",
    "hessian_spectrum": "dynascope.diagnostics.hessian",
    "layer_sharpness": "dynascope.diagnostics.hessian",
    "preconditioned_sharpness": "dynascope.diagnostics.hessian",
    "stability_threshold": "dynascope.diagnostics.hessian",
    "loss_landscape": "dynascope.diagnostics.landscape",
    "interpolate": "dynascope.diagnostics.landscape",
    "trajectory_plane": "dynascope.diagnostics.landscape",
    "effective_rank": "dynascope.diagnostics.plasticity",
    "srank": "dynascope.diagnostics.plasticity",
    "dead_fraction": "dynascope.diagnostics.plasticity",
    "dormant_fraction": "dynascope.diagnostics.plasticity",
    "weight_magnitude": "dynascope.diagnostics.plasticity",
    "equilibrium_angle": "dynascope.diagnostics.scale",
    "Calibration": "dynascope.probes.calibration",
    "NoiseScale": "dynascope.probes.noise_scale",
    "GradientTests": "dynascope.probes.gradient_tests",
    "Alpha": "dynascope.probes.alpha",
    "gradient_tests": "dynascope.diagnostics.gradient_tests",
    "per_example_gradients": "dynascope.diagnostics.per_example",
    "Collapse": "dynascope.probes.collapse",
    "calibration": "dynascope.diagnostics.calibration",
    "gradient_noise_scale": "dynascope.diagnostics.noise_scale",
    "neural_collapse": "dynascope.diagnostics.collapse",
    "example_scores": "dynascope.diagnostics.scores",
    "Sentinel": "dynascope.probes.sentinel",
    "findings": "dynascope.analysis.check",
    "compare": "dynascope.analysis.comparison",
    "detect_events": "dynascope.analysis.forensics",
    "load_snapshot": "dynascope.capture.snapshot",
    "snapshots": "dynascope.capture.snapshot",
    "Snapshot": "dynascope.capture.snapshot",
    "drift_warnings": "dynascope.core.drift",
}

__all__ = ["__version__", "Collected", "Probe", "ProbeContext", "Stat", "RunData", "Scheduled", "ScheduledContext",
           "Session", "load_run", "probe", "Run", "RunStoreError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dynascope' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
