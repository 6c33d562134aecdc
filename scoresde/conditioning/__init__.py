"""Controllable generation: sampling ``p(x0 | y)`` from an unconditional model.

Observations ``y = A x0 + sigma_y n`` (:mod:`.operators`), the methods (:mod:`.methods`: replacement,
RePaint, DPS, ΠGDM; :mod:`.smc`: a particle filter), classifier guidance (:mod:`.classifier`) and
distances to exact posteriors (:mod:`.evaluate`). Exact posteriors of Gaussian-mixture priors:
:meth:`scoresde.GaussianMixture.posterior`. See ``docs/conditioning.md``.
"""

from .classifier import ClassifierGuidance, MixtureClassifier, NoisyClassifier, train_classifier
from .evaluate import MMD, component_weights, default_bandwidth, mmd2
from .methods import (
    METHODS,
    ConditionalResult,
    DPSGuidance,
    Observation,
    PiGDMGuidance,
    ReplacementHook,
    conditional_sample,
    repaint,
    repaint_nfe,
    repaint_schedule,
    replace_known,
)
from .operators import OPERATORS, Colorize, Downsample, LinearOperator, Mask, MatrixOperator
from .smc import smc_sample, systematic_resample

__all__ = [
    "LinearOperator", "Mask", "Colorize", "Downsample", "MatrixOperator", "OPERATORS",
    "Observation", "ReplacementHook", "replace_known", "repaint", "repaint_schedule", "repaint_nfe",
    "DPSGuidance", "PiGDMGuidance", "METHODS", "conditional_sample", "ConditionalResult",
    "smc_sample", "systematic_resample",
    "NoisyClassifier", "train_classifier", "MixtureClassifier", "ClassifierGuidance",
    "MMD", "mmd2", "default_bandwidth", "component_weights",
]
