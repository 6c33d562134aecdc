"""Networks from Hugging Face ``diffusers``, read from disk, as ``model(x, t) -> eps`` with their SDE.

diffusers' U-Nets are discrete-timestep networks: ``unet(x_i, i)`` with
``x_i = sqrt(abar_i) x_0 + sqrt(1 - abar_i) eps`` for ``i = 0..N-1``, the schedule ``abar`` (the
scheduler's ``alphas_cumprod``) and the output convention (``prediction_type``: ``epsilon``,
``sample`` or ``v_prediction``) living in the scheduler. :func:`from_diffusers` reads all three from
the scheduler and returns a :class:`scoresde.adapters.DiscreteTimeAdapter` with a
:class:`scoresde.ddpm.DiscreteVPSDE` through the same ``abar`` (discrete step ``i`` is time
``t_i = (i + 1) T / N``), so every sampler, the likelihood and calibration run the network at the noise
levels it was trained on. :func:`diffusers_timesteps` gives the continuous-time grid of a scheduler's
inference timesteps, for reproducing diffusers' own samplers step for step.

diffusers is optional (``pip install 'scoresde[diffusers]'``); it is imported only when needed.
Nothing here downloads: folders are read with ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from .adapters import ClipX0, DiscreteTimeAdapter, canonical_prediction
from .ddpm import DiscreteVPSDE
from .sde import SDE

PathLike = str | os.PathLike

INSTALL_HINT = "pip install 'scoresde[diffusers]'"


def require_diffusers():
    """Import and return ``diffusers``; raise ``ImportError`` with the install line when missing."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ImportError(f"reading diffusers models needs the diffusers package: {INSTALL_HINT}") from None
    return diffusers


