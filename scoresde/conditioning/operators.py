"""Linear observation operators for inverse problems ``y = A x0 + sigma_y n``, ``n ~ N(0, I)``.

Each operator acts on a batch ``x`` of shape ``(B, *in_shape)`` and returns ``y`` of shape
``(B, *out_shape)``. Besides the forward map it gives what the conditioning methods need:

- ``adjoint(y) = A^T y`` (``<A x, y> = <x, A^T y>``),
- ``pinv(y) = A^+ y`` (Moore-Penrose pseudo-inverse; ``A A^+ y = y`` for full row rank),
- ``solve(y, a, b) = (a A A^T + b I)^{-1} y`` with per-sample scalars ``a, b >= 0`` of shape ``(B,)``
  (or plain numbers): the one linear solve that ΠGDM, filtering and the conditional Gaussians need,
- ``matrix()``: the dense ``(M, D)`` matrix on flattened data (for exact posteriors of small problems).

Coordinate masks, channel averages and average pooling have ``A A^T = c I`` (their rows are
orthogonal with equal norms), so ``solve`` is a division and ``pinv(y) = A^T y / c``. An explicit
matrix uses the eigendecomposition ``A A^T = U diag(l) U^T``, computed once.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._tensor import append_dims

Scalar = Union[float, torch.Tensor]


def _per_sample(v: Scalar, like: torch.Tensor) -> torch.Tensor:
    """A number or ``(B,)`` tensor -> a tensor broadcasting against ``like`` ``(B, ...)``."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    return append_dims(v, like.ndim) if v.ndim == 1 else v


