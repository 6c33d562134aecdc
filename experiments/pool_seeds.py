"""Pool the RMS endpoint errors of several starting-noise seeds into one estimate per solver.

    python experiments/pool_seeds.py --run 1 cal1.csv peers1.csv --run 2 cal2.csv peers2.csv [--problems ring16] [--nfe 10]

On well-separated mixtures the per-sample squared error is heavy-tailed: at 10 NFE a handful of
trajectories in 10,000 that end in another component carry most of the mean (``rms_with_std``'s
bootstrap std is 10 - 25 % of the RMS there), so one draw of the noise can land either side of a
threshold. With the same ``n`` per seed, the pooled mean squared error is the mean of the per-seed
ones, ``rms_pool = sqrt(mean_s rms_s^2)``, and its std follows from the per-seed bootstrap stds
(``std(rms_s^2) ~ 2 rms_s std_s``, seeds independent). Each peer solver is pooled on its own and
the best pooled peer is compared with ours pooled (``ratio = best peer / ours``, its std from the
two relative stds as if independent, which overstates it: both are measured on the same noise); the
per-seed ratios are printed beside it. Each ``--run SEED CALIBRATED PEERS`` names a seed, a
``bench_calibrated.py`` CSV holding rows of that seed and the ``bench_peers.py`` CSV measured on
the same noise (its rows carry no seed, hence the explicit pairing).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from typing import Dict, List, Optional, Tuple


def _rows(path: str) -> List[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def pool(values: List[Tuple[float, float]]) -> Tuple[float, float]:
    """``[(rms_s, std_s)]`` of equal-``n`` seeds -> (pooled RMS, its std)."""
    mse = sum(r * r for r, _ in values) / len(values)
    var = sum((2 * r * s) ** 2 for r, s in values) / len(values) ** 2
    rms = math.sqrt(mse)
    return rms, math.sqrt(var) / (2 * rms)


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", nargs=3, action="append", required=True, metavar=("SEED", "CALIBRATED_CSV", "PEERS_CSV"))
    ap.add_argument("--problems", nargs="+", default=None)
    ap.add_argument("--nfe", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    ours: Dict[Tuple[str, int], Dict[int, Tuple[float, float, int]]] = defaultdict(dict)
    peers: Dict[Tuple[str, int], Dict[str, Dict[int, Tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    for seed_text, cal_path, peers_path in args.run:
        seed = int(seed_text)
        for r in _rows(cal_path):
            if int(r["seed"]) == seed:
                ours[(r["problem"], int(r["nfe"]))][seed] = (float(r["err_calibrated"]), float(r["std_calibrated"]), int(r["n"]))
        for r in _rows(peers_path):
            if r["library"] != "ours":
                peers[(r["problem"], int(r["target_nfe"]))][f"{r['library']}/{r['solver']}"][seed] = (float(r["err"]), float(r["err_std"]))
    for (problem, nfe), by_seed in sorted(ours.items()):
        if (args.problems and problem not in args.problems) or (args.nfe and nfe not in args.nfe):
            continue
        if len({n for _, _, n in by_seed.values()}) != 1:
            raise SystemExit(f"{problem} NFE {nfe}: seeds with different n cannot be pooled this way")
        seeds = sorted(by_seed)
        full = {name: v for name, v in peers[(problem, nfe)].items() if set(seeds) <= set(v)}
        if not full:
            print(f"{problem} NFE {nfe}: no peer measured on every seed {seeds}")
            continue
        pooled_peers = {name: pool([v[s] for s in seeds]) for name, v in full.items()}
        best = min(pooled_peers, key=lambda k: pooled_peers[k][0])
        o = pool([by_seed[s][:2] for s in seeds])
        p = pooled_peers[best]
        rel = math.sqrt((o[1] / o[0]) ** 2 + (p[1] / p[0]) ** 2)
        n = by_seed[seeds[0]][2]
        print(f"{problem} NFE {nfe}, seeds {seeds} x n = {n}:")
        for s in seeds:
            best_s = min(full.values(), key=lambda v: v[s][0])[s][0]
            print(f"  seed {s}: ours {by_seed[s][0]:.4f} +- {by_seed[s][1]:.4f}, best peer {best_s:.4f} -> {best_s / by_seed[s][0]:.2f}x")
        print(f"  pooled: ours {o[0]:.4f} +- {o[1]:.4f}, best peer {p[0]:.4f} +- {p[1]:.4f} ({best}) -> {p[0] / o[0]:.2f}x +- {p[0] / o[0] * rel:.2f}")


if __name__ == "__main__":
    main()
