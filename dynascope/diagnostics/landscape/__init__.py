"""Loss landscapes: filter-normalized random directions, 1D curves and 2D
surfaces, linear interpolation between checkpoints, and the PCA plane of a
training trajectory.

Definitions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets";
metrics reference section 4):

* Filter-normalized direction: a Gaussian d with, for every weight with
  ``ndim >= 2``, each output unit's row ``d.flatten(1)[i]`` rescaled to the norm
  of the matching weight row: ``d_i <- d_i / ||d_i|| * ||theta_i||``. Biases
  and normalization-layer parameters are zero in the direction unless
  ``include_bias_bn=True``.
* 1D curve ``L(theta + a d)``; 2D surface ``L(theta + a d1 + b d2)`` with
  ``a, b`` on ``numpy.linspace(-span, span, resolution)``.
* Interpolation ``L((1 - t) theta_a + t theta_b)`` (Goodfellow et al. 2015).
* Trajectory plane: the top-2 PCA directions of ``theta_i - theta_final``
  over the kept checkpoints, with the path projected onto the plane.

Evaluation moves the live model's weights in place under ``torch.no_grad``
(one preallocated copy of the centre, no per-point allocation), and restores
the model exactly afterwards (parameters, buffers, modes, ``.grad``, RNG),
also on error (architecture invariant 4).

Modules (one concern each): :mod:`.results` (result dataclasses),
:mod:`.directions` (filter-normalized directions), :mod:`.engine` (evaluating
the loss at many points), :mod:`.grid` (adaptive 2D grid), :mod:`.functions`
(the public functions). Everything public is importable from here.
"""

from .directions import NORM_LAYERS, Direction, filter_normalized_direction
from .engine import BNPolicy, MetricFn
from .functions import interpolate, loss_landscape, trajectory_plane
from .results import InterpolationResult, LandscapeResult, TrajectoryPlane

__all__ = [
    "LandscapeResult",
    "InterpolationResult",
    "TrajectoryPlane",
    "filter_normalized_direction",
    "loss_landscape",
    "interpolate",
    "trajectory_plane",
    "NORM_LAYERS",
    "Direction",
    "MetricFn",
    "BNPolicy",
]
