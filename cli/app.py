"""Typer application behind the ``scoresde`` console script.

A thin layer: each command parses and validates its options, calls library functions
(:func:`scoresde.training.train`, :func:`solvers.sample`, :func:`scoresde.likelihood.bits_per_dim`,
:func:`scoresde.checkpoint.checkpoint_info`) and prints or writes what they return. Every error a
user can cause ends as one ``Error: ...`` line on stderr and a non-zero exit code
(:func:`cli._util.user_errors`); ``SCORESDE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

import scoresde
import solvers
from scoresde.data import DATASETS
from scoresde.networks import PRESETS
from scoresde.sde import SDES
from scoresde.training import TrainConfig, resolve_device

from . import condition, evaluate
from ._util import (UserError, check_writable_dir, check_writable_file, grid_drawer, load_toml, merge_config,
                    parse_pairs, user_errors)

# rich_markup_mode=None: plain click output, so a usage error is the usage line and ONE "Error:" line
app = typer.Typer(
    help="Score-based diffusion in continuous time: train, sample, likelihoods.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Choices as enums, built from the library's registries (one source of truth).
DatasetName = Enum("DatasetName", {k: k for k in DATASETS}, type=str)
SDEName = Enum("SDEName", {k: k for k in SDES}, type=str)
ModelPreset = Enum("ModelPreset", {k: k for k in PRESETS}, type=str)


class Split(str, Enum):
    train = "train"
    test = "test"


class ODEMethod(str, Enum):
    """Adaptive torchdiffeq solvers (they step exactly onto T; fixed-grid ones need a step size)."""

    dopri5 = "dopri5"
    dopri8 = "dopri8"
    bosh3 = "bosh3"
    fehlberg2 = "fehlberg2"
    adaptive_heun = "adaptive_heun"


class Trace(str, Enum):
    hutchinson = "hutchinson"
    exact = "exact"


_DEFAULTS = TrainConfig()
_DEFAULTS_DICT = _DEFAULTS.to_dict()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scoresde {scoresde.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Score-based diffusion in continuous time: train, sample, likelihoods."""


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        typer.echo(text, err=True)


def _value(e: Any) -> Any:
    return e.value if isinstance(e, Enum) else e


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------
def _shown(name: str) -> str:
    v = getattr(_DEFAULTS, name)
    return "none" if v is None else str(v)


