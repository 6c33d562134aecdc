"""Sweep every registered sampler over NFE on exact Gaussian mixtures: MMD to the exact distribution,
RMS endpoint error against the exact probability-flow ODE (deterministic samplers), fitted orders.

    python experiments/sweep_samplers.py            # all problems, NFE 10 20 50 100 1000, n = 2000
    python experiments/sweep_samplers.py --quick    # smoke run (< 1 min)

Iterates over whatever ``solvers.SAMPLERS`` holds, each with its default knobs, at the largest
``steps`` whose NFE does not exceed the target (the NFE actually spent is recorded). Conventions
(``experiments/_problems.py``): ``VPSDE(0.1, 20)``, one standard-normal ``x_T`` per problem shared
by every sampler, stochastic samplers seeded with ``--seed``.

Measures:

1. ``mmd2``: unbiased MMD^2 between the n samples and the exact mixture, Gaussian kernel with
   ``h^2 = dim sum_k w_k s_k^2``, mixture terms in closed form; ``mmd2_std`` its jackknife standard
   deviation. The row ``exact`` (n true samples) shows the noise floor.
2. ``rms`` (deterministic samplers): per-coordinate RMS of ``sampler(x_T) - reference(x_T)``, the
   reference being ``solvers.reference.reference_solution`` (PF-ODE with dopri5 at 1e-9, then
   Tweedie at ``t_min`` when the sampler ends with ``denoise_final``).

Slopes: least-squares fit of ``log error`` on ``log NFE``; for ``rms`` over NFE >= 50 (the
asymptotic range) on points at least 100x above the reference's tolerance; for the MMD over
points whose ``mmd2`` exceeds 4 standard deviations (below that the estimator cannot resolve it),
using ``MMD = sqrt(mmd2)``, which is linear in a small bias. Writes ``docs/results/sweep.csv``,
``sweep_slopes.csv``, ``sweep_error.png`` and ``sweep_scatter.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _problems as P  # noqa: E402

import solvers  # noqa: E402
from solvers.reference import reference_solution  # noqa: E402
from solvers.base import CountingModel  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results")
NFES = (10, 20, 50, 100, 1000)
REF_TOL = 1e-9
#: default problems (2-D and 16-D; --problems takes any of _problems.PROBLEMS)
SWEEP_PROBLEMS = ("ring8", "ring5_narrow", "rand16_s0")
SCATTER_NFE = 20
#: tolerances swept for adaptive samplers (whose NFE ignores `steps`)
ADAPTIVE_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-7)


def fit_slope(nfe: List[float], err: List[float]) -> Optional[float]:
    """Least-squares slope of log(err) against log(nfe); None with fewer than two points."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(nfe, err) if b > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def run_problem(pname: str, nfes, n: int, seed: int, only: Optional[List[str]]) -> tuple:
    mixture = P.PROBLEMS[pname]()
    sde = P.make_sde()
    model = mixture.eps_model(sde)
    z = P.starting_noise(mixture.dim, n, seed)
    refs: Dict[tuple, torch.Tensor] = {}

    def reference(t_min: float, denoise: bool) -> torch.Tensor:
        key = (t_min, denoise)
        if key not in refs:
            refs[key] = reference_solution(model, sde, z, t_min=t_min, denoise=denoise, rtol=REF_TOL, atol=REF_TOL)
        return refs[key]

    rows, scatter = [], {}
    exact = mixture.sample(n, torch.Generator().manual_seed(seed + 1))
    m = P.mmd2(exact, mixture)
    rows.append(dict(problem=pname, dim=mixture.dim, n=n, sampler="exact", deterministic="", target_nfe=0, steps=0, nfe=0,
                     mmd2=m.mmd2, mmd2_std=m.std, rms="", median="", seconds=0.0))
    scatter["exact"] = exact
    names = [s for s in sorted(solvers.SAMPLERS) if only is None or s in only]
    for name in names:
        det = P.is_deterministic(name)
        knobs = solvers.SAMPLERS[name].defaults()
        adaptive = P.is_adaptive(name, sde)
        if adaptive and "rtol" in knobs:  # NFE follows the tolerance, not `steps`: sweep the tolerance
            runs = [(f"tol={tol:g}", None, {"rtol": tol, "atol": tol}) for tol in ADAPTIVE_TOLS[: len(nfes)]]
        elif adaptive:
            runs = [("adaptive", None, {})]
        else:
            runs = []
            for target in nfes:
                steps, _ = P.steps_for_nfe(name, sde, target)
                if steps is None:
                    print(f"  {name}: one step costs more than {target} NFE; skipped")
                else:
                    runs.append((target, steps, {}))
        for target, steps, extra in runs:
            counted = CountingModel(model)
            t0 = time.perf_counter()
            x = solvers.SAMPLERS[name](counted, sde, z.clone(), steps=steps, generator=seed, **extra)
            secs = time.perf_counter() - t0
            m = P.mmd2(x, mixture)
            err = med = ""
            if det:
                t_end = knobs.get("t_min") or sde.t_min
                ref = reference(t_end, bool(knobs.get("denoise_final", False)))
                err, med = P.rms(x, ref), P.median_error(x, ref)
            rows.append(dict(problem=pname, dim=mixture.dim, n=n, sampler=name, deterministic=det, target_nfe=target,
                             steps=steps, nfe=counted.nfe, mmd2=m.mmd2, mmd2_std=m.std, rms=err, median=med, seconds=secs))
            if target == SCATTER_NFE or (adaptive and name not in scatter):
                scatter[name] = x
            print(f"  {name:18s} NFE {counted.nfe:5d}  MMD^2 {m.mmd2:9.2e} +- {m.std:7.1e}" + (f"  RMS {err:.3e}  median {med:.3e}" if det else "")
                  + f"  ({secs:.1f} s)", flush=True)
    return rows, scatter


