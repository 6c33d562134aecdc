"""Throughput on a CUDA device: training steps/s (fp32 vs bf16 autocast, eager vs torch.compile) and
sampling images/s (fp32 vs bf16 autocast), with the networks the presets build.

    python experiments/bench_cuda.py [--quick] [--out results.csv]

Training runs :func:`scoresde.training.train` itself (the loop a user runs, EMA and all) on random
data of the preset's shape, and reads the rate of the last logged window, so compilation and
warm-up stay out of the number. Sampling times ``solvers.sample`` with ``dpm_solver`` after one
warm-up call, synchronising the device before reading the clock. Prints a table; writes a CSV.
Needs a GPU (exits with a message otherwise). Numbers are from one run each: repeat before
quoting differences under ~5 %.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

import torch

import solvers
from scoresde import VPSDE
from scoresde.data import Dataset
from scoresde.networks import build_model
from scoresde.training import TrainConfig, train

CASES = [  # preset, data shape, batch size, training steps timed
    ("digits", (1, 8, 8), 64, 300),
    ("cifar10", (3, 32, 32), 128, 120),
]


def train_rate(preset: str, shape: tuple, batch: int, *, amp: bool, compile: str, steps: int) -> float:
    """Optimiser steps per second over the last logged window of a ``steps``-step run."""
    x = torch.rand((max(4 * batch, 512), *shape)) * 2 - 1
    data = Dataset(x=x, y=None, num_classes=None, name="random", is_image=len(shape) == 3)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=preset, batch_size=batch, steps=steps, max_minutes=None, amp=amp,
                          compile=bool(compile), compile_mode=compile or "default", device="cuda", out_dir=out,
                          num_samples=0, ckpt_every=0, log_every=max(steps // 3, 1))
        res = train(cfg, dataset=data, progress=False)
    return float(res.metrics["steps_per_s"])


def sample_rate(preset: str, shape: tuple, batch: int, *, amp: bool, steps: int = 25) -> tuple[float, bool]:
    """Images per second of ``dpm_solver`` with ``steps`` steps, and whether the output is finite."""
    torch.manual_seed(0)
    model = build_model(preset, data_shape=shape).cuda().eval()
    sde = VPSDE()

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            return solvers.sample(model, sde, (batch, *shape), sampler="dpm_solver", steps=steps, generator=0)

    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = run()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return batch / dt, bool(torch.isfinite(res.x).all())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few steps, small presets only")
    ap.add_argument("--out", default=None, help="CSV path (default: print only)")
    ap.add_argument("--compile-mode", default="reduce-overhead",
                    help="torch.compile mode of the compiled row (first preset only); '' to skip it")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device; nothing to measure", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    cases = CASES[:1] if args.quick else CASES
    rows = []
    for i, (preset, shape, batch, steps) in enumerate(cases):
        steps = min(steps, 60) if args.quick else steps
        variants = [(False, ""), (True, "")] + ([(False, args.compile_mode)] if args.compile_mode and i == 0 else [])
        for amp, comp in variants:
            t0 = time.perf_counter()
            try:
                rate = train_rate(preset, shape, batch, amp=amp, compile=comp, steps=steps)
                note = ""
            except Exception as e:  # report and go on: one failing variant should not hide the others
                rate, note = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(dict(what="train", preset=preset, batch=batch, amp=amp, compile=comp,
                             per_s=rate * batch, steps_per_s=rate, wall_s=time.perf_counter() - t0, note=note))
            print(rows[-1], flush=True)
        for amp in (False, True):
            try:
                ips, finite = sample_rate(preset, shape, 256, amp=amp)
                note = "" if finite else "NON-FINITE OUTPUT"
            except Exception as e:
                ips, note = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
            rows.append(dict(what="sample dpm_solver 25", preset=preset, batch=256, amp=amp, compile="",
                             per_s=ips, steps_per_s=float("nan"), wall_s=float("nan"), note=note))
            print(rows[-1], flush=True)
    print("\n| what | preset | batch | bf16 autocast | compile | images/s | steps/s | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['preset']} | {r['batch']} | {r['amp']} | {r['compile']} | {r['per_s']:.0f} | "
              f"{r['steps_per_s']:.1f} | {r['note']} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
