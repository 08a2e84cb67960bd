"""Pure diagnostics: ``(model, loss_fn, batch) -> result dataclass``.

No hooks, no files, no global state; each restores the model exactly.
"""
from .landscape import (  # noqa: E402, F401
    InterpolationResult,
    LandscapeResult,
    TrajectoryPlane,
    filter_normalized_direction,
    interpolate,
    loss_landscape,
    trajectory_plane,
)
