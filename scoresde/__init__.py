"""scoresde: score-based diffusion in continuous time.

SDEs that answer the questions samplers ask, exact Gaussian-mixture scores as ground truth,
conversions among eps / score / x0 / v, and the DDPM bridge. Samplers live in :mod:`solvers`.
"""

from . import analytic, ddpm, likelihood, noise, parameterization
from .analytic import ExactEpsModel, FullCovGaussianMixture, GaussianMixture
from .ddpm import DDPMEpsAdapter, ddpm_betas_from_sde, vpsde_from_ddpm
from .likelihood import bits_per_dim, decode, encode, log_likelihood
from .noise import SampleNoise
from .parameterization import Denoiser, ScoreFunction, score_fn_from_eps
from .sde import SDE, SDES, CosineVPSDE, ReverseSDE, SubVPSDE, VESDE, VPSDE, check_sde, register_sde, sde_from_config
from . import adapters
from .adapters import ClipX0, DenoiserAdapter, DiscreteTimeAdapter, EDMPreconditioner, PredictionAdapter, as_eps_model, check_dtype
from .ddpm import DiscreteVPSDE
from .diffusers_io import from_diffusers, load_any, load_diffusers

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
    "FullCovGaussianMixture",
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
    "check_sde",
    "register_sde",
    "adapters",
    "as_eps_model",
    "check_dtype",
    "PredictionAdapter",
    "DenoiserAdapter",
    "EDMPreconditioner",
    "DiscreteTimeAdapter",
    "ClipX0",
    "DiscreteVPSDE",
    "from_diffusers",
    "load_diffusers",
    "load_any",
]
