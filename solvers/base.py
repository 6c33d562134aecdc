"""What every sampler shares: the model wrapper, time grids, step reporting and guards.

A sampler is a plain function with one signature::

    fn(model, sde, x_T, *, steps, generator=None, callback=None, progress=False, **knobs) -> Tensor

``model(x, t, **model_kwargs) -> eps`` with ``t`` of shape ``(B,)``; ``generator`` is ``None``, an int
seed, a ``torch.Generator`` or a :class:`scoresde.noise.SampleNoise` (noise is drawn per sample, so
sample i does not depend on the batch it was drawn in); ``callback`` receives one dict per step
``{"step", "t", "x", "denoised"}``; ``state_hook`` receives a :class:`Step` after every step and may
return a replacement state. ``model_kwargs`` are passed to the model untouched (class labels, guidance
scales). Samplers build on :class:`Run`, which holds these pieces and is the one step driver: every
sampler hands each new state to :meth:`Run.report` (NaN guard, callback, state hook).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from scoresde._tensor import unchecked
from scoresde.noise import SampleNoise, as_sample_noise
from scoresde.parameterization import eps_to_x0
from scoresde.sde import SDE

Callback = Callable[[Dict[str, Any]], None]

#: noise streams of state hooks: step ``i``, draw ``k`` uses stream ``HOOK_STREAMS + i * HOOK_DRAWS + k``
#: (far above the streams samplers use, so a hook never changes the sampler's own noise)
HOOK_STREAMS = 0x60000000
HOOK_DRAWS = 64

#: :meth:`Run.noise` draws at most this many upcoming streams, and this many numbers, in one call.
NOISE_AHEAD = 8
NOISE_AHEAD_ELEMENTS = 1 << 19


class SamplingError(RuntimeError):
    """Raised when the state stops being finite; the message names the step and the time."""


class CountingModel:
    """Wrap a model and count its calls: one call on a batch is one network evaluation (NFE)."""

    def __init__(self, model: Callable[..., torch.Tensor]):
        self.model = model
        self.nfe = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        self.nfe += 1
        return self.model(x, t, **kwargs)


# ---------------------------------------------------------------------------------------------
# Time grids: each returns a float64 tensor of steps + 1 decreasing times from t_max to t_min.
# ---------------------------------------------------------------------------------------------
def uniform_grid(sde: SDE, steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Uniform in t (Song et al. 2021)."""
    return torch.linspace(t_max, t_min, steps + 1, dtype=torch.float64)


def quadratic_grid(sde: SDE, steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Uniform in sqrt(t): denser near t = 0 (DDIM's 'quadratic' skip, Song et al. 2021a)."""
    r = torch.linspace(math.sqrt(t_max), math.sqrt(t_min), steps + 1, dtype=torch.float64)
    return r * r


def logsnr_grid(sde: SDE, steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """Uniform in log-SNR lambda (DPM-Solver, Lu et al. 2022)."""
    lam = sde.log_snr(torch.tensor([t_max, t_min], dtype=torch.float64))
    grid = sde.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), steps + 1, dtype=torch.float64))
    grid[0], grid[-1] = t_max, t_min
    return grid


def karras_grid(sde: SDE, steps: int, t_min: float, t_max: float, rho: float = 7.0) -> torch.Tensor:
    """Uniform in sigma^(1/rho), sigma = std/alpha (Karras et al. 2022, eq. 5; rho = 7)."""
    s = sde.sigma(torch.tensor([t_max, t_min], dtype=torch.float64))
    r = torch.linspace(float(s[0]) ** (1 / rho), float(s[1]) ** (1 / rho), steps + 1, dtype=torch.float64)
    grid = sde.t_from_sigma(r**rho)
    grid[0], grid[-1] = t_max, t_min
    return grid


