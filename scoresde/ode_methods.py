"""torchdiffeq's method names, and which of them choose their own steps.

torchdiffeq's public API takes a method by name (``odeint(..., method="dopri5")``) but exposes no
table of names, so the names it documents are listed here, once, for both the likelihood and the
``ode`` sampler: ``True`` for the adaptive (error-controlled) methods, ``False`` for the fixed-grid
ones, which need a grid or ``options={"step_size": h}``.
"""

from __future__ import annotations

from typing import Dict

#: method name -> True when adaptive
ODE_METHODS: Dict[str, bool] = {
    "dopri8": True, "dopri5": True, "bosh3": True, "fehlberg2": True, "adaptive_heun": True,
    "euler": False, "midpoint": False, "heun2": False, "heun3": False, "rk4": False,
    "explicit_adams": False, "implicit_adams": False, "fixed_adams": False,
}


def is_adaptive(method: str) -> bool:
    """Whether ``method`` chooses its own steps; ``ValueError`` naming the known methods otherwise."""
    try:
        return ODE_METHODS[method]
    except KeyError:
        raise ValueError(f"method must be a torchdiffeq solver, one of {sorted(ODE_METHODS)}; got {method!r}") from None
