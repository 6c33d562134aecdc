"""Turn any denoising network into the package's model contract ``model(x, t, **kwargs) -> eps``.

Every sampler, the likelihood and calibration ask a model for ``eps`` at continuous time ``t``, with
``x_t = alpha(t) x_0 + std(t) eps`` for the SDE in use. Networks trained elsewhere predict other
things; each adapter here converts one convention exactly (no approximation beyond rounding):

========== ======================================== =============================================
prediction network call                               eps from the output ``o``
========== ======================================== =============================================
``eps``    ``net(x, t)``                             ``o``
``x0``     ``net(x, t)``                             ``(x - alpha o) / std``
``v``      ``net(x, t)``  (Salimans & Ho 2022)       ``(std x + alpha o) / (alpha^2 + std^2)``
``score``  ``net(x, t)``  (Song et al. 2021)         ``-std o``
``denoiser`` ``net(x / alpha, sigma)`` (Karras et     ``(x / alpha - o) / sigma``, ``sigma = std / alpha``
           al. 2022; k-diffusion)
``edm``    ``net(c_in y, t)`` with ``y = x/alpha``   ``D = c_skip y + c_out o``; ``(y - D) / sigma``
           (EDM preconditioning, trained here)
========== ======================================== =============================================

``v = alpha eps - std x0`` is Salimans & Ho's velocity; for a VP SDE (``alpha^2 + std^2 = 1``) the
``v`` row is their ``eps = std x + alpha v``. EDM's scalings (Karras et al. 2022, Table 1) are
``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
``c_in = 1 / sqrt(sigma^2 + sd^2)`` with ``sd = sigma_data``; the noise input ``c_noise`` is the
network's own time ``t`` (a monotone function of ``sigma``, like EDM's ``ln(sigma) / 4``), so the
package's networks and time embeddings serve every target.

Discrete-timestep networks (DDPM, diffusers' ``UNet2DModel``) take an integer-indexed timestep
``i`` with ``x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps`` (``abar`` = ``alphas_cumprod``):
:class:`DiscreteTimeAdapter` maps each continuous ``t`` to the fractional timestep whose
(piecewise-linearly interpolated) ``log abar`` equals ``2 log alpha(t)``, so the network always runs
at the noise level the sampler asks for. Networks with learned variances (Nichol & Dhariwal 2021)
return ``2C`` channels; the first (mean) half is the prediction.

:class:`ClipX0` clips or dynamically thresholds (Saharia et al. 2022, "Imagen", section 2.3) the
``x0`` estimate of any eps model and returns the eps that reproduces the clipped estimate,
``eps' = (x - alpha clip(x0)) / std``, so every sampler (DDIM, DPM-Solver, ancestral, ...) sees it.

Adapters check that a network's floating parameters have the dtype of the input ``x`` and raise one
``ValueError`` naming both (instead of a matrix-multiply dtype error deep inside the network).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from . import parameterization as P
from ._tensor import append_dims
from .sde import SDE

Net = Callable[..., Any]

#: predictions a network may output (see the module docstring)
PREDICTIONS = ("eps", "x0", "v", "score", "denoiser", "edm")

#: other names for the same predictions (diffusers' ``prediction_type`` among them)
PREDICTION_ALIASES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "noise": "eps", "karras": "denoiser"}


def canonical_prediction(prediction: str) -> str:
    """The canonical name of ``prediction`` (``"epsilon"`` -> ``"eps"``, ``"sample"`` -> ``"x0"``,
    ``"v_prediction"`` -> ``"v"``); raises ``ValueError`` for an unknown one."""
    name = PREDICTION_ALIASES.get(prediction, prediction)
    if name not in PREDICTIONS:
        known = sorted(set(PREDICTIONS) | set(PREDICTION_ALIASES))
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {known}")
    return name


def unwrap_output(out: Any) -> torch.Tensor:
    """The tensor in a network's output: ``out.sample`` (diffusers' output dataclasses), ``out[0]``
    for tuples and lists, else ``out`` itself."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def network_dtype(net: Any) -> Optional[torch.dtype]:
    """dtype of the first floating parameter (or buffer) of ``net``; ``None`` for parameter-free callables."""
    if not isinstance(net, torch.nn.Module):
        return None
    for p in net.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in net.buffers():
        if b.is_floating_point():
            return b.dtype
    return None


