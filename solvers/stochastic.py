"""Reverse-SDE samplers (ancestral, Euler-Maruyama, reverse diffusion, predictor-corrector, Langevin, torchsde)."""

from typing import Callable, Dict

STOCHASTIC: Dict[str, Callable] = {}
