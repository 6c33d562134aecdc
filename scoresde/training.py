"""Training a score network: config, the loop, metrics, sample grids and exact resume.

One step (Ho et al. 2020, Algorithm 1, in continuous time; see :mod:`scoresde.losses`)::

    x0 ~ data,  t ~ p(t) on [t_min, T],  eps ~ N(0, I)
    loss = mean_B  w(t) mean_dims || eps_theta(alpha(t) x0 + std(t) eps, t, y) - eps ||^2
    AdamW step (linear warmup, optional cosine decay, gradient clipping), then the EMA update.

Randomness is a pure function of ``(seed, step)``: the data order comes from a per-epoch permutation
seeded by ``(seed, epoch)`` and each step's times, noise and label dropout from a generator seeded by
``(seed, step)``. A resumed run therefore draws exactly what the uninterrupted run would have drawn,
and every rank of a data-parallel run draws the same global batch and keeps its slice
(:mod:`scoresde.distributed`). Global RNG states (for dropout) are saved in the checkpoint too, so on
CPU ``N`` steps straight and ``N/2 + resume + N/2`` give bit-identical parameters.

Written to ``out_dir``: ``config.json`` (the full config), ``checkpoint.pt`` (latest, written
atomically), ``metrics.jsonl`` (one JSON object per logged step) and ``samples_XXXXXX.png``
(grids drawn with the EMA weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch
from torch import nn

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from . import distributed
from ._tensor import append_dims, unchecked
from .checkpoint import FORMAT, FORMAT_VERSION, clean_temporaries, load_checkpoint, save_checkpoint
from .ema import EMA
from .adapters import trained_eps_model
from .losses import WEIGHTINGS, DenoisingLoss
from .sde import SDES, sde_from_config

LR_SCHEDULES = ("constant", "cosine")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's

#: fields that may differ between a run and its resumption (they do not change what is computed
#: at a given step, except ``steps``/``max_minutes``, which only move the end, and the numerics
#: knobs ``amp``/``tf32``/``compile*``, which round differently but compute the same step);
#: with ``lr_schedule="cosine"`` the schedule decays to ``steps``, so ``steps`` is fixed too
RESUMABLE_FIELDS = frozenset({"steps", "max_minutes", "out_dir", "device", "log_every", "sample_every", "ckpt_every",
                              "sample_steps", "sampler", "num_samples", "num_workers", "compile",
                              "compile_mode", "tf32", "amp"})

#: what a run directory holds once a run has started in it
RUN_FILES = ("checkpoint.pt", "config.json", "metrics.jsonl")


@dataclass
class TrainConfig:
    """Everything a training run needs, as plain data (stored in ``config.json`` and the checkpoint).

    The defaults are the ``digits`` job: 8x8 digits, VP SDE, a small U-Net, five CPU minutes.
    """

    # -- data ----------------------------------------------------------------------------------
    dataset: str = "digits"  # a name in scoresde.data.DATASETS
    data_root: Optional[str] = None  # folder of local files (mnist, cifar10, folder)
    data_n: Optional[int] = None  # examples to use (toys: samples drawn; images: a seeded subset)
    flip: bool = False  # random horizontal flips (images)
    conditional: bool = False  # condition on class labels (needs a labelled dataset)
    label_dropout: float = 0.1  # P(label -> null label) when conditional: classifier-free guidance
    # -- SDE and loss --------------------------------------------------------------------------
    sde: str = "vp"  # "vp" | "subvp" | "ve" | "cosine"
    sde_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {"beta_max": 20.0}
    weighting: str = "none"  # "none" (L_simple) | "likelihood" (g^2 / std^2, Song et al. 2021)
    importance_sampling: bool = False  # t with density proportional to the likelihood weight
    t_min: Optional[float] = None  # lower limit of training times (default: the SDE's t_min)
    prediction: str = "eps"  # training target: "eps" | "x0" | "v" | "edm" (Karras et al. 2022 preconditioning)
    sigma_data: float = 0.5  # EDM's data standard deviation (prediction="edm")
    # -- model ---------------------------------------------------------------------------------
    model: str = "digits"  # a preset in scoresde.networks.PRESETS
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # overrides of the preset's fields
    # -- optimisation --------------------------------------------------------------------------
    steps: int = 100_000  # optimiser steps (the run may stop earlier at max_minutes)
    max_minutes: Optional[float] = 5.0  # wall-clock budget of the training loop; None: no limit
    batch_size: int = 64  # global batch (split evenly across ranks); 64 beat 128 on digits in 5 CPU minutes
    lr: float = 2e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple = (0.9, 0.999)  # AdamW betas
    warmup: int = 200  # linear learning-rate warmup steps
    lr_schedule: str = "constant"  # after warmup: "constant" or "cosine" (to 0 at `steps`)
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    ema_decay: float = 0.999  # EMA decay of the weights used for sampling
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1 + n) / (10 + n))
    seed: int = 0  # seeds the initial weights, the data order, times and noise
    # -- hardware ------------------------------------------------------------------------------
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = False  # bf16 autocast on CUDA (ignored on CPU); measured no faster for the presets in eager mode
    compile: bool = False  # torch.compile the network for training
    tf32: bool = True  # TF32 matrix units for float32 matmuls and convolutions on CUDA (2.2x on an H100)
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs (small networks)
    num_workers: int = 0  # kept for the CLI; datasets are in-memory tensors indexed directly
    # -- output --------------------------------------------------------------------------------
    out_dir: str = "runs/digits"  # config.json, checkpoint.pt, metrics.jsonl, samples_*.png
    log_every: int = 50  # steps between metrics.jsonl lines
    sample_every: int = 0  # steps between sample grids (0: only at the end when num_samples > 0)
    ckpt_every: int = 1000  # steps between checkpoints (one is always written at the end)
    sampler: str = "dpm_solver"  # a name in solvers.SAMPLERS for the sample grids
    sample_steps: int = 25  # sampler steps for the grids
    num_samples: int = 64  # samples per grid (0: no grids)

    # -- plain data ----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Build from a dict; unknown keys raise ``ValueError`` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(names)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    # -- building a run's config ---------------------------------------------------------------
    @classmethod
    def resolve(cls, overrides: Mapping[str, Any], *, saved: Optional[Mapping[str, Any]] = None) -> "TrainConfig":
        """The validated config of a run: a base updated by ``overrides``.

        The base is ``saved`` (a resumed run's complete ``config.json``; fields it lacks take the
        defaults) or the defaults. Dict-valued fields (``sde_kwargs``, ``model_kwargs``) are merged
        key by key. A base's preset overrides belong to its preset: when ``overrides`` choose another
        ``model`` (``sde``) without giving ``model_kwargs`` (``sde_kwargs``), those start empty.
        Which fields a resumed run may change is checked against its checkpoint by :func:`train`
        (:meth:`check_resume`).
        """
        defaults = cls().to_dict()
        base = {**defaults, **dict(saved)} if saved is not None else defaults
        cls.from_dict(base)  # unknown keys in a saved config: one line naming them
        values = dict(base)
        for k, v in overrides.items():
            values[k] = {**values[k], **v} if isinstance(v, dict) and isinstance(values.get(k), dict) else v
        for name, kwargs in (("model", "model_kwargs"), ("sde", "sde_kwargs")):
            if values.get(name) != base[name] and kwargs not in overrides:
                values[kwargs] = {}
        return cls.from_dict(values).validate()

    @classmethod
    def for_run(cls, overrides: Mapping[str, Any], *, resume: bool = False) -> "TrainConfig":
        """:meth:`resolve` with the base a run directory decides: with ``resume`` and a
        ``config.json`` in the run directory (``overrides["out_dir"]`` or the default), that file;
        else the defaults. A ``config.json`` that is not a JSON object raises ``ValueError``."""
        out_dir = Path(overrides.get("out_dir") or cls.out_dir)
        saved = None
        path = out_dir / "config.json"
        if resume and path.is_file():
            try:
                saved = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path} is not valid JSON ({err})") from None
            if not isinstance(saved, dict):
                raise ValueError(f"{path} does not hold a config (a JSON object); got {type(saved).__name__}")
        return cls.resolve(overrides, saved=saved)

    def check_resume(self, saved: Mapping[str, Any], where: Any = "the checkpoint") -> None:
        """Refuse to continue a run saved with config ``saved`` under this config when a field that
        alters training differs (every field outside :data:`RESUMABLE_FIELDS`; with a cosine schedule
        ``steps`` too). Raises ``ValueError`` naming ``where`` and each changed field."""
        now = self.to_dict()
        saved = {"prediction": "eps", "sigma_data": 0.5, **saved}  # checkpoints from before these fields
        free = RESUMABLE_FIELDS - ({"steps"} if self.lr_schedule == "cosine" else set())
        diff = sorted(k for k in now if k not in free and saved.get(k) != now[k])
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
            raise ValueError(f"cannot resume from {where}: the config changed in fields that alter training ({detail})")

    def validate(self) -> "TrainConfig":
        """Check every field; raise ``ValueError`` naming the first bad one.

        Types first, exactly as the named command-line options would: bools must be ``True``/``False``
        (not ``"maybe"``), integers integers (not ``1e3``), numbers finite (not NaN or inf), strings
        strings; then the ranges and the names.
        """
        _check_types(self)

        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer; got {v!r}")

        from .data import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(DATASETS)}")
        if self.sde not in SDES:
            raise ValueError(f"sde must be one of {sorted(SDES)}; got {self.sde!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {self.weighting!r}")
        DenoisingLoss.check_target(self.prediction, self.sigma_data, self.weighting, self.importance_sampling)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}")
        for name in ("steps", "batch_size", "log_every"):
            positive_int(name)
        for name in ("warmup", "sample_every", "ckpt_every", "num_samples", "sample_steps", "num_workers", "seed"):
            positive_int(name, allow_zero=True)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number; got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1); got {self.ema_decay!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1); got {self.label_dropout!r}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0; got {self.grad_clip!r}, {self.weight_decay!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}; got {self.compile_mode!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive or None; got {self.max_minutes!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {self.betas!r}")
        if self.num_samples > 0 and self.sample_steps < 1:
            raise ValueError("sample_steps must be >= 1 when sample grids are drawn")
        if not isinstance(self.sde_kwargs, dict) or not isinstance(self.model_kwargs, dict):
            raise ValueError("sde_kwargs and model_kwargs must be dicts")
        resolve_device(self.device)
        return self


def _check_types(config: "TrainConfig") -> None:
    """Refuse a field whose value does not have its annotated type (one line naming field and value).

    ``bool`` fields take only ``True``/``False``; ``int`` fields only integers (not bools); ``float``
    fields integers or floats that are finite; ``Optional[...]`` fields also ``None``; dict fields
    dicts; ``betas`` two finite numbers.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        _check_value(f.name, getattr(config, f.name), hints.get(f.name, Any))


