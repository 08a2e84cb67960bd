"""Pure diagnostics: ``(model, loss_fn, batch) -> result dataclass``.

No hooks, no files, no global state; each restores the model exactly.
"""
from .batchnorm import BNGapResult, batch_vs_running, train_eval_gap  # noqa: E402, F401
from .calibration import CalibrationBins, CalibrationResult, calibration  # noqa: E402, F401
from .collapse import CollapseResult, neural_collapse  # noqa: E402, F401
from .hessian import (  # noqa: E402, F401
    EigenResult,
    LayerSharpnessResult,
    SpectrumResult,
    TraceResult,
    adam_preconditioner,
    hessian_eigenvalues,
    hessian_spectrum,
    hessian_trace,
    layer_sharpness,
    preconditioned_sharpness,
    stability_threshold,
)
from .landscape import (  # noqa: E402, F401
    InterpolationResult,
    LandscapeResult,
    TrajectoryPlane,
    filter_normalized_direction,
    interpolate,
    loss_landscape,
    trajectory_plane,
)
from .noise_scale import NoiseScaleResult, gradient_noise_scale, noise_scale_from_norms  # noqa: E402, F401
from .plasticity import (  # noqa: E402, F401
    PlasticityResult,
    dead_fraction,
    dormant_fraction,
    effective_rank,
    plasticity_metrics,
    srank,
    weight_magnitude,
)
from .scores import ExampleScores, example_scores  # noqa: E402, F401
from .weights import (  # noqa: E402, F401
    PowerLawFit,
    WeightSpectrum,
    angular_change,
    power_law_alpha,
    singular_values,
    stable_rank,
    weight_norms,
    weight_spectra,
)
