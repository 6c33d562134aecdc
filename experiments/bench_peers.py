"""Our deterministic samplers against k-diffusion and diffusers at 10 and 20 NFE on exact Gaussian mixtures.

Run with the peers' environment and our package on the path::

    PYTHONPATH=/work/main /work/peers-venv/bin/python experiments/bench_peers.py [--quick]

Every solver gets the SAME exact model (``GaussianMixture.eps_model`` of ``VPSDE(0.1, 20)``, the
continuous limit of DDPM's linear betas 1e-4 .. 0.02) and the SAME standard-normal draw ``z``:

* ours: ``x_T = z`` at ``t = T`` (sigma = 152.2), grid down to ``t_min = 1e-3`` (sigma = 0.0105),
  output Tweedie's denoise at ``t_min`` (the samplers' ``denoise_final``, no extra NFE);
* k-diffusion: ``D(y, sigma) = y - sigma eps(alpha y, t(sigma))``, ``get_sigmas_karras`` from
  ``sigma(T)`` to ``sigma(t_min)`` (then 0, k-diffusion's default), starting from ``y = z / alpha(T)``
  (the same point as ours);
* diffusers: ``beta_start=1e-4, beta_end=0.02, linear``, ``timestep_spacing="linspace"`` (first
  timestep 999, sigma = 157.4), ``clip_sample=False``, start ``z * init_noise_sigma`` (the VP
  state ``z``, or ``y = z sqrt(1 + sigma^2)`` for sigma-space schedulers). The exact model is
  evaluated at the noise level the scheduler itself assigns to the timestep it passes
  (``scheduler.sigmas`` where it has them, else ``alphas_cumprod[timestep]``) -- generous to
  diffusers, which with a real network would interpolate.

Reference (identical rule for every solver): the probability-flow ODE from the solver's own start
``(sigma_0, z)`` down to the bottom of the noise range, solved with
``solvers.reference.reference_solution`` (dopri5, rtol = atol = 1e-9, float64), then Tweedie's
denoise there -- the sigma -> 0 limit that every solver's output approximates. The bottom is
``sigma(t_min) = 0.0105`` for ours and k-diffusion, ``sigma(timestep 0) = 0.0100`` for diffusers
(the difference between the two targets, and between either and the exact ODE solution at
sigma = 0, is below 1e-3 RMS on these problems). A solver that ends at a noise level instead
(diffusers' ``final_sigmas_type="sigma_min"``) is compared with the ODE state at that level. A
solver that skips the bottom of the range (diffusers' "linspace" multistep schedulers stop
evaluating at timestep round(999/n) and jump to x0 from there) is charged for it. An
independent solve in ``r = sigma^(1/7)`` (dopri8, 1e-10, ``_problems.reference_solution``) is
reported as the reference's own error. Error = RMS over samples and coordinates,
``sqrt(mean_{i,j} (x_ij - x_ref,ij)^2)`` (``err``, with ``err_std`` its bootstrap standard deviation
over samples; all solvers share the samples, so their comparison is paired); ``err_norm`` = ``sqrt(dim) err`` is the RMS of
the per-sample Euclidean norm.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _problems as P  # noqa: E402

from scoresde import VPSDE  # noqa: E402

warnings.filterwarnings("ignore")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results")

# Our configurations beyond the defaults (kept only when the sampler takes those knobs): every
# combination of order, corrector and time grid of the multistep DPM-Solver++.
OUR_VARIANTS: Dict[str, List[dict]] = {
    "dpm_solver": [
        {"order": o, "corrector": c, "schedule": g}
        for o in (2, 3)
        for c in (False, True)
        for g in ("window", "logsnr", "uniform", "quadratic")
    ],
}


# ---------------------------------------------------------------------------------------------
# References, cached per (start, end)
# ---------------------------------------------------------------------------------------------
class References:
    """Exact PF-ODE endpoints from ``z`` for one problem, cached by ``(sigma_start, sigma_last)``."""

    def __init__(self, mixture, z: torch.Tensor, check: bool):
        self.mixture, self.z, self.check = mixture, z, check
        self.cache: Dict[Tuple[float, float], torch.Tensor] = {}
        self.self_error: Dict[Tuple[float, float], float] = {}

    def get(self, sigma_start: float, sigma_last: float, denoise: bool = True) -> torch.Tensor:
        """x0 by Tweedie at ``sigma_last`` (``denoise``), else the VP state ``x`` at ``sigma_last``."""
        key = (round(sigma_start, 6), round(sigma_last, 8), denoise)
        if key not in self.cache:
            from solvers.reference import reference_solution

            base = P.make_sde()
            t0 = float(base.t_from_sigma(torch.tensor(sigma_start, dtype=P.DTYPE)))
            t1 = float(base.t_from_sigma(torch.tensor(sigma_last, dtype=P.DTYPE)))
            # the same linear-beta schedule, horizon moved to the solver's first noise level
            sde = VPSDE(base.beta_min, base.beta_max, T=t0)
            model = self.mixture.eps_model(sde)
            x0 = reference_solution(model, sde, self.z, t_min=t1, denoise=denoise)
            self.cache[key] = x0
            if self.check:  # independent solve in another variable, at a tighter tolerance
                y0 = self.z * math.sqrt(1 + sigma_start**2)
                y = P.reference_solution(model, sde, y0, sigma_start, sigma_last)
                s_last = torch.tensor(sigma_last, dtype=P.DTYPE)
                alt = P.denoiser(model, sde)(y, s_last) if denoise else y / torch.sqrt(1 + s_last**2)
                self.self_error[key] = P.rms(x0, alt)
        return self.cache[key]


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------
def run_ours(mixture, z, refs: References, nfe: int, variants: bool = True) -> List[dict]:
    import solvers
    from solvers.base import CountingModel

    sde = P.make_sde()
    model = mixture.eps_model(sde)
    s_T = float(sde.sigma(torch.tensor(sde.T, dtype=P.DTYPE)))
    rows = []
    for name in sorted(solvers.SAMPLERS):
        if not P.is_deterministic(name):
            continue
        knobs_all = solvers.SAMPLERS[name].defaults()
        configs = [{}] + [
            v for v in (OUR_VARIANTS.get(name, []) if variants else [])
            if set(v) <= set(knobs_all) and any(knobs_all[k] != x for k, x in v.items())  # not the default again
            and _accepts(name, v)
        ]
        steps, _ = P.steps_for_nfe(name, sde, nfe)
        if steps is None:
            continue
        for knobs in configs:
            o = {**knobs_all, **knobs}
            t_end = o.get("t_min") or sde.t_min
            s_last = float(sde.sigma(torch.tensor(t_end, dtype=P.DTYPE)))
            counted = CountingModel(model)
            x = solvers.SAMPLERS[name](counted, sde, z.clone(), steps=steps, **knobs)
            if o.get("denoise_final", False):
                ref = refs.get(s_T, s_last)
            else:  # the sampler stops at t_min: compare with the ODE state there
                from solvers.reference import reference_solution

                ref = reference_solution(model, sde, z, t_min=t_end, denoise=False)
            label = name + "".join(f" {k}={v}" for k, v in knobs.items())
            rows.append(dict(library="ours", solver=label, nfe=counted.nfe, **_err(x, ref)))
    return rows


def _most_steps(cost: Callable[[int], int], nfe: int) -> Optional[int]:
    """Most steps whose NFE (``cost``, counted on a tiny batch) is at most ``nfe``."""
    best = None
    for n in range(1, nfe + 1):
        c = cost(n)
        if c > nfe:
            break
        if c > 0:
            best = n
    return best


def _err(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """``err`` (RMS) and ``err_std`` (its bootstrap standard deviation) of a row, from one pass."""
    err, err_std = P.rms_with_std(x, ref)
    return dict(err=err, err_std=err_std)


def _accepts(name: str, knobs: dict) -> bool:
    """Whether our sampler takes these knob values (a schedule name may not exist in this version)."""
    import solvers

    sde = P.make_sde()
    try:
        solvers.SAMPLERS[name](lambda x, t: torch.zeros_like(x), sde, torch.zeros(1, 2, dtype=P.DTYPE), steps=3, **knobs)
    except (ValueError, TypeError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# k-diffusion
# ---------------------------------------------------------------------------------------------
KDIFF = ("lms", "dpmpp_2m", "heun", "euler")


def run_kdiffusion(mixture, z, refs: References, nfe: int) -> List[dict]:
    import k_diffusion.sampling as ks

    sde = P.make_sde()
    model = mixture.eps_model(sde)
    D = P.denoiser(model, sde)
    s_max = float(sde.sigma(torch.tensor(sde.T, dtype=P.DTYPE)))
    s_min = float(sde.sigma(torch.tensor(sde.t_min, dtype=P.DTYPE)))
    ref = refs.get(s_max, s_min)
    rows = []
    for name in KDIFF:
        fn = getattr(ks, f"sample_{name}")
        calls = [0]

        def denoise(y, sigma, **_):
            calls[0] += 1
            return D(y, sigma)

        def run(n: int, zz: torch.Tensor) -> torch.Tensor:
            calls[0] = 0
            sig = ks.get_sigmas_karras(n, s_min, s_max, rho=7.0, device="cpu").to(P.DTYPE)
            y = zz * math.sqrt(1 + s_max**2)  # = z / alpha(T): the same start as ours
            return fn(denoise, y, sig, disable=True)

        n_best = _most_steps(lambda n: (run(n, z[:2]), calls[0])[1], nfe)
        if n_best is None:
            continue
        out = run(n_best, z)
        rows.append(dict(library="k-diffusion", solver=name, nfe=calls[0], **_err(out, ref)))
    return rows


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------
def diffusers_schedulers() -> Dict[str, Callable]:
    import diffusers as d

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", timestep_spacing="linspace")
    dpm, unipc = d.DPMSolverMultistepScheduler, d.UniPCMultistepScheduler
    return {
        "DPMSolverMultistep": lambda: dpm(**common),
        "DPMSolverMultistep sigma_min": lambda: dpm(**common, final_sigmas_type="sigma_min"),
        "DPMSolverMultistep karras": lambda: dpm(**common, use_karras_sigmas=True),
        "DPMSolverMultistep lu": lambda: dpm(**common, use_lu_lambdas=True),
        "DPMSolverMultistep 3M": lambda: dpm(**common, solver_order=3),
        "UniPCMultistep": lambda: unipc(**common),
        "UniPCMultistep sigma_min": lambda: unipc(**common, final_sigmas_type="sigma_min"),
        "UniPCMultistep karras": lambda: unipc(**common, use_karras_sigmas=True),
        "UniPCMultistep 3": lambda: unipc(**common, solver_order=3),
        "DDIM": lambda: d.DDIMScheduler(**common, clip_sample=False),
        "EulerDiscrete": lambda: d.EulerDiscreteScheduler(**common),
        "HeunDiscrete": lambda: d.HeunDiscreteScheduler(**common),
    }


def _sigma_lookup(sched) -> Callable[[torch.Tensor], float]:
    """timestep -> the noise level the scheduler's own update assigns to it."""
    if getattr(sched, "sigmas", None) is not None and len(sched.sigmas) > len(sched.timesteps) - 1:
        table = {float(t): float(s) for t, s in zip(sched.timesteps, sched.sigmas)}
    else:
        abar = sched.alphas_cumprod.double()
        table = {float(t): float(((1 - abar[int(t)]) / abar[int(t)]).sqrt()) for t in sched.timesteps}

    def sigma_of(t) -> float:
        key = float(t)
        if key not in table:
            raise KeyError(f"model called at timestep {key} that the scheduler did not list")
        return table[key]

    return sigma_of


