"""Corrector step rules for the ``pc`` and ``langevin`` samplers, measured on exact mixtures and digits.

Standalone on purpose: the predictor-corrector loop is written out here (not imported from
``solvers/``) so that candidate corrector rules can be compared without touching the library. The
loop is the library's: a uniform time grid ``T = t_0 > ... > t_N = t_min``, the reverse-diffusion
predictor on the exact forward kernel ``(r, q) = sde.transition(s, t)``::

    x_s = (2 - r) x_t - (q^2 / std_t) eps(x_t, t) + q z,

then ``corrector_steps`` Langevin steps at ``s`` targeting ``p_s``::

    x <- x + e score(x, s) + sqrt(2 e) z,   score = -eps / std_s,

and Tweedie's denoising ``x0 = (x - std eps) / alpha`` at ``t_min`` at the end (one more evaluation).
``langevin`` is the same loop without the predictor (annealed Langevin dynamics over the grid).

Step rules ``e`` (``r2 = r_i^2``: ``1 - beta_i`` for VP, 1 for VE; ``D`` = data dimension):

* ``paper``  Song et al. 2021, Alg. 2/3, per sample: ``e = 2 r2 (snr ||z|| / ||score||)^2``. State- and
  noise-dependent; infinite for a zero network output.
* ``papercap`` the paper's rule capped at ``e <= std_s^2``: ``-hess log p_s <= I / std_s^2`` for every data law
  (``p_s`` is a Gaussian convolution), so ULA is stable for ``e < 2 std_s^2``; finite for a zero output.
* ``ald``    score_sde's annealed Langevin step (Song & Ermon 2019): ``e = 2 r2 (snr std_s)^2``.
* ``expz``   ``||score||`` replaced by its typical value ``sqrt(D) / std``, ``||z||`` kept:
  ``e = 2 r2 snr^2 std^2 ||z||^2 / D`` (candidate (b) of the brief; ALD with a chi^2 jitter).
* ``clampK`` the paper's rule capped at ``K`` times the ALD step:
  ``e = 2 r2 snr^2 std^2 min(||z||^2 / ||eps||^2, K)`` (bounded, finite for a zero output).
* ``mala-<base>`` the base proposal (``ald`` or ``clampK`` with ``||z||^2 -> D``, so the step depends on
  the state only) with a Metropolis-Hastings accept/reject per sample, the log-density difference
  taken by the trapezoid rule on the score, ``log p(x') - log p(x) ~ (score(x) + score(x')) . (x' - x) / 2``
  (exact for Gaussians). The score at the proposal is the next step's evaluation, so with a one-value
  cache the cost stays one evaluation per corrector step.

Metrics per run (n samples, float64, one seed): unbiased MMD^2 against the exact mixture with a
Gaussian kernel ``h^2 = D sum_k w_k s_k^2`` (mixture terms in closed form), its estimator floor (RMS of
the same estimate over independent exact sample sets of size n), mean exact ``log p`` of the samples
(and of exact samples), the total-variation error of the component weights (samples assigned to
their most responsible component), the width ratio ``mean ||x - mu_k||^2 / (D s_k^2)`` over assigned
samples (1 when right), and the number of non-finite samples.

Run ``python experiments/bench_pc_defaults.py --help``; the tables in docs/pc_defaults.md come from
the commands listed there.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from scoresde import GaussianMixture
from scoresde._tensor import append_dims
from scoresde.sde import SDE, VESDE, VPSDE

Tensor = torch.Tensor
Model = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Step rules
# ---------------------------------------------------------------------------------------------
def _sq(v: Tensor) -> Tensor:
    """Per-sample squared Euclidean norm over all non-batch dims: ``(B, ...) -> (B,)``."""
    return v.reshape(v.shape[0], -1).pow(2).sum(1)


def step_size(rule: str, eps: Tensor, z: Tensor, std: float, r2: float, snr: float) -> Tensor:
    """Per-sample Langevin step ``e`` (B,) of ``rule`` (see the module docstring)."""
    b, d = eps.shape[0], eps[0].numel()
    base = 2.0 * r2 * (snr * std) ** 2  # the ALD step
    tiny = torch.finfo(eps.dtype).tiny
    if rule == "paper":  # as solvers/stochastic.py today: ||score|| clamped at tiny -> e = inf for eps = 0
        score_norm = (_sq(eps).sqrt() / std).clamp_min(tiny)
        return 2.0 * r2 * (snr * _sq(z).sqrt() / score_norm) ** 2
    if rule == "papercap":  # the paper's rule capped at std^2 (ULA on p_s is stable for e < 2 std^2)
        score_norm = (_sq(eps).sqrt() / std).clamp_min(tiny)
        e = 2.0 * r2 * (snr * _sq(z).sqrt() / score_norm) ** 2
        return e.clamp(max=std * std)
    if rule == "ald":
        return torch.full((b,), base, dtype=eps.dtype)
    if rule == "expz":
        return base * _sq(z) / d
    if rule.startswith("clamp"):  # clampK or clampK-noz (||z||^2 -> D, for the MH proposal)
        k = float(rule[5:].split("-")[0])
        zz = torch.full((b,), float(d), dtype=eps.dtype) if rule.endswith("-noz") else _sq(z)
        ratio = torch.minimum(zz / _sq(eps).clamp_min(tiny), torch.full_like(zz, k))
        return base * ratio
    raise ValueError(f"unknown rule {rule!r}")


def corrector(model: Model, x: Tensor, eps: Tensor, s: float, std: float, r2: float, rule: str, snr: float,
              gen: torch.Generator) -> Tuple[Tensor, Optional[Tensor], int]:
    """One corrector step at time ``s`` from ``x`` (whose eps is given). Returns the new state, its eps
    when known (MH rules), and the network evaluations spent."""
    z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    if not rule.startswith("mala-"):
        e = append_dims(step_size(rule, eps, z, std, r2, snr), x.ndim)
        return x + torch.sqrt(2.0 * e) * z - (e / std) * eps, None, 0
    base = rule[5:]
    e = append_dims(step_size(base, eps, z, std, r2, snr), x.ndim)
    score = -eps / std
    prop = x + e * score + torch.sqrt(2.0 * e) * z
    eps_p = model(prop, torch.full((x.shape[0],), s, dtype=x.dtype))
    score_p = -eps_p / std
    e_p = append_dims(step_size(base, eps_p, z, std, r2, snr), x.ndim)  # z unused by the -noz/ald rules
    d = x[0].numel()
    flat = lambda v: v.reshape(v.shape[0], -1)  # noqa: E731
    dlogp = 0.5 * (flat(score + score_p) * flat(prop - x)).sum(1)
    log_fwd = -0.5 * d * torch.log(flat(e)[:, 0]) - _sq(z) / 2
    back = x - prop - e_p * score_p
    log_bwd = -0.5 * d * torch.log(flat(e_p)[:, 0]) - _sq(back) / (4 * flat(e_p)[:, 0])
    log_a = dlogp + log_bwd - log_fwd
    u = torch.rand(x.shape[0], generator=gen, dtype=x.dtype)
    acc = append_dims(torch.log(u) < log_a, x.ndim)
    return torch.where(acc, prop, x), torch.where(acc, eps_p, eps), 1


def sample(model: Model, sde: SDE, x: Tensor, steps: int, *, predictor: bool, rule: str, snr: float,
           corrector_steps: int, seed: int, skip_below: float = 0.0, schedule: str = "uniform") -> Tuple[Tensor, int]:
    """The pc loop (``predictor=True``) or annealed Langevin (``predictor=False``); returns ``(x0, nfe)``.

    ``skip_below``: no corrector at levels with ``std_s < skip_below`` (candidate (e)). ``schedule``:
    ``uniform`` in t (the library's default) or ``logsnr`` (uniform in log-SNR, as solvers.base's)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(sde.T, sde.t_min, steps + 1, dtype=torch.float64)
    if schedule == "logsnr":
        lam = sde.log_snr(t[[0, -1]])
        t = sde.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), steps + 1, dtype=torch.float64))
        t[0], t[-1] = sde.T, sde.t_min
    elif schedule != "uniform":
        raise ValueError(f"schedule must be uniform or logsnr; got {schedule!r}")
    alpha, std = sde.alpha(t).tolist(), sde.std(t).tolist()
    r, q = (v.tolist() for v in sde.transition(t[1:], t[:-1]))
    tl = t.tolist()
    b = x.shape[0]
    tb = lambda ti: torch.full((b,), ti, dtype=x.dtype)  # noqa: E731
    nfe, cached, cached_t = 0, None, None  # eps of the current state at time cached_t, when known

    def eps_at(k: int) -> Tensor:
        nonlocal nfe
        if cached is not None and cached_t == k:
            return cached
        nfe += 1
        return model(x, tb(tl[k]))

    for i in range(steps):
        if predictor:
            eps = eps_at(i)
            z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            x = (2.0 - r[i]) * x - (q[i] ** 2 / std[i]) * eps + q[i] * z
            cached = None
        if rule != "none" and std[i + 1] >= skip_below:
            for _ in range(corrector_steps):
                eps = eps_at(i + 1)
                x, cached, extra = corrector(model, x, eps, tl[i + 1], std[i + 1], r[i] ** 2, rule, snr, gen)
                cached_t = i + 1
                nfe += extra
    eps = eps_at(steps)
    return (x - std[-1] * eps) / alpha[-1], nfe


