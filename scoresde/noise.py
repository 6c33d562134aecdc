"""Per-sample, counter-based Gaussian noise: reproducible whatever the batch size or device.

A stochastic sampler draws fresh noise at every step. With one ``torch.Generator`` per batch, sample i
depends on how many other samples shared its batch. :class:`SampleNoise` instead derives every
number from ``(seed, sample id, stream, element index)`` with an integer hash, vectorised in torch
(no Python loop over samples).

**Words.** The hash is Wellons' "lowbias32" ``H`` (two xor-shift-multiply rounds on 32-bit words),
chained over the counters in two 32-bit lanes with different salts: ``key_i = H(H(seed) ^ H(id_i + c))``,
``base_{i,s} = H(key_i ^ H(s + c'))`` (and ``key2``, ``base2`` likewise), and element ``k``'s word
``w = H(H(base_{i,s} ^ H(k)) ^ base2_{i,s})``. ``H`` is a bijection of 32-bit words, so for one seed
distinct ids (mod ``2^32``) get distinct keys and one sample's streams distinct bases: no two samples
share ``x_T`` and no sample repeats its own noise. The second lane makes the draws of two different
samples at two different streams coincide with probability ``2^-64`` instead of ``2^-32`` per pair
(with one lane, 50,000 samples x 1,000 steps would share ~3e5 draws across samples). The per-element work runs on ``int32``
tensors whose bits are the 32-bit words: ``*`` wraps modulo ``2^32`` (two's complement, which is what
torch's CPU vector kernels and CUDA integer units do) and the logical shift is an arithmetic shift
masked to the remaining bits. These words are bit-identical to a pure-Python reference
(``_hash32_int``; checked in ``tests/test_noise.py``), so they are the same on every device and in
every batch.

**Normals.** Box-Muller on two words ``(w1, w2)`` per pair of normals:
``u = (w1 mod 2^31 + 1/2) / 2^31`` in ``(0, 1]``, ``phi = 2 pi w2 / 2^32`` with ``w2`` read as a signed
integer (``phi`` in ``[-pi, pi)``), ``r = sqrt(-2 log u)``, giving ``r cos phi`` and ``r sin phi``.
The largest ``|z|`` is ``sqrt(64 log 2) = 6.66`` (``P(|z| > 6.66) = 3e-11``). The floating-point
work is done in float64 for float64 output and in float32 otherwise (it is ~2x cheaper, and float32
carries the result anyway). Elementwise float ops do not depend on where an element sits in a
tensor, so sample i is **bit-identical in any batch on one device** (tested over many batch sizes,
offsets and thread counts). Across devices (CPU vs CUDA) the words agree exactly but ``log``,
``cos`` and ``sin`` come from different math libraries, so the normals agree to a few units in the
last place of the working precision, not bit for bit.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

_MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32 multipliers
_ID_SALT, _STREAM_SALT = 0x9E3779B9, 0x6A09E667
# the second 32-bit lane of the keys and bases (see the module docstring)
_LANE2_SALT, _ID_SALT2, _STREAM_SALT2 = 0x3C6EF372, 0xBB67AE85, 0xA54FF53A


def _signed32(c: int) -> int:
    """The int32 whose two's-complement bits are the 32-bit word ``c``."""
    c &= _MASK32
    return c - (1 << 32) if c >= 1 << 31 else c


def _hash32_int(x: int) -> int:
    """lowbias32 on a Python int (the reference): ``x ^= x >> 16; x *= C1; x ^= x >> 15; x *= C2; x ^= x >> 16`` mod 2^32."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _C1) & _MASK32
    x ^= x >> 15
    x = (x * _C2) & _MASK32
    return x ^ (x >> 16)


def _i32(c: int) -> torch.Tensor:
    return torch.tensor(_signed32(c), dtype=torch.int32)


# 0-dim int32 operands: a Python int would be wrapped and converted on every call (~5 us each).
_K = {name: _i32(v) for name, v in dict(c1=_C1, c2=_C2, m15=0x1FFFF, m16=0xFFFF, m31=0x7FFFFFFF, s15=15, s16=16).items()}


def _hash32_(x: torch.Tensor, tmp: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lowbias32 in place on an ``int32`` tensor of 32-bit words (two's complement); returns ``x``.

    ``(x >> k) & (2^(32-k) - 1)`` is the logical shift; ``x *= c`` wraps modulo ``2^32``. ``tmp``
    (same shape and dtype) is scratch space, allocated when not given.
    """
    if x.dtype != torch.int32:
        raise TypeError(f"_hash32_ works on int32 words; got {x.dtype}")
    k = _K
    tmp = torch.empty_like(x) if tmp is None else tmp
    x.bitwise_xor_(torch.bitwise_right_shift(x, k["s16"], out=tmp).bitwise_and_(k["m16"]))
    x.mul_(k["c1"])
    x.bitwise_xor_(torch.bitwise_right_shift(x, k["s15"], out=tmp).bitwise_and_(k["m15"]))
    x.mul_(k["c2"])
    x.bitwise_xor_(torch.bitwise_right_shift(x, k["s16"], out=tmp).bitwise_and_(k["m16"]))
    return x