@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file of TrainConfig fields; options given on the command line override it.", show_default="none"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory: config.json, checkpoint.pt, metrics.jsonl, sample grids.", show_default=_shown("out_dir")),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoint.pt (its config.json is the base; options override it)."),
    force: bool = typer.Option(False, "--force", help="Start afresh in an OUT that already holds a run, deleting its files."),
    dataset: Optional[DatasetName] = typer.Option(None, help="Dataset (no download for the toys and digits).", show_default=_shown("dataset")),
    data_root: Optional[Path] = typer.Option(None, help="Folder of local files for mnist, cifar10, folder.", show_default="$SCORESDE_DATA or ./data"),
    data_n: Optional[int] = typer.Option(None, min=1, help="Number of examples to use (toys: drawn; images: a seeded subset).", show_default="all"),
    conditional: Optional[bool] = typer.Option(None, "--conditional/--unconditional", help="Condition on class labels (classifier-free guidance training).", show_default=_shown("conditional")),
    sde: Optional[SDEName] = typer.Option(None, help="Forward SDE.", show_default=_shown("sde")),
    sde_arg: Optional[List[str]] = typer.Option(None, "--sde-arg", metavar="KEY=VALUE", help="SDE parameter key=value, repeatable (e.g. beta_max=20).", show_default="the SDE's defaults"),
    model: Optional[ModelPreset] = typer.Option(None, help="Network preset.", show_default=_shown("model")),
    model_arg: Optional[List[str]] = typer.Option(None, "--model-arg", metavar="KEY=VALUE", help="Preset override key=value, repeatable (e.g. base_channels=32).", show_default="the preset's values"),
    steps: Optional[int] = typer.Option(None, min=1, help="Optimiser steps.", show_default=_shown("steps")),
    max_minutes: Optional[float] = typer.Option(None, min=0.0, help="Wall-clock budget of the loop in minutes (0: no limit).", show_default=_shown("max_minutes")),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Global batch size.", show_default=_shown("batch_size")),
    lr: Optional[float] = typer.Option(None, min=0.0, help="AdamW peak learning rate.", show_default=_shown("lr")),
    warmup: Optional[int] = typer.Option(None, min=0, help="Linear learning-rate warmup steps.", show_default=_shown("warmup")),
    ema_decay: Optional[float] = typer.Option(None, min=0.0, help="EMA decay of the sampling weights.", show_default=_shown("ema_decay")),
    seed: Optional[int] = typer.Option(None, min=0, help="Seed of weights, data order, times and noise.", show_default=_shown("seed")),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N (auto picks CUDA when present).", show_default=_shown("device")),
    sampler: Optional[str] = typer.Option(None, help="Sampler for the sample grids (see `scoresde samplers`).", show_default=_shown("sampler")),
    sample_steps: Optional[int] = typer.Option(None, min=1, help="Sampler steps for the grids.", show_default=_shown("sample_steps")),
    num_samples: Optional[int] = typer.Option(None, min=0, help="Samples per grid (0: no grids).", show_default=_shown("num_samples")),
    sample_every: Optional[int] = typer.Option(None, min=0, help="Steps between sample grids (0: only at the end).", show_default=_shown("sample_every")),
    ckpt_every: Optional[int] = typer.Option(None, min=0, help="Steps between checkpoints (one is always written at the end).", show_default=_shown("ckpt_every")),
    log_every: Optional[int] = typer.Option(None, min=1, help="Steps between metrics.jsonl lines.", show_default=_shown("log_every")),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY=VALUE", help="Any other TrainConfig field as key=value, repeatable (e.g. weighting=likelihood).", show_default="none"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or chatter."),
) -> None:
    """Train a score network; writes the run directory and a final sample grid OUT/samples.png."""
    from scoresde.training import TrainingInterrupted, train as run_training

    with user_errors():
        known = [f.name for f in dataclasses.fields(TrainConfig)]
        file_values = load_toml(config) if config is not None else {}
        options: Dict[str, Any] = {
            "out_dir": None if out is None else str(out),
            "dataset": _value(dataset),
            "data_root": None if data_root is None else str(data_root),
            "data_n": data_n,
            "conditional": conditional,
            "sde": _value(sde),
            "model": _value(model),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "warmup": warmup,
            "ema_decay": ema_decay,
            "seed": seed,
            "device": device,
            "sampler": _value(sampler),
            "sample_steps": sample_steps,
            "num_samples": num_samples,
            "sample_every": sample_every,
            "ckpt_every": ckpt_every,
            "log_every": log_every,
        }
        options = {k: v for k, v in options.items() if v is not None}
        if max_minutes is not None:
            options["max_minutes"] = max_minutes or None  # 0 on the command line: no time limit
        if sde_arg:
            options["sde_kwargs"] = parse_pairs(sde_arg, "--sde-arg")
        if model_arg:
            options["model_kwargs"] = parse_pairs(model_arg, "--model-arg")
        extra = parse_pairs(set_, "--set")

        # Layers in order of precedence (dicts merged key by key, unknown keys named with their
        # source); the run directory decides the base: a resumed run starts from its own config.json.
        where = [str(config) if config else "config", "--set", "options"]
        overrides = merge_config({}, [file_values, extra, options], known, where)
        cfg = TrainConfig.for_run(overrides, resume=resume)
        out_dir = Path(cfg.out_dir)
        check_writable_dir(out_dir)
        if cfg.sampler not in solvers.SAMPLERS:
            raise UserError(f"sampler must be one of {sorted(solvers.SAMPLERS)}; got {cfg.sampler!r}")
        if resume and not (out_dir / "checkpoint.pt").is_file():
            _say(quiet, f"no checkpoint in {out_dir}; starting a new run")
        dev = resolve_device(cfg.device)
        _say(quiet, f"training {cfg.model} on {cfg.dataset} with the {cfg.sde} SDE on {dev} -> {cfg.out_dir}")
        draw = grid_drawer(cfg.sampler, cfg.sample_steps, cfg.seed) if cfg.num_samples > 0 else None
        try:
            result = run_training(cfg, resume=resume, force=force, progress=not quiet, draw=draw)
        except TrainingInterrupted as stop:
            typer.echo(f"Error: {stop}", err=True)
            raise typer.Exit(128 + stop.signal) from None

        grid = Path(result.out_dir) / f"samples_{result.step:06d}.png"
        if grid.is_file():  # the final grid (EMA weights) under a stable name
            shutil.copyfile(grid, Path(result.out_dir) / "samples.png")
        loss = result.metrics.get("loss")
        typer.echo(
            f"step {result.step} (stopped by {result.stopped_by}) in {result.elapsed_s:.1f} s"
            + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
        )
        typer.echo(f"checkpoint: {result.final_checkpoint}")
        if grid.is_file():
            typer.echo(f"samples: {Path(result.out_dir) / 'samples.png'}")


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------
def _load(checkpoint: Path, ema: bool, device: str):
    """``(model, sde, config, device)`` from a scoresde checkpoint (or run folder) or a local diffusers
    ``save_pretrained`` folder (:func:`scoresde.diffusers_io.load_any`); ``config`` is the training
    config of a scoresde checkpoint, or the loader's description of a diffusers model."""
    from scoresde.diffusers_io import load_any

    dev = resolve_device(device)
    model, sde, info = load_any(checkpoint, ema=ema, device=dev)
    return model, sde, info.get("config", info), dev


