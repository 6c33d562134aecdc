"""CLI commands for controllable generation: ``scoresde inpaint`` and ``scoresde train-classifier``.

``register(app)`` adds them to the Typer app. ``inpaint`` conditions a trained unconditional model
on a linear observation ``y = A x0 + sigma_y n`` (inpainting, colourisation, super-resolution) with
one of :data:`scoresde.conditioning.METHODS` and writes a PNG of observation | samples | truth and
the tensors (.npz). Every mistake a user can make ends as one ``Error: ...`` line.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Dict, Optional

import typer

from ._util import UserError, user_errors


class OperatorName(str, Enum):
    inpaint = "inpaint"
    colorize = "colorize"
    superres = "superres"


class MethodName(str, Enum):
    replacement = "replacement"
    repaint = "repaint"
    dps = "dps"
    pigdm = "pigdm"
    smc = "smc"


def build_operator(name: str, shape, mask: str = "lower", factor: int = 2, seed: int = 0):
    """The operator ``name`` for data of event shape ``shape``; ``mask`` is a mask name
    (:meth:`Mask.from_name`) or a .npy / .png file of shape (H, W) or (C, H, W) (nonzero = observed)."""
    import numpy as np
    import torch

    from scoresde.conditioning import Colorize, Downsample, Mask

    shape = tuple(int(s) for s in shape)
    if name == "colorize":
        return Colorize(shape)
    if name == "superres":
        return Downsample(shape, factor)
    path = Path(mask)
    if path.suffix.lower() in (".npy", ".png") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(2, "no such file", str(path))
        if path.suffix.lower() == ".npy":
            m = torch.as_tensor(np.load(path))
        else:
            import matplotlib.image as mpimg

            img = mpimg.imread(path)
            m = torch.as_tensor(img[..., 0] if img.ndim == 3 else img)
        m = m != 0
        if tuple(m.shape) not in (shape, shape[-2:]):
            raise UserError(f"mask {path} has shape {tuple(m.shape)}; the data are {shape} (give (H, W) or (C, H, W))")
        return Mask(m, channels=shape[0] if m.ndim == 2 and len(shape) == 3 else None)
    return Mask.from_name(mask, shape, seed=seed)


def _load_observations(observe: Optional[Path], dataset: str, shape, count: int):
    """``(truth or None, y or None, labels or None)`` from an .npz / .png file or the held-out test split."""
    import numpy as np
    import torch

    if observe is None:
        from scoresde.data import load_dataset

        ds = load_dataset(dataset, split="test")
        n = min(count, len(ds))
        return ds.x[:n], None, (ds.y[:n] if ds.y is not None else None)
    if not observe.is_file():
        raise FileNotFoundError(2, "no such file", str(observe))
    if observe.suffix.lower() == ".npz":
        blob = np.load(observe)
        truth = torch.as_tensor(blob["x"]).float() if "x" in blob else None
        y = torch.as_tensor(blob["y"]).float() if "y" in blob else None
        labels = torch.as_tensor(blob["labels"]) if "labels" in blob else None
        if truth is None and y is None:
            raise UserError(f"{observe} must hold an array 'x' (images to observe) or 'y' (observations)")
        if truth is not None:
            if truth.ndim == len(shape):
                truth = truth[None]
            if tuple(truth.shape[1:]) != tuple(shape):
                raise UserError(f"images in {observe} have shape {tuple(truth.shape[1:])}; the model's data are {tuple(shape)}")
        return truth, y, labels
    if observe.suffix.lower() == ".png":
        import matplotlib.image as mpimg

        img = torch.as_tensor(mpimg.imread(observe)).float()
        if img.max() > 1.0:
            img = img / 255.0
        c = shape[0]
        img = img[..., :3] if img.ndim == 3 else img[..., None]
        img = img.mean(-1, keepdim=True) if c == 1 else img
        x = (img.permute(2, 0, 1) * 2 - 1)[None]
        if tuple(x.shape[1:]) != tuple(shape):
            raise UserError(f"image {observe} has shape {tuple(x.shape[1:])}; the model's data are {tuple(shape)}")
        return x, None, None
    raise UserError(f"--observe takes an .npz or .png file; got {observe}")


def register(app: typer.Typer) -> None:
    """Add ``inpaint`` and ``train-classifier`` to ``app``."""

    @app.command()
    def inpaint(
        checkpoint: Path = typer.Argument(..., help="Checkpoint of an unconditional model (`scoresde train`)."),
        observe: Optional[Path] = typer.Option(None, help=".npz with 'x' (images to observe) or 'y' (observations), or a .png image.", show_default="the first --count held-out test images"),
        count: int = typer.Option(8, min=1, help="Held-out test images to observe when --observe is not given."),
        operator: OperatorName = typer.Option(OperatorName.inpaint, help="inpaint (mask), colorize (channel mean), superres (average pooling)."),
        mask: str = typer.Option("lower", help="Missing region: lower | upper | left | right | center | random:P, or a .npy/.png file (nonzero = observed)."),
        factor: int = typer.Option(2, min=1, help="Super-resolution factor."),
        method: MethodName = typer.Option(MethodName.repaint, help="replacement | repaint | dps | pigdm | smc (see docs/conditioning.md)."),
        sigma_y: float = typer.Option(0.0, help="Observation noise std (>= 0; replacement and repaint need 0, dps > 0)."),
        sampler: str = typer.Option("ancestral", help="Sampler for replacement / dps / pigdm."),
        steps: int = typer.Option(50, min=1, help="Sampler steps (repaint: levels; smc: filter steps)."),
        scale: float = typer.Option(1.0, help="Guidance scale (dps, pigdm)."),
        jacobian: str = typer.Option("gaussian", help="dps / pigdm: 'autograd' (exact vector-Jacobian product) or 'gaussian' (N(m, I) prior's Jacobian, no backward pass; robust for trained networks)."),
        particles: int = typer.Option(16, min=1, help="Particles per sample (smc)."),
        jump_length: int = typer.Option(10, min=1, help="RePaint jump length."),
        resamplings: int = typer.Option(5, min=1, help="RePaint resamplings (NFE about steps x resamplings)."),
        samples: int = typer.Option(4, "--samples", "-n", min=1, help="Samples per observation."),
        seed: int = typer.Option(0, min=0, help="Seed (per-sample noise; also the observation noise)."),
        ema: bool = typer.Option(True, "--ema/--no-ema", help="Use the EMA weights."),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
        out: Path = typer.Option(Path("inpaint.png"), "--out", "-o", help="PNG: one row per observation: observation | samples | truth."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No chatter."),
    ) -> None:
        """Sample p(x | y) from an unconditional model: inpainting, colourisation, super-resolution."""
        import time

        import numpy as np
        import torch

        from scoresde.checkpoint import load_model
        from scoresde.conditioning import METHODS, Observation, conditional_sample
        from scoresde.noise import SampleNoise
        from scoresde.training import resolve_device

        with user_errors():
            if not sigma_y >= 0:
                raise UserError(f"--sigma-y must be >= 0; got {sigma_y}")
            m = method.value
            if sigma_y > 0 and not METHODS[m]["noisy"]:
                raise UserError(f"method {m} handles noise-free observations only (--sigma-y 0); for noisy y use dps, pigdm or smc")
            if sigma_y == 0 and m == "dps":
                raise UserError("method dps needs noisy observations (--sigma-y > 0); for noise-free y use replacement, repaint, pigdm or smc")
            dev = resolve_device(device)
            model, sde, cfg = load_model(checkpoint, ema=ema, device=dev)
            data = load_checkpoint_shape(checkpoint)
            op = build_operator(operator.value, data, mask=mask, factor=factor, seed=seed)
            truth, y, labels = _load_observations(observe, cfg.get("dataset", "digits"), data, count)
            if y is None:
                y = op(truth.double())
                if sigma_y > 0:
                    y = y + sigma_y * SampleNoise(seed + 1, torch.arange(y.shape[0])).randn(tuple(y.shape[1:]), 0, dtype=torch.float64)
            y = torch.as_tensor(y, dtype=torch.float32)
            if tuple(y.shape[1:]) != tuple(op.out_shape):
                raise UserError(f"observations y have shape {tuple(y.shape[1:])}; the {operator.value} operator gives {tuple(op.out_shape)}")
            knobs: Dict[str, Any] = {}
            if m in ("dps", "pigdm"):
                knobs.update(scale=scale, jacobian=jacobian)
            if m == "smc":
                knobs["particles"] = particles
            if m == "repaint":
                knobs.update(jump_length=jump_length, resamplings=resamplings)
            started = time.time()
            rows, nfe = [], 0
            for i in range(y.shape[0]):
                obs = Observation(op, y[i], sigma_y)
                noise = SampleNoise(seed, torch.arange(i * samples, (i + 1) * samples))
                res = conditional_sample(model, sde, obs, samples, method=m, sampler=sampler, steps=steps,
                                         generator=noise, device=dev, **knobs)
                rows.append(res.x.float().cpu())
                nfe = res.nfe
                if not quiet:
                    typer.echo(f"observation {i + 1}/{y.shape[0]} done", err=True)
            x = torch.stack(rows)  # (N, S, ...)
            shown = op.pinv(y.double()).float()
            _save_rows(shown, x, truth, out)
            arrays = {"y": y.numpy(), "observed": shown.numpy(), "samples": x.numpy()}
            if truth is not None:
                arrays["x"] = truth.numpy()
            if labels is not None:
                arrays["labels"] = labels.numpy()
            np.savez(out.with_suffix(".npz"), **arrays)
            typer.echo(f"{m}: {y.shape[0]} observations x {samples} samples, {nfe} NFE per sample, "
                       f"{time.time() - started:.1f} s -> {out} and {out.with_suffix('.npz')}")

    @app.command("train-classifier")
    def train_classifier_cmd(
        dataset: str = typer.Option("digits", help="Labelled dataset (digits, mnist, cifar10, folder, gmm)."),
        checkpoint: Optional[Path] = typer.Option(None, help="Take the SDE from this model checkpoint.", show_default="the vp SDE"),
        steps: int = typer.Option(3000, min=1, help="Optimiser steps."),
        batch_size: int = typer.Option(128, min=1, help="Batch size."),
        lr: float = typer.Option(2e-3, min=0.0, help="AdamW learning rate."),
        hidden: int = typer.Option(256, min=1, help="Hidden width."),
        depth: int = typer.Option(3, min=1, help="Hidden layers."),
        seed: int = typer.Option(0, min=0, help="Seed."),
        out: Path = typer.Option(Path("classifier.pt"), "--out", "-o", help="Output file (state dict and config)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
    ) -> None:
        """Train a noise-conditional classifier p_t(label | x_t) for classifier guidance."""
        import torch

        from scoresde.conditioning import NoisyClassifier, train_classifier
        from scoresde.data import load_dataset
        from scoresde.sde import VPSDE

        with user_errors():
            ds = load_dataset(dataset, split="train")
            if ds.y is None or ds.num_classes is None:
                raise UserError(f"dataset {dataset!r} has no labels")
            if checkpoint is not None:
                from scoresde.checkpoint import load_model

                _, sde, _ = load_model(checkpoint, ema=False)
            else:
                sde = VPSDE()
            clf = NoisyClassifier(ds.shape, ds.num_classes, sde, hidden=hidden, depth=depth)
            log = None if quiet else (lambda s, loss: typer.echo(f"step {s}: loss {loss:.4f}", err=True))
            train_classifier(clf, ds.x, ds.y, steps=steps, batch_size=batch_size, lr=lr, seed=seed, log=log)
            test = load_dataset(dataset, split="test")
            with torch.no_grad():
                acc = float((clf(test.x, torch.full((len(test),), sde.t_min)).argmax(1) == test.y).float().mean())
            torch.save({"config": clf.config(), "state_dict": clf.state_dict()}, out)
            typer.echo(f"classifier -> {out}; held-out accuracy at t_min: {acc:.3f}")


def load_checkpoint_shape(checkpoint: Path):
    """The data's event shape recorded in a checkpoint's model config."""
    from scoresde.checkpoint import load_checkpoint

    from .app import model_shape

    return tuple(model_shape(load_checkpoint(checkpoint).get("model_config") or {}))


def _save_rows(observed, samples, truth, path: Path) -> None:
    """One row per observation: ``A^+ y`` | the samples | the truth (images), as a PNG."""
    import torch

    from scoresde.training import save_sample_grid

    n, s = samples.shape[:2]
    if samples.ndim != 5:  # vectors: scatter of everything
        save_sample_grid(samples.reshape(n * s, -1), path)
        return
    cols = [observed[:, None], samples] + ([truth.float()[:, None]] if truth is not None else [])
    grid = torch.cat(cols, dim=1)  # (N, cols, C, H, W)
    _image_rows(grid, path)


def _image_rows(grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from scoresde.training import upscale_nearest

    n, k, c, h, w = grid.shape
    canvas = torch.full((c, n * (h + 1) + 1, k * (w + 1) + 1), -1.0)
    for i in range(n):
        for j in range(k):
            canvas[:, 1 + i * (h + 1): 1 + i * (h + 1) + h, 1 + j * (w + 1): 1 + j * (w + 1) + w] = grid[i, j]
    canvas = upscale_nearest(canvas)
    img = ((canvas.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    plt.imsave(path, img[..., 0] if c == 1 else img, cmap="gray" if c == 1 else None, vmin=0, vmax=1)


__all__ = ["register", "build_operator", "load_checkpoint_shape"]
