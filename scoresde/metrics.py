"""Sample-quality metrics for the 8x8 ``digits``: a small CNN classifier stands in for Inception.

A :class:`DigitClassifier` is trained once on the real *train* digits (fixed seed, a few seconds on
CPU) and cached to a file; from it, for generated samples against held-out real *test* digits:

- Fréchet distance (Heusel et al. 2017, "FID") between Gaussians fitted to the classifier's
  penultimate features: ``FD = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``.
  The plug-in estimate is biased upwards by an amount that shrinks with the sample count n
  (Chong & Forsyth 2020), so FDs are comparable only at equal n: :func:`digit_metrics` subsamples
  both sets to the same ``n`` (default: the smaller set; the held-out test split has 359 digits).
- classifier Inception score (Salimans et al. 2016): ``IS = exp(E_x KL(p(y|x) || p(y)))`` with
  ``p(y) = E_x p(y|x)``; between 1 and 10 (10 classes), high when each sample is classified
  confidently and the classes are balanced.
- ``confident``: fraction of samples whose top class probability exceeds 0.9 (``threshold``).

Samples are clipped to ``[-1, 1]`` (the data range) before classification.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._tensor import append_dims

#: bump when the classifier's architecture or training recipe changes (invalidates cached weights)
CLASSIFIER_VERSION = 2
CONFIDENCE_THRESHOLD = 0.9
FEATURE_DIM = 64


def cache_dir() -> Path:
    """``$SCORESDE_CACHE``, else ``$XDG_CACHE_HOME/scoresde``, else ``~/.cache/scoresde``."""
    if os.environ.get("SCORESDE_CACHE"):
        return Path(os.environ["SCORESDE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "scoresde"


class DigitClassifier(nn.Module):
    """CNN for ``(B, 1, 8, 8)`` digits in ``[-1, 1]``: three 3x3 conv layers (16, 32, 64 channels,
    ReLU, one 2x2 max-pool to 4x4), a 64-unit ReLU layer (the features), and a linear 10-way head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 16, FEATURE_DIM), nn.ReLU(),  # (B, 64) features
        )
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self.body(x))


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Augmentation: translate each image by -1, 0 or +1 pixel on each axis (background -1 fills)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, 1, 10, 10)
    dx, dy = torch.randint(0, 3, (2, x.shape[0]), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # (B, 8, 1)
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # (B, 1, 8)
    b = torch.arange(x.shape[0])[:, None, None]
    return padded[b, 0, rows, cols][:, None]


def _outliers(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Non-digits as many as ``x``: a third N(0,1) noise clipped to [-1, 1], a third uniform noise,
    a third the digits of ``x`` with their 64 pixels shuffled (same intensities, no structure)."""
    b = x.shape[0]
    gauss = torch.randn(x.shape, generator=g).clamp(-1, 1)
    unif = 2 * torch.rand(x.shape, generator=g) - 1
    perm = torch.argsort(torch.rand(b, 64, generator=g), dim=1)
    shuffled = torch.gather(x.reshape(b, 64), 1, perm).reshape(x.shape)
    kind = append_dims(torch.randint(0, 3, (b,), generator=g), x.ndim)  # (B, 1, ..., 1)
    return torch.where(kind == 0, gauss, torch.where(kind == 1, unif, shuffled))


def train_digit_classifier(
    seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 2e-3, outlier_weight: float = 0.5
) -> tuple[DigitClassifier, dict]:
    """Train on the real train digits; returns ``(model, meta)`` with the held-out test accuracy.

    Adam with a cosine schedule, one-pixel random shifts, and outlier exposure (Hendrycks et al.
    2019): on noise and pixel-shuffled digits the loss ``-outlier_weight * mean_k log p(k|x)``
    pushes the prediction to uniform, so that non-digits are not classified confidently (without
    it, about half of pure-noise images got a top probability above 0.9).
    """
    from .data import load_dataset

    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * math.ceil(len(train) / batch_size))
    model.train()
    for _ in range(epochs):
        for x, y in train.batches(batch_size, g, drop_last=False):
            loss = F.cross_entropy(model(_shift(x, g)), y)
            if outlier_weight > 0:  # outlier exposure: uniform class probabilities on non-digits
                logp = F.log_softmax(model(_outliers(x, g)), dim=1)
                loss = loss - outlier_weight * logp.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    meta = {"version": CLASSIFIER_VERSION, "seed": seed, "epochs": epochs, "outlier_weight": outlier_weight,
            "test_accuracy": acc}
    return model, meta


def load_digit_classifier(path: Optional[str | os.PathLike] = None, *, seed: int = 0, retrain: bool = False) -> DigitClassifier:
    """The cached classifier (trained and saved on first use, or when ``retrain``).

    ``path`` defaults to ``cache_dir()/digit_classifier_v{version}_seed{seed}.pt``. The file holds
    only tensors and plain data (saved with ``torch.save``, loaded with ``weights_only=True``); an
    unreadable or stale file is retrained and overwritten, with a warning.
    """
    path = Path(path) if path is not None else cache_dir() / f"digit_classifier_v{CLASSIFIER_VERSION}_seed{seed}.pt"
    if path.is_file() and not retrain:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["meta"]["version"] != CLASSIFIER_VERSION:
                raise ValueError(f"version {blob['meta']['version']} != {CLASSIFIER_VERSION}")
            model = DigitClassifier()
            model.load_state_dict(blob["state_dict"])
            model.meta = dict(blob["meta"])
            return model.eval()
        except Exception as err:  # corrupt, foreign or stale file: rebuild it
            warnings.warn(f"retraining the digit classifier: could not use {path} ({err})")
    model, meta = train_digit_classifier(seed)
    model.meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: concurrent readers see the old file or the new one
    return model


def frechet_distance_from_stats(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, in float64.

    ``Tr (S1 S2)^{1/2}`` is the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^{1/2} S2 S1^{1/2}`` (similar to ``S1 S2``), which avoids a non-symmetric matrix square root.
    """
    mu1, mu2, cov1, cov2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, mu2, cov1, cov2))
    w, v = torch.linalg.eigh(cov1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)


