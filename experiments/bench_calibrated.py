"""Model-calibrated time grids (``solvers.calibrate_grid``) against the default grid of ``dpm_solver``
and against the best peer (k-diffusion / diffusers, from the CSVs of ``bench_peers.py``).

    PYTHONPATH=. .venv/bin/python experiments/bench_calibrated.py [--nfe 10 20] [--n 2000] [--seed 0]

Per problem and NFE: calibrate a grid on a screen of ``--pilot`` starts drawn from the fixed
``pilot_seed`` (7919, never the evaluation noise; see ``solvers.calibrate`` for the stratified
pilot and the validation half), then run ``dpm_solver`` with default knobs on
the default grid and on the calibrated grid from ``starting_noise(dim, n, seed)`` (the benchmark's
``z``) and measure the RMS endpoint error against the same reference as ``bench_peers.py``
(``solvers.reference.reference_solution``, dopri5 at 1e-9, Tweedie at ``t_min``). The pilot's cost
is reported separately (``pilot_cost``: network evaluations x samples, paid once per grid); the
sampling itself costs exactly NFE per sample. Writes ``docs/results/calibrated.csv``. A grid does
not depend on the evaluation noise, so ``--grid-cache DIR`` keeps each one (JSON) for reruns on
another ``--seed`` / ``--n`` (pass the peers' CSVs measured on that same noise with ``--peers``).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import Dict, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _problems as P  # noqa: E402

import solvers  # noqa: E402
from solvers.reference import reference_solution  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results")


def best_peers(paths) -> Dict[Tuple[str, int], Tuple[float, str]]:
    out: Dict[Tuple[str, int], Tuple[float, str]] = {}
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for r in csv.DictReader(f):
                if r["library"] == "ours":
                    continue
                key = (r["problem"], int(r["target_nfe"]))
                if key not in out or float(r["err"]) < out[key][0]:
                    out[key] = (float(r["err"]), f"{r['library']}/{r['solver']}")
    return out


def main(argv: Optional[list] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="+", default=list(P.ALL_PROBLEMS))
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pilot", type=int, default=64000, help="starts screened by calibrate_grid (pilot_samples)")
    ap.add_argument("--knots", type=int, default=None, help="calibrate_grid's knots (default: its own)")
    ap.add_argument("--coefficients", choices=["auto", "on", "off"], default="auto",
                    help="calibrate_grid's per-step coefficients: its default (fitted up to COEFFICIENTS_UP_TO steps), always, never")
    ap.add_argument("--grid-cache", default=None, help="directory to keep calibrated grids in (JSON)")
    ap.add_argument("--peers", nargs="+", default=[os.path.join(RESULTS, "peers.csv"), os.path.join(RESULTS, "peers_heldout.csv")],
                    help="bench_peers CSVs with the peers' errors on the same (n, seed)")
    ap.add_argument("--ref-cache", default=None, help="directory to keep reference solutions in")
    ap.add_argument("--out", default=os.path.join(RESULTS, "calibrated.csv"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    peers = best_peers(args.peers)
    sde = P.make_sde()
    rows = []
    for pname in args.problems:
        mixture = P.ALL_PROBLEMS[pname]()
        model = mixture.eps_model(sde)
        z = P.starting_noise(mixture.dim, args.n, args.seed)
        cache = args.ref_cache and os.path.join(args.ref_cache, f"{pname}_{args.n}_{args.seed}.pt")
        if cache and os.path.exists(cache):
            ref = torch.load(cache)
        else:
            ref = reference_solution(model, sde, z, t_min=sde.t_min, denoise=True)
            if cache:
                torch.save(ref, cache)
        for nfe in args.nfe:
            t0 = time.time()
            extra = {} if args.knots is None else {"knots": args.knots}
            tag = "" if args.knots is None else f"_k{args.knots}"
            # calibrate_grid's own default, resolved here because the cache file is named by it
            fit_coefs = {"on": True, "off": False}.get(args.coefficients, nfe <= solvers.calibrate.COEFFICIENTS_UP_TO)
            extra["coefficients"] = fit_coefs
            tag += "_coef" if fit_coefs else "_grid"
            gpath = args.grid_cache and os.path.join(args.grid_cache, f"{pname}_{nfe}_{args.pilot}{tag}.json")
            if gpath and os.path.exists(gpath):
                grid = solvers.CalibratedGrid.load(gpath)
                with open(gpath + ".seconds") as f:
                    secs = float(f.read())
            else:
                grid = solvers.calibrate_grid(model, sde, (mixture.dim,), steps=nfe, pilot_samples=args.pilot, dtype=P.DTYPE,
                                              **extra)
                secs = time.time() - t0
                if gpath:
                    os.makedirs(args.grid_cache, exist_ok=True)
                    grid.save(gpath)
                    with open(gpath + ".seconds", "w") as f:
                        f.write(f"{secs}")
            x_def = solvers.SAMPLERS["dpm_solver"](model, sde, z.clone(), steps=nfe)
            res = solvers.sample(model, sde, x_T=z.clone(), sampler="dpm_solver", steps=nfe, t_grid=grid)
            e_def, s_def = P.rms_with_std(x_def, ref)
            e_cal, s_cal = P.rms_with_std(res.x, ref)
            peer = peers.get((pname, nfe), (float("nan"), "-"))
            sig = sde.sigma(torch.tensor(grid.t, dtype=P.DTYPE)).tolist()
            row = dict(problem=pname, dim=mixture.dim, n=args.n, seed=args.seed, nfe=res.nfe, err_default=e_def, std_default=s_def,
                       err_calibrated=e_cal, std_calibrated=s_cal, best_peer=peer[0], best_peer_solver=peer[1],
                       ratio_default=peer[0] / e_def, ratio_calibrated=peer[0] / e_cal, pilot_samples=grid.pilot_samples,
                       pilot_rms_default=grid.default_rms, pilot_rms=grid.pilot_rms, validation_rms_default=grid.validation_default_rms,
                       validation_grid_rms=grid.validation_grid_rms, validation_rms=grid.validation_rms,
                       accurate_samples=grid.accurate_samples, grids_tried=grid.grids_tried,
                       coefficients_tried=grid.coefficients_tried,
                       pilot_cost=grid.pilot_cost, calib_seconds=secs, knots=" ".join(f"{k:g}" for k in grid.knots),
                       sigmas=" ".join(f"{s:.3g}" for s in sig),
                       coefficients="-" if grid.coefficients is None else
                       " ".join("/".join(f"{v:g}" for v in c) for c in grid.coefficients))
            rows.append(row)
            print(f"{pname:13s} NFE {nfe:2d}: default {e_def:.4f} calibrated {e_cal:.4f} (x{e_def / e_cal:.2f}); best peer {peer[0]:.4f} "
                  f"-> ratio {peer[0] / e_def:.2f}x / {peer[0] / e_cal:.2f}x; pilot {grid.default_rms:.4f}->{grid.pilot_rms:.4f}, "
                  f"validation {grid.validation_default_rms:.4f}->{grid.validation_grid_rms:.4f} (grid)->{grid.validation_rms:.4f}, "
                  f"{grid.grids_tried} grids + {grid.coefficients_tried} coefficient sets, cost {grid.pilot_cost / 1e6:.1f}M sample-NFE, {secs:.0f}s", flush=True)
    for nfe in args.nfe:
        at = [r for r in rows if r["nfe"] == nfe]
        gm = lambda k: math.exp(sum(math.log(r[k]) for r in at) / len(at))  # noqa: E731
        print(f"NFE {nfe}: geometric mean RMS default {gm('err_default'):.4f}, calibrated {gm('err_calibrated'):.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