class LinearOperator:
    """Base class: ``y = A x`` on batches. Subclasses set ``in_shape``, ``out_shape`` and implement
    ``forward`` and ``adjoint``; ``pinv``, ``solve`` and ``gram_eigenvalues`` have generic
    dense fall-backs that subclasses with structure override."""

    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    name: str = "linear"

    @property
    def in_dim(self) -> int:
        return int(math.prod(self.in_shape))

    @property
    def out_dim(self) -> int:
        return int(math.prod(self.out_shape))

    # -- to implement -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.check_x(x)
        return self.forward(x)

    def check_x(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != tuple(self.in_shape):
            raise ValueError(f"{self.name} operator expects x of shape (B, {', '.join(map(str, self.in_shape))}); "
                             f"got {tuple(x.shape)}")

    def check_y(self, y: torch.Tensor) -> torch.Tensor:
        """Accept ``y`` of shape ``out_shape`` (one observation) or ``(B, *out_shape)``; returns ``(B or 1, ...)``."""
        y = torch.as_tensor(y)
        if tuple(y.shape) == tuple(self.out_shape):
            y = y[None]
        if tuple(y.shape[1:]) != tuple(self.out_shape):
            raise ValueError(f"y does not fit the {self.name} operator: expected shape "
                             f"({', '.join(map(str, self.out_shape))}) or (B, {', '.join(map(str, self.out_shape))}); "
                             f"got {tuple(y.shape)}")
        return y

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense ``(M, D)`` matrix on flattened data: column ``j`` is ``A e_j``."""
        eye = torch.eye(self.in_dim, dtype=dtype).reshape(self.in_dim, *self.in_shape)
        return self.forward(eye).reshape(self.in_dim, self.out_dim).T.contiguous()

    def gram_eigenvalues(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Eigenvalues ``l`` of ``A A^T`` (the squared singular values), shape ``(M,)``."""
        m = self.matrix(dtype)
        return torch.linalg.eigvalsh(m @ m.T).clamp(min=0)

    def solve(self, y: torch.Tensor, a: Scalar, b: Scalar) -> torch.Tensor:
        """``(a A A^T + b I)^{-1} y`` with ``a, b`` numbers or per-sample ``(B,)`` tensors (dense fall-back)."""
        m = self.matrix(y.dtype).to(y.device)
        lam, u = torch.linalg.eigh(m @ m.T)
        flat = y.reshape(y.shape[0], -1)
        c = flat @ u  # (B, M)
        a = torch.as_tensor(a, dtype=y.dtype, device=y.device).reshape(-1, 1)
        b = torch.as_tensor(b, dtype=y.dtype, device=y.device).reshape(-1, 1)
        return ((c / (a * lam.clamp(min=0) + b)) @ u.T).reshape(y.shape)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """``A^+ y`` (dense fall-back through ``torch.linalg.pinv``)."""
        p = torch.linalg.pinv(self.matrix(y.dtype).to(y.device))  # (D, M)
        return (y.reshape(y.shape[0], -1) @ p.T).reshape(y.shape[0], *self.in_shape)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``A^+ A x``: the orthogonal projection onto the row space of ``A`` (the observed part of x)."""
        return self.pinv(self.forward(x))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_shape={self.in_shape}, out_shape={self.out_shape})"


class _TightOperator(LinearOperator):
    """An operator with ``A A^T = c I`` (orthogonal rows of equal norm ``sqrt(c)``)."""

    gram: float = 1.0

    def gram_eigenvalues(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        return torch.full((self.out_dim,), float(self.gram), dtype=dtype)

    def solve(self, y: torch.Tensor, a: Scalar, b: Scalar) -> torch.Tensor:
        return y / (_per_sample(a, y) * self.gram + _per_sample(b, y))

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        return self.adjoint(y) / self.gram


class Mask(_TightOperator):
    """Coordinate selection (imputation, inpainting): ``y = x[mask]``, the kept entries in row-major order.

    Args:
        mask: boolean tensor of the data's event shape (``(D,)`` vectors, ``(C, H, W)`` images, a
            ``(H, W)`` mask is broadcast over channels when ``channels`` is given); True = observed.
        channels: number of channels to broadcast a ``(H, W)`` image mask over.

    ``A A^T = I``; ``A^T y`` puts ``y`` back and fills the unobserved entries with zeros.
    """

    name = "inpaint"
    gram = 1.0

    def __init__(self, mask: torch.Tensor, channels: int | None = None):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError("mask must be boolean or contain only 0 and 1")
            mask = mask.bool()
        if channels is not None:
            mask = mask.expand(int(channels), *mask.shape[-2:]).clone() if mask.ndim == 2 else mask
        if mask.ndim < 1 or int(mask.sum()) == 0:
            raise ValueError("mask must have at least one observed (True) entry")
        self.mask = mask
        self.in_shape = tuple(mask.shape)
        self.out_shape = (int(mask.sum()),)
        self._index = mask.reshape(-1).nonzero().squeeze(1)

    def forward(self, x):
        return x.reshape(x.shape[0], -1)[:, self._index.to(x.device)]

    def adjoint(self, y):
        out = y.new_zeros((y.shape[0], self.in_dim))
        out[:, self._index.to(y.device)] = y
        return out.reshape(y.shape[0], *self.in_shape)

    def mask_like(self, x: torch.Tensor) -> torch.Tensor:
        """The mask as ``x``'s dtype, shape ``(1, *in_shape)``."""
        return self.mask.to(device=x.device, dtype=x.dtype)[None]

    @classmethod
    def from_name(cls, name: str, shape: Sequence[int], seed: int = 0) -> "Mask":
        """Standard image masks by name for ``shape = (C, H, W)`` (or vectors ``(D,)``):
        ``lower`` / ``upper`` / ``left`` / ``right`` (that half is *missing*), ``center`` (the
        central half-size square missing), ``random:P`` (each pixel missing with probability P,
        seeded), ``keep:i,j,...`` (vectors: the listed coordinates observed)."""
        shape = tuple(int(s) for s in shape)
        if name.startswith("keep:"):
            keep = [int(v) for v in name[5:].split(",") if v.strip()]
            m = torch.zeros(int(math.prod(shape)), dtype=torch.bool)
            if not keep or min(keep) < 0 or max(keep) >= m.numel():
                raise ValueError(f"mask {name!r}: indices must lie in [0, {m.numel()})")
            m[keep] = True
            return cls(m.reshape(shape))
        if len(shape) != 3:
            raise ValueError(f"named mask {name!r} needs image data (C, H, W); got event shape {shape}")
        c, h, w = shape
        m = torch.ones(h, w, dtype=torch.bool)
        if name == "lower":
            m[h // 2:] = False
        elif name == "upper":
            m[: h // 2] = False
        elif name == "left":
            m[:, : w // 2] = False
        elif name == "right":
            m[:, w // 2:] = False
        elif name == "center":
            m[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = False
        elif name.startswith("random:"):
            p = float(name.split(":", 1)[1])
            if not 0 <= p < 1:
                raise ValueError(f"mask {name!r}: the missing fraction must lie in [0, 1)")
            m = torch.rand(h, w, generator=torch.Generator().manual_seed(seed)) >= p
        else:
            raise ValueError(f"unknown mask {name!r}; expected lower, upper, left, right, center, random:P, keep:i,j,... or a file")
        return cls(m, channels=c)


class Colorize(_TightOperator):
    """Grey-scale observation of colour images: ``y = mean over channels``, ``(B, C, H, W) -> (B, 1, H, W)``.

    Each row averages ``C`` entries with weight ``1/C``: ``A A^T = I / C``; ``A^+ y`` copies ``y``
    into every channel.
    """

    name = "colorize"

    def __init__(self, shape: Sequence[int]):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 3 or shape[0] < 2:
            raise ValueError(f"colorize needs colour images (C >= 2, H, W); got event shape {shape}")
        self.in_shape = shape
        self.out_shape = (1,) + shape[1:]
        self.gram = 1.0 / shape[0]

    def forward(self, x):
        return x.mean(dim=1, keepdim=True)

    def adjoint(self, y):
        return y.expand(y.shape[0], self.in_shape[0], *y.shape[2:]) / self.in_shape[0]


class Downsample(_TightOperator):
    """Super-resolution: ``y = f x f average pooling``, ``(B, C, H, W) -> (B, C, H/f, W/f)``.

    Each row averages a disjoint ``f x f`` block: ``A A^T = I / f^2``; ``A^+ y`` is nearest-neighbour
    upsampling.
    """

    name = "superres"

    def __init__(self, shape: Sequence[int], factor: int = 2):
        shape = tuple(int(s) for s in shape)
        factor = int(factor)
        if len(shape) != 3 or factor < 1 or shape[1] % factor or shape[2] % factor:
            raise ValueError(f"superres needs images (C, H, W) with H and W divisible by the factor {factor}; got {shape}")
        self.in_shape, self.factor = shape, factor
        self.out_shape = (shape[0], shape[1] // factor, shape[2] // factor)
        self.gram = 1.0 / factor**2

    def forward(self, x):
        return F.avg_pool2d(x, self.factor)

    def adjoint(self, y):
        return F.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2


class MatrixOperator(LinearOperator):
    """An explicit matrix on flattened data: ``y = A vec(x)``, ``A`` of shape ``(M, D)``.

    ``solve`` and ``pinv`` use the eigendecomposition ``A A^T = U diag(l) U^T`` (computed once).
    """

    name = "matrix"

    def __init__(self, matrix: torch.Tensor, in_shape: Sequence[int] | None = None):
        m = torch.as_tensor(matrix, dtype=torch.float64)
        if m.ndim != 2:
            raise ValueError(f"matrix must be 2-D (M, D); got shape {tuple(m.shape)}")
        self.A = m
        self.in_shape = (m.shape[1],) if in_shape is None else tuple(int(s) for s in in_shape)
        if int(math.prod(self.in_shape)) != m.shape[1]:
            raise ValueError(f"in_shape {self.in_shape} does not hold the matrix's {m.shape[1]} columns")
        self.out_shape = (m.shape[0],)
        lam, u = torch.linalg.eigh(m @ m.T)
        self._lam, self._u = lam.clamp(min=0), u

    def _a(self, like):
        return self.A.to(device=like.device, dtype=like.dtype)

    def forward(self, x):
        return x.reshape(x.shape[0], -1) @ self._a(x).T

    def adjoint(self, y):
        return (y @ self._a(y)).reshape(y.shape[0], *self.in_shape)

    def matrix(self, dtype=torch.float64):
        return self.A.to(dtype)

    def gram_eigenvalues(self, dtype=torch.float64):
        return self._lam.to(dtype)

    def solve(self, y, a, b):
        u = self._u.to(device=y.device, dtype=y.dtype)
        lam = self._lam.to(device=y.device, dtype=y.dtype)
        a = torch.as_tensor(a, dtype=y.dtype, device=y.device).reshape(-1, 1)
        b = torch.as_tensor(b, dtype=y.dtype, device=y.device).reshape(-1, 1)
        return ((y @ u) / (a * lam + b)) @ u.T

    def pinv(self, y):
        u = self._u.to(device=y.device, dtype=y.dtype)
        lam = self._lam.to(device=y.device, dtype=y.dtype)
        inv = torch.where(lam > 1e-12 * float(lam.max()), 1.0 / lam.clamp(min=1e-300), torch.zeros_like(lam))
        return self.adjoint(((y @ u) * inv) @ u.T)


OPERATORS = {"inpaint": Mask, "colorize": Colorize, "superres": Downsample, "matrix": MatrixOperator}

__all__ = ["LinearOperator", "Mask", "Colorize", "Downsample", "MatrixOperator", "OPERATORS"]
