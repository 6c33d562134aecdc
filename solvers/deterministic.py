"""Deterministic and fast samplers (DDIM, probability-flow ODE via torchdiffeq, Heun, DPM-Solver++)."""

from typing import Callable, Dict

DETERMINISTIC: Dict[str, Callable] = {}

#: sampler name -> {knob: default}, read by the CLI's `samplers` command
KNOBS: Dict[str, Dict[str, object]] = {}
