"""Digit metrics: Fréchet distance against closed forms, Inception score bounds, the cached classifier."""

import math
import warnings

import numpy as np
import pytest
import torch

from scoresde import metrics
from scoresde.data import load_dataset
from scoresde.metrics import (
    digit_metrics,
    frechet_distance,
    frechet_distance_from_stats,
    inception_score,
    load_digit_classifier,
)




@pytest.fixture(scope="module")
def classifier():
    # the instrument the benchmarks use: trained once (about 15 s of one core) and cached under
    # $SCORESDE_CACHE or ~/.cache/scoresde; later runs load it
    return load_digit_classifier()


def test_fd_closed_forms():
    d = 5
    mu = torch.randn(d, dtype=torch.float64)
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)
    assert abs(frechet_distance_from_stats(mu, cov, mu, cov)) < 1e-9
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    assert abs(frechet_distance_from_stats(mu, cov, mu + shift, cov) - float(shift.pow(2).sum())) < 1e-9
    # isotropic N(0, a^2 I) vs N(0, b^2 I): d (a - b)^2
    eye = torch.eye(d, dtype=torch.float64)
    assert abs(frechet_distance_from_stats(0 * mu, 4 * eye, 0 * mu, 0.25 * eye) - d * (2 - 0.5) ** 2) < 1e-9


def test_fd_non_commuting_covariances_match_scipy_sqrtm():
    from scipy.linalg import sqrtm

    rng = np.random.RandomState(0)
    a, b = rng.randn(6, 6), rng.randn(6, 6)
    s1, s2 = a @ a.T, b @ b.T
    m1, m2 = rng.randn(6), rng.randn(6)
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(sqrtm(s1 @ s2)))
    got = frechet_distance_from_stats(*(torch.from_numpy(v) for v in (m1, s1, m2, s2)))
    assert abs(got - expected) < 1e-8 * max(1.0, abs(expected))


def test_fd_of_features_with_itself_is_zero_and_a_shift_adds_its_square():
    f = torch.randn(500, 16, dtype=torch.float64)
    assert abs(frechet_distance(f, f)) < 1e-8
    c = torch.linspace(-1, 1, 16, dtype=torch.float64)
    # the covariance is shift-invariant, so FD(f, f + c) = |c|^2 exactly (up to rounding)
    assert abs(frechet_distance(f, f + c) - float(c.pow(2).sum())) < 1e-8
    assert frechet_distance(f, f + 2 * c) > frechet_distance(f, f + c)


def test_inception_score_bounds():
    k = 10
    assert abs(inception_score(torch.eye(k).repeat(3, 1)) - k) < 1e-6  # confident and balanced: IS = K
    assert abs(inception_score(torch.eye(k)[[2] * 30]) - 1) < 1e-6  # one class only: IS = 1
    assert abs(inception_score(torch.full((30, k), 1 / k)) - 1) < 1e-6  # uninformative: IS = 1


def test_classifier_is_accurate_on_held_out_digits(classifier):
    # sklearn digits are easy: simple CNNs exceed 95% test accuracy
    assert classifier.meta["test_accuracy"] > 0.93


def test_real_digits_score_high_and_noise_low(classifier):
    test = load_dataset("digits", split="test").x
    train = load_dataset("digits", split="train").x
    real = digit_metrics(train, test, classifier=classifier)
    assert real["n"] == 359  # both subsampled to the smaller set
    # held-out digits of 10 balanced classes, classified at >93%: IS near 10, mostly confident
    assert real["inception_score"] > 8 and real["confident"] > 0.8
    g = torch.Generator().manual_seed(0)
    noise = digit_metrics(torch.randn(359, 1, 8, 8, generator=g), test, classifier=classifier)
    uniform = digit_metrics(2 * torch.rand(359, 1, 8, 8, generator=g) - 1, test, classifier=classifier)
    for bad in (noise, uniform):
        # outlier exposure trains the classifier to answer "uniform" on noise: IS near 1, none confident
        assert bad["inception_score"] < 2 and bad["confident"] < 0.05
        assert bad["fd"] > 10 * real["fd"]
    # FD grows as real digits are pushed away from the data (additive shift of the pixels)
    fds = [digit_metrics((test + s).clamp(-1, 1), train, classifier=classifier)["fd"] for s in (0.0, 0.3, 0.8)]
    assert fds[0] < fds[1] < fds[2]


def test_digit_metrics_compares_at_equal_n(classifier):
    test = load_dataset("digits", split="test").x
    out = digit_metrics(test[:100], classifier=classifier)
    assert out["n"] == 100 and out["threshold"] == 0.9
    assert digit_metrics(test, classifier=classifier, n=50)["n"] == 50
    with pytest.raises(ValueError, match="n must lie in"):
        digit_metrics(test[:10], classifier=classifier, n=20)


def test_digit_metrics_input_checks(classifier):
    with pytest.raises(ValueError, match=r"samples must have shape \(N, 1, 8, 8\)"):
        digit_metrics(torch.zeros(10, 3, 8, 8), classifier=classifier)
    bad = torch.zeros(10, 1, 8, 8)
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 samples with non-finite"):
        digit_metrics(bad, classifier=classifier)


def test_classifier_cache_round_trip_and_corrupt_file(tmp_path, classifier, monkeypatch):
    calls = []

    def fake_train(seed=0, epochs=20):
        calls.append(seed)
        return classifier, dict(classifier.meta)

    monkeypatch.setattr(metrics, "train_digit_classifier", fake_train)
    path = tmp_path / "clf.pt"
    first = load_digit_classifier(path)
    assert path.is_file() and calls == [0]
    again = load_digit_classifier(path)  # loaded with weights_only=True, not retrained
    assert calls == [0]
    x = load_dataset("digits", split="test").x[:20]
    assert torch.allclose(again(x), first(x))
    path.write_bytes(b"not a checkpoint")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_digit_classifier(path)
    assert calls == [0, 0] and any("retraining" in str(w.message) for w in caught)
