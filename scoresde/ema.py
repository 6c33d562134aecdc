"""Exponential moving average of a model's weights (Polyak averaging; as used by DDPM and NCSN++).

After every optimiser step::

    shadow <- d_n shadow + (1 - d_n) theta,      d_n = min(decay, (1 + n) / (10 + n))  (with warmup)

where ``n`` counts updates. The warmup (TensorFlow's ``ExponentialMovingAverage(num_updates=...)``)
lets the average forget the random initialisation quickly, which matters for runs of a few thousand
steps: with ``decay = 0.999`` and no warmup the initial weights still carry ``0.999^n`` of the mass
(37% after 1000 steps). Buffers (e.g. normalisation statistics) are copied, not averaged.

The state is plain tensors and numbers, so it stores in a ``weights_only`` checkpoint. Under
data-parallel training every rank applies the same update to identical parameters, so the averages
stay identical without communication.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch
from torch import nn


class EMA:
    """An exponential moving average of ``model``'s parameters.

    Args:
        model: the trained module (its parameter names key the shadow copy).
        decay: the asymptotic decay ``d`` in ``[0, 1)``.
        warmup: use ``d_n = min(decay, (1 + n) / (10 + n))``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1); got {decay}")
        self.decay, self.warmup, self.num_updates = decay, bool(warmup), 0
        self.shadow: Dict[str, torch.Tensor] = {
            k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad
        }

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """``shadow <- d shadow + (1 - d) theta`` for every trainable parameter."""
        d = self.current_decay()
        params = dict(model.named_parameters())
        shadows = list(self.shadow.values())
        current = [params[k].detach() for k in self.shadow]
        torch._foreach_lerp_(shadows, current, 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters with the averages."""
        params = dict(model.named_parameters())
        for k, v in self.shadow.items():
            params[k].copy_(v)

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averages into ``model`` (restored on exit), e.g. to draw samples."""
        backup = {k: p.detach().clone() for k, p in model.named_parameters() if k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, v in backup.items():
                    params[k].copy_(v)

    def averaged_state_dict(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """``model.state_dict()`` with the averaged parameters in place of the live ones."""
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for k, v in self.shadow.items():
            state[k] = v.detach().clone()
        return state

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": {k: v.detach().clone() for k, v in self.shadow.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        extra = set(state["shadow"]) - set(self.shadow)
        if missing or extra:
            raise ValueError(f"EMA state does not match the model: missing {sorted(missing)}, unexpected {sorted(extra)}")
        self.decay, self.warmup = float(state["decay"]), bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
        with torch.no_grad():
            for k, v in state["shadow"].items():
                self.shadow[k].copy_(v)


__all__ = ["EMA"]