def looks_like_safetensors(path: PathLike) -> bool:
    """True when ``path`` is a safetensors file: an 8-byte little-endian header length ``n`` followed by
    ``n`` bytes of JSON starting with ``{`` (the format's layout)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def safetensors_message(path: PathLike) -> str:
    """The one-line explanation for a safetensors file given where a scoresde checkpoint was expected."""
    path = Path(path)
    return (f"{path} is a safetensors file (diffusers / Hugging Face weights), not a scoresde checkpoint; "
            f"pass the folder that holds it with its config.json, or the pipeline folder with model_index.json "
            f"({path.parent}), to scoresde.load_any / `scoresde sample FOLDER`")


def scheduler_alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """``abar`` of a diffusers scheduler as float64 ``(N,)`` (the values its own ``step`` uses)."""
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod; only DDPM-type (VP) schedulers are supported")
    return torch.as_tensor(abar).detach().to(torch.float64).cpu()


def from_diffusers(unet: Any, scheduler: Any, *, sde: Optional[SDE] = None,
                   clip_sample: bool = False) -> Tuple[torch.nn.Module, SDE]:
    """``(model, sde)`` for a diffusers U-Net and its scheduler.

    From the scheduler: ``alphas_cumprod`` (the schedule the network was trained on),
    ``prediction_type`` (``epsilon`` -> eps, ``sample`` -> x0, ``v_prediction`` -> v) and
    ``variance_type`` (``learned`` / ``learned_range``: the U-Net returns ``2C`` channels, the first
    ``C`` are kept). ``sde`` defaults to :class:`~scoresde.ddpm.DiscreteVPSDE` through that ``abar``,
    so timestep ``i`` is time ``(i + 1) / N``; any other VP-type SDE may be given (the adapter then maps
    its noise levels to fractional timesteps). Class labels and other U-Net inputs pass through as
    ``model_kwargs`` (e.g. ``class_labels=``).

    ``clip_sample=True`` also applies the scheduler's treatment of the x0 estimate with
    :class:`~scoresde.adapters.ClipX0`: ``thresholding`` (dynamic thresholding at
    ``dynamic_thresholding_ratio``, capped at ``sample_max_value``) or ``clip_sample`` (clipping to
    ``clip_sample_range``). The eps is then the one consistent with the clipped x0 (diffusers' DDIM with
    ``use_clipped_model_output=True``; its DDPM step uses only x0 and x_t, so it agrees either way).
    Off by default: clipping suits pixel data in ``[-1, 1]`` and changes the model the likelihood sees.
    """
    config = dict(getattr(scheduler, "config", {}) or {})
    abar = scheduler_alphas_cumprod(scheduler)
    prediction = canonical_prediction(config.get("prediction_type", "epsilon"))
    learned = config.get("variance_type") in ("learned", "learned_range")
    if sde is None:
        sde = DiscreteVPSDE(abar)
    model: torch.nn.Module = DiscreteTimeAdapter(unet, sde, abar, prediction, learned_variance=learned)
    if clip_sample:
        if config.get("thresholding"):
            model = ClipX0(model, sde, 1.0, percentile=float(config.get("dynamic_thresholding_ratio", 0.995)),
                           max_threshold=float(config.get("sample_max_value", 1.0)))
        elif config.get("clip_sample"):
            model = ClipX0(model, sde, float(config.get("clip_sample_range", 1.0)))
    return model, sde


def diffusers_timesteps(scheduler: Any, num_inference_steps: int, sde: Optional[SDE] = None,
                        t_end: Optional[float] = None) -> torch.Tensor:
    """The continuous times of a scheduler's inference steps: ``steps + 1`` decreasing times, float64.

    Calls ``scheduler.set_timesteps(num_inference_steps)`` (so its ``timestep_spacing``: ``leading``,
    ``trailing`` or ``linspace``, and ``steps_offset`` apply) and maps each timestep ``i`` to the time
    with ``alpha(t)^2 = abar_i``: ``(i + 1) T / N`` on the default :class:`~scoresde.ddpm.DiscreteVPSDE`,
    ``t_from_log_snr(log(abar_i / (1 - abar_i)))`` on another ``sde``. The last time is where the chain
    ends: ``abar = 1`` (DDPM; DDIM with ``set_alpha_to_one``) becomes ``t_end`` (default ``1e-12 T``,
    noise std ~3e-7 for DDPM's schedule), DDIM's ``final_alpha_cumprod = abar_0`` becomes ``t_0``.
    Pass the result as ``t_grid`` with ``steps = num_inference_steps``.

    diffusers' DDIM steps from timestep ``i`` to ``i - N // steps``; this equals the next listed
    timestep for ``leading`` spacing (any ``steps_offset``) and for ``trailing`` when ``steps`` divides
    ``N``. For other settings that chain is not a time grid, and a ``ValueError`` says so.
    """
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}")
    abar = scheduler_alphas_cumprod(scheduler)
    n_train = abar.numel()
    scheduler.set_timesteps(num_inference_steps)
    ts = torch.as_tensor(scheduler.timesteps).detach().cpu().long()
    if ts.numel() != num_inference_steps or bool(torch.any(ts[1:] >= ts[:-1])):
        raise ValueError(f"{type(scheduler).__name__} gave timesteps {ts.tolist()}; expected {num_inference_steps} decreasing ones")
    T = float(sde.T) if sde is not None else 1.0
    is_ddim = hasattr(scheduler, "final_alpha_cumprod")
    if is_ddim:
        stride = n_train // num_inference_steps
        prev = ts - stride
        nxt = torch.cat([ts[1:], torch.tensor([-1])])
        ok = bool(torch.all(torch.where(prev >= 0, prev == nxt, nxt == -1)))
        if not ok:
            raise ValueError(
                f"diffusers' DDIM with timestep_spacing={scheduler.config.get('timestep_spacing')!r} steps from each "
                f"timestep i to i - {stride}, not to the next listed one ({ts.tolist()}): that chain is not a time grid")
        final_abar = float(scheduler.final_alpha_cumprod)
    else:
        final_abar = 1.0
    if sde is None or isinstance(sde, DiscreteVPSDE) and sde.num_steps == n_train:
        t = (ts.to(torch.float64) + 1) / n_train * T
    else:
        a = abar[ts]
        t = sde.t_from_log_snr(torch.log(a) - torch.log1p(-a)).to(torch.float64).clamp(0.0, T)
    if final_abar >= 1.0:
        end = 1e-12 * T if t_end is None else float(t_end)
    else:
        end = (1.0 / n_train * T) if sde is None or isinstance(sde, DiscreteVPSDE) else float(
            sde.t_from_log_snr(torch.tensor(final_abar / (1 - final_abar), dtype=torch.float64).log()))
    return torch.cat([t, torch.tensor([end], dtype=torch.float64)])


def _load_class(diffusers, class_name: str, where: Path):
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{where} names the class {class_name!r}, which this diffusers ({diffusers.__version__}) lacks")
    return cls


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None


def is_diffusers_folder(path: PathLike) -> bool:
    """True for a ``save_pretrained`` folder: a pipeline (``model_index.json``) or a model (``config.json``
    with a ``_class_name``)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            return "_class_name" in json.loads(cfg.read_text())
        except (OSError, ValueError):
            return False
    return False


def load_diffusers(folder: PathLike, *, device: Any = "cpu", dtype: Optional[torch.dtype] = None,
                   sde: Optional[SDE] = None, clip_sample: bool = False) -> Tuple[torch.nn.Module, SDE, Dict[str, Any]]:
    """Load a local diffusers ``save_pretrained`` folder: ``(model, sde, info)``.

    ``folder`` is a pipeline folder (``model_index.json`` with a ``unet`` and a ``scheduler``
    component) or a bare model folder (``config.json`` naming e.g. ``UNet2DModel``; the scheduler is
    read from a ``scheduler_config.json`` beside it or a sibling ``scheduler/`` folder, else diffusers'
    default ``DDPMScheduler()``: DDPM's linear schedule, 1000 steps, epsilon; ``info["scheduler"]`` says
    which). ``clip_sample``: see :func:`from_diffusers`. The network is in eval mode on ``device`` (and
    ``dtype`` when given). ``info`` holds the
    classes, ``prediction``, ``num_train_timesteps``, ``shape`` (``(C, H, W)`` of one sample when the
    config gives ``sample_size``) and ``source = "diffusers"``.
    """
    diffusers = require_diffusers()
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no diffusers folder at {folder}")
    scheduler_note = None
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        unet_key = "unet" if "unet" in index else next(
            (k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and "Model" in str(v[1])), None)
        if unet_key is None or "scheduler" not in index:
            raise ValueError(f"{folder / 'model_index.json'} has no unet and scheduler components")
        unet_cls = _load_class(diffusers, index[unet_key][1], folder / "model_index.json")
        sched_cls = _load_class(diffusers, index["scheduler"][1], folder / "model_index.json")
        unet = unet_cls.from_pretrained(folder / unet_key, local_files_only=True)
        scheduler = sched_cls.from_pretrained(folder / "scheduler", local_files_only=True)
        scheduler_note = f"{sched_cls.__name__} from {folder / 'scheduler'}"
    elif is_diffusers_folder(folder):
        cfg = _read_json(folder / "config.json")
        unet_cls = _load_class(diffusers, cfg["_class_name"], folder / "config.json")
        unet = unet_cls.from_pretrained(folder, local_files_only=True)
        scheduler = None
        for cand in (folder, folder.parent / "scheduler"):
            path = cand / "scheduler_config.json"
            if path.is_file():
                sc = _read_json(path)
                sched_cls = _load_class(diffusers, sc.get("_class_name", "DDPMScheduler"), path)
                scheduler = sched_cls.from_pretrained(cand, local_files_only=True)
                scheduler_note = f"{sched_cls.__name__} from {path}"
                break
        if scheduler is None:
            scheduler = diffusers.DDPMScheduler()
            scheduler_note = "default DDPMScheduler() (linear betas 1e-4..0.02, 1000 steps, epsilon): the folder has none"
    else:
        weights = sorted(p.name for p in folder.glob("*.safetensors"))
        extra = f" (it holds {weights[0]} but no config.json)" if weights else ""
        raise ValueError(f"{folder} is not a diffusers folder: no model_index.json or config.json{extra}")
    unet.eval().to(device)
    if dtype is not None:
        unet.to(dtype)
    model, sde = from_diffusers(unet, scheduler, sde=sde, clip_sample=clip_sample)
    ucfg = dict(getattr(unet, "config", {}) or {})
    size = ucfg.get("sample_size")
    shape = None
    if size is not None and ucfg.get("in_channels") is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        shape = (int(ucfg["in_channels"]), *map(int, hw))
    info = {
        "source": "diffusers",
        "path": str(folder),
        "unet": type(unet).__name__,
        "scheduler": scheduler_note,
        "prediction": model.prediction,
        "learned_variance": bool(model.learned_variance),
        "num_train_timesteps": model.num_steps,
        "clipped": isinstance(model, ClipX0),
        "shape": shape,
        "scheduler_object": scheduler,
    }
    return model, sde, info


def load_any(path: PathLike, *, ema: bool = True, device: Any = "cpu") -> Tuple[torch.nn.Module, SDE, Dict[str, Any]]:
    """Load a model from whatever ``path`` holds: ``(model(x, t) -> eps, sde, info)``.

    - a scoresde checkpoint file (or a run folder holding ``checkpoint.pt``):
      :func:`scoresde.checkpoint.load_model`; ``info = {"source": "scoresde", "config": ..., "path": ...}``
      (``ema`` picks the EMA weights);
    - a diffusers ``save_pretrained`` folder (pipeline or bare U-Net), or its ``config.json`` /
      ``model_index.json``: :func:`load_diffusers`;
    - a ``.safetensors`` file: ``ValueError`` pointing at the folder that should be given instead.
    """
    from .checkpoint import load_model

    p = Path(path)
    if p.is_dir():
        if is_diffusers_folder(p):
            return load_diffusers(p, device=device)
        if (p / "checkpoint.pt").is_file():
            p = p / "checkpoint.pt"
        else:
            raise ValueError(f"{p} holds neither a scoresde checkpoint.pt nor a diffusers model "
                             "(model_index.json / config.json)")
    if not p.is_file():
        raise ValueError(f"no checkpoint file or model folder at {p}")
    if p.name in ("model_index.json", "config.json") and is_diffusers_folder(p.parent):
        return load_diffusers(p.parent, device=device)
    if looks_like_safetensors(p):
        raise ValueError(safetensors_message(p))
    model, sde, config = load_model(p, ema=ema, device=device)
    return model, sde, {"source": "scoresde", "path": str(p), "config": config}


__all__ = [
    "INSTALL_HINT",
    "require_diffusers",
    "looks_like_safetensors",
    "safetensors_message",
    "scheduler_alphas_cumprod",
    "from_diffusers",
    "diffusers_timesteps",
    "is_diffusers_folder",
    "load_diffusers",
    "load_any",
]