def _check_value(name: str, value: Any, hint: Any) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false; got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer; got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string; got {value!r}")
    elif hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a table of key = value pairs; got {value!r}")
    elif hint is tuple or origin is tuple:
        if not isinstance(value, (tuple, list)) or not all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) for v in value
        ):
            raise ValueError(f"{name} must be a list of finite numbers; got {value!r}")


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    out_dir: str
    step: int
    final_checkpoint: str
    metrics: Dict[str, Any]
    elapsed_s: float
    stopped_by: str  # "steps" | "time" (a signal raises TrainingInterrupted instead)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"CUDA requested but not available (device={name!r})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}")
    return device


# ---------------------------------------------------------------------------------------------
# Deterministic randomness
# ---------------------------------------------------------------------------------------------
def _mix(*words: int) -> int:
    """SplitMix64-style hash of integers to a 63-bit seed (decorrelates neighbouring seeds)."""
    h = 0x9E3779B97F4A7C15
    for w in words:
        h = (h ^ (int(w) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


_DATA_STREAM, _STEP_STREAM = 1, 2


class BatchSchedule:
    """The global batch indices of every step, a pure function of ``(seed, step)``.

    Epoch ``e`` visits the examples in the order ``randperm(N)`` seeded by ``(seed, e)``, in
    ``N // B`` batches of ``B`` (the remainder of each permutation is skipped, as with ``drop_last``).
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch_size={batch_size} is larger than the dataset ({n} examples)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, _DATA_STREAM, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm[k * self.batch_size : (k + 1) * self.batch_size]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator for step ``step``'s times, noise, flips and label dropout."""
    return torch.Generator().manual_seed(_mix(seed, _STEP_STREAM, step))


def rng_state() -> Dict[str, Any]:
    """Global torch / CUDA / numpy / python RNG states as tensors and plain lists (weights_only-safe)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Pieces of the run
# ---------------------------------------------------------------------------------------------
def lr_lambda(config: TrainConfig):
    """Multiplier of the peak lr at a step: linear warmup, then constant or cosine decay to 0."""
    warmup, total, cosine = config.warmup, config.steps, config.lr_schedule == "cosine"

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cosine:
            frac = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return f


def build_data(config: TrainConfig):
    """The training set the config names; a toy too large for the memory is refused before it is drawn."""
    from .memory import check_dataset_fits
    from .data import load_dataset

    check_dataset_fits(config.dataset, config.data_n)
    return load_dataset(config.dataset, root=config.data_root, n=config.data_n, seed=config.seed, flip=config.flip)


def build_network(config: TrainConfig, data_shape: tuple, num_classes: Optional[int]) -> nn.Module:
    from .networks import build_model

    torch.manual_seed(config.seed)  # the initial weights depend on the seed only
    return build_model(config.model, data_shape=data_shape, num_classes=num_classes, **config.model_kwargs)


#: sample grids narrower than this many pixels are enlarged by an integer factor (nearest neighbour)
MIN_GRID_PIXELS = 256


def upscale_nearest(img: torch.Tensor, min_width: int = MIN_GRID_PIXELS) -> torch.Tensor:
    """Enlarge ``(C, H, W)`` by the smallest integer factor ``k`` with ``k W >= min_width`` (each pixel
    becomes a ``k x k`` block: nearest neighbour, no blur); images already that wide are returned as they are."""
    k = max(1, math.ceil(min_width / img.shape[-1]))
    return img if k == 1 else img.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)


def save_sample_grid(x: torch.Tensor, path: Path, title: str = "") -> None:
    """Write samples as a PNG: a tiled image grid for ``(N, C, H, W)`` in [-1, 1], a scatter plot for 2-D vectors.

    A grid narrower than :data:`MIN_GRID_PIXELS` (8x8 digits: 73 px) is enlarged by an integer
    factor with nearest-neighbour blocks (:func:`upscale_nearest`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = x.detach().float().cpu()
    if x.ndim == 4:
        n, c, h, w = x.shape
        cols = int(math.ceil(math.sqrt(n)))
        rows = int(math.ceil(n / cols))
        grid = torch.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), -1.0)
        for i in range(n):
            r, q = divmod(i, cols)
            grid[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
        grid = upscale_nearest(grid)
        img = ((grid.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        plt.imsave(path, img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1)
        return
    flat = x.reshape(x.shape[0], -1)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(flat[:, 0], flat[:, 1] if flat.shape[1] > 1 else torch.zeros(len(flat)), s=2)
    ax.set_aspect("equal")
    ax.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: how the trainer draws its sample grids: ``draw(model, sde, shape, device=..., model_kwargs=...)``
#: returns ``shape = (num_samples, *data_shape)`` samples (the model carries the EMA weights, in eval mode)
DrawFn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    model: Optional[nn.Module] = None,
    dataset: Any = None,
    draw: Optional[DrawFn] = None,
) -> TrainResult:
    """Train a score network as ``config`` says; with ``resume``, continue from ``out_dir/checkpoint.pt``
    when it exists (exactly: the continued run equals an uninterrupted one).

    Args:
        config: the run (validated here).
        resume: continue the run in ``out_dir``; its checkpoint's config must agree on every field
            that alters training (:meth:`TrainConfig.check_resume`).
        force: start afresh in an ``out_dir`` that already holds a run, deleting its files
            (without ``resume`` or ``force`` such a directory is refused: :class:`RunDirectoryError`).
        progress: show a bar against whichever limit (``steps`` or ``max_minutes``) ends the run.
        model, dataset: replace the ones built from the config (tests, custom networks): the model
            must follow ``model(x, t, y=None) -> eps``; the dataset needs ``x``, ``y``, ``num_classes``.
        draw: how to draw the sample grids (:data:`DrawFn`), e.g. with :func:`solvers.sample`; without
            it no grids are drawn (a warning says so when ``num_samples > 0``).

    The run directory is checked, locked (``out_dir/.lock``: a second run on it fails at once) and
    cleared of temporaries of interrupted saves before anything expensive is built. SIGINT and
    SIGTERM during the loop end it at the next step boundary with a checkpoint (written atomically),
    then raise :class:`TrainingInterrupted` (a second signal interrupts at once). Under ``torchrun``
    every rank calls this; rank 0 holds the lock and writes the files.
    """
    config = TrainConfig.from_dict(config.to_dict()).validate()
    info, device = distributed.setup(resolve_device(config.device))
    lock = None
    try:
        error = None
        if info.is_main:
            try:
                lock = RunDirectory(config.out_dir).open(resume=resume, force=force)
            except Exception as err:  # shared with the other ranks below, then raised
                error = err
        failed = distributed.broadcast_flag(error is not None, info, device)
        if error is not None:
            raise error
        if failed:
            raise RunDirectoryError(f"rank 0 could not prepare the run directory {config.out_dir} (see its error)")
        if config.num_samples > 0 and draw is None:
            warnings.warn("train(): num_samples > 0 but no draw function was given, so no sample grids are drawn "
                          "(pass draw=..., or num_samples=0)", stacklevel=2)
        return _Run(config, info, device, model, dataset, draw).run(resume=resume, progress=progress)
    finally:
        if lock is not None:
            lock.close()
        distributed.cleanup(info)


class RunDirectoryError(ValueError):
    """The run directory cannot be used: not writable, in use by another run, or holding a run that
    would be overwritten."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the run; a checkpoint of the last completed step was written first.

    Attributes: ``signal`` (the signal number), ``step`` and ``checkpoint`` (its path).
    """

    def __init__(self, signum: int, step: int, checkpoint: str):
        name = signal.Signals(signum).name
        super().__init__(f"training stopped by {name} at step {step}; checkpoint saved to {checkpoint} "
                         "(continue with resume=True / --resume)")
        self.signal, self.step, self.checkpoint = signum, step, checkpoint


LOCK_NAME = ".lock"


class RunDirectory:
    """A run directory held for one run: created, checked and locked (``flock`` on ``out/.lock``).

    :meth:`open` refuses a directory that is not writable, is locked by another live process, or
    (without ``resume``/``force``) already holds a run (any of :data:`RUN_FILES`); with ``force`` it
    deletes that run's files. Holding the lock, it removes every temporary an interrupted
    :func:`~scoresde.checkpoint.save_checkpoint` left. :meth:`close` deletes the lock file and
    releases the lock. The lock is advisory and per host (``flock``); where ``fcntl`` is missing
    (Windows) the directory is not locked.
    """

    def __init__(self, out: Any):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd: Optional[int] = None

    def open(self, *, resume: bool = False, force: bool = False) -> "RunDirectory":
        out = self.out
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunDirectoryError(f"cannot create the run directory {out}: {err.strerror or err}") from None
        if not out.is_dir():
            raise RunDirectoryError(f"the run directory {out} is not a directory")
        self._lock()
        try:
            existing = [name for name in RUN_FILES if (out / name).exists()]
            if existing and not resume:
                if not force:
                    raise RunDirectoryError(
                        f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
                        "--force to overwrite it (resume=True / force=True), or choose another --out"
                    )
                for p in [out / n for n in (*RUN_FILES, "samples.png")] + sorted(out.glob("samples_*.png")):
                    p.unlink(missing_ok=True)
            clean_temporaries(out / "checkpoint.pt", all_pids=True)
        except BaseException:
            self.close()
            raise
        return self

    def _lock(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise RunDirectoryError(f"cannot write to the run directory {self.out}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise RunDirectoryError(
                    f"{self.out} is in use by another training run (pid {holder} holds {self.path}); "
                    "wait for it to end or choose another --out"
                ) from None
            try:  # the holder before us may have deleted the file it locked: then lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def close(self) -> None:
        """Delete the lock file and release the lock (idempotent)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: see _lock
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def _stop_on_signals(on_signal: Callable[[int], None]):
    """Route SIGINT and SIGTERM to ``on_signal`` for the duration (main thread only; a signal the
    process ignores stays ignored); the previous handlers come back afterwards."""
    previous: Dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                if signal.getsignal(sig) is signal.SIG_IGN:
                    continue
                previous[sig] = signal.signal(sig, lambda signum, frame: on_signal(signum))
            except (ValueError, OSError):  # pragma: no cover - not allowed here
                pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def progress_status(step: int, steps: int, elapsed: float, budget: Optional[float], start_step: int = 0):
    """``(fraction, text)`` of a run at ``step`` after ``elapsed`` seconds of this session.

    The run ends at ``steps`` or when ``elapsed`` reaches the time ``budget`` (seconds; ``None``: no
    limit), whichever comes first, so the fraction done is ``max(step / steps, elapsed / budget)``.
    The text gives the step, the time against the budget, and the time left: the smaller of
    ``budget - elapsed`` and the remaining steps at this session's rate ``(step - start_step) / elapsed``.
    """
    frac = step / steps
    left = math.inf
    done = step - start_step
    if done > 0 and elapsed > 0:
        left = (steps - step) * elapsed / done
    text = f"step {step}/{steps}"
    if budget is not None:
        frac = max(frac, elapsed / budget)
        left = min(left, max(budget - elapsed, 0.0))
        text += f", {_clock(elapsed)} of {_clock(budget)}"
    else:
        text += f", {_clock(elapsed)}"
    text += f", {_clock(left)} left" if math.isfinite(left) else ""
    return min(frac, 1.0), text


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class _Bar:
    """A tqdm bar over the fraction of the run done (:func:`progress_status`), refreshed at most
    every ``interval`` seconds."""

    UNITS = 1000

    def __init__(self, enabled: bool, start_step: int, steps: int, budget: Optional[float], interval: float = 0.5):
        self.bar = None
        self.start_step, self.steps, self.budget, self.interval = start_step, steps, budget, interval
        self.extra, self.shown = "", -math.inf
        if enabled:
            from tqdm.auto import tqdm

            # the status text rides in desc: tqdm would put ", " before a postfix
            self.bar = tqdm(total=self.UNITS, desc="", dynamic_ncols=True,
                            bar_format="training: {percentage:3.0f}%|{bar}| {desc}")

    def update(self, step: int, elapsed: float, force: bool = False) -> None:
        if self.bar is None or (not force and elapsed - self.shown < self.interval):
            return
        self.shown = elapsed
        frac, text = progress_status(step, self.steps, elapsed, self.budget, self.start_step)
        self.bar.set_description_str(text + self.extra, refresh=False)
        self.bar.n = int(frac * self.UNITS)
        self.bar.refresh()

    def close(self, step: int, elapsed: float, stopped_by: str) -> None:
        if self.bar is None:
            return
        self.update(step, elapsed, force=True)
        if stopped_by in ("steps", "time"):  # that limit ended the run: it is complete
            self.bar.n = self.UNITS
            self.bar.refresh()
        self.bar.close()


class _Run:
    def __init__(self, config: TrainConfig, info: distributed.DistInfo, device: torch.device, model, dataset,
                 draw: Optional[DrawFn] = None):
        self.config, self.info, self.device, self.draw = config, info, device, draw
        self.signalled: Optional[int] = None
        self.saved_step = -1
        self.out = Path(config.out_dir)
        data = dataset if dataset is not None else build_data(config)
        self.x_all = data.x.to(device)
        self.shape = tuple(data.x.shape[1:])
        if config.conditional and getattr(data, "y", None) is None:
            raise ValueError(f"conditional=True needs class labels; dataset {config.dataset!r} has none")
        self.num_classes = data.num_classes if config.conditional else None
        self.y_all = data.y.to(device) if config.conditional else None
        self.flip = bool(getattr(data, "flip", False))
        self.batches = BatchSchedule(len(data.x), config.batch_size, config.seed)
        self.local = distributed.rank_slice(config.batch_size, info)

        self.sde = sde_from_config({"name": config.sde, **config.sde_kwargs})
        self.loss = DenoisingLoss(self.sde, config.weighting, config.importance_sampling, config.t_min,
                                  config.prediction, config.sigma_data)
        if model is None:
            model = build_network(config, self.shape, self.num_classes)
        self.model = model.to(device)
        self.model_config = getattr(model, "config", None)
        self.ema = EMA(self.model, config.ema_decay, config.ema_warmup)
        # fused: one kernel for all parameters on CUDA instead of several per tensor (the step is
        # launch-bound for small networks); the CPU build has no fused AdamW.
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, betas=tuple(config.betas),
                                     fused=device.type == "cuda" or None,
                                     weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(config))
        self.step = 0
        self.last_metrics: Dict[str, Any] = {}

        fwd: nn.Module = self.model
        if info.enabled:
            fwd = nn.parallel.DistributedDataParallel(self.model, device_ids=[device] if device.type == "cuda" else None)
        if config.compile:
            fwd = torch.compile(fwd, mode=config.compile_mode)
        self.fwd = fwd
        self.amp = config.amp and device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = config.tf32
            torch.backends.cudnn.allow_tf32 = config.tf32

    # -- checkpoints ------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def state(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": self.step,
            "config": self.config.to_dict(),
            "model_config": self.model_config,
            "sde_config": self.sde.config(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng_state(),
            "metrics": self.last_metrics,
            "world_size": self.info.world_size,
            "versions": {"scoresde": _version(), "torch": str(torch.__version__)},
        }

    def save(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.ckpt_path, self.state())
        self.saved_step = self.step
        distributed.barrier(self.info)

    def restore(self) -> bool:
        if not self.ckpt_path.is_file():
            return False
        state = load_checkpoint(self.ckpt_path, map_location="cpu")
        self.config.check_resume(state["config"], self.ckpt_path)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.last_metrics = dict(state.get("metrics") or {})
        return True

    # -- one step ---------------------------------------------------------------------------
    def batch(self, step: int):
        g = step_generator(self.config.seed, step)
        idx = self.batches.indices(step)
        b = idx.numel()
        t, w = self.loss.sample_t(b, generator=g)
        eps = torch.randn((b, *self.shape), generator=g)
        flip = torch.rand(b, generator=g) < 0.5 if self.flip else None
        drop = torch.rand(b, generator=g) < self.config.label_dropout
        sl = self.local
        x0 = self.x_all[idx[sl].to(self.device)]
        if flip is not None:
            x0 = torch.where(append_dims(flip[sl].to(self.device), x0.ndim), x0.flip(-1), x0)
        kwargs = {}
        if self.y_all is not None:
            y = self.y_all[idx[sl].to(self.device)]
            kwargs["y"] = torch.where(drop[sl].to(self.device), torch.full_like(y, self.num_classes), y)
        dev = self.device
        return x0, t[sl].to(dev), eps[sl].to(dev, x0.dtype), w[sl].to(dev), kwargs

    def train_step(self, step: int):
        x0, t, eps, w, kwargs = self.batch(step)
        # t was drawn inside [t_min, T]: skip the per-call range checks (a host sync each on CUDA)
        with unchecked(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss.per_sample(self.fwd, x0, t, eps, w, kwargs).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        else:
            gnorm = torch.zeros((), device=self.device)
        self.opt.step()
        self.sched.step()
        self.ema.update(self.model)
        return loss.detach(), gnorm.detach()

    # -- outputs ----------------------------------------------------------------------------
    def write_samples(self) -> Optional[Path]:
        if not self.info.is_main or self.config.num_samples <= 0 or self.draw is None:
            return None
        n = self.config.num_samples
        kwargs = {}
        if self.num_classes is not None:  # labels cycle through the classes
            kwargs["model_kwargs"] = {"y": torch.arange(n, device=self.device) % self.num_classes}
        was_training = self.model.training
        self.model.eval()
        try:
            with self.ema.average_parameters(self.model), torch.no_grad():
                x = self.draw(trained_eps_model(self.model, self.sde, self.config.to_dict()), self.sde, (n, *self.shape),
                              device=self.device, **kwargs)
        finally:
            self.model.train(was_training)
        path = self.out / f"samples_{self.step:06d}.png"
        save_sample_grid(x, path, title=f"step {self.step}")
        return path

    def on_signal(self, signum: int) -> None:
        """First SIGINT/SIGTERM: stop at the next step boundary with a checkpoint. A second one while
        that is pending (a long step, grid or save) interrupts at once; a save in progress is atomic,
        so the previous checkpoint stays whole."""
        if self.signalled is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopped without a final checkpoint")
        self.signalled = signum

    def run(self, *, resume: bool, progress: bool) -> TrainResult:
        cfg, main = self.config, self.info.is_main
        resumed = resume and self.restore()
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            if not resumed:
                (self.out / "metrics.jsonl").write_text("")
            else:
                _truncate_metrics(self.out / "metrics.jsonl", self.step)
        budget = None if cfg.max_minutes is None else 60.0 * cfg.max_minutes
        bar = _Bar(progress and main, self.step, cfg.steps, budget)
        self.model.train()
        start = time.perf_counter()
        window_start, window_steps = start, 0
        loss_sum = torch.zeros((), device=self.device)
        gnorm_last = torch.zeros((), device=self.device)
        stopped_by = "steps"
        with _stop_on_signals(self.on_signal):
            with open(self.out / "metrics.jsonl", "a") if main else contextlib.nullcontext() as log:
                while self.step < cfg.steps:
                    now = time.perf_counter()
                    over = budget is not None and now - start >= budget
                    if self.info.enabled or over or self.signalled is not None:
                        over, signalled = distributed.agree_to_stop(over, self.signalled is not None,
                                                                    self.info, self.device)
                        if signalled:
                            stopped_by = "signal"
                            break
                        if over:
                            stopped_by = "time"
                            break
                    bar.update(self.step, now - start)
                    loss, gnorm_last = self.train_step(self.step)
                    self.step += 1
                    loss_sum += loss
                    window_steps += 1
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        now = time.perf_counter()
                        mean_loss = distributed.all_reduce_mean(loss_sum / window_steps, self.info)
                        rate = window_steps / max(now - window_start, 1e-9)
                        self.last_metrics = {
                            "step": self.step,
                            "loss": float(mean_loss),
                            "lr": self.sched.get_last_lr()[0],
                            "grad_norm": float(gnorm_last),
                            "ema_decay": self.ema.current_decay(),
                            "steps_per_s": rate,
                            "samples_per_s": rate * cfg.batch_size,
                            "elapsed_s": now - start,
                        }
                        if main:
                            log.write(json.dumps(self.last_metrics) + "\n")
                            log.flush()
                        bar.extra = f", loss {self.last_metrics['loss']:.4f}, {rate * cfg.batch_size:.0f} img/s"
                        loss_sum.zero_()
                        window_start, window_steps = now, 0
                    if cfg.sample_every and self.step % cfg.sample_every == 0:
                        self.write_samples()
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                        self.save()
            elapsed = time.perf_counter() - start
            bar.close(self.step, elapsed, stopped_by)
            if self.saved_step != self.step:
                self.save()
        if stopped_by == "signal":
            raise TrainingInterrupted(self.signalled or signal.SIGINT, self.step, str(self.ckpt_path))
        if cfg.num_samples > 0 and not (cfg.sample_every and self.step % cfg.sample_every == 0):
            self.write_samples()
        return TrainResult(str(self.out), self.step, str(self.ckpt_path), dict(self.last_metrics), elapsed, stopped_by)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines logged after ``step`` (a crashed run logs past its last checkpoint; the resumed
    run logs those steps again), so each step appears once. Unreadable lines are kept as they are."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) > step:
                continue
        except (ValueError, KeyError, TypeError):
            pass
        kept.append(line)
    path.write_text("".join(l + "\n" for l in kept))


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


__all__ = ["TrainConfig", "TrainResult", "train", "resolve_device", "BatchSchedule", "step_generator",
           "save_sample_grid", "upscale_nearest", "DrawFn", "LR_SCHEDULES", "RESUMABLE_FIELDS", "RUN_FILES",
           "RunDirectory", "RunDirectoryError", "TrainingInterrupted", "progress_status"]