def run_diffusers(mixture, z, refs: References, nfe: int) -> List[dict]:
    sde = P.make_sde()
    model = mixture.eps_model(sde)
    rows = []
    abar0 = 1 - 1e-4  # alphas_cumprod[0] of the linear schedule
    sigma_bottom = math.sqrt((1 - abar0) / abar0)  # 0.0100: the bottom of diffusers' noise range
    for label, make in diffusers_schedulers().items():
        def run(n: int, z: torch.Tensor):
            sched = make()
            sched.set_timesteps(n)
            sigma_of = _sigma_lookup(sched)
            seen: List[float] = []

            def eps(x, t):
                s = sigma_of(t)
                seen.append(s)
                return P.eps_sigma(model, sde, x * math.sqrt(1 + s * s), torch.tensor(s, dtype=P.DTYPE))

            x = z * sched.init_noise_sigma if torch.is_tensor(sched.init_noise_sigma) else z * float(sched.init_noise_sigma)
            x = x.to(P.DTYPE)
            for t in sched.timesteps:
                xin = sched.scale_model_input(x, t)
                x = sched.step(eps(xin.to(P.DTYPE), t), t, x).prev_sample.to(P.DTYPE)
            # where the last step lands: sigmas[-1] (0 = the clean-data estimate); DDIM's last step
            # goes to alphas_cumprod = 1 (set_alpha_to_one), i.e. sigma = 0
            final = float(sched.sigmas[-1]) if getattr(sched, "sigmas", None) is not None else 0.0
            return x, seen, final

        def cost(n: int) -> int:
            try:
                return len(run(n, z[:2])[1])
            except Exception:  # some schedulers reject very few steps
                return 0

        n_best = _most_steps(cost, nfe)
        if n_best is None:
            continue
        out, seen, final_sigma = run(n_best, z)
        if final_sigma > 0:  # ends at a noise level (final_sigmas_type="sigma_min"): the ODE state there
            ref = refs.get(seen[0], final_sigma, denoise=False)
        else:  # ends with x0: the sigma -> 0 limit, Tweedie at the bottom of the training range
            ref = refs.get(seen[0], sigma_bottom)
        rows.append(dict(library="diffusers", solver=label, nfe=len(seen), **_err(out, ref)))
    return rows


