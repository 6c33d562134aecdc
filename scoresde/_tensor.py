"""Small tensor helpers shared by the package: broadcasting per-sample scalars and input checks."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Union

import torch

Number = Union[float, int]
TimeLike = Union[torch.Tensor, float, int]

_CHECKS = contextvars.ContextVar("scoresde_checks", default=True)


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample ``(B,)`` tensor broadcasts against ``(B, ...)``.

    Works for any data rank (vectors, images, video); never hard-codes the rank.
    """
    missing = ndim - v.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of rank {v.ndim} to rank {ndim}")
    return v.reshape(v.shape + (1,) * missing)


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def checks_enabled() -> bool:
    return _CHECKS.get()


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Skip per-call range checks inside hot loops whose inputs were validated once.

    Each range check costs a host synchronisation on CUDA; samplers validate their time grid
    once and then evaluate the SDE inside this context.
    """
    token = _CHECKS.set(False)
    try:
        yield
    finally:
        _CHECKS.reset(token)


def as_time(t: TimeLike, like: torch.Tensor | None = None) -> torch.Tensor:
    """Turn ``t`` (tensor, float or int) into a floating tensor, on ``like``'s device and dtype if given."""
    if not isinstance(t, torch.Tensor):
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
        device = like.device if like is not None else None
        return torch.as_tensor(float(t), dtype=dtype, device=device)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if like is not None and (t.device != like.device):
        t = t.to(like.device)
    return t


def check_time(t: torch.Tensor, T: float, name: str = "t") -> None:
    """Raise ``ValueError`` naming ``name`` when any entry lies outside ``[0, T]`` or is not finite."""
    if not checks_enabled():
        return
    slack = 1e-6 * max(T, 1.0)
    bad = ~torch.isfinite(t) | (t < -slack) | (t > T + slack)
    if bool(bad.any()):
        lo, hi = float(t.min()), float(t.max())
        raise ValueError(f"{name} must lie in [0, T={T:g}]; got values in [{lo:g}, {hi:g}]")


def check_positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return value