def check_dtype(net: Any, x: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``net``'s floating parameters and the input ``x`` differ in dtype.

    Skipped under autocast (mixed precision feeds lower-precision activations on purpose) and for
    callables without parameters.
    """
    want = network_dtype(net)
    if want is None or want == x.dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise ValueError(
        f"the network's parameters are {want} but the input x is {x.dtype}: cast the network "
        f"(net.to({x.dtype})) or sample in {want} (e.g. solvers.sample(..., dtype={want}))"
    )


class _Wrapper(torch.nn.Module):
    """Base of the adapters: attributes it lacks (``config``, ``num_classes``, ...) are read from the
    wrapped network, so code written for the raw network keeps working on the wrapper."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("net", "model") or name.startswith("_"):
                raise
            d = self.__dict__
            inner = d["_modules"].get("net", d.get("net")) if "net" in d["_modules"] or "net" in d else \
                d["_modules"].get("model", d.get("model"))
            if inner is None:
                raise
            return getattr(inner, name)


def _scales(sde: SDE, x: torch.Tensor, t: torch.Tensor):
    t = sde._t(t, x)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t, append_dims(sde.alpha(t).to(x.dtype), x.ndim), append_dims(sde.std(t).to(x.dtype), x.ndim)


def output_to_eps(out: torch.Tensor, x: torch.Tensor, sde: SDE, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """Convert a network output in the convention ``prediction`` (``eps``, ``x0``, ``v`` or ``score``,
    taken at ``(x, t)``) to ``eps``, by the formulas of :mod:`scoresde.parameterization`."""
    prediction = canonical_prediction(prediction)
    if prediction == "eps":
        return out
    if prediction in _TO_EPS:
        return _TO_EPS[prediction](x, out, sde, t)
    raise ValueError(f"output_to_eps handles eps, x0, v and score; {prediction!r} needs its own adapter")


def eps_to_output(eps: torch.Tensor, x: torch.Tensor, sde: SDE, t: torch.Tensor, prediction: str) -> torch.Tensor:
    """Inverse of :func:`output_to_eps`: ``x0 = (x - std eps)/alpha``, ``v = alpha eps - std x0``,
    ``score = -eps/std``."""
    prediction = canonical_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction in _FROM_EPS:
        return _FROM_EPS[prediction](x, eps, sde, t)
    raise ValueError(f"eps_to_output handles eps, x0, v and score; got {prediction!r}")


#: prediction -> conversion to / from eps, each ``fn(x, value, sde, t)``
_TO_EPS = {"x0": P.x0_to_eps, "v": P.v_to_eps, "score": lambda x, v, sde, t: P.score_to_eps(v, sde, t)}
_FROM_EPS = {"x0": P.eps_to_x0, "v": P.eps_to_v, "score": lambda x, e, sde, t: P.eps_to_score(e, sde, t)}


class PredictionAdapter(_Wrapper):
    """``net(x, t, **kw)`` predicting ``eps``, ``x0``, ``v`` or ``score`` -> ``model(x, t, **kw) -> eps``.

    Args:
        net: the network (any callable; outputs with a ``.sample`` field or tuples are unwrapped).
        sde: the SDE whose ``alpha(t)``, ``std(t)`` the network was trained with.
        prediction: ``"eps"``, ``"x0"``, ``"v"`` or ``"score"`` (or a diffusers alias).
    """

    def __init__(self, net: Net, sde: SDE, prediction: str = "eps"):
        super().__init__()
        prediction = canonical_prediction(prediction)
        if prediction not in ("eps", "x0", "v", "score"):
            raise ValueError(f"PredictionAdapter takes eps, x0, v or score; use DenoiserAdapter or EDMPreconditioner for {prediction!r}")
        self.net, self.sde, self.prediction = net, sde, prediction

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        check_dtype(self.net, x)
        out = unwrap_output(self.net(x, t, **model_kwargs))
        return output_to_eps(out, x, self.sde, t, self.prediction)


class DenoiserAdapter(_Wrapper):
    """A k-diffusion / EDM denoiser ``D(y, sigma) ~ E[x0 | y]`` on the scaled input ``y = x / alpha``
    (``y = x0 + sigma eps``, ``sigma = std / alpha``; Karras et al. 2022) -> ``model(x, t) -> eps``.

    ``eps = (x / alpha - D(x / alpha, sigma(t))) / sigma(t)``. ``sigma`` is passed as a ``(B,)`` tensor
    in the dtype of ``x``.
    """

    def __init__(self, net: Net, sde: SDE):
        super().__init__()
        self.net, self.sde = net, sde

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        check_dtype(self.net, x)
        t, a, s = _scales(self.sde, x, t)
        sigma = (self.sde.sigma(t)).to(x.dtype)
        y = x / a
        d = unwrap_output(self.net(y, sigma, **model_kwargs))
        return (y - d) / append_dims(sigma, x.ndim)


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """EDM preconditioning (Karras et al. 2022, Table 1): ``(c_skip, c_out, c_in)`` at ``sigma``.

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``; the loss weight ``(sigma^2 + sd^2) / (sigma sd)^2 = 1/c_out^2``
    makes the training target ``(x0 - c_skip y) / c_out`` unit-weighted.
    """
    var = sigma * sigma + sigma_data**2
    root = torch.sqrt(var)
    return sigma_data**2 / var, sigma * sigma_data / root, 1.0 / root


class EDMPreconditioner(_Wrapper):
    """A network ``F`` trained with EDM preconditioning -> ``model(x, t) -> eps``.

    With ``y = x / alpha(t)`` and ``sigma = sigma(t)``, ``D(y) = c_skip y + c_out F(c_in y, t)`` (see
    :func:`edm_scalings`; ``c_noise`` is the time ``t`` itself) and ``eps = (y - D) / sigma``.
    :meth:`raw` gives ``(F, target)`` for the loss ``|F - (x0 - c_skip y) / c_out|^2``.
    """

    def __init__(self, net: Net, sde: SDE, sigma_data: float = 0.5):
        super().__init__()
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise ValueError(f"sigma_data must be a positive finite number; got {sigma_data!r}")
        self.net, self.sde, self.sigma_data = net, sde, float(sigma_data)

    def _parts(self, x: torch.Tensor, t: torch.Tensor, model_kwargs):
        t, a, _ = _scales(self.sde, x, t)
        sigma = append_dims(self.sde.sigma(t).to(x.dtype), x.ndim)
        c_skip, c_out, c_in = edm_scalings(sigma, self.sigma_data)
        y = x / a
        f = unwrap_output(self.net(c_in * y, t, **model_kwargs))
        return y, sigma, c_skip, c_out, f

    def denoise(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """``D = c_skip y + c_out F(c_in y, t)``, the estimate of ``x0``."""
        y, _, c_skip, c_out, f = self._parts(x, t, model_kwargs)
        return c_skip * y + c_out * f

    def raw(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, **model_kwargs):
        """``(F, (x0 - c_skip y) / c_out)``: the network output and its EDM training target."""
        y, _, c_skip, c_out, f = self._parts(x, t, model_kwargs)
        return f, (x0 - c_skip * y) / c_out

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        check_dtype(self.net, x)
        y, sigma, c_skip, c_out, f = self._parts(x, t, model_kwargs)
        # y - D = (1 - c_skip) y - c_out F, and (1 - c_skip) = sigma^2 / (sigma^2 + sd^2)
        return ((1.0 - c_skip) * y - c_out * f) / sigma


class DiscreteTimeAdapter(_Wrapper):
    """A discrete-timestep network ``net(x, timestep, **kw)`` (DDPM; diffusers' ``UNet2DModel``) ->
    ``model(x, t, **kw) -> eps``.

    The network was trained on ``x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps``, ``i = 0..N-1``. For each
    continuous ``t`` the adapter finds the fractional timestep ``i(t)`` at which ``log abar`` (linear
    between integers, with ``abar_{-1} = 1``) equals ``2 log alpha(t)`` of ``sde``, calls
    ``net(x, i(t), **kw)`` (float timesteps, as diffusers' U-Nets accept), and converts the output.
    Times beyond the discrete range are clamped to ``[-1, N-1]``.

    Args:
        net: the network.
        sde: the continuous-time SDE the samplers use (:class:`scoresde.ddpm.DiscreteVPSDE` reproduces
            ``abar`` exactly; any VP-type SDE works, evaluated at its own noise levels).
        alphas_cumprod: ``abar`` of shape ``(N,)``; default: ``sde`` discretised at ``t_i = (i + 1) T / 1000``.
        prediction: ``eps``, ``x0``, ``v`` or ``score`` (diffusers' ``epsilon``, ``sample``,
            ``v_prediction`` accepted).
        learned_variance: the output has ``2C`` channels (dim 1) of which the first ``C`` are the
            prediction; ``None`` (default) splits whenever the output has twice the input's channels.
    """

    def __init__(
        self,
        net: Net,
        sde: SDE,
        alphas_cumprod: Optional[torch.Tensor] = None,
        prediction: str = "eps",
        learned_variance: Optional[bool] = None,
    ):
        super().__init__()
        self.net, self.sde = net, sde
        self.prediction = canonical_prediction(prediction)
        if self.prediction not in ("eps", "x0", "v", "score"):
            raise ValueError(f"a discrete-timestep network predicts eps, x0, v or score; got {prediction!r}")
        self.learned_variance = learned_variance
        if alphas_cumprod is None:
            t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000 * sde.T
            alphas_cumprod = torch.exp(2 * sde.log_alpha(t))
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu()
        if abar.ndim != 1 or abar.numel() < 2 or bool(torch.any(abar <= 0)) or bool(torch.any(abar > 1)):
            raise ValueError("alphas_cumprod must be a 1-D tensor of at least 2 entries in (0, 1]")
        if bool(torch.any(abar[1:] >= abar[:-1])):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        # log abar at indices -1, 0, ..., N-1 (decreasing)
        self.register_buffer("_log_abar", torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(abar)]))

    @property
    def num_steps(self) -> int:
        """``N``, the number of discrete training timesteps."""
        return self._log_abar.numel() - 1

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.exp(self._log_abar[1:])

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Fractional timestep ``i(t)`` for continuous time ``t`` (same shape and dtype)."""
        target = 2 * self.sde.log_alpha(t.to(torch.float64))  # float64: integer steps stay integers
        table = -self._log_abar.to(target.device)  # increasing
        hi = torch.searchsorted(table, -target.contiguous()).clamp(1, table.numel() - 1)
        lo = hi - 1
        w = ((-target - table[lo]) / (table[hi] - table[lo])).clamp(0.0, 1.0)
        return (lo.to(torch.float64) + w - 1.0).to(t.dtype)

    def time(self, timestep: torch.Tensor) -> torch.Tensor:
        """Continuous time whose ``alpha(t)^2`` equals the (interpolated) ``abar`` at ``timestep``,
        clamped to ``[0, T]``."""
        i = torch.as_tensor(timestep, dtype=torch.float64).clamp(-1, self.num_steps - 1) + 1
        lo = i.floor().long().clamp(max=self.num_steps - 1)
        w = i - lo
        log_abar = (1 - w) * self._log_abar[lo] + w * self._log_abar[lo + 1]
        lam = log_abar - torch.log(-torch.expm1(log_abar))
        # the last discrete steps may be noisier than alpha(T): clamp into the SDE's horizon
        return self.sde.t_from_log_snr(lam).clamp(0.0, self.sde.T)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        check_dtype(self.net, x)
        t = self.sde._t(t, x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = unwrap_output(self.net(x, self.timestep(t), **model_kwargs))
        split = self.learned_variance
        if split is None:
            split = out.ndim >= 2 and x.ndim >= 2 and out.shape[1] == 2 * x.shape[1]
        if split:
            if out.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"learned_variance=True needs 2C = {2 * x.shape[1]} output channels; got {out.shape[1]}")
            out = out[:, : x.shape[1]]
        return output_to_eps(out, x, self.sde, t, self.prediction)


class ClipX0(_Wrapper):
    """Clip or dynamically threshold the ``x0`` estimate of an eps model; returns the matching eps.

    ``x0 = (x - std eps) / alpha`` is replaced by ``c(x0)`` and ``eps' = (x - alpha c(x0)) / std``, so
    any sampler forming ``x0`` from eps uses the clipped estimate. ``c`` is

    - static clipping (DDPM's images, Ho et al. 2020): ``clamp(x0, -clip, clip)``;
    - dynamic thresholding (Saharia et al. 2022): per sample, ``s = max(clip, quantile(|x0|, p))`` and
      ``c(x0) = clamp(x0, -s, s) * clip / s`` (``clip = 1`` is the paper's ``[-1, 1]`` data range).

    Args:
        model: ``model(x, t, **kw) -> eps``.
        sde: its SDE.
        clip: the data range bound (default 1, images in ``[-1, 1]``).
        percentile: ``p`` in ``(0, 1]`` for dynamic thresholding (Imagen used 0.995); ``None``: static.
        max_threshold: upper limit of ``s`` (diffusers' ``sample_max_value``); ``None``: no limit.
    """

    def __init__(self, model: Net, sde: SDE, clip: float = 1.0, percentile: Optional[float] = None,
                 max_threshold: Optional[float] = None):
        super().__init__()
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"clip must be a positive finite number; got {clip!r}")
        if percentile is not None and not 0.0 < percentile <= 1.0:
            raise ValueError(f"percentile must lie in (0, 1]; got {percentile!r}")
        if max_threshold is not None and not max_threshold >= clip:
            raise ValueError(f"max_threshold must be >= clip={clip}; got {max_threshold!r}")
        self.model, self.sde = model, sde
        self.clip, self.percentile, self.max_threshold = float(clip), percentile, max_threshold

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """``c(x0)`` (see the class docstring)."""
        if self.percentile is None:
            return x0.clamp(-self.clip, self.clip)
        flat = x0.reshape(x0.shape[0], -1).abs()
        work = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
        s = torch.quantile(work, self.percentile, dim=1).to(x0.dtype).clamp(min=self.clip)
        if self.max_threshold is not None:
            s = s.clamp(max=self.max_threshold)
        s = append_dims(s, x0.ndim)
        return torch.maximum(torch.minimum(x0, s), -s) * (self.clip / s)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        t, a, s = _scales(self.sde, x, t)
        eps = self.model(x, t, **model_kwargs)
        x0 = self.clip_x0((x - s * eps) / a)
        return (x - a * x0) / s


def as_eps_model(
    net: Net,
    sde: SDE,
    prediction: str = "eps",
    *,
    discrete: bool = False,
    alphas_cumprod: Optional[torch.Tensor] = None,
    learned_variance: Optional[bool] = None,
    sigma_data: float = 0.5,
    clip: Optional[float] = None,
    percentile: Optional[float] = None,
) -> torch.nn.Module:
    """One entry point: wrap ``net`` so that ``model(x, t, **kw) -> eps`` for ``sde``.

    Args:
        net: the network.
        sde: the SDE it was trained with.
        prediction: what ``net`` outputs (:data:`PREDICTIONS` or a diffusers alias): ``"eps"``, ``"x0"``,
            ``"v"``, ``"score"`` (called as ``net(x, t)``), ``"denoiser"`` (``net(x / alpha, sigma)``),
            ``"edm"`` (EDM-preconditioned ``F``, with ``sigma_data``).
        discrete: the network takes DDPM timesteps (:class:`DiscreteTimeAdapter`, with
            ``alphas_cumprod`` and ``learned_variance``).
        clip, percentile: wrap the result in :class:`ClipX0` (``clip`` alone: static clipping;
            with ``percentile``: dynamic thresholding).

    Returns the wrapper, an ``nn.Module`` holding ``net`` (so ``.to(device)`` moves both).
    """
    prediction = canonical_prediction(prediction)
    model: torch.nn.Module
    if discrete:
        model = DiscreteTimeAdapter(net, sde, alphas_cumprod, prediction, learned_variance)
    elif prediction == "denoiser":
        model = DenoiserAdapter(net, sde)
    elif prediction == "edm":
        model = EDMPreconditioner(net, sde, sigma_data)
    else:
        model = PredictionAdapter(net, sde, prediction)
    if clip is not None or percentile is not None:
        model = ClipX0(model, sde, 1.0 if clip is None else clip, percentile)
    return model


def trained_eps_model(net: Net, sde: SDE, config: Optional[dict] = None) -> Any:
    """The eps model of a network trained here with ``config["prediction"]`` (``TrainConfig.prediction``):
    ``net`` itself for ``"eps"`` (and for configs written before the field existed), else
    :func:`as_eps_model` with ``config["sigma_data"]`` for ``"edm"``."""
    config = config or {}
    prediction = config.get("prediction") or "eps"
    if prediction == "eps":
        return net
    model = as_eps_model(net, sde, prediction, sigma_data=float(config.get("sigma_data", 0.5)))
    if isinstance(net, torch.nn.Module):
        model.train(net.training)
    return model


__all__ = [
    "trained_eps_model",
    "PREDICTIONS",
    "PREDICTION_ALIASES",
    "canonical_prediction",
    "unwrap_output",
    "network_dtype",
    "check_dtype",
    "output_to_eps",
    "eps_to_output",
    "edm_scalings",
    "PredictionAdapter",
    "DenoiserAdapter",
    "EDMPreconditioner",
    "DiscreteTimeAdapter",
    "ClipX0",
    "as_eps_model",
]
