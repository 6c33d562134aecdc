"""Per-sample, counter-based Gaussian noise: reproducible whatever the batch size or device.

A stochastic sampler draws fresh noise at every step. With one ``torch.Generator`` per batch, sample i
depends on how many other samples shared its batch. :class:`SampleNoise` instead derives every
number from ``(seed, sample id, stream, element index)`` with an integer hash, vectorised in torch
(no Python loop over samples): sample 17 of seed 0 is the same in a batch of 1 or of 256, on CPU
or CUDA. The hash is Wellons' "lowbias32" (two xor-shift-multiply rounds), chained over the counters;
Box-Muller turns two 32-bit words into a normal deviate (tails to about 6.6 sigma).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for 32-bit values held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """32-bit words -> float64 uniforms in (0, 1]."""
    return (words.to(torch.float64) + 1.0) / 4294967296.0


class SampleNoise:
    """A source of standard normal noise keyed per sample.

    Args:
        seed: the run's seed.
        sample_ids: ``(B,)`` integer ids of the samples in the batch (default ``0..B-1``; pass
            ``offset + arange(B)`` when drawing a large set in several batches).

    ``randn(shape, stream)`` returns ``(B, *shape)``; every distinct ``stream`` (a step counter,
    say) gives independent noise. ``randn_like(x, stream)`` matches ``x``.
    """

    def __init__(self, seed: int, sample_ids: Union[torch.Tensor, Sequence[int], int]):
        if isinstance(sample_ids, int):
            sample_ids = torch.arange(sample_ids)
        self.seed = int(seed)
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64)
        if self.sample_ids.ndim != 1:
            raise ValueError("sample_ids must be a 1-D tensor of integer ids")
        # key_i = H(H(seed) ^ H(id_i)): mixes the seed's 64 bits and the id.
        seed_word = _hash32(torch.tensor(self.seed & _MASK32) ^ _hash32(torch.tensor((self.seed >> 32) & _MASK32)))
        self._keys = _hash32(seed_word ^ _hash32(self.sample_ids + 0x9E3779B9))

    @property
    def batch_size(self) -> int:
        return self.sample_ids.numel()

    def subset(self, index: Union[slice, torch.Tensor]) -> "SampleNoise":
        """Noise for a sub-batch, keeping each sample's identity."""
        return SampleNoise(self.seed, self.sample_ids[index])

    def randn(
        self,
        shape: Sequence[int],
        stream: int = 0,
        *,
        device: Optional[Union[torch.device, str]] = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal noise of shape ``(B, *shape)``; ``stream`` selects an independent draw."""
        n = int(math.prod(shape))
        half = (n + 1) // 2  # Box-Muller gives two normals (cos and sin) per pair of words
        keys = self._keys.to(device)
        stream_word = _hash32(torch.tensor(int(stream) & _MASK32, device=device) + 0x6A09E667)
        base = _hash32(keys ^ stream_word)[:, None]  # (B, 1)
        j = torch.arange(half, device=device, dtype=torch.int64)[None, :]  # (1, half)
        w1 = _hash32(base ^ _hash32(2 * j))  # (B, half)
        w2 = _hash32(base ^ _hash32(2 * j + 1))
        r = torch.sqrt(-2.0 * torch.log(_uniform(w1)))
        phase = (2 * math.pi) * _uniform(w2)
        z = torch.cat([r * torch.cos(phase), r * torch.sin(phase)], dim=1)[:, :n]
        return z.reshape((self.batch_size, *shape)).to(dtype)

    def randn_like(self, x: torch.Tensor, stream: int = 0) -> torch.Tensor:
        if x.shape[0] != self.batch_size:
            raise ValueError(f"noise source holds {self.batch_size} samples; x has batch size {x.shape[0]}")
        return self.randn(tuple(x.shape[1:]), stream, device=x.device, dtype=x.dtype)


def as_sample_noise(
    generator: Union[None, int, torch.Generator, SampleNoise], batch_size: int
) -> SampleNoise:
    """Normalise a sampler's ``generator`` argument into a :class:`SampleNoise` for ``batch_size`` samples.

    ``None`` draws a fresh seed from torch's global RNG, an ``int`` is a seed, a ``torch.Generator``
    gives its next 63-bit integer as the seed (so seeding the generator fixes the run), and a
    :class:`SampleNoise` is used as is (its batch size must match).
    """
    if isinstance(generator, SampleNoise):
        if generator.batch_size != batch_size:
            raise ValueError(f"generator holds {generator.batch_size} sample ids; the batch has {batch_size}")
        return generator
    if isinstance(generator, torch.Generator):
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    elif generator is None:
        seed = int(torch.randint(0, 2**62, ()))
    elif isinstance(generator, int):
        seed = generator
    else:
        raise ValueError(f"generator must be None, an int seed, a torch.Generator or a SampleNoise; got {type(generator)}")
    return SampleNoise(seed, torch.arange(batch_size))