def frechet_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to ``(n1, d)`` and ``(n2, d)`` features."""
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"features must be (n, d) with the same d; got {tuple(feats1.shape)} and {tuple(feats2.shape)}")
    if min(feats1.shape[0], feats2.shape[0]) < 2:
        raise ValueError("need at least 2 samples per set for a covariance")
    a, b = feats1.double(), feats2.double()
    return frechet_distance_from_stats(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def inception_score(probs: torch.Tensor) -> float:
    """``exp(mean_i KL(p_i || mean_j p_j))`` for class probabilities ``(n, K)``."""
    p = probs.double().clamp(min=1e-12)
    marginal = p.mean(0, keepdim=True)
    kl = (p * (p.log() - marginal.log())).sum(1)
    return float(torch.exp(kl.mean()))


def _check_digits(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{name} must have shape (N, 1, 8, 8); got {tuple(x.shape)}")
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
    if bad:
        raise ValueError(f"{name} holds {bad} samples with non-finite values")
    return x.detach().float().cpu().clamp(-1.0, 1.0)


@torch.no_grad()
def _features_and_probs(model: DigitClassifier, x: torch.Tensor, batch_size: int = 1024):
    feats, probs = [], []
    for i in range(0, x.shape[0], batch_size):
        f = model.features(x[i : i + batch_size])
        feats.append(f)
        probs.append(torch.softmax(model.head(f), dim=1))
    return torch.cat(feats), torch.cat(probs)


def digit_metrics(
    samples: torch.Tensor,
    reference: Optional[torch.Tensor] = None,
    *,
    n: Optional[int] = None,
    classifier: Optional[DigitClassifier] = None,
    seed: int = 0,
    threshold: float = CONFIDENCE_THRESHOLD,
) -> dict:
    """FD, classifier Inception score and confident fraction of ``samples`` ``(N, 1, 8, 8)`` in ``[-1, 1]``.

    Args:
        samples: generated digits (clipped to [-1, 1]).
        reference: real digits; default the held-out test split (359 digits).
        n: compare this many of each (seeded subsets); default ``min(N, M)``. FD depends on n.
        classifier: default :func:`load_digit_classifier` (cached).
        seed: seeds the subsets.
        threshold: a sample counts as confident when its top class probability exceeds this.

    Returns ``{"fd", "inception_score", "confident", "n", "threshold"}``; IS and ``confident`` are
    computed on the same ``n`` samples as FD.
    """
    samples = _check_digits(samples, "samples")
    if reference is None:
        from .data import load_dataset

        reference = load_dataset("digits", split="test").x
    reference = _check_digits(reference, "reference")
    n_max = min(samples.shape[0], reference.shape[0])
    n = n_max if n is None else int(n)
    if not 2 <= n <= n_max:
        raise ValueError(f"n must lie in [2, {n_max}] (samples: {samples.shape[0]}, reference: {reference.shape[0]}); got {n}")
    g = torch.Generator().manual_seed(seed)
    samples = samples[torch.randperm(samples.shape[0], generator=g)[:n]]
    reference = reference[torch.randperm(reference.shape[0], generator=g)[:n]]
    model = classifier if classifier is not None else load_digit_classifier()
    model.eval()
    f_s, p_s = _features_and_probs(model, samples)
    f_r, _ = _features_and_probs(model, reference)
    return {
        "fd": frechet_distance(f_s, f_r),
        "inception_score": inception_score(p_s),
        "confident": float((p_s.max(1).values > threshold).float().mean()),
        "n": n,
        "threshold": threshold,
    }


def baseline_metrics(repeats: int = 10, classifier: Optional[DigitClassifier] = None) -> dict:
    """Reference points at n = 359 (the test split), each against the held-out test digits: real
    train digits (a different subset per repeat), N(0,1) noise clipped to [-1, 1], and uniform
    noise on [-1, 1] (fresh noise per repeat). Returns ``{name: {metric: (mean, sd)}}`` over
    ``repeats`` seeds: the FD of a single draw is noisy (real vs real: sd about a third of the mean).
    """
    from .data import load_dataset

    test = load_dataset("digits", split="test").x
    train = load_dataset("digits", split="train").x
    n = test.shape[0]
    clf = classifier if classifier is not None else load_digit_classifier()
    runs: dict[str, list] = {"real_train": [], "gaussian_noise": [], "uniform_noise": []}
    for seed in range(repeats):
        g = torch.Generator().manual_seed(seed)
        candidates = {
            "real_train": train,
            "gaussian_noise": torch.randn(n, 1, 8, 8, generator=g).clamp(-1, 1),
            "uniform_noise": 2 * torch.rand(n, 1, 8, 8, generator=g) - 1,
        }
        for name, x in candidates.items():
            runs[name].append(digit_metrics(x, test, n=n, classifier=clf, seed=seed))
    out = {}
    for name, results in runs.items():
        out[name] = {}
        for key in ("fd", "inception_score", "confident"):
            v = torch.tensor([r[key] for r in results], dtype=torch.float64)
            out[name][key] = (float(v.mean()), float(v.std()) if repeats > 1 else 0.0)
    return out
