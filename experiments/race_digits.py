"""The digits race: our default training job vs diffusers' unconditional recipe, same wall-clock budget.

(a) Ours: ``scoresde.training.train(TrainConfig(max_minutes=M))`` with the default configuration,
    sampled with a sampler from ``solvers.SAMPLERS`` at <= 50 network evaluations (NFE).
(b) Theirs: diffusers ``UNet2DModel`` + ``DDPMScheduler`` set up as in diffusers'
    ``examples/unconditional_image_generation/train_unconditional.py``: two blocks (64, 128) with
    attention at the lower resolution, two layers per block, 1000 linear-beta timesteps, eps
    prediction, AdamW (lr 5e-4, betas (0.95, 0.999), weight decay 1e-6), batch 128, EMA with the
    example's warmup (inv_gamma 1, power 3/4, max decay 0.9999); trained for the same M minutes and
    sampled with 1000 DDPM steps and with 50 DDIM steps. It runs in the peers' virtual environment
    (``--peer-python``, default /work/peers-venv/bin/python) with this repository on PYTHONPATH.

Both are judged by :func:`scoresde.metrics.digit_metrics` (Frechet distance in the digit CNN's
feature space, classifier Inception score, fraction of confidently classified samples) on the same
number of samples against the held-out test digits. Training runs one after the other (never in
parallel) with the same thread count; run it on a quiet machine. Usage::

    python experiments/race_digits.py --minutes 5 --out docs/race_digits.md
    python experiments/race_digits.py --minutes 0.5 --n 128          # smoke run

Prints a markdown table and writes it (with the settings) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# (b) diffusers, run inside the peers' environment
# ---------------------------------------------------------------------------------------------
def peer_worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # the parent saved scoresde.data's digits train split (the peers' env lacks scikit-learn)
    data = torch.load(os.path.join(args.work, "digits_train.pt"), weights_only=True)  # (1437, 1, 8, 8) in [-1, 1]
    model = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=args.peer_lr, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    warmup = args.peer_warmup
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))  # constant_with_warmup
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    g = torch.Generator().manual_seed(args.seed)
    budget, step = 60.0 * args.minutes, 0
    model.train()
    start = time.perf_counter()
    while time.perf_counter() - start < budget:
        perm = torch.randperm(data.shape[0], generator=g)
        for i in range(0, data.shape[0] - args.batch + 1, args.batch):  # drop_last
            if time.perf_counter() - start >= budget:
                break
            x0 = data[perm[i : i + args.batch]]
            noise = torch.randn(x0.shape, generator=g)
            ts = torch.randint(0, 1000, (x0.shape[0],), generator=g)
            loss = F.mse_loss(model(sched.add_noise(x0, noise, ts), ts).sample, noise)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            ema.step(model.parameters())
            step += 1
    train_s = time.perf_counter() - start
    ema.copy_to(model.parameters())
    model.eval()

    out = {"steps": step, "train_s": train_s, "params": sum(p.numel() for p in model.parameters()), "samples": {}}
    for name, scheduler, n_steps in [("ddpm", DDPMScheduler.from_config(sched.config), 1000),
                                     ("ddim", DDIMScheduler.from_config(sched.config), 50)]:
        scheduler.set_timesteps(n_steps)
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn((args.n, 1, 8, 8), generator=gen)
        t0 = time.perf_counter()
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = model(x, t).sample
                x = scheduler.step(eps, t, x, generator=gen).prev_sample if name == "ddpm" else scheduler.step(eps, t, x, eta=0.0).prev_sample
        path = os.path.join(args.work, f"peer_{name}.pt")
        torch.save(x.clamp(-1, 1), path)
        out["samples"][name] = {"path": path, "nfe": n_steps, "sample_s": time.perf_counter() - t0}
    Path(args.work, "peer.json").write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# (a) ours
# ---------------------------------------------------------------------------------------------
def run_ours(args: argparse.Namespace) -> dict:
    import torch

    import solvers
    from scoresde.checkpoint import load_model
    from scoresde.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    overrides = json.loads(args.ours_config) if args.ours_config else {}
    cfg = TrainConfig(**{"max_minutes": args.minutes, "out_dir": os.path.join(args.work, "ours"), "num_samples": 0,
                         "seed": args.seed, "device": "cpu", "ckpt_every": 0, **overrides})
    res = train(cfg, progress=not args.quiet)
    model, sde, _ = load_model(res.final_checkpoint)
    out = {"steps": res.step, "train_s": res.elapsed_s, "params": sum(p.numel() for p in model.parameters()),
           "config": cfg.to_dict(), "samples": {}}
    for spec in args.ours:
        name, steps = spec.split(":")
        t0 = time.perf_counter()
        with torch.no_grad():
            r = solvers.sample(model, sde, (args.n, 1, 8, 8), sampler=name, steps=int(steps), generator=args.seed + 1)
        if r.nfe > 50:
            raise SystemExit(f"{spec} used {r.nfe} network evaluations; the race allows at most 50")
        out["samples"][f"{name} ({steps} steps)"] = {"x": r.x.clamp(-1, 1), "nfe": r.nfe, "sample_s": time.perf_counter() - t0}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget for each side")
    p.add_argument("--n", type=int, default=359, help="samples per sampler (the test split has 359 digits)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours", nargs="+", default=["dpm_solver:50", "heun:25"],
                   help="our samplers as name:steps (each at most 50 NFE)")
    p.add_argument("--ours-config", default=None,
                   help='JSON overrides of our TrainConfig for experiments, e.g. \'{"batch_size": 64}\' (the race uses the default)')
    p.add_argument("--peer-python", default="/work/peers-venv/bin/python")
    p.add_argument("--peer-lr", type=float, default=5e-4)
    p.add_argument("--peer-warmup", type=int, default=100,
                   help="warmup steps for diffusers (the example's 500 would eat a third of a 5-minute CPU run)")
    p.add_argument("--batch", type=int, default=128, help="diffusers batch size (ours: the TrainConfig default)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--out", type=str, default=None, help="write the markdown table here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--work", type=str, default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peer_worker:
        peer_worker(args)
        return

    import torch

    from scoresde.metrics import digit_metrics, load_digit_classifier

    work = tempfile.mkdtemp(prefix="race_digits_")
    args.work = work
    rows = []
    clf = load_digit_classifier()

    def judge(label, x, nfe, steps, train_s, sample_s, params):
        m = digit_metrics(x, n=args.n, classifier=clf, seed=args.seed)
        rows.append({"model": label, "nfe": nfe, "train_steps": steps, "train_s": train_s, "params": params,
                     "sample_s": sample_s, **m})

    from scoresde.data import load_dataset

    train_x = load_dataset("digits", split="train").x
    if not args.skip_peer:
        torch.save(train_x, os.path.join(work, "digits_train.pt"))
        cmd = [args.peer_python, str(Path(__file__).resolve()), "--peer-worker", "--work", work,
               "--minutes", str(args.minutes), "--n", str(args.n), "--threads", str(args.threads), "--seed", str(args.seed),
               "--peer-lr", str(args.peer_lr), "--peer-warmup", str(args.peer_warmup), "--batch", str(args.batch)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        subprocess.run(cmd, check=True, env=env)
        peer = json.loads(Path(work, "peer.json").read_text())
        for name, s in peer["samples"].items():
            label = "diffusers UNet2DModel, DDPM 1000 steps" if name == "ddpm" else "diffusers UNet2DModel, DDIM 50 steps"
            judge(label, torch.load(s["path"], weights_only=True), s["nfe"], peer["steps"], peer["train_s"], s["sample_s"], peer["params"])
    if not args.skip_ours:
        ours = run_ours(args)
        for name, s in ours["samples"].items():
            judge(f"scoresde default, {name}", s["x"], s["nfe"], ours["steps"], ours["train_s"], s["sample_s"], ours["params"])

    real = digit_metrics(train_x, n=args.n, classifier=clf, seed=args.seed)
    lines = [
        f"Digits race: {args.minutes:g} training minutes each, {args.threads} threads, {args.n} samples per row, "
        f"judged by scoresde.metrics against the {args.n} held-out test digits (seed {args.seed}).",
        "",
        "| model / sampler | NFE | train steps | train s | params | FD (lower better) | IS (max 10) | confident |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['nfe']} | {r['train_steps']} | {r['train_s']:.0f} | {r['params'] / 1e6:.2f}M | "
                     f"{r['fd']:.2f} | {r['inception_score']:.2f} | {100 * r['confident']:.1f}% |")
    lines.append(f"| real training digits (reference) | - | - | - | - | {real['fd']:.2f} | {real['inception_score']:.2f} | "
                 f"{100 * real['confident']:.1f}% |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