def _words32(values: torch.Tensor) -> torch.Tensor:
    """Integers (any int dtype) -> int32 tensor of their 32-bit words ``v mod 2^32``."""
    v = values.to(torch.int64) & _MASK32
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)


# Per-element counter words H(k), laid out as [H(0), H(2), ..., H(2h-2), H(1), H(3), ..., H(2h-1)]:
# the first half feeds the radii, the second the phases. They depend on nothing but h and the device.
_COUNTERS: Dict[Tuple[int, torch.device], torch.Tensor] = {}
_CPU = torch.device("cpu")
_COUNTERS_MAX = 16


def _counter_words(half: int, device: torch.device) -> torch.Tensor:
    key = (half, device)
    c = _COUNTERS.get(key)
    if c is None:
        k = torch.arange(half, dtype=torch.int32, device=device)
        c = _hash32_(torch.cat([2 * k, 2 * k + 1]))[None, :]  # (1, 2h); 2h < 2^31 assumed
        if len(_COUNTERS) >= _COUNTERS_MAX:
            _COUNTERS.pop(next(iter(_COUNTERS)))
        _COUNTERS[key] = c
    return c


_F: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}


def _fconst(name: str, value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim float constant of ``dtype``: an int32 tensor combined with it promotes to ``dtype``
    inside the kernel (conversion and affine map in one pass)."""
    c = _F.get((name, dtype))
    if c is None:
        c = _F[(name, dtype)] = torch.tensor(value, dtype=dtype)
    return c


def _box_muller(w: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """``(B, 2h)`` int32 words ``[w1 | w2]`` -> ``(B, 2h)`` normals ``[r cos phi | r sin phi]`` in ``work``.

    ``u = (w1 mod 2^31 + 1/2) 2^-31`` in ``(0, 1]`` (float32 rounds it to at most 1, never above),
    ``r = sqrt(-2 log u)`` (at most ``sqrt(64 log 2) = 6.66``), ``phi = 2 pi w2 2^-32`` with ``w2``
    signed, in ``[-pi, pi]``. Overwrites ``w``'s first half.
    """
    half = w.shape[1] // 2
    # Few, reused buffers: the network between two draws evicts the caches, so every fresh buffer
    # is a cold one. u and phi are written straight into the output's two halves.
    z = torch.empty((w.shape[0], 2 * half), dtype=work, device=w.device)
    r, s = z[:, :half], z[:, half:]
    torch.add(_fconst("half_ulp", 2.0**-32, work), w[:, :half].bitwise_and_(_K["m31"]), alpha=2.0**-31, out=r)
    r.log_().mul_(-2.0).sqrt_()
    torch.mul(w[:, half:], _fconst("phase", 2.0 * math.pi * 2.0**-32, work), out=s)  # phi
    cos = torch.cos(s)
    s.sin_().mul_(r)
    r.mul_(cos)
    return z


class SampleNoise:
    """A source of standard normal noise keyed per sample.

    Args:
        seed: the run's seed (any Python int; its low 64 bits are used).
        sample_ids: ``(B,)`` integer ids of the samples in the batch (default ``0..B-1``; pass
            ``offset + arange(B)`` when drawing a large set in several batches). Ids are taken
            modulo ``2^32``.

    ``randn(shape, stream)`` returns ``(B, *shape)``; every distinct ``stream`` (a step counter,
    say, modulo ``2^32``) gives independent noise. ``randn_like(x, stream)`` matches ``x``.
    """

    def __init__(self, seed: int, sample_ids: Union[torch.Tensor, Sequence[int], int]):
        if isinstance(sample_ids, int):
            sample_ids = torch.arange(sample_ids)
        self.seed = int(seed)
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.int64)
        if self.sample_ids.ndim != 1:
            raise ValueError("sample_ids must be a 1-D tensor of integer ids")
        # key_i = H(H(seed_lo ^ H(seed_hi)) ^ H(id_i + salt)): mixes the seed's 64 bits and the id;
        # the second lane the same with other salts.
        seed_word = _hash32_int((self.seed & _MASK32) ^ _hash32_int((self.seed >> 32) & _MASK32))
        seed_word2 = _hash32_int(seed_word + _LANE2_SALT)
        ids = _hash32_(_words32(self.sample_ids + _ID_SALT))
        ids2 = _hash32_(_words32(self.sample_ids + _ID_SALT2))
        self._keys = torch.stack([_hash32_(ids.bitwise_xor_(_signed32(seed_word))),
                                  _hash32_(ids2.bitwise_xor_(_signed32(seed_word2)))], dim=1)  # (B, 2) int32
        self._bases_cache: Dict[Tuple[int, torch.device], torch.Tensor] = {}
        # streams whose per-sample bases are hashed in one go (fewer tiny kernels per draw)
        self._block = max(1, min(64, (1 << 20) // max(1, self.batch_size)))

    @property
    def batch_size(self) -> int:
        return self.sample_ids.numel()

    def subset(self, index: Union[slice, torch.Tensor]) -> "SampleNoise":
        """Noise for a sub-batch, keeping each sample's identity."""
        return SampleNoise(self.seed, self.sample_ids[index])

    def _base_block(self, blk: int, device: torch.device) -> torch.Tensor:
        """``(block, B, 2)`` int32 ``[base_{i,s}, base2_{i,s}]`` with ``base = H(key ^ H(s + c'))`` per lane,
        for the streams ``s = blk * block + j``, hashed in one go and kept (samplers walk streams in order)."""
        bases = self._bases_cache.get((blk, device))
        if bases is None:
            first = blk * self._block
            words = [[_signed32(_hash32_int(first + j + _STREAM_SALT)), _signed32(_hash32_int(first + j + _STREAM_SALT2))]
                     for j in range(self._block)]
            sw = torch.tensor(words, dtype=torch.int32, device=device)[:, None, :]
            bases = _hash32_(self._keys.to(device)[None, :, :] ^ sw)
            if len(self._bases_cache) >= 4:
                self._bases_cache.pop(next(iter(self._bases_cache)))
            self._bases_cache[(blk, device)] = bases
        return bases

    def _bases(self, stream: int, count: int, device: torch.device) -> torch.Tensor:
        """``(count, B, 2)`` bases of the streams ``stream, ..., stream + count - 1`` (mod ``2^32``)."""
        parts, s, left = [], int(stream) & _MASK32, count
        while left > 0:
            blk, off = divmod(s, self._block)
            take = min(left, self._block - off)
            parts.append(self._base_block(blk, device)[off : off + take])
            s, left = (s + take) & _MASK32, left - take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def words(
        self, n_pairs: int, stream: int = 0, *, count: int = 1, device: Optional[Union[torch.device, str]] = None
    ) -> torch.Tensor:
        """The ``(count, B, 2 n_pairs)`` int32 words of the draws ``stream, ..., stream + count - 1``:
        ``w[s, i, k] = H(H(base_{i,s} ^ H(c_k)) ^ base2_{i,s})`` with
        ``c = (0, 2, ..., 2 n - 2, 1, 3, ..., 2 n - 1)`` (radius words first, then phase words)."""
        dev = _CPU if device is None else torch.device(device)
        b = self._bases(stream, count, dev)
        w = b[:, :, 0:1] ^ _counter_words(n_pairs, dev)
        tmp = torch.empty_like(w)  # one scratch buffer for both rounds
        return _hash32_(_hash32_(w, tmp).bitwise_xor_(b[:, :, 1:2]), tmp)

    def randn_streams(
        self,
        shape: Sequence[int],
        stream: int,
        count: int,
        *,
        device: Optional[Union[torch.device, str]] = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``count`` consecutive draws at once, ``(count, B, *shape)``: entry ``j`` is bit-identical to
        ``randn(shape, stream + j)`` (the same elementwise operations on the same words), for the
        cost of one draw's fixed per-call work."""
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be a positive integer; got {count!r}")
        n = int(math.prod(shape))
        half = (n + 1) // 2
        work = torch.float64 if dtype == torch.float64 else torch.float32
        w = self.words(half, stream, count=count, device=device).view(count * self.batch_size, 2 * half)
        z = _box_muller(w, work)
        if n != 2 * half:
            z = z[:, :n]
        return z.reshape((count, self.batch_size, *shape)).to(dtype)

    def randn(
        self,
        shape: Sequence[int],
        stream: int = 0,
        *,
        device: Optional[Union[torch.device, str]] = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Standard normal noise of shape ``(B, *shape)``; ``stream`` selects an independent draw.

        Element ``j < h`` of a sample is ``r_j cos phi_j`` and element ``h + j`` is ``r_j sin phi_j``
        (``h = ceil(n / 2)``, ``n = prod(shape)``; the last sine is dropped when ``n`` is odd).
        """
        return self.randn_streams(shape, stream, 1, device=device, dtype=dtype)[0]

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