def slopes(rows: List[dict]) -> List[dict]:
    out = []
    keys = sorted({(r["problem"], r["sampler"]) for r in rows if r["sampler"] != "exact"})
    for prob, s in keys:
        rs = sorted((r for r in rows if r["problem"] == prob and r["sampler"] == s), key=lambda r: r["nfe"])
        det = rs[0]["deterministic"]
        rms_pts = [(r["nfe"], r["rms"]) for r in rs if det and r["nfe"] >= 50 and r["rms"] > 100 * REF_TOL]
        med_pts = [(r["nfe"], r["median"]) for r in rs if det and r["nfe"] >= 50 and r["median"] > 100 * REF_TOL]
        mmd_pts = [(r["nfe"], math.sqrt(r["mmd2"])) for r in rs if r["mmd2"] > 4 * r["mmd2_std"]]
        out.append(dict(
            problem=prob, sampler=s,
            rms_slope=fit_slope(*zip(*rms_pts)) if len(rms_pts) >= 2 else None,
            rms_range=f"{rms_pts[0][0]}-{rms_pts[-1][0]}" if len(rms_pts) >= 2 else "",
            median_slope=fit_slope(*zip(*med_pts)) if len(med_pts) >= 2 else None,
            mmd_slope=fit_slope(*zip(*mmd_pts)) if len(mmd_pts) >= 2 else None,
            mmd_range=f"{mmd_pts[0][0]}-{mmd_pts[-1][0]}" if len(mmd_pts) >= 2 else "",
        ))
    return out


