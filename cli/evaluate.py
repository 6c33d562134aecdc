"""``scoresde fid ref`` and ``scoresde fid calc``: FID / KID / IS / precision-recall from the command line.

``fid ref`` computes reference statistics (Inception features' mean and covariance, plus a subset of
the features for KID and precision/recall) of a dataset known to :mod:`scoresde.data` or of a
folder / array of images, and writes them to an ``.npz``. ``fid calc`` scores samples (a PNG folder,
an ``.npz`` / ``.pt`` written by ``scoresde sample``, or a shard folder) against such a file or
directly against a dataset, and prints one JSON object. The arithmetic lives in
:mod:`scoresde.fidelity`; this module only turns options into its arguments.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from ._util import UserError, check_writable_file, user_errors

fid_app = typer.Typer(help="Sample quality with Inception features: FID, KID, IS, precision/recall (needs the [eval] extra).",
                      no_args_is_help=True, add_completion=False)


def _writable(path: Path, what: str, suffix: str) -> Path:
    """Refuse, before any work, an output path of the wrong kind or in a folder this process cannot write."""
    if path.suffix.lower() != suffix:
        raise UserError(f"{what} must be a {suffix} file; got {path}")
    return check_writable_file(path, what)


def _one_source(a: object, b: object, names: str, n: Optional[int]) -> None:
    """Exactly one of two mutually exclusive inputs, and a usable count of images."""
    if (a is None) == (b is None):
        raise UserError(f"give exactly one of {names}")
    if n is not None and n < 2:
        raise UserError(f"-n must be at least 2; got {n}")


def _extractor(weights: Optional[Path], download: bool, device: str):
    from scoresde.fidelity import inception_extractor
    from scoresde.training import resolve_device

    return inception_extractor(weights, download=download, device=resolve_device(device))


def _first(images, n: Optional[int], what: str):
    if n is None:
        return images
    if n > images.shape[0]:
        raise UserError(f"-n {n} exceeds the {images.shape[0]} images of {what}")
    return images[:n]


@fid_app.command("ref")
def fid_ref(
    dataset: Optional[str] = typer.Option(None, help="A dataset of scoresde.data (cifar10, mnist, digits, folder).", show_default="none"),
    images: Optional[Path] = typer.Option(None, help="Or: a folder of images, an .npz / .pt of images, or a shard folder.", show_default="none"),
    split: str = typer.Option("train", help="Dataset split (train | test)."),
    data_root: Optional[Path] = typer.Option(None, help="Folder of the dataset's local files.", show_default="$SCORESDE_DATA or ./data"),
    n: Optional[int] = typer.Option(None, "-n", "--num-images", help="Use this many images (a seeded subset of a dataset; the first n otherwise).", show_default="all"),
    out: Path = typer.Option(..., "--out", "-o", help="Reference statistics file (.npz)."),
    keep_features: int = typer.Option(10_000, min=2, help="Feature rows kept for KID and precision/recall."),
    weights: Optional[Path] = typer.Option(None, help="Inception weights file (weights-inception-2015-12-05-6726825d.pth).", show_default="$SCORESDE_INCEPTION_WEIGHTS, else torch-fidelity's cache / download"),
    download: bool = typer.Option(True, "--download/--no-download", help="Let torch-fidelity download the weights into its cache when no file is found."),
    batch_size: int = typer.Option(128, min=1, help="Images per network call."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Reference statistics of a dataset or of an image set, written to an .npz; prints a JSON summary."""
    from scoresde import fidelity as fd

    with user_errors():
        _one_source(dataset, images, "--dataset or --images", n)
        _writable(out, "--out", ".npz")
        start = time.perf_counter()
        if dataset is not None:
            imgs = fd.dataset_images(dataset, split=split, root=None if data_root is None else str(data_root), n=n)
        else:
            imgs = _first(fd.load_images(images), n, str(images))
        ex = _extractor(weights, download, device)
        ref = fd.reference_statistics(imgs, ex, keep_features=keep_features, batch_size=batch_size, progress=not quiet)
        ref.save(out)
        typer.echo(json.dumps({"out": str(out), "n": ref.n, "shape": list(ref.shape), "extractor": ref.extractor,
                               "features_kept": int(ref.features.shape[0]), "source": dataset or str(images),
                               "split": split if dataset else None, "seconds": round(time.perf_counter() - start, 2)}))