# ---------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two problems, 400 samples (smoke run)")
    ap.add_argument("--n", type=int, default=2000, help="samples per problem")
    ap.add_argument("--nfe", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--problems", nargs="+", default=None, help=f"any of {list(P.ALL_PROBLEMS)} (default: the first six)")
    ap.add_argument("--no-variants", action="store_true", help="ours at defaults only (skip the knob grid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(RESULTS, "peers.csv"))
    ap.add_argument("--markdown", metavar="CSV", help="only print the side-by-side markdown table of a results CSV")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(read_csv(args.markdown)))
        return
    torch.set_num_threads(1)
    names = args.problems or (list(P.QUICK_PROBLEMS) if args.quick else list(P.PROBLEMS))
    n = 400 if args.quick else args.n
    rows: List[dict] = []
    t_start = time.time()
    for pname in names:
        mixture = P.ALL_PROBLEMS[pname]()
        z = P.starting_noise(mixture.dim, n, args.seed)
        refs = References(mixture, z, check=not args.quick)
        for nfe in args.nfe:
            got = run_ours(mixture, z, refs, nfe, not args.no_variants) + run_kdiffusion(mixture, z, refs, nfe) + run_diffusers(mixture, z, refs, nfe)
            for r in got:
                r.update(problem=pname, dim=mixture.dim, target_nfe=nfe, n=n, err_norm=r["err"] * math.sqrt(mixture.dim))
            rows += got
        worst_ref = max(refs.self_error.values(), default=float("nan"))
        print(f"\n== {pname} (dim {mixture.dim}, n = {n}); reference self-check (two ODE solves, RMS): {worst_ref:.2e}")
        report(rows, pname, args.nfe)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if not args.quick:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["problem", "dim", "n", "target_nfe", "library", "solver", "nfe", "err", "err_std", "err_norm"])
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        print(f"\nwrote {args.out}")
    print(f"total {time.time() - t_start:.0f} s")