def plot(rows: List[dict], scatters: Dict[str, dict], out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = list(dict.fromkeys(r["problem"] for r in rows))
    samplers = sorted({r["sampler"] for r in rows if r["sampler"] != "exact"})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(samplers)}
    fig, axes = plt.subplots(2, len(probs), figsize=(3.2 * len(probs), 6), squeeze=False)
    for j, prob in enumerate(probs):
        floor = [r for r in rows if r["problem"] == prob and r["sampler"] == "exact"][0]
        for s in samplers:
            rs = sorted((r for r in rows if r["problem"] == prob and r["sampler"] == s), key=lambda r: r["nfe"])
            if not rs:
                continue
            if rs[0]["deterministic"]:
                axes[0, j].loglog([r["nfe"] for r in rs], [r["rms"] for r in rs], "o-", color=colors[s], label=s, ms=3)
            pos = [r for r in rs if r["mmd2"] > 0]  # an unbiased MMD^2 estimate can be negative at the floor
            axes[1, j].loglog([r["nfe"] for r in pos], [r["mmd2"] for r in pos], "o-", color=colors[s], label=s, ms=3)
        axes[1, j].axhline(2 * floor["mmd2_std"], color="k", ls=":", lw=1, label="2 std (exact samples)")
        axes[0, j].set_title(prob, fontsize=9)
        axes[1, j].set_xlabel("NFE")
    axes[0, 0].set_ylabel("RMS endpoint error vs exact PF-ODE")
    axes[1, 0].set_ylabel("MMD$^2$ to the exact mixture")
    axes[1, -1].legend(fontsize=6, loc="lower left")
    axes[0, -1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sweep_error.png"), dpi=70)
    plt.close(fig)

    if not scatters:
        return
    two_d = [p for p in probs if scatters.get(p) and next(iter(scatters[p].values())).shape[1] == 2]
    if two_d:
        names = ["exact"] + [s for s in samplers if any(s in scatters[p] for p in two_d)]
        fig, axes = plt.subplots(len(two_d), len(names), figsize=(1.9 * len(names), 1.9 * len(two_d)), squeeze=False)
        for i, p in enumerate(two_d):
            for j, s in enumerate(names):
                ax = axes[i, j]
                if s in scatters[p]:
                    x = scatters[p][s][:1000]
                    ax.scatter(x[:, 0], x[:, 1], s=0.3, alpha=0.5, color="k" if s == "exact" else colors[s])
                lim = 1.3 * float(P.PROBLEMS[p]().means.abs().max()) + 1
                ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
                ax.set_xticks([]), ax.set_yticks([])
                ax.set_title(s if i == 0 else "", fontsize=7)
            axes[i, 0].set_ylabel(p, fontsize=7)
        fig.suptitle(f"samples at {SCATTER_NFE} NFE", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "sweep_scatter.png"), dpi=70)
        plt.close(fig)


def markdown(rows: List[dict], slope_rows: List[dict]) -> str:
    """Per problem: RMS endpoint error and MMD^2 (+- std) per sampler and NFE, with the fitted slopes."""
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        rs = [r for r in rows if r["problem"] == prob]
        floor = [r for r in rs if r["sampler"] == "exact"][0]
        out += [f"**{prob}** (dim {floor['dim']}, n = {floor['n']}; exact samples: MMD^2 = "
                f"{float(floor['mmd2']):.1e} +- {float(floor['mmd2_std']):.1e})", ""]
        targets = list(dict.fromkeys(r["target_nfe"] for r in rs if isinstance(r["target_nfe"], int) and r["sampler"] != "exact"))
        out.append("| sampler | " + " | ".join(f"NFE {t}" for t in targets[: len(NFES)]) + " | RMS slope | median slope | MMD slope |")
        out.append("|---" * (len(targets[: len(NFES)]) + 4) + "|")
        for name in dict.fromkeys(r["sampler"] for r in rs if r["sampler"] != "exact"):
            mine = [r for r in rs if r["sampler"] == name]
            cells = []
            for r in mine[: len(NFES)]:
                c = f"{float(r['mmd2']):.1e}+-{float(r['mmd2_std']):.0e}"
                if r["rms"] not in ("", None):
                    c = f"**{float(r['rms']):.2e}** / " + c
                lab = "" if r["target_nfe"] == r["nfe"] else f" ({r['target_nfe']}, NFE {r['nfe']})" if isinstance(r["target_nfe"], str) else f" (NFE {r['nfe']})"
                cells.append(c + lab)
            cells += [""] * (len(targets[: len(NFES)]) - len(cells))
            sl = [x for x in slope_rows if x["problem"] == prob and x["sampler"] == name]
            f = lambda v: "" if v in (None, "") else f"{float(v):.2f}"  # noqa: E731
            out.append(f"| {name} | " + " | ".join(cells) + f" | {f(sl[0]['rms_slope']) if sl else ''} | {f(sl[0]['median_slope']) if sl else ''} | {f(sl[0]['mmd_slope']) if sl else ''} |")
        out.append("")
    return "\n".join(out)