def window_grid(sde: SDE, steps: int, t_min: float, t_max: float, sigma_lo: float = 0.5, sigma_hi: float = 10.0) -> torch.Tensor:
    """Steps uniform in ``v(sigma) = log((sigma + sigma_hi) / (sigma + sigma_lo))``.

    Inside the window ``sigma_lo << sigma << sigma_hi``, ``v ~ -log sigma``: uniform log-SNR steps,
    where the denoiser ``D`` changes fastest (posterior modes separate, components sharpen). Above it
    ``v ~ sigma_hi / sigma``: uniform in ``1/sigma``, matching ``D ~ mean + Cov y / sigma^2`` with
    ``y ~ sigma z``, which changes by ``O(1/sigma)``. Below it ``v ~ const - sigma / sigma_lo``:
    uniform in ``sigma``, where ``D = y + sigma^2 score`` barely moves. So the step is sized to how
    much ``D`` changes in each regime rather than spread evenly over the whole log-SNR range (which
    spends about two thirds of the steps outside the window for ``sigma`` in [0.01, 157]).
    The defaults suit data of scale ~1-3 (per-coordinate std); scale both with the data.
    """
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f"window needs 0 < sigma_lo < sigma_hi; got ({sigma_lo}, {sigma_hi})")
    ends = sde.sigma(torch.tensor([t_max, t_min], dtype=torch.float64))
    v = torch.log((ends + sigma_hi) / (ends + sigma_lo))
    e = torch.exp(torch.linspace(float(v[0]), float(v[1]), steps + 1, dtype=torch.float64))
    grid = sde.t_from_sigma((sigma_hi - sigma_lo * e) / (e - 1))  # inverse of v
    grid[0], grid[-1] = t_max, t_min
    return grid


SCHEDULES: Dict[str, Callable[..., torch.Tensor]] = {
    "uniform": uniform_grid,
    "quadratic": quadratic_grid,
    "logsnr": logsnr_grid,
    "karras": karras_grid,
    "window": window_grid,
}