# ---------------------------------------------------------------------------------------------
# Metrics against the exact mixture
# ---------------------------------------------------------------------------------------------
def bandwidth(mix: GaussianMixture) -> float:
    """``h^2 = D sum_k w_k s_k^2``: two draws of one component are about e^-1 apart in the kernel."""
    return math.sqrt(mix.dim * float((mix.weights * mix.stds**2).sum()))


def _gauss_conv(sq: Tensor, var: Tensor, h2: float, d: int) -> Tensor:
    return (h2 / (h2 + var)) ** (d / 2) * torch.exp(-0.5 * sq / (h2 + var))


def mmd2(x: Tensor, mix: GaussianMixture) -> float:
    """Unbiased MMD^2(samples, mixture), Gaussian kernel, mixture terms in closed form."""
    h = bandwidth(mix)
    h2, d = h * h, mix.dim
    x = x.reshape(x.shape[0], -1).double()
    n = x.shape[0]
    mu = mix.means.reshape(mix.num_components, -1)
    s2, w = mix.stds**2, mix.weights
    e_pp = float(w @ _gauss_conv(torch.cdist(mu, mu).pow(2), s2[:, None] + s2[None, :], h2, d) @ w)
    g = _gauss_conv(torch.cdist(x, mu).pow(2), s2[None, :], h2, d) @ w
    k = torch.exp(-0.5 * torch.cdist(x, x).pow(2) / h2)
    k.fill_diagonal_(0.0)
    return e_pp - 2 * float(g.mean()) + float(k.sum()) / (n * (n - 1))