def replot(out_dir: str) -> None:
    """Redraw the error figure and the markdown table from a saved sweep.csv (no sampling)."""
    with open(os.path.join(out_dir, "sweep.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("dim", "n", "steps", "nfe"):
            r[k] = int(r[k])
        r["target_nfe"] = int(r["target_nfe"]) if r["target_nfe"].isdigit() else r["target_nfe"]
        for k in ("mmd2", "mmd2_std", "rms", "median", "seconds"):
            r[k] = float(r[k]) if r[k] != "" else ""
        r["deterministic"] = r["deterministic"] == "True"
    plot(rows, {}, out_dir)
    with open(os.path.join(out_dir, "sweep.md"), "w") as f:
        f.write(markdown(rows, slopes(rows)))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else str(v)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: ring8, n = 300, NFE 10 20 50; writes nothing")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--problems", nargs="+", default=None, choices=sorted(P.PROBLEMS))
    ap.add_argument("--samplers", nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--replot", action="store_true", help="redraw sweep_error.png and sweep.md from sweep.csv")
    args = ap.parse_args(argv)
    if args.replot:
        replot(args.out_dir)
        return
    torch.set_num_threads(1)
    probs = args.problems or (["ring8"] if args.quick else list(SWEEP_PROBLEMS))
    nfes = [10, 20, 50] if args.quick else args.nfe
    n = 300 if args.quick else args.n
    print(f"samplers: {sorted(solvers.SAMPLERS)}")
    rows, scatters = [], {}
    t0 = time.time()
    for p in probs:
        print(f"== {p}")
        r, sc = run_problem(p, nfes, n, args.seed, args.samplers)
        rows += r
        scatters[p] = sc
    sl = slopes(rows)
    print("\nfitted slopes of log error vs log NFE (expected: Euler-type -1, Heun / 2nd-order DPM-Solver -2)")
    print(f"{'problem':14s} {'sampler':18s} {'rms slope':>10s} {'median':>7s} {'range':>9s} {'MMD slope':>10s} {'range':>9s}")
    for s in sl:
        print(f"{s['problem']:14s} {s['sampler']:18s} {fmt(s['rms_slope'] and round(s['rms_slope'], 2)):>10s} "
              f"{fmt(s['median_slope'] and round(s['median_slope'], 2)):>7s} {s['rms_range']:>9s} "
              f"{fmt(s['mmd_slope'] and round(s['mmd_slope'], 2)):>10s} {s['mmd_range']:>9s}")
    if not args.quick:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "sweep.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: fmt(v) for k, v in r.items()} for r in rows)
        with open(os.path.join(args.out_dir, "sweep_slopes.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(sl[0]))
            w.writeheader()
            w.writerows({k: fmt(v) for k, v in r.items()} for r in sl)
        plot(rows, scatters, args.out_dir)
        with open(os.path.join(args.out_dir, "sweep.md"), "w") as f:
            f.write(markdown(rows, sl))
        print(f"wrote {args.out_dir}/sweep.csv, sweep_slopes.csv, sweep_error.png, sweep_scatter.png")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