@fid_app.command("calc")
def fid_calc(
    samples: Path = typer.Argument(..., help="Samples: a folder of images, an .npz / .pt from `scoresde sample`, or a shard folder."),
    ref: Optional[Path] = typer.Option(None, help="Reference statistics from `scoresde fid ref`.", show_default="none"),
    dataset: Optional[str] = typer.Option(None, help="Or: compare with this dataset of scoresde.data directly.", show_default="none"),
    split: str = typer.Option("train", help="Split of --dataset."),
    data_root: Optional[Path] = typer.Option(None, help="Folder of the dataset's local files.", show_default="$SCORESDE_DATA or ./data"),
    n: Optional[int] = typer.Option(None, "-n", "--num-samples", help="Score the first n samples.", show_default="all"),
    metric: Optional[List[str]] = typer.Option(None, "--metric", "-m", help="fid, kid, isc, prc; repeatable.", show_default="all four"),
    kid_subsets: int = typer.Option(100, min=1, help="KID: number of random subsets."),
    kid_subset_size: int = typer.Option(1000, min=2, help="KID: rows per subset (lowered to the smaller set)."),
    seed: int = typer.Option(2020, help="Seed of KID's subsets and IS's shuffle."),
    weights: Optional[Path] = typer.Option(None, help="Inception weights file (weights-inception-2015-12-05-6726825d.pth).", show_default="$SCORESDE_INCEPTION_WEIGHTS, else torch-fidelity's cache / download"),
    download: bool = typer.Option(True, "--download/--no-download", help="Let torch-fidelity download the weights into its cache when no file is found."),
    batch_size: int = typer.Option(128, min=1, help="Images per network call."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the JSON to this file.", show_default="stdout only"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score samples against reference statistics (or a dataset): prints one JSON object."""
    from scoresde import fidelity as fd

    with user_errors():
        _one_source(ref, dataset, "--ref or --dataset", n)
        metrics = tuple(metric) if metric else fd.METRICS
        unknown = sorted(set(metrics) - set(fd.METRICS))
        if unknown:
            raise UserError(f"unknown --metric {unknown}; choose from {list(fd.METRICS)}")
        if out is not None:
            _writable(out, "--out", ".json")
        reference = fd.Reference.load(ref) if ref is not None else None  # a missing file fails before any work
        imgs = _first(fd.load_images(samples), n, str(samples))
        if reference is not None and tuple(imgs.shape[1:]) != tuple(reference.shape):
            raise UserError(f"samples are {'x'.join(map(str, imgs.shape[1:]))} (C x H x W) but {ref} was computed on "
                            f"{'x'.join(map(str, reference.shape))} images")
        start = time.perf_counter()
        ex = _extractor(weights, download, device)
        if reference is None:
            real = fd.dataset_images(dataset, split=split, root=None if data_root is None else str(data_root))
            reference = fd.reference_statistics(real, ex, batch_size=batch_size, progress=not quiet)
        result = fd.evaluate(imgs, reference, ex, metrics=metrics, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                             seed=seed, batch_size=batch_size, progress=not quiet)
        result.update(samples=str(samples), reference=str(ref) if ref is not None else f"{dataset}:{split}",
                      seconds=round(time.perf_counter() - start, 2))
        text = json.dumps(result)
        if out is not None:
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            tmp.write_text(text + "\n")
            os.replace(tmp, out)
        typer.echo(text)


def register(app: typer.Typer) -> None:
    """Add the ``fid`` command group (``fid ref``, ``fid calc``) to ``app``."""
    app.add_typer(fid_app, name="fid")


__all__ = ["fid_app", "register"]