def assign(x: Tensor, mix: GaussianMixture) -> Tensor:
    """Index of the most responsible data component of each sample."""
    one = torch.ones((), dtype=torch.float64)
    logj, _, _ = mix._components(x.double(), one, 0 * one)
    return logj.argmax(1)


def metrics(x: Tensor, mix: GaussianMixture) -> Dict[str, float]:
    x = x.double()
    ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    out = {"nonfinite": int((~ok).sum())}
    x = x[ok]
    if x.shape[0] < 10:
        return {**out, "mmd2": float("nan"), "logp": float("nan"), "tv": float("nan"), "width": float("nan")}
    k = assign(x, mix)
    frac = torch.bincount(k, minlength=mix.num_components).double() / x.shape[0]
    resid = _sq(x - mix.means[k]) / (mix.dim * mix.stds[k] ** 2)
    out.update(mmd2=mmd2(x, mix), logp=float(mix.log_prob(x).mean()), tv=0.5 * float((frac - mix.weights).abs().sum()),
               width=float(resid.mean()))
    return out


def reference(mix: GaussianMixture, n: int, repeats: int = 4) -> Dict[str, float]:
    """The same metrics on exact samples: MMD^2 floor (RMS over ``repeats`` sets of size n), TV floor,
    and the exact mean log p (from 20 n samples)."""
    g = torch.Generator().manual_seed(12345)
    ests, tvs = [], []
    for _ in range(repeats):
        m = metrics(mix.sample(n, generator=g), mix)
        ests.append(m["mmd2"])
        tvs.append(m["tv"])
    big = mix.sample(20 * n, generator=g)
    return {"mmd2_floor": math.sqrt(sum(v * v for v in ests) / repeats), "tv_floor": sum(tvs) / repeats,
            "logp_exact": float(mix.log_prob(big).mean())}


# ---------------------------------------------------------------------------------------------
# Problems and specs
# ---------------------------------------------------------------------------------------------
def problems() -> Dict[str, Tuple[GaussianMixture, SDE]]:
    ring, mix16 = GaussianMixture.ring(), GaussianMixture.random(dim=16, k=8, seed=0)
    return {
        "ring_vp": (ring, VPSDE()),
        "ring_ve": (ring, VESDE()),
        "mix16_vp": (mix16, VPSDE()),
        "mix16_ve": (mix16, VESDE()),
    }


def parse_spec(spec: str) -> Dict[str, object]:
    """``sampler/rule/snr/corrector_steps[/skip_below][@schedule]``, e.g. ``pc/ald/0.16/1``,
    ``langevin/ald/0.3/1@logsnr``; ``rd`` = reverse-diffusion predictor alone."""
    spec, _, schedule = spec.partition("@")
    schedule = schedule or "uniform"
    if spec == "rd":
        return dict(predictor=True, rule="none", snr=0.0, corrector_steps=0, skip_below=0.0, schedule=schedule)
    parts = spec.split("/")
    if len(parts) not in (4, 5) or parts[0] not in ("pc", "langevin"):
        raise ValueError(f"spec must be sampler/rule/snr/corrector_steps[/skip_below][@schedule]; got {spec!r}")
    return dict(predictor=parts[0] == "pc", rule=parts[1], snr=float(parts[2]), corrector_steps=int(parts[3]),
                skip_below=float(parts[4]) if len(parts) == 5 else 0.0, schedule=schedule)


