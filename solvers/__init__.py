"""Samplers for score-based diffusion: plain functions with one signature, one name -> function map.

    fn(model, sde, x_T, *, steps, generator=None, callback=None, progress=False, **knobs) -> Tensor

``SAMPLERS`` maps each name to its function; the CLI, the docs and the experiments read only it.
:func:`sample` draws ``x_T`` from the prior (per sample, reproducibly), counts network evaluations
and optionally keeps the trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from scoresde.noise import as_sample_noise
from scoresde.sde import SDE

from .base import SCHEDULES, CountingModel, Run, SamplingError, model_device, time_grid
from .calibrate import CalibratedGrid, GridCache, calibrate_grid
from .deterministic import DETERMINISTIC
from .deterministic import KNOBS as _DETERMINISTIC_KNOBS
from .stochastic import KNOBS as _STOCHASTIC_KNOBS
from .stochastic import STOCHASTIC

Sampler = Callable[..., torch.Tensor]

#: name -> sampler function; the single registry read by the CLI and experiments.
SAMPLERS: Dict[str, Sampler] = {**STOCHASTIC, **DETERMINISTIC}

#: name -> {knob: default} for every sampler (printed by `scoresde samplers`).
SAMPLER_KNOBS: Dict[str, Dict[str, Any]] = {**_STOCHASTIC_KNOBS, **_DETERMINISTIC_KNOBS}

#: steps used by :func:`sample` when none are given (the papers' usual settings).
DEFAULT_STEPS: Dict[str, int] = {
    "ancestral": 1000,
    "euler_maruyama": 1000,
    "reverse_diffusion": 1000,
    "pc": 1000,
    "langevin": 1000,
    "sde": 1000,
    "ddim": 50,
    "ode": 100,
    "heun": 18,
    "dpm_solver": 20,
}


@dataclass
class SampleResult:
    """Output of :func:`sample`: samples ``x`` ``(B, ...)``, network evaluations ``nfe``, and when
    asked the per-step ``trajectory`` ``(S, B, ...)``, ``denoised`` estimates and ``times`` ``(S,)``."""

    x: torch.Tensor
    nfe: int
    trajectory: Optional[torch.Tensor] = None
    denoised: Optional[torch.Tensor] = None
    times: Optional[torch.Tensor] = None


def sample(
    model: Callable[..., torch.Tensor],
    sde: SDE,
    shape: Optional[Sequence[int]] = None,
    *,
    x_T: Optional[torch.Tensor] = None,
    sampler: str = "pc",
    steps: Optional[int] = None,
    generator: Any = None,
    progress: bool = False,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    keep_trajectory: bool = False,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    enable_grad: bool = False,
    **knobs: Any,
) -> SampleResult:
    """Draw samples with any sampler in :data:`SAMPLERS`.

    Give either ``shape`` ``(B, ...)`` (then ``x_T`` is drawn from the prior with per-sample noise,
    stream 0 of ``generator``, on ``device``: by default the device of the model's first parameter
    or buffer, else the CPU) or ``x_T``. ``knobs`` go to the sampler (``model_kwargs`` among them).
    Runs under ``torch.no_grad()`` (no autograd graph through the steps) unless ``enable_grad``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    if (shape is None) == (x_T is None):
        raise ValueError("give exactly one of shape or x_T")
    if x_T is None:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"shape must be (B, ...) with positive sizes; got {shape}")
        noise = as_sample_noise(generator, shape[0])
        dtype = dtype or torch.get_default_dtype()
        device = model_device(model) if device is None else device
        x_T = sde.prior_std * noise.randn(shape[1:], 0, device=device, dtype=dtype)
        generator = noise
    steps = DEFAULT_STEPS.get(sampler, 100) if steps is None else steps
    counted = CountingModel(model)
    xs: List[torch.Tensor] = []
    x0s: List[torch.Tensor] = []
    ts: List[float] = []

    def keep(info: Dict[str, Any]) -> None:
        if keep_trajectory:
            xs.append(info["x"].detach().clone())
            d = info.get("denoised")
            x0s.append((d if d is not None else torch.full_like(info["x"], float("nan"))).detach().clone())
            ts.append(float(torch.as_tensor(info["t"]).reshape(-1)[0]))
        if callback is not None:
            callback(info)

    hook = keep if (keep_trajectory or callback is not None) else None
    with torch.set_grad_enabled(enable_grad):
        x = SAMPLERS[sampler](counted, sde, x_T, steps=steps, generator=generator, callback=hook, progress=progress,
                              **knobs)
    result = SampleResult(x=x, nfe=counted.nfe)
    if keep_trajectory and xs:
        result.trajectory = torch.stack(xs)
        result.denoised = torch.stack(x0s)
        result.times = torch.tensor(ts, dtype=torch.float64)
    return result


__all__ = ["SAMPLERS", "SAMPLER_KNOBS", "DEFAULT_STEPS", "SCHEDULES", "SampleResult", "SamplingError", "Run", "sample", "time_grid",
           "calibrate_grid", "CalibratedGrid", "GridCache"]
