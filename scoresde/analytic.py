"""Data distributions with exact scores: the ground truth for every sampler, likelihood and benchmark.

A mixture of isotropic Gaussians ``p_0 = sum_k w_k N(mu_k, s_k^2 I)`` stays a Gaussian mixture
under every linear SDE: at time t its components are ``N(alpha mu_k, (alpha^2 s_k^2 + std^2) I)``.
So the marginal density, the score and the optimal eps-predictor are closed-form:

    score(x, t) = sum_k r_k(x, t) (alpha mu_k - x) / v_k(t),   v_k = alpha^2 s_k^2 + std^2,
    eps(x, t)   = -std(t) score(x, t),

with ``r_k`` the posterior responsibilities. Components may live in any event shape
(``means`` of shape ``(K, *event)``: vectors or images).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch

from ._tensor import TimeLike, append_dims
from .sde import SDE

ArrayLike = Union[torch.Tensor, Sequence]


class _MixtureDensity:
    """What both mixture classes derive from their per-component terms ``_components(x, alpha, v)``
    (log joint ``log w_k + log N(x; alpha mu_k, alpha^2 C_k + v I)``) and their exact ``score``:
    densities, responsibilities, the optimal noise prediction, the posterior mean and the eps model."""

    def _components(self, x: torch.Tensor, alpha: torch.Tensor, var_noise: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def score(self, sde: SDE, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log-density of the data distribution at ``x``: shape ``(B,)``."""
        one = torch.ones((), dtype=x.dtype, device=x.device)
        logj = self._components(x, one, 0 * one)[0]
        return torch.logsumexp(logj, dim=1)

    def marginal_log_prob(self, sde: SDE, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact ``log p_t(x)`` of the forward-SDE marginal at time ``t``: shape ``(B,)``."""
        t = sde._t(t, x)
        logj = self._components(x, sde.alpha(t), sde.std(t) ** 2)[0]
        return torch.logsumexp(logj, dim=1)

    def responsibilities(self, sde: SDE, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """``p_t(k | x_t = x)``, shape ``(B, K)``: the exact noisy classifier of the components."""
        t = sde._t(t, x)
        logj = self._components(x, sde.alpha(t), sde.std(t) ** 2)[0]
        return torch.softmax(logj, dim=1)

    def eps(self, sde: SDE, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Optimal noise prediction ``E[eps | x_t = x] = -std(t) score(x, t)``."""
        t = sde._t(t, x)
        return -append_dims(sde.std(t), x.ndim) * self.score(sde, x, t)

    def denoise(self, sde: SDE, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact posterior mean ``E[x0 | x_t = x] = (x + std^2 score) / alpha`` (Tweedie)."""
        t = sde._t(t, x)
        a, s = append_dims(sde.alpha(t), x.ndim), append_dims(sde.std(t), x.ndim)
        return (x + s * s * self.score(sde, x, t)) / a

    def eps_model(self, sde: SDE) -> "ExactEpsModel":
        """An exact ``model(x, t) -> eps`` for ``sde``: plug it into any sampler."""
        return ExactEpsModel(self, sde)


class GaussianMixture(_MixtureDensity):
    """``sum_k weights[k] N(means[k], stds[k]^2 I)`` with exact marginals and scores under any SDE.

    Args:
        means: ``(K, *event_shape)`` component means.
        stds: ``(K,)`` positive isotropic standard deviations (a scalar is broadcast).
        weights: ``(K,)`` non-negative weights summing to one (default: uniform).
    """

    def __init__(self, means: ArrayLike, stds: ArrayLike, weights: Optional[ArrayLike] = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *event_shape); got shape {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(k).clone()
        if stds.shape != (k,):
            raise ValueError(f"stds must have shape ({k},); got {tuple(stds.shape)}")
        if not bool(torch.all(stds > 0)) or not bool(torch.isfinite(stds).all()):
            raise ValueError(f"stds must be positive and finite; got {stds.tolist()}")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape ({k},); got {tuple(weights.shape)}")
        if bool(torch.any(weights < 0)) or abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must be non-negative and sum to one; got sum {float(weights.sum()):.8g}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        self.means, self.stds, self.weights = means, stds, weights
        self.event_shape = tuple(means.shape[1:])
        self.dim = int(math.prod(self.event_shape))

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # -- moments ------------------------------------------------------------------------------
    def mean(self) -> torch.Tensor:
        return torch.einsum("k,k...->...", self.weights, self.means)

    def covariance(self) -> torch.Tensor:
        """``(D, D)`` covariance of the flattened data."""
        mu = self.means.reshape(self.num_components, -1)
        m = self.weights @ mu
        second = torch.einsum("k,ki,kj->ij", self.weights, mu, mu) + torch.diag(
            (self.weights * self.stds**2).sum().expand(self.dim)
        )
        return second - torch.outer(m, m)

    # -- sampling and densities ---------------------------------------------------------------
    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Draw ``n`` samples, shape ``(n, *event_shape)``."""
        device = generator.device if generator is not None else None
        idx = torch.multinomial(self.weights.to(device), n, replacement=True, generator=generator)
        noise = torch.randn((n,) + self.event_shape, generator=generator, dtype=torch.float64, device=device)
        x = self.means.to(device)[idx] + append_dims(self.stds.to(device)[idx], noise.ndim) * noise
        return x.to(dtype)

    def _params(self, x: torch.Tensor):
        mu = self.means.to(device=x.device, dtype=x.dtype).reshape(self.num_components, -1)  # (K, D)
        s2 = self.stds.to(device=x.device, dtype=x.dtype) ** 2  # (K,)
        logw = torch.log(self.weights.to(device=x.device, dtype=x.dtype))  # (K,)
        return mu, s2, logw

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.event_shape))}); got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def _components(self, x: torch.Tensor, alpha: torch.Tensor, var_noise: torch.Tensor):
        """Log joint ``log w_k + log N(x; alpha mu_k, v_k I)`` (B, K), and ``v_k`` (B, K), residuals (B, K, D)."""
        flat = self._check_x(x)
        mu, s2, logw = self._params(x)
        alpha = alpha.reshape(-1, 1) if alpha.ndim else alpha.reshape(1, 1)
        var_noise = var_noise.reshape(-1, 1) if var_noise.ndim else var_noise.reshape(1, 1)
        v = alpha**2 * s2 + var_noise  # (B or 1, K)
        diff = flat[:, None, :] - alpha[..., None] * mu  # (B, K, D)
        sq = diff.pow(2).sum(-1)  # (B, K)
        logn = -0.5 * self.dim * torch.log(2 * math.pi * v) - 0.5 * sq / v
        return logw + logn, v, diff

    def score(self, sde: SDE, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact ``grad_x log p_t(x)``, shape of ``x``."""
        t = sde._t(t, x)
        logj, v, diff = self._components(x, sde.alpha(t), sde.std(t) ** 2)
        r = torch.softmax(logj, dim=1)  # (B, K) responsibilities
        score = -(r / v)[..., None] * diff  # (B, K, D)
        return score.sum(1).reshape(x.shape)

    def as_full(self) -> "FullCovGaussianMixture":
        """The same mixture as a :class:`FullCovGaussianMixture` (covariances ``s_k^2 I``)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return FullCovGaussianMixture(self.means, self.stds[:, None, None] ** 2 * eye, self.weights)

    def posterior(self, A, y: torch.Tensor, sigma_y: float) -> "FullCovGaussianMixture":
        r"""The exact posterior ``p(x0 | y)`` for the observation ``y = A x0 + sigma_y n``, ``n ~ N(0, I)``.

        Derivation. Component k is ``x0 ~ N(m_k, s_k^2 I)``; then ``(x0, y)`` is jointly Gaussian with
        ``y ~ N(A m_k, G_k)``, ``G_k = s_k^2 A A^T + sigma_y^2 I``, ``Cov(x0, y) = s_k^2 A^T``. Conditioning
        a joint Gaussian gives the component posterior

            mean_k = m_k + s_k^2 A^T G_k^{-1} (y - A m_k),
            C_k    = s_k^2 I - s_k^4 A^T G_k^{-1} A  =  (I / s_k^2 + A^T A / sigma_y^2)^{-1}   (Woodbury),

        and Bayes' rule over the component label gives the reweighted weights

            w'_k  ∝  w_k N(y; A m_k, G_k).

        The left-hand (Woodbury) forms stay finite at ``sigma_y = 0``, where they are the exact limit:
        conditioning on the linear constraints ``A x0 = y`` (``C_k = s_k^2 (I - A^+ A)``, the component
        restricted to the affine subspace). There, directions of ``y`` outside the range of ``A``
        (zero eigenvalues of ``A A^T``) carry no information (they must be zero up to rounding, the
        same for every component) and are dropped. In the eigenbasis ``A A^T = U diag(l) U^T``,
        ``G_k = U diag(s_k^2 l + sigma_y^2) U^T`` is diagonal, so everything is a division.

        Args:
            A: a :class:`scoresde.conditioning.LinearOperator` (its ``matrix()`` is used) or a dense
                ``(M, D)`` matrix on the flattened data.
            y: one observation, shape ``(M,)`` or the operator's ``out_shape`` (or ``(1, ...)``).
            sigma_y: observation noise standard deviation, ``>= 0``.

        Returns:
            A :class:`FullCovGaussianMixture` of the same event shape, with attribute ``log_evidence``
            (``log p(y)``; at ``sigma_y = 0`` a density on the range of ``A``) and
            ``component_log_evidence`` (``(K,)``).
        """
        sigma_y = float(sigma_y)
        if not sigma_y >= 0 or not math.isfinite(sigma_y):
            raise ValueError(f"sigma_y must be a finite number >= 0; got {sigma_y}")
        mat = A.matrix(torch.float64) if hasattr(A, "matrix") and callable(A.matrix) else torch.as_tensor(A, dtype=torch.float64)
        if mat.ndim != 2 or mat.shape[1] != self.dim:
            raise ValueError(f"A must act on the mixture's {self.dim} flattened coordinates (shape (M, {self.dim})); "
                             f"got shape {tuple(mat.shape)}")
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        if y.numel() != mat.shape[0]:
            raise ValueError(f"y has {y.numel()} entries but A has {mat.shape[0]} rows")
        lam, u = torch.linalg.eigh(mat @ mat.T)
        lam = lam.clamp(min=0)
        if sigma_y == 0:
            keep = lam > 1e-10 * float(lam.max().clamp(min=1e-300))
            lam, u = lam[keep], u[:, keep]
        a_rot = u.T @ mat  # (r, D): rows orthogonal, A_rot A_rot^T = diag(lam)
        y_rot = u.T @ y  # (r,)
        mu = self.means.reshape(self.num_components, -1)  # (K, D)
        s2 = self.stds**2  # (K,)
        g = s2[:, None] * lam[None, :] + sigma_y**2  # (K, r)
        resid = y_rot[None, :] - mu @ a_rot.T  # (K, r)
        log_ev = -0.5 * (torch.log(2 * math.pi * g).sum(1) + (resid**2 / g).sum(1))  # (K,)
        means = mu + s2[:, None] * ((resid / g) @ a_rot)  # (K, D)
        eye = torch.eye(self.dim, dtype=torch.float64)
        covs = s2[:, None, None] * eye - (s2**2)[:, None, None] * torch.einsum("ri,kr,rj->kij", a_rot, 1.0 / g, a_rot)
        covs = 0.5 * (covs + covs.transpose(1, 2))
        logw = torch.log(self.weights) + log_ev
        total = torch.logsumexp(logw, 0)
        post = FullCovGaussianMixture(means.reshape(self.means.shape), covs, torch.exp(logw - total))
        post.log_evidence = float(total)
        post.component_log_evidence = log_ev
        return post

    def marginal(self, sde: SDE, t: float) -> "GaussianMixture":
        """The marginal at a single time ``t`` as a mixture (for moments and sampling)."""
        tt = torch.tensor(float(t), dtype=torch.float64)
        a, s = float(sde.alpha(tt)), float(sde.std(tt))
        return GaussianMixture(a * self.means, torch.sqrt(a**2 * self.stds**2 + s**2), self.weights)

    # -- constructors for the standard test problems ------------------------------------------
    @classmethod
    def gaussian(cls, mean: ArrayLike, std: float) -> "GaussianMixture":
        """A single isotropic Gaussian ``N(mean, std^2 I)``."""
        mean = torch.as_tensor(mean, dtype=torch.float64)
        return cls(mean[None], torch.tensor([float(std)], dtype=torch.float64), torch.ones(1, dtype=torch.float64))

    @classmethod
    def ring(
        cls, k: int = 8, radius: float = 4.0, std: float = 0.3, unequal: bool = True
    ) -> "GaussianMixture":
        """A 2-D ring of ``k`` well-separated components; with ``unequal``, weights and widths differ."""
        angles = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
        if unequal:
            idx = torch.arange(k, dtype=torch.float64)
            weights = 1.0 + idx
            weights = weights / weights.sum()
            stds = std * (0.5 + idx / max(k - 1, 1))
        else:
            weights, stds = torch.full((k,), 1.0 / k, dtype=torch.float64), torch.full((k,), std, dtype=torch.float64)
        return cls(means, stds, weights)

    @classmethod
    def random(
        cls, dim: int, k: int = 8, seed: int = 0, scale: float = 2.0, std_range: tuple = (0.2, 0.6)
    ) -> "GaussianMixture":
        """A random mixture in ``dim`` dimensions (means ~ N(0, scale^2), random widths and weights)."""
        g = torch.Generator().manual_seed(seed)
        means = scale * torch.randn(k, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        stds = lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64)
        weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
        return cls(means, stds, weights / weights.sum())

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, event_shape={self.event_shape})"