def markdown(rows: List[dict]) -> str:
    """Side-by-side table: best of each library, our default samplers, our best configuration."""
    out = [
        "| problem | NFE | best k-diffusion | best diffusers | ours, defaults (best) | ours, best configuration | best peer / ours defaults | best peer / ours best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cell = lambda r: f"{r['err']:.4f} ± {r['err_std']:.4f} {r['solver']} ({r['nfe']})" if r else "-"  # noqa: E731
    for prob in dict.fromkeys(r["problem"] for r in rows):
        for k in sorted({int(r["target_nfe"]) for r in rows if r["problem"] == prob}):
            at = [r for r in rows if r["problem"] == prob and int(r["target_nfe"]) == k]
            best = lambda rs: min(rs, key=lambda r: r["err"]) if rs else None  # noqa: E731
            kd = best([r for r in at if r["library"] == "k-diffusion"])
            df = best([r for r in at if r["library"] == "diffusers"])
            od = best([r for r in at if r["library"] == "ours" and " " not in r["solver"]])
            ob = best([r for r in at if r["library"] == "ours"])
            peer = best([x for x in (kd, df) if x])
            ratio = lambda o: f"{peer['err'] / o['err']:.2f}x" if peer and o else "-"  # noqa: E731
            out.append(f"| {prob} | {k} | {cell(kd)} | {cell(df)} | {cell(od)} | {cell(ob)} | {ratio(od)} | {ratio(ob)} |")
    return "\n".join(out)


def read_csv(path: str) -> List[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["err"], r["nfe"] = float(r["err"]), int(r["nfe"])
        r["err_std"] = float(r.get("err_std") or "nan")
    return rows


def report(rows: List[dict], pname: str, nfes: List[int]) -> None:
    """Print each solver's error per NFE, the best peer and our best with the ratio."""
    mine = [r for r in rows if r["problem"] == pname]
    solvers_ = sorted({(r["library"], r["solver"]) for r in mine})
    print(f"{'library':12s} {'solver':34s} " + " ".join(f"{'NFE' + str(k):>16s}" for k in nfes))
    for lib, s in solvers_:
        cells = []
        for k in nfes:
            r = [x for x in mine if x["library"] == lib and x["solver"] == s and x["target_nfe"] == k]
            cells.append(f"{r[0]['err']:.4f} ({r[0]['nfe']:>2d})" if r else "-")
        print(f"{lib:12s} {s:34s} " + " ".join(f"{c:>16s}" for c in cells))
    for k in nfes:
        at = [r for r in mine if r["target_nfe"] == k]
        peers = [r for r in at if r["library"] != "ours"]
        ours = [r for r in at if r["library"] == "ours"]
        if peers and ours:
            bp, bo = min(peers, key=lambda r: r["err"]), min(ours, key=lambda r: r["err"])
            print(
                f"NFE {k}: best peer {bp['library']}/{bp['solver']} {bp['err']:.4f}; ours {bo['solver']} {bo['err']:.4f}; "
                f"ratio {bp['err'] / bo['err']:.2f}x {'(>= 2x: yes)' if bp['err'] >= 2 * bo['err'] else '(>= 2x: NO)'}"
            )


if __name__ == "__main__":
    main()
