"""scoresde: score-based diffusion in continuous time.

SDEs that answer the questions samplers ask, exact Gaussian-mixture scores as ground truth,
conversions among eps / score / x0 / v, and the DDPM bridge. Samplers live in :mod:`solvers`.
"""

from . import analytic, ddpm, likelihood, noise, parameterization
from .analytic import ExactEpsModel, GaussianMixture
from .ddpm import DDPMEpsAdapter, ddpm_betas_from_sde, vpsde_from_ddpm
from .likelihood import bits_per_dim, decode, encode, log_likelihood
from .noise import SampleNoise
from .parameterization import Denoiser, ScoreFunction, score_fn_from_eps
from .sde import SDE, SDES, CosineVPSDE, ReverseSDE, SubVPSDE, VESDE, VPSDE, sde_from_config

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "SDES",
    "VPSDE",
    "SubVPSDE",
    "VESDE",
    "CosineVPSDE",
    "ReverseSDE",
    "sde_from_config",
    "GaussianMixture",
    "ExactEpsModel",
    "ScoreFunction",
    "Denoiser",
    "score_fn_from_eps",
    "DDPMEpsAdapter",
    "vpsde_from_ddpm",
    "ddpm_betas_from_sde",
    "SampleNoise",
    "log_likelihood",
    "bits_per_dim",
    "encode",
    "decode",
    "likelihood",
    "analytic",
    "ddpm",
    "noise",
    "parameterization",
    "__version__",
]
