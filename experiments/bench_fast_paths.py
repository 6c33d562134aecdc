"""Wall time of the `ode` and `sde` samplers with the digits U-Net at batch 256 on the CPU.

Run it once per checkout with the checkout on PYTHONPATH (e.g. the commit before the move to the
public torchdiffeq/torchsde API, and after) and compare the printed medians: the hand-written fast
paths were kept only if they saved at least 10 % of wall time. The network is the untrained `digits`
preset (its cost per call is what matters, not its samples); the same seeds give the same NFE.

    PYTHONPATH=OLD_TREE python experiments/bench_fast_paths.py
    PYTHONPATH=. python experiments/bench_fast_paths.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import scoresde
import solvers
from scoresde.networks import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = build_model("digits", data_shape=(1, 8, 8)).eval()
    sde = scoresde.VPSDE()
    cases = {"ode": dict(sampler="ode", rtol=1e-3, atol=1e-3), "sde": dict(sampler="sde", steps=20)}
    for name, kw in cases.items():
        times, nfe = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            res = solvers.sample(net, sde, (args.batch, 1, 8, 8), generator=0, **kw)
            times.append(time.perf_counter() - start)
            nfe = res.nfe
        print(f"{name}: median {statistics.median(times):.3f} s over {args.repeats} runs, NFE {nfe}, "
              f"{statistics.median(times) / nfe * 1e3:.1f} ms per NFE")


if __name__ == "__main__":
    main()
