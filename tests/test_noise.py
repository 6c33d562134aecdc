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


# --- the integer words: int32 tensor arithmetic against a pure-Python reference -----------------
from scoresde import noise as N  # noqa: E402

_EDGES = [0, 1, 2, 0xFFFF, 0x10000, 0x1FFFF, 0x7FFFFFFF, 0x80000000, 0x80000001, 0xFFFF0000, 0xFFFFFFFE, 0xFFFFFFFF]


def test_hash_on_int32_words_equals_the_python_reference():
    """lowbias32 on int32 tensors (wrapping multiply, masked arithmetic shift) gives exactly the
    words of the plain mod-2^32 definition, on edge values and 200k random words; the length is odd
    so the kernels' scalar tail runs too."""
    g = torch.Generator().manual_seed(0)
    words = _EDGES + torch.randint(0, 2**32, (200_001 - len(_EDGES),), generator=g, dtype=torch.int64).tolist()
    got = N._hash32_(N._words32(torch.tensor(words))).to(torch.int64) & 0xFFFFFFFF
    want = torch.tensor([N._hash32_int(w) for w in words])
    assert torch.equal(got, want)
    assert N._hash32_int(0) == 0 and N._hash32_int(1) != 1  # the reference itself is not the identity


def _reference_words(seed, sample_id, stream, n_pairs):
    """The documented two-lane chain ``H(H(base ^ H(c_k)) ^ base2)`` in pure Python for one sample."""
    H, M = N._hash32_int, 0xFFFFFFFF
    seed_word = H((seed & M) ^ H((seed >> 32) & M))
    seed_word2 = H(seed_word + N._LANE2_SALT)
    key = H(seed_word ^ H(sample_id + N._ID_SALT))
    key2 = H(seed_word2 ^ H(sample_id + N._ID_SALT2))
    base = H(key ^ H((stream & M) + N._STREAM_SALT))
    base2 = H(key2 ^ H((stream & M) + N._STREAM_SALT2))
    counters = [2 * k for k in range(n_pairs)] + [2 * k + 1 for k in range(n_pairs)]
    return [H(H(base ^ H(c)) ^ base2) for c in counters]


@pytest.mark.parametrize("seed,ids,stream", [(0, [0, 5, 63], 1), (2**40 + 7, [2**31 + 3, 2**32 - 1], 2**31 + 9), (-5, [17], 0)])
def test_draw_words_equal_the_python_chain(seed, ids, stream):
    got = SampleNoise(seed, torch.tensor(ids)).words(37, stream)[0].to(torch.int64) & 0xFFFFFFFF
    for row, i in zip(got, ids):
        assert row.tolist() == _reference_words(seed, i, stream, 37)


def test_box_muller_edge_words_stay_finite_and_bounded():
    """w1 = 2^31 - 1 gives u = 1 - 2^-32 (float32 rounds it to 1, not above: log u > 0 would make r
    NaN), so r <= 2^-15.5; w1 = 0 gives u = 2^-32 and the largest radius sqrt(64 log 2)."""
    w1 = N._words32(torch.tensor(_EDGES))
    w = torch.cat([w1, w1.flip(0)])[None, :]
    rmax = math.sqrt(64 * math.log(2))
    for work in (torch.float32, torch.float64):
        z = N._box_muller(w.clone(), work)
        assert bool(torch.isfinite(z).all())
        h = len(_EDGES)
        r = torch.hypot(z[0, :h].double(), z[0, h:].double())
        assert float(r.max()) <= rmax * (1 + 1e-6) and float(r.max()) >= rmax * (1 - 1e-6)
        for top in (0x7FFFFFFF, 0xFFFFFFFF):  # the top bit is not used for the radius
            assert float(r[_EDGES.index(top)]) <= 2**-15.5 * (1 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_are_bit_identical_across_batch_sizes_offsets_and_threads(dtype):
    """Sample i's noise is the same bits in any batch, at any position in it, and with 1 or 2 threads
    (the big draw is split into chunks across threads; odd sizes exercise the kernels' tails)."""
    shape = (3, 37, 41)  # 4551 elements: odd, not a multiple of any vector width
    ids = torch.arange(100, 131)
    big = SampleNoise(4, ids).randn(shape, 7, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(SampleNoise(4, ids).randn(shape, 7, dtype=dtype), big)
    finally:
        torch.set_num_threads(threads)
    for lo, hi in [(0, 1), (5, 6), (30, 31), (3, 10), (1, 30), (0, 17)]:
        part = SampleNoise(4, ids[lo:hi]).randn(shape, 7, dtype=dtype)
        assert torch.equal(part, big[lo:hi]), (lo, hi)
    shuffled = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(1))]
    assert torch.equal(SampleNoise(4, shuffled).randn(shape, 7, dtype=dtype), big[shuffled - 100])


def test_float32_and_float64_draws_agree_to_rounding():
    z32 = SampleNoise(9, 50).randn((501,), 3, dtype=torch.float32).double()
    z64 = SampleNoise(9, 50).randn((501,), 3, dtype=torch.float64)
    assert float((z32 - z64).abs().max()) < 1e-5  # a few float32 ulps at |z| <= 6.66
    assert not torch.equal(z32, z64)  # the float32 path really computes in float32
    half = SampleNoise(9, 50).randn((501,), 3, dtype=torch.float16).double()
    assert float((half - z64).abs().max()) < 5e-3


def test_tail_frequencies_match_the_normal_law():
    """4e6 float32 draws: P(|z| > c) for c = 2, 3, 4 within 5 binomial standard deviations of
    2 Phi(-c), and no |z| beyond the documented bound 6.66."""
    z = SampleNoise(21, 2000).randn((2000,), 1, dtype=torch.float32).flatten().double()
    n = z.numel()
    for c in (2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(c)
        k = int((z.abs() > c).sum())
        assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p)), (c, k, n * p)
    assert float(z.abs().max()) <= math.sqrt(64 * math.log(2)) + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streams_drawn_together_equal_separate_draws(dtype):
    """randn_streams(shape, s, k)[j] is bit-identical to randn(shape, s + j), also across the edge of a
    cached block of stream bases and across the 2^32 wrap of the stream counter."""
    noise = SampleNoise(5, 7)
    for first, count in [(0, 1), (3, 8), (60, 9), (2**32 - 3, 6)]:
        block = noise.randn_streams((5, 3), first, count, dtype=dtype)
        assert block.shape == (count, 7, 5, 3)
        for j in range(count):
            assert torch.equal(block[j], SampleNoise(5, 7).randn((5, 3), (first + j) % 2**32, dtype=dtype)), (first, j)
    with pytest.raises(ValueError, match="count"):
        noise.randn_streams((3,), 0, 0)
