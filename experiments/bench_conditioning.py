"""Benchmark the conditioning methods against exact posteriors of Gaussian-mixture priors.

Problems: the 2-D ring (:meth:`GaussianMixture.ring`) and a random 16-D mixture (8 components),
each with (a) imputation: some coordinates observed exactly, (b) a noisy random projection
``y = A x + 0.3 n``. The prior model is the exact eps of the mixture (no training error), so every
error below is the method's own. For each method and budget of network evaluations per output sample
(NFE, particles included): unbiased MMD^2 to the exact posterior (Gaussian kernel, ``h^2 = tr Cov``
of the posterior, mixture terms in closed form), the error of the posterior mean (Euclidean norm),
and the component-weight error (sum of absolute differences between the fraction of samples
assigned to each posterior component and the exact posterior weights). ``exact`` rows are draws from
the posterior itself: the estimators' floor. The particle filter is also run at a fixed 50 steps with
1..64 particles (and at 200 steps with 16 and 64), and the rate of its MMD^2 against particles is
fitted (log-log least squares on the points above 3x the 64-particle value, i.e. before the floor
that the 50-step chain's discretisation sets).

With ``--digits CKPT``: inpaint the lower half of the 359 held-out test digits with a trained model
and report how often the digits judge gives the true label, per method (``conditioning_digits.csv``).
With ``--guidance CKPT``: train a noise-conditional classifier and report how often the judge agrees
with the target label of classifier-guided samples, per guidance scale.

Usage: ``python experiments/bench_conditioning.py [--n 1000] [--seed 0] [--quick] [--digits CKPT]``. Writes
``docs/results/conditioning.csv``, ``docs/results/conditioning_particles.csv`` and
``docs/conditioning_error.png``; prints markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from pathlib import Path

import torch

from scoresde import GaussianMixture, VPSDE
from scoresde.conditioning import (
    MatrixOperator,
    Mask,
    Observation,
    component_weights,
    conditional_sample,
    default_bandwidth,
    mmd2,
    repaint_nfe,
)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def problems(seed: int):
    g = torch.Generator().manual_seed(seed)
    ring = GaussianMixture.ring()
    rand = GaussianMixture.random(16, k=8, seed=seed)
    out = {}
    out["ring2d/impute"] = (ring, Mask.from_name("keep:0", (2,)), torch.tensor([2.6], dtype=F64), 0.0)
    a = torch.randn(1, 2, generator=g, dtype=F64)
    x = ring.sample(1, g)[0]
    out["ring2d/project"] = (ring, MatrixOperator(a), a @ x + 0.3 * torch.randn(1, generator=g, dtype=F64), 0.3)
    x = rand.sample(1, g)[0]
    out["rand16/impute"] = (rand, Mask.from_name("keep:" + ",".join(map(str, range(8))), (16,)), x[:8].clone(), 0.0)
    a = torch.randn(4, 16, generator=g, dtype=F64) / 4.0
    out["rand16/project"] = (rand, MatrixOperator(a), a @ x + 0.3 * torch.randn(4, generator=g, dtype=F64), 0.3)
    return out


def settings(method: str, nfe: int):
    """(sampler knobs) giving about ``nfe`` evaluations per output sample."""
    if method == "replacement":
        return dict(sampler="ancestral", steps=nfe - 1)
    if method in ("dps", "pigdm"):
        return dict(sampler="ancestral", steps=nfe - 1)
    if method == "pigdm_ddim":
        return dict(sampler="ddim", steps=nfe)
    if method == "repaint":
        steps = max(2, nfe // 4)
        while repaint_nfe(steps, 5, 4) > nfe and steps > 2:
            steps -= 1
        return dict(steps=steps, jump_length=5, resamplings=4)
    if method == "smc":
        return dict(steps=max(1, nfe // 8 - 1), particles=8)
    raise ValueError(method)


def diffusers_repaint(prior, op, y, n: int, nfe: int, seed: int):
    """diffusers' RePaintScheduler (DDPM linear betas 1e-4..0.02 over 1000 steps, the discrete twin of
    our VPSDE) driven by the same exact prior eps, on the same mask and y: eps at discrete step k is the
    mixture's exact eps at the continuous time with the same log-SNR ``log(abar_k / (1 - abar_k))``.
    Returns ``(samples, NFE)``; ``None`` when diffusers is not installed."""
    try:
        from diffusers import RePaintScheduler
    except ImportError:
        return None
    sde = VPSDE()
    sched = RePaintScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                             clip_sample=False, eta=1.0)
    steps = max(2, nfe // 4)
    sched.set_timesteps(steps, jump_length=5, jump_n_sample=4)
    while sum(1 for a, b in zip([sched.timesteps[0] + 1] + list(sched.timesteps[:-1]), sched.timesteps) if b < a) > nfe and steps > 2:
        steps -= 1
        sched.set_timesteps(steps, jump_length=5, jump_n_sample=4)
    abar = sched.alphas_cumprod.double()
    g = torch.Generator().manual_seed(seed)
    mask = op.mask.to(F64)[None].expand(n, *op.in_shape)
    original = op.adjoint(y.to(F64)[None]).expand(n, *op.in_shape)
    x = torch.randn((n,) + tuple(op.in_shape), generator=g, dtype=F64)
    calls, last = 0, int(sched.timesteps[0]) + 1
    for t in sched.timesteps.tolist():
        if t < last:
            tc = sde.t_from_log_snr(torch.log(abar[t] / (1 - abar[t]))).clamp(min=1e-5)
            eps = prior.eps(sde, x, tc.expand(n))
            calls += 1
            x = sched.step(eps, t, x, original, mask, generator=g).prev_sample
        else:
            x = sched.undo_step(x, last, generator=g)
        last = t
    return x, calls


def score(x, post):
    h = default_bandwidth(post)
    m = mmd2(x, post, h)
    mean_err = float((x.reshape(x.shape[0], -1).mean(0) - post.mean().reshape(-1)).norm())
    w_err = float((component_weights(x, post) - post.weights).abs().sum())
    return m, mean_err, w_err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="output samples per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="two budgets, fewer particle counts")
    ap.add_argument("--digits", metavar="CKPT", help="instead: inpaint the held-out digits with this trained model")
    ap.add_argument("--guidance", metavar="CKPT", help="instead: classifier guidance on digits with this trained model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.digits:
        digits(args.digits, args.seed)
        return
    if args.guidance:
        guidance(args.guidance, args.seed)
        return
    sde = VPSDE()
    budgets = [50, 200] if args.quick else [50, 100, 200, 400]
    rows, prows = [], []
    for name, (prior, op, y, sy) in problems(args.seed).items():
        post = prior.posterior(op, y, sy)
        obs = Observation(op, y, sy)
        model = prior.eps_model(sde)
        ex = post.sample(args.n, torch.Generator().manual_seed(args.seed + 1))
        m, me, we = score(ex, post)
        rows.append(dict(problem=name, method="exact", nfe=0, mmd2=m.mmd2, mmd2_std=m.std, mean_err=me, weight_err=we, seconds=0.0))
        un = prior.sample(args.n, torch.Generator().manual_seed(args.seed + 2))
        m, me, we = score(un, post)
        rows.append(dict(problem=name, method="unconditional", nfe=0, mmd2=m.mmd2, mmd2_std=m.std, mean_err=me, weight_err=we, seconds=0.0))
        methods = ["pigdm", "pigdm_ddim", "smc"] + (["replacement", "repaint"] if sy == 0 else ["dps"])
        for method in methods:
            for nfe in budgets:
                knobs = settings(method, nfe)
                started = time.time()
                res = conditional_sample(model, sde, obs, args.n, method=method.split("_")[0], generator=args.seed,
                                         dtype=F64, **knobs)
                secs = time.time() - started
                m, me, we = score(res.x, post)
                rows.append(dict(problem=name, method=method, nfe=res.nfe, mmd2=m.mmd2, mmd2_std=m.std, mean_err=me,
                                 weight_err=we, seconds=round(secs, 2)))
                print(f"{name:15s} {method:12s} NFE {res.nfe:4d}  MMD^2 {m.mmd2:9.2e} +- {m.std:7.1e}  "
                      f"mean {me:.3f}  weights {we:.3f}  {secs:.1f}s", flush=True)
        if sy == 0:
            for nfe in budgets:
                started = time.time()
                got = diffusers_repaint(prior, op, y, args.n, nfe, args.seed)
                if got is None:
                    break
                m, me, we = score(got[0], post)
                rows.append(dict(problem=name, method="peer: diffusers RePaint", nfe=got[1], mmd2=m.mmd2, mmd2_std=m.std,
                                 mean_err=me, weight_err=we, seconds=round(time.time() - started, 2)))
                print(f"{name:15s} diffusers RePaint NFE {got[1]:4d}  MMD^2 {m.mmd2:9.2e} +- {m.std:7.1e}  mean {me:.3f}  "
                      f"weights {we:.3f}", flush=True)
        sweep = [(50, p) for p in ([1, 4, 16, 64] if args.quick else [1, 2, 4, 8, 16, 32, 64])] + [(200, 16), (200, 64)]
        for steps, p in sweep:
            started = time.time()
            res = conditional_sample(model, sde, obs, args.n, method="smc", steps=steps, particles=p, generator=args.seed, dtype=F64)
            m, me, we = score(res.x, post)
            prows.append(dict(problem=name, steps=steps, particles=p, nfe=res.nfe, mmd2=m.mmd2, mmd2_std=m.std, mean_err=me,
                              weight_err=we, seconds=round(time.time() - started, 2)))
            print(f"{name:15s} smc {steps} steps P={p:3d}   NFE {res.nfe:5d}  MMD^2 {m.mmd2:9.2e} +- {m.std:7.1e}  mean {me:.3f}  weights {we:.3f}", flush=True)
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    for path, data in ((out / "conditioning.csv", rows), (out / "conditioning_particles.csv", prows)):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    report(rows, prows)
    plot(rows, prows, ROOT / "docs" / "conditioning_error.png")


DIGIT_METHODS = {
    "replacement": dict(method="replacement", sampler="ancestral", steps=100),
    "repaint": dict(method="repaint", steps=50, jump_length=10, resamplings=5),
    "pigdm (ancestral)": dict(method="pigdm", sampler="ancestral", steps=100, jacobian="gaussian"),
    "pigdm (ddim)": dict(method="pigdm", sampler="ddim", steps=50, jacobian="gaussian"),
    "smc": dict(method="smc", steps=50, particles=8),
}


def digits(checkpoint: str, seed: int, batch: int = 128) -> None:
    """Inpaint the lower half of the 359 held-out test digits; report how often the digits judge
    (:func:`scoresde.metrics.load_digit_classifier`) gives the true label, per method."""
    import solvers
    from scoresde.checkpoint import load_model
    from scoresde.data import load_dataset
    from scoresde.metrics import load_digit_classifier
    from scoresde.noise import SampleNoise

    model, sde_, _ = load_model(checkpoint)
    ds = load_dataset("digits", split="test")
    judge = load_digit_classifier()
    op = Mask.from_name("lower", ds.shape)

    def accuracy(x):
        with torch.no_grad():
            return float((judge(x.clamp(-1, 1)).argmax(1) == ds.y).float().mean())

    n = len(ds)
    results = [("true digits", 0, accuracy(ds.x), 0.0)]
    started = time.time()
    x = solvers.sample(model, sde_, (n,) + ds.shape, sampler="dpm_solver", steps=20, generator=seed).x
    results.append(("unconditional (dpm_solver, 20 steps)", 21, accuracy(x), time.time() - started))
    results.append(("observed half only (zeros below)", 0, accuracy(op.pinv(op(ds.x))), 0.0))
    for name, knobs in DIGIT_METHODS.items():
        started, outs, nfe = time.time(), [], 0
        for i in range(0, n, batch):
            xb = ds.x[i : i + batch]
            obs = Observation(op, op(xb), 0.0)
            res = conditional_sample(model, sde_, obs, xb.shape[0], generator=SampleNoise(seed, torch.arange(i, i + xb.shape[0])),
                                     **knobs)
            outs.append(res.x)
            nfe = res.nfe
        acc = accuracy(torch.cat(outs))
        results.append((name, nfe, acc, time.time() - started))
        print(f"{name:32s} NFE {nfe:4d}  true label {acc:.3f}  {time.time() - started:.0f}s", flush=True)
    print("\n| method | NFE per sample | judge gives the true label | seconds (CPU) |\n|---|---:|---:|---:|")
    for name, nfe, acc, secs in results:
        print(f"| {name} | {nfe} | {acc:.3f} | {secs:.0f} |")
    out = ROOT / "docs" / "results" / "conditioning_digits.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "nfe", "true_label_rate", "seconds"])
        w.writerows(results)


def guidance(checkpoint: str, seed: int, n: int = 200) -> None:
    """Classifier guidance on digits: train a NoisyClassifier (3000 steps) on the train digits, then
    draw ``n`` samples per scale aimed at labels ``i mod 10`` with ddim (50 steps) and report how often
    the digits judge agrees with the target label."""
    import solvers
    from scoresde.checkpoint import load_model
    from scoresde.conditioning import ClassifierGuidance, NoisyClassifier, train_classifier
    from scoresde.data import load_dataset
    from scoresde.metrics import load_digit_classifier

    model, sde_, _ = load_model(checkpoint)
    train = load_dataset("digits", split="train")
    started = time.time()
    clf = train_classifier(NoisyClassifier(train.shape, 10, sde_), train.x, train.y, steps=3000, seed=seed)
    print(f"noisy classifier trained in {time.time() - started:.0f}s", flush=True)
    judge = load_digit_classifier()
    target = torch.arange(n) % 10
    print("\n| guidance scale | NFE | judge agrees with the target label | seconds |\n|---:|---:|---:|---:|")
    for scale in (0.0, 1.0, 2.0, 4.0):
        started = time.time()
        guided = ClassifierGuidance(model, clf, sde_, scale=scale)
        res = solvers.sample(guided, sde_, (n,) + train.shape, sampler="ddim", steps=50, generator=seed,
                             model_kwargs={"y": target})
        with torch.no_grad():
            agree = float((judge(res.x.clamp(-1, 1)).argmax(1) == target).float().mean())
        print(f"| {scale:g} | {res.nfe} | {agree:.3f} | {time.time() - started:.0f} |", flush=True)


def fit_rate(points):
    """Least-squares slope of log MMD^2 against log particles."""
    if len(points) < 2:
        return float("nan")
    xs = [math.log(p) for p, _ in points]
    ys = [math.log(v) for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def report(rows, prows) -> None:
    print("\n| problem | method | NFE | MMD^2 (+- s.e.) | mean error | weight error |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['problem']} | {r['method']} | {r['nfe']} | {r['mmd2']:.2e} (+- {r['mmd2_std']:.1e}) | "
              f"{r['mean_err']:.3f} | {r['weight_err']:.3f} |")
    print("\n| problem | steps | particles | NFE | MMD^2 (+- s.e.) | mean error | weight error |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in prows:
        print(f"| {r['problem']} | {r['steps']} | {r['particles']} | {r['nfe']} | {r['mmd2']:.2e} (+- {r['mmd2_std']:.1e}) | "
              f"{r['mean_err']:.3f} | {r['weight_err']:.3f} |")
    for prob in dict.fromkeys(r["problem"] for r in prows):
        rs = [r for r in prows if r["problem"] == prob and r["steps"] == 50]
        # the approach to the 50-step floor: points above 3x the MMD^2 of the largest particle count
        floor = rs[-1]["mmd2"]
        pts = [(r["particles"], r["mmd2"]) for r in rs if r["mmd2"] > 3 * max(floor, 2 * r["mmd2_std"])]
        print(f"{prob}: at 50 steps MMD^2 ~ particles^{fit_rate(pts):.2f} over the {len(pts)} points above 3x the "
              f"{rs[-1]['particles']}-particle value {floor:.1e} (the 50-step floor)")


def plot(rows, prows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = list(dict.fromkeys(r["problem"] for r in rows))
    fig, axes = plt.subplots(2, len(probs), figsize=(4 * len(probs), 7), squeeze=False)
    for j, prob in enumerate(probs):
        ax = axes[0][j]
        rs = [r for r in rows if r["problem"] == prob]
        floor = next(r for r in rs if r["method"] == "exact")
        unc = next(r for r in rs if r["method"] == "unconditional")
        for method in dict.fromkeys(r["method"] for r in rs if r["nfe"] > 0):
            pts = [(r["nfe"], max(r["mmd2"], 1e-6)) for r in rs if r["method"] == method]
            ax.loglog(*zip(*pts), "o-", ms=3, label=method)
        ax.axhline(2 * floor["mmd2_std"], color="k", ls=":", lw=1, label="2 s.e. (exact draws)")
        ax.axhline(unc["mmd2"], color="gray", ls="--", lw=1, label="unconditional")
        ax.set_title(prob, fontsize=9)
        ax.set_xlabel("NFE per sample")
        ax = axes[1][j]
        for steps in (50, 200):
            ps = [r for r in prows if r["problem"] == prob and r["steps"] == steps]
            ax.loglog([r["particles"] for r in ps], [max(r["mmd2"], 1e-6) for r in ps], "o-", ms=3, label=f"smc, {steps} steps")
        ax.legend(fontsize=7)
        ax.axhline(2 * floor["mmd2_std"], color="k", ls=":", lw=1)
        ax.set_xlabel("particles")
    axes[0][0].set_ylabel("MMD$^2$ to the exact posterior")
    axes[1][0].set_ylabel("MMD$^2$ (particle filter)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
