"""Race the training targets (``TrainConfig.prediction`` = eps, x0, v, edm) on digits for equal steps.

Each target trains the default digits job (VP SDE, the ``digits`` U-Net, batch 64, EMA 0.999) for
the same number of optimiser steps (``--steps``, default 3200: about what the default 5-minute job
makes on a quiet CPU; steps, not minutes, so a shared machine does not decide the race), then is
sampled with DPM-Solver++ at 10 and 50 network evaluations and judged by
:func:`scoresde.metrics.digit_metrics` (FD in the digit CNN's feature space, classifier Inception
score, confident fraction) against the held-out test digits. The real training digits are judged
the same way as the reference level. Usage::

    python experiments/race_targets.py --steps 3200 --targets eps x0 v edm --out /tmp/race.json
    python experiments/race_targets.py --steps 50 --targets edm --n 64       # smoke run

Prints a markdown table; ``--out`` also writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3200)
    p.add_argument("--targets", nargs="+", default=["eps", "x0", "v", "edm"])
    p.add_argument("--nfe", nargs="+", type=int, default=[10, 50])
    p.add_argument("--n", type=int, default=359, help="samples per evaluation (the test split has 359 digits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sigma-data", type=float, default=0.5)
    p.add_argument("--work", default="/tmp/race_targets")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    import solvers
    from scoresde.checkpoint import load_model
    from scoresde.data import load_dataset
    from scoresde.metrics import digit_metrics
    from scoresde.training import TrainConfig, train

    torch.set_num_threads(args.threads)
    rows = []
    real = load_dataset("digits", seed=args.seed).x
    ref = digit_metrics(real[torch.randperm(len(real), generator=torch.Generator().manual_seed(args.seed))[: args.n]])
    rows.append({"target": "real training digits", "nfe": "-", **{k: ref[k] for k in ("fd", "inception_score", "confident")}})
    for target in args.targets:
        cfg = TrainConfig(steps=args.steps, max_minutes=None, out_dir=f"{args.work}/{target}", num_samples=0,
                          ckpt_every=0, device="cpu", seed=args.seed, prediction=target, sigma_data=args.sigma_data)
        t0 = time.perf_counter()
        res = train(cfg, progress=False, force=True)
        train_s = time.perf_counter() - t0
        model, sde, _ = load_model(res.final_checkpoint)
        for nfe in args.nfe:
            with torch.no_grad():
                r = solvers.sample(model, sde, (args.n, 1, 8, 8), sampler="dpm_solver", steps=nfe, generator=args.seed + 1)
            m = digit_metrics(r.x.clamp(-1, 1))
            rows.append({"target": target, "nfe": r.nfe, "steps": res.step, "train_s": round(train_s, 1),
                         **{k: m[k] for k in ("fd", "inception_score", "confident")}})
            print(json.dumps(rows[-1]), flush=True)
    print("| target | NFE | FD | IS | confident |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['nfe']} | {r['fd']:.1f} | {r['inception_score']:.2f} | {r['confident']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
