"""Sample quality against NFE for each sampler, on a trained checkpoint.

    # 8x8 digits: the digits judge (classifier FD / IS against the held-out test digits)
    python experiments/sweep_quality.py runs/digits/checkpoint.pt --samplers ddim dpm_solver heun --nfe 5 10 20 50 -n 1000
    # images: FID / KID / IS through scoresde.fidelity (Inception; reference from `scoresde fid ref`)
    python experiments/sweep_quality.py runs/cifar10/checkpoint.pt --ref cifar10_train.npz -n 10000 --nfe 10 20 50 100

For every ``(sampler, target NFE)`` it draws ``n`` samples with :func:`scoresde.generate.generate`
(per-sample noise, seed ``--seed``: the same starting noise ``x_T`` for every sampler) at the largest
``steps`` whose NFE does not exceed the target (``experiments/_problems.steps_for_nfe``; the NFE
actually spent is recorded), scores them, and writes into ``--out-dir``: ``quality.csv``,
``quality.md`` (the same table) and ``quality.png`` (the primary metric, FD or FID, against NFE, one
line per sampler, log-scaled NFE). The judge is the digits classifier for ``(1, 8, 8)`` data
(``--judge auto``) and the Inception metrics otherwise. FID-type numbers depend on ``n`` (the
plug-in estimate is biased upwards by ~1/n): compare rows at equal ``n`` only, and use
``n = 50,000`` for numbers comparable with papers.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _problems as P  # noqa: E402

from scoresde.checkpoint import load_model  # noqa: E402
from scoresde.generate import generate  # noqa: E402
from scoresde.training import resolve_device  # noqa: E402

DEFAULT_SAMPLERS = ("ddim", "heun", "dpm_solver")
DEFAULT_NFE = (5, 10, 20, 50)


def data_shape(config: Dict[str, Any]) -> tuple:
    """Per-sample shape from a network's ``.config`` (U-Net: ``(C, H, H)``; MLP: ``(dim,)``)."""
    if config.get("arch") == "unet":
        return (config["in_channels"], config["image_size"], config["image_size"])
    return (config["dim"],)


def make_judge(kind: str, shape: tuple, args: argparse.Namespace):
    """``score(x) -> dict`` and the name of its primary (lower-is-better) column."""
    if kind == "auto":
        kind = "digits" if tuple(shape) == (1, 8, 8) else "fid"
    if kind == "digits":
        from scoresde.metrics import digit_metrics

        return (lambda x: digit_metrics(x, seed=args.seed)), "fd", "digits"
    from scoresde import fidelity as fd

    if (args.ref is None) == (args.dataset is None):
        raise SystemExit("--judge fid needs exactly one of --ref FILE or --dataset NAME")
    ex = fd.inception_extractor(args.weights, download=not args.no_download, device=resolve_device(args.device))
    if args.ref is not None:
        ref = fd.Reference.load(args.ref)
    else:
        ref = fd.reference_statistics(fd.dataset_images(args.dataset, split=args.split), ex, progress=True)

    def score(x: torch.Tensor) -> Dict[str, Any]:
        return fd.evaluate(fd.to_uint8(x.clamp(-1, 1)), ref, ex, kid_subset_size=min(1000, x.shape[0]),
                           kid_subsets=args.kid_subsets, metrics=("fid", "kid", "isc"))

    return score, "fid", "fid"


def sweep(model, sde, shape: tuple, samplers: Sequence[str], nfes: Sequence[int], score, *, n: int, seed: int,
          batch_size: int, chunk: Optional[int], autocast: Optional[str], progress: bool) -> List[Dict[str, Any]]:
    """One row per ``(sampler, target NFE)`` that the sampler can reach: its steps, NFE, wall time and scores."""
    rows = []
    for name in samplers:
        for target in nfes:
            steps, nfe = P.steps_for_nfe(name, sde, target)
            if steps is None:
                print(f"{name}: one step costs more than {target} NFE; skipped", file=sys.stderr)
                continue
            start = time.perf_counter()
            res = generate(model, sde, shape, n, sampler=name, steps=steps, seed=seed, batch_size=batch_size, chunk=chunk,
                           autocast=autocast, progress=progress)
            wall = time.perf_counter() - start
            row = {"sampler": name, "target_nfe": target, "steps": steps, "nfe": res.nfe_per_batch, "n": n,
                   "seconds": round(wall, 2), **{k: v for k, v in score(res.x).items() if not isinstance(v, str)}}
            rows.append(row)
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), file=sys.stderr)
    return rows


def write_outputs(rows: List[Dict[str, Any]], out_dir: Path, primary: str, title: str) -> None:
    """``quality.csv``, ``quality.md`` and ``quality.png`` (``primary`` against NFE per sampler)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "quality.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out_dir / "quality.md").write_text(f"{title}\n\n" + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r[primary]) for r in rows if r["sampler"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["target_nfe"] for r in rows}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("NFE per sample")
    ax.set_ylabel(primary.upper() + " (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "quality.png", dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS))
    ap.add_argument("--nfe", nargs="+", type=int, default=list(DEFAULT_NFE))
    ap.add_argument("-n", type=int, default=1000, help="samples per (sampler, NFE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=None, help="fixed network-call size (default: 16 CPU / 512 CUDA)")
    ap.add_argument("--autocast", choices=["bf16", "fp16"], default=None)
    ap.add_argument("--judge", choices=["auto", "digits", "fid"], default="auto")
    ap.add_argument("--ref", type=Path, default=None, help="reference statistics from `scoresde fid ref`")
    ap.add_argument("--dataset", default=None, help="or: a dataset of scoresde.data to compute the reference from")
    ap.add_argument("--split", default="train")
    ap.add_argument("--weights", type=Path, default=None, help="Inception weights file")
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-ema", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=None, help="default: docs/results/quality_<checkpoint folder>")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.n < 2:
        raise SystemExit(f"-n must be at least 2; got {args.n}")
    dev = resolve_device(args.device)
    model, sde, _ = load_model(args.checkpoint, ema=not args.no_ema, device=dev)
    shape = data_shape(model.config)
    score, primary, kind = make_judge(args.judge, shape, args)
    out_dir = args.out_dir or Path(__file__).resolve().parents[1] / "docs" / "results" / f"quality_{args.checkpoint.parent.name}"
    rows = sweep(model, sde, shape, args.samplers, args.nfe, score, n=args.n, seed=args.seed, batch_size=args.batch_size,
                 chunk=args.chunk, autocast=args.autocast, progress=not args.quiet)
    if not rows:
        raise SystemExit("no (sampler, NFE) pair was reachable")
    title = f"{args.checkpoint} ({kind} judge, n = {args.n}, seed {args.seed}{', ' + args.autocast if args.autocast else ''})"
    write_outputs(rows, out_dir, primary, title)
    print(f"wrote {out_dir}/quality.csv, quality.md, quality.png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
