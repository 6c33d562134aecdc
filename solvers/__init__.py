"""Samplers for score-based diffusion: plain functions with one signature, one name -> function map.

    SAMPLERS[name](model, sde, x_T, *, steps=None, generator=None, callback=None, progress=False,
                   state_hook=None, model_kwargs=None, **options) -> Tensor

``SAMPLERS`` (the registry, :mod:`solvers.registry`) maps each name to a typed :class:`Sampler`
record; the CLI, the docs and the experiments read only it, and :func:`register` adds one from
outside. :func:`sample` draws ``x_T`` from the prior (per sample, reproducibly), counts network
evaluations and optionally keeps the trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from scoresde.noise import as_sample_noise
from scoresde.sde import SDE

from . import ddim, dpm_solver, dpmpp_sde, heun, ode, stochastic, torchsde_solver
from .base import SCHEDULES, CountingModel, Run, SamplingError, Step, model_device, time_grid
from .calibrate import CalibratedGrid, GridCache, calibrate_grid
from .registry import REGISTRY, GridOptions, Sampler, SamplerOptions, get, knob, register

for _record in (*stochastic.RECORDS, torchsde_solver.RECORD, ddim.RECORD, dpmpp_sde.RECORD, ode.RECORD, heun.RECORD,
                dpm_solver.RECORD):
    register(_record)

#: name -> :class:`Sampler` record (each callable with the one signature); the registry itself.
SAMPLERS = REGISTRY

#: the sampler :func:`sample`, the CLI and the trainer use when none is named
DEFAULT_SAMPLER = "dpm_solver"


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
    sampler: str = DEFAULT_SAMPLER,
    steps: Optional[int] = None,
    generator: Any = None,
    progress: bool = False,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    state_hook: Optional[Callable[[Step], Optional[torch.Tensor]]] = None,
    keep_trajectory: bool = False,
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    enable_grad: bool = False,
    **knobs: Any,
) -> SampleResult:
    """Draw samples with any sampler in :data:`SAMPLERS`.

    Give either ``shape`` ``(B, ...)`` (then ``x_T`` is drawn from the prior with per-sample noise,
    stream 0 of ``generator``, on ``device``: by default the device of the model's first parameter
    or buffer, else the CPU) or ``x_T``. ``steps`` defaults to the record's ``default_steps``;
    ``callback(info)`` and ``state_hook(step)`` run after every step (see :class:`Sampler`);
    ``keep_trajectory`` keeps ``x_T`` and the state after every step (``trajectory`` ``(S + 1, B, ...)``,
    ``denoised`` likewise, NaN where a step forms none, ``times`` ``(S + 1,)``). ``knobs`` are the
    sampler's options (``model_kwargs`` among them). Runs under ``torch.no_grad()`` (no autograd
    graph through the steps) unless ``enable_grad``. Returns a :class:`SampleResult`.
    """
    record = get(sampler)
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

    if keep_trajectory:  # x_T first, at the prior's time T
        xs.append(x_T.detach().clone())
        x0s.append(torch.full_like(x_T, float("nan")))
        ts.append(float(sde.T))
    hook = keep if (keep_trajectory or callback is not None) else None
    with torch.set_grad_enabled(enable_grad):
        x = record(counted, sde, x_T, steps=steps, generator=generator, callback=hook, progress=progress,
                   state_hook=state_hook, **knobs)
    result = SampleResult(x=x, nfe=counted.nfe)
    if keep_trajectory:
        result.trajectory = torch.stack(xs)
        result.denoised = torch.stack(x0s)
        result.times = torch.tensor(ts, dtype=torch.float64)
    return result


__all__ = ["SAMPLERS", "REGISTRY", "DEFAULT_SAMPLER", "Sampler", "SamplerOptions", "GridOptions", "knob", "register", "get",
           "SCHEDULES", "SampleResult", "SamplingError", "Run", "Step", "sample", "time_grid", "CountingModel",
           "calibrate_grid", "CalibratedGrid", "GridCache"]