def _data_shape(model: Any, cfg: Dict[str, Any]) -> tuple:
    """Per-sample data shape: what the loader recorded, else read from the network's config."""
    if cfg.get("shape"):
        return tuple(int(d) for d in cfg["shape"])
    return model_shape(getattr(model, "config", {}) or {})


@app.command()
def sample(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file written by `scoresde train` (or a diffusers folder)."),
    sampler: str = typer.Option(solvers.DEFAULT_SAMPLER, help="Sampler (see `scoresde samplers`)."),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampler steps.", show_default="the sampler's default"),
    knob: Optional[List[str]] = typer.Option(None, "--knob", "-k", metavar="KEY=VALUE", help="Sampler option key=value, repeatable (see `scoresde samplers`).", show_default="none"),
    schedule: Optional[str] = typer.Option(None, help="Time grid option (uniform, quadratic, logsnr, karras, window).", show_default="the sampler's default"),
    t_min: Optional[float] = typer.Option(None, min=0.0, help="Last time of the grid.", show_default="the SDE's t_min"),
    eta: Optional[float] = typer.Option(None, min=0.0, help="DDIM noise option (0: deterministic).", show_default="0.0"),
    order: Optional[int] = typer.Option(None, min=1, max=3, help="DPM-Solver++ order option.", show_default="3"),
    denoise_final: Optional[bool] = typer.Option(None, "--denoise-final/--no-denoise-final", help="Final Tweedie denoising step option.", show_default="True"),
    grid: Optional[Path] = typer.Option(None, help="dpm_solver on a time grid fitted by `scoresde calibrate` (its steps and options).", show_default="none"),
    num_samples: int = typer.Option(64, "--num-samples", "-n", help="Number of samples."),
    batch_size: int = typer.Option(64, min=1, help="Samples per batch (the output does not depend on it)."),
    chunk: Optional[int] = typer.Option(None, min=0, show_default="16 on CPU, 512 on CUDA", help="Network calls are made on exactly this many samples (padded), so outputs are bit-identical for any --batch-size; 0: call on the whole batch (fastest, last-bit rounding then depends on the batch size)."),
    seed: int = typer.Option(0, min=0, help="Seed: sample i gets the same noise whatever the batch size."),
    label: Optional[int] = typer.Option(None, min=0, help="Class label for every sample (conditional models).", show_default="none (unconditional)"),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale w (1: plain conditional; needs --label)."),
    autocast: Optional[str] = typer.Option(None, help="Run the network under bf16 or fp16 autocast (the solver state stays float32).", show_default="off"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Sample with the EMA weights (or the raw trained ones)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto picks CUDA when present; under torchrun each rank takes its local GPU)."),
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid of the samples (of the first 256 with --out-dir)."),
    tensors: Optional[Path] = typer.Option(None, help="Samples as .npz or .pt.", show_default="OUT with suffix .npz"),
    out_dir: Optional[Path] = typer.Option(None, help="Write resumable shards here instead of one tensor file (works under torchrun: each rank draws its share; a rerun skips finished shards).", show_default="none"),
    shard_size: int = typer.Option(1000, min=1, help="Samples per shard with --out-dir."),
    trajectory: Optional[Path] = typer.Option(None, help="PNG strip of x_T, x_t and the denoised estimate over time (first batch).", show_default="none"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or chatter."),
) -> None:
    """Draw samples from a checkpoint; writes a PNG grid and the tensors (or shards), prints NFE and wall time."""
    from scoresde.generate import dist_env, generate, generate_shards, load_shards, local_device
    from scoresde.training import save_sample_grid

    from .pictures import trajectory_strip

    with user_errors():
        if num_samples < 1:
            raise UserError(f"-n / --num-samples must be a positive integer; got {num_samples}")
        record = solvers.get(sampler)
        knobs = parse_pairs(knob, "--knob")
        common = {"schedule": schedule, "t_min": t_min, "eta": eta, "order": order, "denoise_final": denoise_final}
        knobs.update({k: v for k, v in common.items() if v is not None})
        fitted = None
        if grid is not None:
            steps, knobs, fitted = _with_grid(grid, sampler, steps, knobs)
        record.options(knobs)  # every option checked before any work
        if autocast not in (None, "bf16", "fp16"):
            raise UserError(f"--autocast must be bf16 or fp16; got {autocast}")
        tensors = tensors if tensors is not None else out.with_suffix(".npz")
        if tensors.suffix not in (".npz", ".pt"):
            raise UserError(f"--tensors must end in .npz or .pt; got {tensors}")
        if out.suffix.lower() != ".png":
            raise UserError(f"--out must be a .png file; got {out}")
        if label is None and guidance != 1.0:
            raise UserError("--guidance needs --label (the class to guide towards)")
        check_writable_file(out, "--out")
        if out_dir is None:
            check_writable_file(tensors, "--tensors")
        else:
            check_writable_dir(out_dir, "--out-dir")
        if trajectory is not None:
            check_writable_file(trajectory, "--trajectory")

        rank, world, _ = dist_env()
        model, sde, cfg, dev = _load(checkpoint, ema, local_device(device) if world > 1 else device)
        num_classes = getattr(model, "num_classes", None)
        if label is not None:
            if num_classes is None:
                raise UserError(f"--label needs a class-conditional model; {checkpoint} was trained unconditionally")
            if label >= num_classes:
                raise UserError(f"--label must be in 0..{num_classes - 1}; got {label}")
        shape = _data_shape(model, cfg)
        steps_used = steps if steps is not None else record.default_steps
        if fitted is not None:
            knobs = {**knobs, "t_grid": fitted}
        common_kw = dict(sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, chunk=chunk, label=label,
                         guidance=guidance, autocast=autocast, device=dev, progress=not quiet and rank == 0, **knobs)
        start = time.perf_counter()
        meta = {"sampler": sampler, "steps": steps_used, "seed": seed, "checkpoint": str(checkpoint),
                "label": -1 if label is None else label, "guidance": guidance, "knobs": json.dumps(knobs, default=str),
                "grid": "" if grid is None else str(grid)}
        if out_dir is not None:
            _say(quiet or rank > 0, f"{num_samples} samples with {sampler} ({steps_used} steps) on {world} process(es) -> {out_dir}")
            report = generate_shards(model, sde, shape, num_samples, out_dir, shard_size=shard_size,
                                     run_info={"checkpoint": str(checkpoint)}, **common_kw)
            wall = time.perf_counter() - start
            if rank > 0:
                return
            typer.echo(f"shards: {len(report.drawn)} drawn, {len(report.skipped)} already done on rank 0 ({out_dir})")
            typer.echo(f"wall time: {wall:.2f} s")
            if report.complete and world == 1:
                x = load_shards(out_dir)[:256]
                save_sample_grid(x, out, title=f"{sampler}, {steps_used} steps")
                typer.echo(f"grid: {out}")
            return
        _say(quiet, f"{num_samples} samples with {sampler} ({steps_used} steps) on {dev}")
        res = generate(model, sde, shape, num_samples, keep_trajectory=trajectory is not None, **common_kw)
        wall = time.perf_counter() - start
        x = res.x
        save_sample_grid(x, out, title=f"{sampler}, {steps_used} steps")
        meta["nfe"] = res.nfe
        if tensors.suffix == ".npz":
            import numpy as np

            np.savez(tensors, x=x.numpy(), **{k: np.asarray(v) for k, v in meta.items()})
        else:
            import torch

            torch.save({"x": x, **meta}, tensors)
        if trajectory is not None:
            traj = res.first
            if traj is None or traj.trajectory is None:
                raise UserError(f"sampler {sampler!r} reported no steps to draw a trajectory from")
            trajectory_strip(traj.times, traj.trajectory, traj.denoised, trajectory)
        per = res.nfe_per_batch
        typer.echo(f"NFE: {per:g} per batch ({res.nfe} in {res.batches} batch(es))")
        typer.echo(f"wall time: {wall:.2f} s ({wall / num_samples * 1e3:.1f} ms/sample)")
        typer.echo(f"grid: {out}")
        typer.echo(f"tensors: {tensors}")
        if trajectory is not None:
            typer.echo(f"trajectory: {trajectory}")


def _with_grid(path: Path, sampler: str, steps: Optional[int], knobs: Dict[str, Any]):
    """``(steps, knobs, grid)`` for sampling on the calibrated grid at ``path``: its steps and the
    knobs it was fitted with; a clash with what the user asked for is an error, not a silent override."""
    if sampler != "dpm_solver":
        raise UserError(f"--grid is a dpm_solver time grid; got --sampler {sampler}")
    try:
        fitted = solvers.CalibratedGrid.load(path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if steps is not None and steps != fitted.steps:
        raise UserError(f"--grid {path} was fitted for {fitted.steps} steps; got --steps {steps}")
    if "schedule" in knobs or "t_min" in knobs:
        raise UserError("--grid fixes the time grid; drop --schedule / --t-min")
    used = {**solvers.SAMPLERS["dpm_solver"].defaults(), **fitted.knobs}  # what the fit ran with, defaults included
    clash = {k: (v, used[k]) for k, v in knobs.items() if k in used and used[k] != v}
    if clash:
        raise UserError(f"--grid {path} was fitted with other knobs: {clash} (asked, fitted)")
    return fitted.steps, {**fitted.knobs, **knobs}, fitted


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------
@app.command()
def calibrate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file written by `scoresde train`."),
    steps: int = typer.Option(..., min=2, help="NFE the grid is fitted for (sample with the same --steps)."),
    out: Path = typer.Option(Path("grid.json"), "--out", "-o", help="JSON file for the grid (read by `sample --grid`)."),
    pilot_samples: int = typer.Option(64000, min=4, help="Starts screened: half to fit, half to validate."),
    typical_samples: int = typer.Option(2000, min=1, help="Starts per half standing for those not at risk."),
    pilot_steps: int = typer.Option(200, min=2, help="Steps of the accurate solves the grid is fitted against."),
    coefficients: Optional[bool] = typer.Option(None, "--coefficients/--no-coefficients", help="Also fit per-step solver coefficients on the grid (kept only if they validate better).", show_default="up to 15 steps"),
    knob: Optional[List[str]] = typer.Option(None, "--knob", "-k", metavar="KEY=VALUE", help="dpm_solver knob key=value, repeatable (not schedule / t_grid / coefficients).", show_default="none"),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Samples per network call.", show_default="512 on CUDA, 256 on CPU"),
    seed: int = typer.Option(7919, min=0, help="Seed of the pilot's starts (never the sampling noise)."),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Fit to the EMA weights (or the raw trained ones)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto picks CUDA when present)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or chatter."),
) -> None:
    """Fit a dpm_solver time grid and per-step coefficients to a checkpoint (after "Align Your
    Steps" and learned-coefficient solvers); a one-off cost that it prints (~35-90 M sample-NFE at
    10 steps with the defaults, ~10-20 M with --no-coefficients), after which `sample --grid` costs
    exactly --steps NFE."""
    import torch

    with user_errors():
        knobs = parse_pairs(knob, "--knob")
        solvers.SAMPLERS["dpm_solver"].options(knobs)
        if "coefficients" in knobs:
            raise UserError("calibrate fits the coefficients itself: use --coefficients / --no-coefficients")
        if pilot_steps < steps:
            raise UserError(f"--pilot-steps must be at least --steps ({steps}); got {pilot_steps}")
        if out.suffix.lower() != ".json":
            raise UserError(f"--out must be a .json file; got {out}")
        check_writable_file(out, "--out")  # before the expensive fit, not after it
        model, sde, cfg, dev = _load(checkpoint, ema, device)
        if getattr(model, "num_classes", None) is not None:
            raise UserError("calibrate fits unconditional models only (this checkpoint is class-conditional)")
        shape = _data_shape(model, cfg)
        batch = batch_size or (512 if dev.type == "cuda" else 256)
        _say(quiet, f"calibrating a {steps}-step dpm_solver grid on {dev}")
        start = time.perf_counter()
        try:
            fitted = solvers.calibrate_grid(model, sde, shape, steps=steps, pilot_samples=pilot_samples,
                                            typical_samples=typical_samples, pilot_steps=pilot_steps, pilot_seed=seed,
                                            coefficients=coefficients, batch_size=batch, device=dev, progress=not quiet,
                                            **knobs)
        except (TypeError, ValueError) as e:
            raise UserError(str(e)) from None
        wall = time.perf_counter() - start
        out.parent.mkdir(parents=True, exist_ok=True)
        fitted.save(out)
        sig = sde.sigma(torch.tensor(fitted.t, dtype=torch.float64)).tolist()
        typer.echo(f"sigma grid: {' '.join(f'{v:.3g}' for v in sig)}")
        typer.echo(f"RMS endpoint error, validation half: default grid {fitted.validation_default_rms:.4g}, "
                   f"this grid {fitted.validation_grid_rms:.4g}, with its coefficients {fitted.validation_rms:.4g}"
                   + ("" if fitted.coefficients is not None else " (none kept)" if fitted.coefficients_tried else " (not fitted)"))
        typer.echo(f"cost: {fitted.pilot_cost / 1e6:.3g} M sample-NFE ({fitted.pilot_samples} starts screened), "
                   f"{fitted.grids_tried} grids and {fitted.coefficients_tried} coefficient sets tried, {wall:.1f} s")
        typer.echo(f"grid: {out}  (scoresde sample {checkpoint} --grid {out})")


