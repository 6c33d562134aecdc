"""Reverse-SDE samplers (ancestral, Euler-Maruyama, reverse diffusion, predictor-corrector, Langevin, torchsde)."""

from typing import Callable, Dict

STOCHASTIC: Dict[str, Callable] = {}

#: sampler name -> {knob: default}, read by the CLI's `samplers` command
KNOBS: Dict[str, Dict[str, object]] = {}
