"""Per-sample counter-based noise: batch-size independence and Gaussian statistics."""

import math

import pytest
import torch
from scipy import stats

from scoresde.noise import SampleNoise, as_sample_noise


def test_sample_i_does_not_depend_on_the_batch():
    big = SampleNoise(11, torch.arange(256)).randn((3, 4), stream=5)
    for i in [0, 17, 255]:
        one = SampleNoise(11, torch.tensor([i])).randn((3, 4), stream=5)
        assert torch.equal(big[i], one[0])
    assert torch.equal(SampleNoise(11, 256).subset(slice(10, 20)).randn((3, 4), 5), big[10:20])


def test_streams_seeds_and_samples_differ():
    a = SampleNoise(0, 4).randn((100,), 0)
    assert not torch.equal(a, SampleNoise(0, 4).randn((100,), 1))
    assert not torch.equal(a, SampleNoise(1, 4).randn((100,), 0))
    assert not torch.equal(a[0], a[1])
    assert torch.equal(a, SampleNoise(0, 4).randn((100,), 0))


def test_gaussian_statistics():
    """1e6 draws: mean and variance within 5 standard errors, a KS test against N(0,1), and
    correlations between neighbouring elements, streams and samples below 5/sqrt(n)."""
    z = SampleNoise(3, 1000).randn((1000,), 2, dtype=torch.float64)
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert stats.kstest(z.flatten()[:200_000].numpy(), "norm").pvalue > 1e-4
    z2 = SampleNoise(3, 1000).randn((1000,), 3, dtype=torch.float64)
    m = z.numel()
    for u, v in [(z[:, :-1], z[:, 1:]), (z, z2), (z[:-1], z[1:])]:
        r = float(torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1])
        assert abs(r) < 5 / math.sqrt(m)


def test_dtype_device_and_shape():
    x = torch.zeros(3, 2, 5, dtype=torch.float64)
    out = SampleNoise(0, 3).randn_like(x, 1)
    assert out.shape == x.shape and out.dtype == torch.float64
    with pytest.raises(ValueError, match="batch size"):
        SampleNoise(0, 4).randn_like(x, 1)


def test_generator_forms():
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(as_sample_noise(g1, 3).randn((4,)), as_sample_noise(g2, 3).randn((4,)))
    assert torch.equal(as_sample_noise(7, 3).randn((4,)), SampleNoise(7, 3).randn((4,)))
    with pytest.raises(ValueError, match="generator"):
        as_sample_noise("seed", 3)