def model_shape(mc: Dict[str, Any]) -> tuple:
    """Per-sample data shape of a trained model, read from its config (U-Net: (C, H, H); MLP: (dim,))."""
    if mc.get("arch") == "unet":
        return (mc["in_channels"], mc["image_size"], mc["image_size"])
    if mc.get("arch") == "mlp":
        return (mc["dim"],)
    raise UserError(f"cannot tell the data shape of a {mc.get('arch')!r} model from its config")


# ---------------------------------------------------------------------------------------------
# likelihood
# ---------------------------------------------------------------------------------------------
@app.command()
def likelihood(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file written by `scoresde train`."),
    split: Split = typer.Option(Split.test, help="Split of the checkpoint's dataset."),
    dataset: Optional[DatasetName] = typer.Option(None, help="Dataset to evaluate (needed for a diffusers folder, which records none).", show_default="the checkpoint's"),
    n: int = typer.Option(128, "--n", "-n", min=1, help="Number of examples (a seeded subset of the split)."),
    batch_size: int = typer.Option(64, min=1, help="Examples per ODE solve."),
    method: ODEMethod = typer.Option(ODEMethod.dopri5, help="Adaptive ODE solver."),
    rtol: float = typer.Option(1e-5, min=0.0, help="Relative tolerance."),
    atol: float = typer.Option(1e-5, min=0.0, help="Absolute tolerance."),
    trace: Trace = typer.Option(Trace.hutchinson, help="Divergence: Hutchinson estimate or exact (small data only)."),
    probes: int = typer.Option(1, min=1, help="Hutchinson probes per example, integrated in one solve."),
    seed: int = typer.Option(0, min=0, help="Seed of the subset, dequantisation and probes."),
    data_root: Optional[Path] = typer.Option(None, help="Folder of local files (mnist, cifar10, folder).", show_default="the checkpoint's"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights (or the raw trained ones)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N (auto picks CUDA when present)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or chatter."),
) -> None:
    """Bits per dimension of a data split under the model's probability-flow ODE (mean ± standard error)."""
    import torch

    from scoresde.memory import check_dataset_fits
    from scoresde.data import load_dataset
    from scoresde.likelihood import bits_per_dim, log_likelihood

    with user_errors():
        model, sde, cfg, dev = _load(checkpoint, ema, device)
        name = _value(dataset) if dataset is not None else cfg.get("dataset")
        if name is None:
            raise UserError(f"{checkpoint} records no dataset: pass --dataset")
        root = str(data_root) if data_root is not None else cfg.get("data_root")
        check_dataset_fits(name, n)  # a toy of n examples is drawn in memory: refuse one that cannot fit
        data = load_dataset(name, root=root, n=n, seed=seed, split=_value(split))
        discrete = data.levels is not None  # L-level data: bits/dim of the discrete data is defined
        _say(quiet, f"{len(data.x)} {name} ({_value(split)}) examples, {_value(method)} rtol={rtol:g} atol={atol:g}, "
                    f"{_value(trace)} trace" + ("" if discrete else " -- continuous density: the data are not discrete levels"))
        gen = torch.Generator(device=dev).manual_seed(seed)
        opts = dict(method=_value(method), rtol=rtol, atol=atol, trace=_value(trace), probes=probes, progress=not quiet)
        conditional = bool(cfg.get("conditional")) and data.y is not None
        bpd, nfe = [], 0
        start = time.perf_counter()
        for i in range(0, len(data.x), batch_size):
            xb = data.x[i : i + batch_size].to(dev)
            if conditional:
                opts["model_kwargs"] = {"y": data.y[i : i + batch_size].to(dev)}
            if discrete:
                res = bits_per_dim(model, sde, xb, generator=gen, levels=data.levels, **opts)
                bpd.append(res.bpd.double().cpu())
            else:
                res = log_likelihood(model, sde, xb, generator=gen, **opts)
                bpd.append((-res.logp / (xb[0].numel() * math.log(2.0))).double().cpu())
            nfe += res.nfe
        wall = time.perf_counter() - start
        values = torch.cat(bpd)
        mean = float(values.mean())
        stderr = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        kind = "bits/dim" if discrete else "bits/dim (continuous density of the stored values)"
        typer.echo(f"{kind}: {mean:.4f} ± {stderr:.4f} (n={len(values)}, standard error of the mean)")
        typer.echo(f"NFE: {nfe} in {math.ceil(len(values) / batch_size)} solve(s), wall time: {wall:.2f} s")


# ---------------------------------------------------------------------------------------------
# info, samplers
# ---------------------------------------------------------------------------------------------
@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="Checkpoint file."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """What a checkpoint holds: SDE, model, step, EMA, dataset, versions."""
    from scoresde.checkpoint import checkpoint_info

    with user_errors():
        summary = checkpoint_info(checkpoint)
        if as_json:
            typer.echo(json.dumps(summary, indent=2, default=str))
            return
        sde_cfg = dict(summary.get("sde") or {})
        model_cfg = dict(summary.get("model") or {})
        versions = summary.get("versions") or {}
        metrics = summary.get("metrics") or {}
        rows = [
            ("checkpoint", summary["path"]),
            ("step", summary.get("step")),
            ("dataset", f"{summary.get('dataset')}" + (" (conditional)" if summary.get("conditional") else "")),
            ("sde", f"{sde_cfg.pop('name', '?')} {_kv(sde_cfg)}"),
            ("model", f"{summary.get('preset')} preset, {model_cfg.pop('arch', '?')}, {summary.get('model_numel'):,} parameters"),
            ("model config", _kv(model_cfg)),
            ("ema", f"yes (decay {summary.get('ema_decay')})" if summary.get("has_ema") else "no"),
            ("last metrics", _kv({k: metrics[k] for k in ("loss", "lr", "steps_per_s") if k in metrics}) or "none"),
            ("versions", _kv(versions) or "unknown"),
            ("format", summary.get("format_version")),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            typer.echo(f"{k:<{width}}  {v}")


def _kv(d: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


@app.command()
def samplers() -> None:
    """Every sampler: what it is, its default steps and NFE, and each option with its default."""
    for name, record in solvers.SAMPLERS.items():
        kind = "stochastic" if record.stochastic else "deterministic"
        typer.echo(f"{name}  ({kind}; default steps {record.default_steps}; NFE {record.nfe})")
        if record.summary:
            typer.echo(f"    {record.summary}")
        for key, (default, helptext) in record.describe().items():
            typer.echo(f"    {key}={default!r}" + (f"  {helptext}" if helptext else ""))


# Commands defined in their own modules: evaluation (FID/KID/IS) and conditional generation.
evaluate.register(app)
condition.register(app)


def main() -> None:
    app()


__all__ = ["app", "main"]