def time_grid(
    sde: SDE,
    steps: int,
    schedule: str = "uniform",
    t_min: Optional[float] = None,
    t_max: Optional[float] = None,
    **schedule_kwargs: Any,
) -> torch.Tensor:
    """``steps + 1`` times from ``t_max`` (default T) down to ``t_min`` (default ``sde.t_min``);
    ``schedule_kwargs`` go to the schedule (``rho`` for karras, ``sigma_lo``/``sigma_hi`` for window)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}; got {schedule!r}")
    t_min = sde.t_min if t_min is None else float(t_min)
    t_max = sde.T if t_max is None else float(t_max)
    if not 0 < t_min < t_max <= sde.T:
        raise ValueError(f"need 0 < t_min < t_max <= T={sde.T}; got t_min={t_min}, t_max={t_max}")
    return SCHEDULES[schedule](sde, steps, t_min, t_max, **schedule_kwargs)


# ---------------------------------------------------------------------------------------------
# The per-run helper samplers build on.
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """The pieces one sampling run needs, so each sampler body stays short.

    ``eps(x, t)`` and ``denoise(x, t)`` call the model with a ``(B,)`` time in ``x``'s dtype;
    ``noise(x, stream)`` draws per-sample noise; ``report`` checks finiteness and calls the callback.
    """

    model: Callable[..., torch.Tensor]
    sde: SDE
    x: torch.Tensor
    generator: Any = None
    callback: Optional[Callback] = None
    progress: bool = False
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    state_hook: Optional[Callable[["Step"], Optional[torch.Tensor]]] = None

    def __post_init__(self) -> None:
        check_state(self.x)
        self._checked = False
        self._noise: Optional[SampleNoise] = None
        self._ahead: Dict[int, torch.Tensor] = {}
        #: set by a sampler that will ask for the streams ``0 .. streams - 1`` in increasing order;
        #: :meth:`noise` may then draw several of them at once (never past the end)
        self.streams: Optional[int] = None
        #: whether the caller chose the number of steps (set by the registry; adaptive samplers refuse it)
        self.steps_given = False
        self.model_kwargs = dict(self.model_kwargs or {})

    @property
    def wants_denoised(self) -> bool:
        """Whether a callback or a state hook will read the step's denoised estimate."""
        return self.callback is not None or self.state_hook is not None

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def times(self, t: torch.Tensor | float) -> torch.Tensor:
        """Broadcast a scalar time to the ``(B,)`` tensor the model contract requires."""
        t = torch.as_tensor(t, dtype=self.x.dtype, device=self.x.device)
        return t.expand(self.batch) if t.ndim == 0 else t

    def eps(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        if self._checked:
            with unchecked():
                return self.model(x, self.times(t), **self.model_kwargs)
        try:  # the first call of a run: the model contract, checked once
            with unchecked():
                out = self.model(x, self.times(t), **self.model_kwargs)
        except RuntimeError:
            from scoresde.adapters import check_dtype

            inner = self.model
            while isinstance(inner, CountingModel):
                inner = inner.model
            check_dtype(inner, x)  # a dtype mismatch gets one clear line instead of a matmul error
            raise
        check_model_output(out, x)
        self._checked = True
        return out

    def denoise(self, x: torch.Tensor, t: torch.Tensor | float, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x0 = (x - std eps) / alpha``; pass ``eps`` to reuse an evaluation."""
        tb = self.times(t)
        if eps is None:
            eps = self.eps(x, tb)
        with unchecked():
            return eps_to_x0(x, eps, self.sde, tb)

    def noise(self, like: torch.Tensor, stream: int) -> torch.Tensor:
        """Standard normal noise shaped like ``like``, drawn per sample; one ``stream`` per draw.

        When the sampler has declared ``streams``, up to ``NOISE_AHEAD`` upcoming streams (at most
        ``NOISE_AHEAD_ELEMENTS`` numbers in all) are drawn in one call
        (:meth:`SampleNoise.randn_streams`, bit-identical to separate draws) and handed out in
        turn: a draw's fixed cost (a few dozen small kernels, ~0.3-0.6 ms on one CPU core) is then
        paid once per block instead of once per step. The returned tensor is the caller's to modify.
        """
        if self._noise is None:
            self._noise = as_sample_noise(self.generator, self.batch)
        key = stream + 1  # stream 0 is reserved for x_T in sample()
        z = self._ahead.pop(key, None)
        if z is not None and z.shape == like.shape and z.dtype == like.dtype and z.device == like.device:
            return z
        count = 1
        if self.streams is not None:
            count = max(1, min(NOISE_AHEAD, NOISE_AHEAD_ELEMENTS // max(1, like.numel()), self.streams - stream))
        block = self._noise.randn_streams(tuple(like.shape[1:]), key, count, device=like.device, dtype=like.dtype)
        self._ahead = {key + j: block[j] for j in range(1, count)}
        return block[0]

    def steps(self, n: int, desc: str = "sampling") -> Iterable[int]:
        """``range(n)`` with a progress bar when asked."""
        if not self.progress:
            return range(n)
        from tqdm.auto import tqdm

        return tqdm(range(n), desc=desc, leave=False)

    def hook_noise(self, like: torch.Tensor, step: int, k: int = 0) -> torch.Tensor:
        """Per-sample standard normal noise for draw ``k`` of a state hook at ``step`` (its own
        streams, drawn apart from the sampler's read-ahead so the sampler's noise is unchanged)."""
        if not 0 <= k < HOOK_DRAWS:
            raise ValueError(f"a state hook may draw at most {HOOK_DRAWS} noise tensors per step; got k={k}")
        if self._noise is None:
            self._noise = as_sample_noise(self.generator, self.batch)
        key = HOOK_STREAMS + step * HOOK_DRAWS + k
        return self._noise.randn_streams(tuple(like.shape[1:]), key, 1, device=like.device, dtype=like.dtype)[0]

    def report(self, step: int, t: torch.Tensor | float, v: torch.Tensor, denoised: Optional[torch.Tensor] = None,
               *, scale: float = 1.0, t_prev: Optional[float] = None) -> torch.Tensor:
        """The end of every step: guard, callback, state hook. Returns the state to continue from.

        ``v`` is the sampler's own state variable, the state being ``x = scale * v`` (``scale`` is
        ``alpha(t)`` for samplers that integrate ``y = x / alpha``; ``x`` is only built when a
        callback or hook reads it). Raises :class:`SamplingError` when ``v`` is not finite
        (:func:`all_finite`), calls the callback with ``{"step", "t", "x", "denoised"}``, then the
        state hook with a :class:`Step`; a tensor it returns replaces the state (divided by ``scale``).
        """
        if not all_finite(v):
            tv = float(torch.as_tensor(t).reshape(-1)[0])
            raise SamplingError(f"non-finite values in the state at step {step} (t = {tv:.6g}); sampling stopped")
        if self.callback is not None:
            self.callback({"step": step, "t": t, "x": v if scale == 1.0 else scale * v, "denoised": denoised})
        return self.hook(step, t, v, denoised, scale=scale, t_prev=t_prev)

    def hook(self, step: int, t: torch.Tensor | float, v: torch.Tensor, denoised: Optional[torch.Tensor] = None,
             *, scale: float = 1.0, t_prev: Optional[float] = None) -> torch.Tensor:
        """Hand the state ``x = scale * v`` to the state hook (if any) and return the state to continue
        from, in the sampler's variable. Called by :meth:`report`; a sampler that revises its state
        after reporting it (``dpm_solver``'s corrector) calls it again on the revised state."""
        if self.state_hook is None:
            return v
        x = v if scale == 1.0 else scale * v
        info = Step(step, float(torch.as_tensor(t).reshape(-1)[0]), None if t_prev is None else float(t_prev), x,
                    denoised, self.sde, lambda k=0: self.hook_noise(x, step, k))
        new = self.state_hook(info)
        if new is None:
            return v
        if not isinstance(new, torch.Tensor) or new.shape != x.shape or new.dtype != x.dtype:
            raise ValueError(f"state_hook must return None or a tensor like the state {tuple(x.shape)} {x.dtype}; "
                             f"got {getattr(new, 'shape', type(new).__name__)}")
        return new if scale == 1.0 else new / scale


@dataclass
class Step:
    """What a state hook sees after step ``index``: the state ``x`` ``(B, ...)`` at time ``t``
    (reached from ``t_prev``), the denoised estimate ``x0`` of the step's last network evaluation
    (``None`` where the sampler forms none), the SDE, and ``noise(k=0)``: per-sample standard normal
    noise shaped like ``x``, reproducible and distinct for each step and ``k``."""

    index: int
    t: float
    t_prev: Optional[float]
    x: torch.Tensor
    denoised: Optional[torch.Tensor]
    sde: SDE
    noise: Callable[..., torch.Tensor]


def check_state(x: Any) -> None:
    """``x_T`` must be a floating-point tensor ``(B, ...)`` with at least one element."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"x_T must be a tensor of shape (B, ...) with at least two dims; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"x_T must not be empty; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x_T must be a floating-point tensor; got {x.dtype} (convert with .float() or .double())")


def check_model_output(out: Any, x: torch.Tensor) -> None:
    """The model contract ``model(x, t) -> eps``: a tensor of ``x``'s shape (checked on the first call)."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model must return a tensor eps shaped like x {tuple(x.shape)}; got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"the model returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; "
                         "model(x, t) must return eps shaped like x")
    if not out.is_floating_point():
        raise ValueError(f"the model returned a {out.dtype} tensor; eps must be floating point")


def explicit_grid(sde: SDE, t_grid: Any, steps: int, t_min: Optional[float] = None) -> torch.Tensor:
    """An explicit time grid as a float64 CPU tensor: ``steps + 1`` strictly decreasing finite times
    in ``(0, T]`` (a sequence, a tensor, or an object with a ``.t`` attribute holding one, such as
    :class:`solvers.CalibratedGrid`). ``t_min``, if given, must equal its last time."""
    grid = t_grid if isinstance(t_grid, (torch.Tensor, list, tuple)) else getattr(t_grid, "t", t_grid)
    try:
        grid = torch.as_tensor(grid, dtype=torch.float64).reshape(-1).cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"t_grid must be a sequence of times; got {type(t_grid).__name__}") from None
    if not isinstance(steps, int) or steps < 1 or grid.numel() != steps + 1:
        raise ValueError(f"t_grid must hold steps + 1 = {steps + 1} times; got {grid.numel()} (steps={steps!r})")
    if not bool(torch.isfinite(grid).all()) or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError("t_grid must be finite and strictly decreasing")
    if not (float(grid[-1]) > 0 and float(grid[0]) <= float(sde.T)):
        raise ValueError(f"t_grid must lie in (0, T={sde.T}]; got [{float(grid[-1])}, {float(grid[0])}]")
    if t_min is not None and abs(float(t_min) - float(grid[-1])) > 1e-12 * max(1.0, abs(float(t_min))):
        raise ValueError(f"t_min={t_min} disagrees with the end of t_grid ({float(grid[-1])}); leave t_min unset")
    return grid


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for plain callables."""
    for attr in ("parameters", "buffers"):
        tensors = getattr(model, attr, None)
        if callable(tensors):
            for p in tensors():
                return p.device
    return torch.device("cpu")


def all_finite(x: torch.Tensor) -> bool:
    """True iff every element of ``x`` is finite, at the cost of one reduction when it is.

    IEEE addition propagates NaN and infinities (``inf + finite = inf``, ``inf - inf = nan``), so a
    finite ``sum(x)`` proves every element finite. The converse fails only when finite elements
    overflow the sum (float16 sums above 65504, say); so a non-finite sum is confirmed by the full
    elementwise ``isfinite(x).all()`` before anything is reported. One host read per call, as before.
    """
    if math.isfinite(float(x.detach().sum())):
        return True
    return bool(torch.isfinite(x).all())