class ExactEpsModel(torch.nn.Module):
    """``model(x, t, **ignored) -> eps`` of a :class:`GaussianMixture` under an SDE (exact, no training).

    A ``torch.nn.Module`` so it moves like a network and plugs into code written for networks.
    Extra keyword inputs (class labels, guidance scales) are accepted and ignored.
    """

    def __init__(self, mixture: "GaussianMixture | FullCovGaussianMixture", sde: SDE):
        super().__init__()
        self.mixture, self.sde = mixture, sde

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
        return self.mixture.eps(self.sde, x, t)


class FullCovGaussianMixture(_MixtureDensity):
    """``sum_k weights[k] N(means[k], covs[k])`` with full covariances, exact marginals and scores under any SDE.

    Under a linear SDE the marginal at time t is ``sum_k w_k N(alpha m_k, alpha^2 C_k + std^2 I)``.
    With the eigendecomposition ``C_k = Q_k diag(e_k) Q_k^T`` (computed once) the marginal covariance is
    ``Q_k diag(alpha^2 e_k + std^2) Q_k^T``, so with ``z = Q_k^T (x - alpha m_k)`` and
    ``v = alpha^2 e_k + std^2``:

        log N_k = -1/2 sum_j [log(2 pi v_j) + z_j^2 / v_j],     score = sum_k r_k (-Q_k (z / v)),

    ``r_k`` the responsibilities, ``eps = -std score``. Covariances may be singular (a posterior under
    noise-free constraints): the marginal is then non-degenerate for every ``std(t) > 0``.

    Args:
        means: ``(K, *event_shape)``.
        covs: ``(K, D, D)`` symmetric positive semi-definite, ``D = prod(event_shape)``.
        weights: ``(K,)`` non-negative, summing to one (default uniform).
    """

    def __init__(self, means: ArrayLike, covs: ArrayLike, weights: Optional[ArrayLike] = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2:
            raise ValueError(f"means must have shape (K, *event_shape); got shape {tuple(means.shape)}")
        k = means.shape[0]
        d = int(math.prod(means.shape[1:]))
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape ({k}, {d}, {d}); got {tuple(covs.shape)}")
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or bool(torch.any(weights < 0)) or abs(float(weights.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must have shape ({k},), be non-negative and sum to one")
        covs = 0.5 * (covs + covs.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(covs)
        scale = evals.abs().amax(1, keepdim=True).clamp(min=1e-300)
        if bool((evals < -1e-8 * scale).any()):
            raise ValueError("covs must be positive semi-definite")
        self.means, self.covs, self.weights = means, covs, weights
        self.evals, self.evecs = evals.clamp(min=0), evecs
        self.event_shape = tuple(means.shape[1:])
        self.dim = d

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def as_full(self) -> "FullCovGaussianMixture":
        return self

    def mean(self) -> torch.Tensor:
        return torch.einsum("k,k...->...", self.weights, self.means)

    def covariance(self) -> torch.Tensor:
        """``(D, D)`` covariance of the flattened data."""
        mu = self.means.reshape(self.num_components, -1)
        m = self.weights @ mu
        second = torch.einsum("k,ki,kj->ij", self.weights, mu, mu) + torch.einsum("k,kij->ij", self.weights, self.covs)
        return second - torch.outer(m, m)

    def sample(
        self, n: int, generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64
    ) -> torch.Tensor:
        """Draw ``n`` samples, shape ``(n, *event_shape)``: ``m_k + Q_k sqrt(e_k) z``."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means.reshape(self.num_components, -1)[idx] + torch.einsum(
            "nij,nj->ni", self.evecs[idx], self.evals[idx].sqrt() * z)
        return x.reshape(n, *self.event_shape).to(dtype)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.event_shape))}); got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def _components(self, x: torch.Tensor, alpha: torch.Tensor, var_noise: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Log joint ``log w_k + log N_k(x)`` (B, K), variances ``v`` (B or 1, K, D), rotated residuals ``z`` (B, K, D)."""
        flat = self._check_x(x)
        kw = dict(device=x.device, dtype=x.dtype)
        mu = self.means.to(**kw).reshape(self.num_components, -1)
        q, e = self.evecs.to(**kw), self.evals.to(**kw)
        alpha = alpha.reshape(-1, 1, 1) if alpha.ndim else alpha.reshape(1, 1, 1)
        var_noise = var_noise.reshape(-1, 1, 1) if var_noise.ndim else var_noise.reshape(1, 1, 1)
        v = alpha**2 * e[None] + var_noise  # (B or 1, K, D)
        diff = flat[:, None, :] - alpha * mu[None]  # (B, K, D)
        z = torch.einsum("bkd,kde->bke", diff, q)
        logn = -0.5 * (torch.log(2 * math.pi * v).sum(-1) + (z**2 / v).sum(-1))
        return torch.log(self.weights.to(**kw)) + logn, v, z

    def score(self, sde: SDE, x: torch.Tensor, t: TimeLike) -> torch.Tensor:
        """Exact ``grad_x log p_t(x)``, shape of ``x``."""
        t = sde._t(t, x)
        logj, v, z = self._components(x, sde.alpha(t), sde.std(t) ** 2)
        r = torch.softmax(logj, dim=1)
        q = self.evecs.to(device=x.device, dtype=x.dtype)
        score = -torch.einsum("bke,kde->bd", r[..., None] * z / v, q)
        return score.reshape(x.shape)

    def __repr__(self) -> str:
        return f"FullCovGaussianMixture(K={self.num_components}, event_shape={self.event_shape})"
