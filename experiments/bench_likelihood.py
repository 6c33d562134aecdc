"""Benchmark: our ``log_likelihood`` against k-diffusion's ``sampling.log_likelihood`` on exact models.

Run with the peers venv (k-diffusion installed) and our package on the path::

    PYTHONPATH=/work/main /work/peers-venv/bin/python experiments/bench_likelihood.py [--n 32] [--quick]

Both integrate the probability-flow ODE of the SAME exact Gaussian-mixture eps model with dopri5 at
the same ``rtol = atol``. k-diffusion works in ``sigma = std/alpha`` on ``y = x_t/alpha``; the eps
model is wrapped as its denoiser ``D(y, sigma) = y - sigma eps(alpha y, t(sigma))`` (the VDenoiser
convention). k-diffusion estimates the divergence with ONE Rademacher probe drawn by
``torch.randint_like`` from the global generator; we seed that generator and hand our function a
``torch.Generator`` with the same seed, so both use the same probe (checked below).

Errors (nats per dimension; max and RMS over samples):

* ``ode``: with the same probe the Hutchinson integral ``int v^T J v`` is one fixed number per
  sample; a method's ODE error is its distance to its own answer at ``rtol = atol = 1e-9``
  (k-diffusion's and ours agree there to the digits printed as ``ref gap``).
* ``exact``: our ``trace="exact"`` against the closed-form ``log p_0(x)`` with the exact terminal
  density (isolates the solver and the small-t correction from the prior mismatch).

NFE counts right-hand-side evaluations (one network forward plus its VJP each), for both.
Timings are not reported: the machine is shared; NFE is the cost measure.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from scoresde import GaussianMixture, VESDE, VPSDE
from scoresde._tensor import append_dims, unchecked
from scoresde.likelihood import log_likelihood

F64 = torch.float64


class KDenoiser(torch.nn.Module):
    """Our eps model in k-diffusion's denoiser convention: ``D(y, sigma) = y - sigma eps(alpha y, t)``."""

    def __init__(self, eps_model, sde):
        super().__init__()
        self.eps_model, self.sde = eps_model, sde

    def forward(self, y: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        with unchecked():
            t = self.sde.t_from_sigma(sigma).clamp(0.0, self.sde.T)
            alpha = append_dims(self.sde.alpha(t), y.ndim)
        return y - append_dims(sigma, y.ndim) * self.eps_model(alpha * y, t)


def k_loglik(kdiff, model, sde, x, tol, seed):
    """k-diffusion's log p^y_{sigma_min}(x) (its own convention: no small-t correction, prior
    N(0, sigma_max^2) on y_T) and its NFE."""
    with unchecked():
        s = sde.sigma(torch.tensor([sde.t_min, sde.T], dtype=F64))
    torch.manual_seed(seed)
    ll, info = kdiff.sampling.log_likelihood(KDenoiser(model, sde), x, float(s[0]), float(s[1]), atol=tol, rtol=tol)
    return ll, info["fevals"]


def ours(model, sde, x, tol, seed, **kw):
    r = log_likelihood(model, sde, x, rtol=tol, atol=tol, generator=torch.Generator().manual_seed(seed), **kw)
    return r.logp, r.nfe


def same_probe_check(x: torch.Tensor, seed: int) -> None:
    torch.manual_seed(seed)
    a = torch.randint_like(x, 2) * 2 - 1
    b = torch.randint(0, 2, (1,) + tuple(x.shape), generator=torch.Generator().manual_seed(seed)).to(x.dtype) * 2 - 1
    assert torch.equal(a, b[0]), "probe streams differ: the comparison would not use the same probe"


def stats(err: torch.Tensor, d: int) -> str:
    e = err.abs() / d
    return f"{float(e.max()):.1e} / {float(e.pow(2).mean().sqrt()):.1e}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=32, help="samples per problem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one problem, two tolerances")
    args = p.parse_args()
    torch.set_num_threads(1)
    import k_diffusion as kdiff

    problems = {"ring8 (2-D)": GaussianMixture.ring(), "random8 (8-D)": GaussianMixture.random(8, seed=1)}
    sdes = {"VP": VPSDE(), "VE": VESDE()}
    tols = [1e-3, 1e-4, 1e-5]
    if args.quick:
        problems = dict(list(problems.items())[:1])
        tols = [1e-4, 1e-5]
    rows = []
    t_start = time.time()
    for pname, mix in problems.items():
        x = mix.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 100))
        same_probe_check(x, args.seed)
        d = mix.dim
        for sname, sde in sdes.items():
            model = mix.eps_model(sde)
            ref_k, _ = k_loglik(kdiff, model, sde, x, 1e-9, args.seed)
            ref_o, _ = ours(model, sde, x, 1e-9, args.seed)
            # same convention as k-diffusion (no correction, its prior) to check the two references agree
            with unchecked():
                s_T = float(sde.sigma(torch.tensor(sde.T, dtype=F64)))
                a_T = sde.alpha(torch.tensor(sde.T, dtype=F64))

            def k_prior(z, s_T=s_T, a_T=a_T):  # N(0, s_T^2) on y_T = z / alpha_T, minus D log alpha_T
                y = z / a_T
                return (-0.5 * y.pow(2) / s_T**2 - 0.5 * math.log(2 * math.pi * s_T**2)).reshape(len(z), -1).sum(1) - d * torch.log(a_T)

            ref_o_k, _ = ours(model, sde, x, 1e-9, args.seed, correction=False, prior_logp=k_prior)
            gap = float((ref_k - ref_o_k).abs().max()) / d
            truth = mix.log_prob(x)
            terminal = lambda z, sde=sde, mix=mix: mix.marginal_log_prob(sde, z, sde.T)  # noqa: E731
            for tol in tols:
                lk, nk = k_loglik(kdiff, model, sde, x, tol, args.seed)
                lo, no = ours(model, sde, x, tol, args.seed)
                lb, nb = ours(model, sde, x, tol, args.seed, error_norm="batch")
                le = log_likelihood(model, sde, x, rtol=tol, atol=tol, trace="exact", prior_logp=terminal)
                rows.append(
                    f"| {pname} | {sname} | {tol:.0e} | {nk} | {stats(lk - ref_k, d)} | {nb} | {stats(lb - ref_o, d)} "
                    f"| {no} | {stats(lo - ref_o, d)} | {stats(le.logp - truth, d)} | {gap:.0e} |"
                )
                print(rows[-1], flush=True)
    header = (
        "| data | SDE | rtol=atol | k-diff NFE | k-diff ode err max / rms | ours batch-norm NFE | ours batch-norm "
        "ode err | ours default NFE | ours default ode err | ours exact-trace err vs log p_0 | ref gap |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print()
    print(header)
    print("\n".join(rows))
    print(f"\n(n = {args.n} samples per problem, float64, 1 thread, {time.time() - t_start:.0f} s wall on a shared machine)")


if __name__ == "__main__":
    main()