def zero_check(specs: List[str]) -> None:
    """A model returning zeros (the zero-initialised network): is every sample finite?"""
    sde = VPSDE()
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    print("\n| spec | zero model: finite samples (of 16) | max abs |\n|---|---|---|")
    for spec in specs:
        p = parse_spec(spec)
        x_T = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        with torch.no_grad():
            x, _ = sample(zero, sde, x_T, 50, seed=0, **p)
        fin = int(torch.isfinite(x.reshape(16, -1)).all(1).sum())
        print(f"| {spec} | {fin} | {float(x.abs().max()):.3g} |", flush=True)


def run_mixtures(names: List[str], specs: List[str], steps: List[int], n: int, seed: int) -> None:
    probs = problems()
    for name in names:
        mix, sde = probs[name]
        ref = reference(mix, n)
        print(f"\n### {name} (n = {n}, seed {seed}): MMD^2 floor {ref['mmd2_floor']:.1e}, "
              f"TV floor {ref['tv_floor']:.3f}, exact mean log p {ref['logp_exact']:.2f}\n")
        print("| spec | steps | NFE | MMD^2 | / floor | mean log p | weight TV | width | non-finite | s |")
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        model = mix.eps_model(sde)
        for st in steps:
            for spec in specs:
                p = parse_spec(spec)
                x_T = sde.prior_sample((n, mix.dim), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
                t0 = time.perf_counter()
                with torch.no_grad():
                    x, nfe = sample(model, sde, x_T, st, seed=seed + 1, **p)
                m = metrics(x, mix)
                print(f"| {spec} | {st} | {nfe} | {m['mmd2']:.2e} | {m['mmd2'] / ref['mmd2_floor']:.1f} | "
                      f"{m['logp']:.2f} | {m['tv']:.3f} | {m['width']:.3f} | {m['nonfinite']} | "
                      f"{time.perf_counter() - t0:.0f} |", flush=True)


def run_digits(ckpt: str, specs: List[str], steps: List[int], n: int, seeds: List[int]) -> None:
    from scoresde.checkpoint import load_model
    from scoresde.metrics import digit_metrics, load_digit_classifier

    model, sde, _ = load_model(ckpt)
    clf = load_digit_classifier()
    net = lambda x, t: model(x, t)  # noqa: E731
    print(f"\n### digits ({ckpt}, n = {n}, seeds {seeds}; FD/IS/confident as mean over seeds)\n")
    print("| spec | steps | NFE | FD | FD per seed | IS | confident | non-finite | s |\n|---|---|---|---|---|---|---|---|---|",
          flush=True)
    for st in steps:
        for spec in specs:
            p = parse_spec(spec)
            fds, iss, cfs, bad, t0, nfe = [], [], [], 0, time.perf_counter(), 0
            for seed in seeds:
                x_T = sde.prior_sample((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    x, nfe = sample(net, sde, x_T, st, seed=seed + 1, **p)
                fin = torch.isfinite(x.reshape(n, -1)).all(1)
                bad += int((~fin).sum())
                m = digit_metrics(torch.nan_to_num(x, nan=0.0).clamp(-1, 1), n=n, classifier=clf, seed=seed)
                fds.append(m["fd"]), iss.append(m["inception_score"]), cfs.append(m["confident"])
            k = len(seeds)
            per = ", ".join(f"{v:.1f}" for v in fds)
            print(f"| {spec} | {st} | {nfe} | {sum(fds) / k:.2f} | {per} | {sum(iss) / k:.2f} | {sum(cfs) / k:.3f} | {bad} | "
                  f"{time.perf_counter() - t0:.0f} |", flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="*", default=["ring_vp", "ring_ve", "mix16_vp"])
    ap.add_argument("--specs", nargs="+", default=["rd", "pc/paper/0.16/1", "pc/ald/0.16/1", "langevin/ald/0.16/1"])
    ap.add_argument("--steps", nargs="+", type=int, default=[1000])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits", default=None, help="checkpoint: sample digits with each spec and score them")
    ap.add_argument("--digits-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--zero", action="store_true", help="only the zero-model finiteness check")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.zero:
        zero_check(a.specs)
    elif a.digits:
        run_digits(a.digits, a.specs, a.steps, min(a.n, 359), a.digits_seeds)
    else:
        run_mixtures(a.problems, a.specs, a.steps, a.n, a.seed)


if __name__ == "__main__":
    main(sys.argv[1:])
