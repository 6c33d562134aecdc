"""The sampler registry: one typed record per sampler, and the one place where options are checked.

A sampler is an implementation ``fn(run, steps, options) -> Tensor`` (``run`` a :class:`solvers.base.Run`
holding the model, the SDE, ``x_T``, the noise, the callback, the progress flag and the state hook)
plus a :class:`Sampler` record naming it, its frozen options dataclass, its default number of
steps, the SDE methods it needs and whether it is stochastic. Every record is called the same way::

    REGISTRY["ddim"](model, sde, x_T, steps=50, generator=0, eta=0.5)

and :func:`register` adds one from outside the package (a new sampler is one file plus one record).

Options are frozen dataclasses derived from :class:`SamplerOptions`. Each field's type annotation is
its type check (``bool``, ``int``, ``float``, ``str``, ``Optional[...]``, ``Tuple[float, float]``;
``Any`` is checked by the class's own :meth:`SamplerOptions.check`), a field's ``metadata["choices"]``
lists its allowed values and ``metadata["help"]`` describes it for ``scoresde samplers``.
:meth:`Sampler.options` turns ``key=value`` knobs (from Python or the command line) into an instance,
raising one ``TypeError`` for unknown knobs and one ``ValueError`` naming the first bad value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type

import torch

from scoresde.sde import SDE

from .base import SCHEDULES, Run

Tensor = torch.Tensor


def knob(default: Any, help: str = "", choices: Optional[Tuple[Any, ...]] = None) -> Any:
    """A dataclass field of an options class: its default, a one-line ``help`` and allowed ``choices``."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, metadata=meta)


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the annotation ``kind``; ints are accepted (and converted) for floats,
    lists for tuples. Raises ``ValueError`` naming the knob."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin is typing.Union:  # Optional[X] and other unions: the first member that accepts it
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, member)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{name} must not be {value!r}")
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer; got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string; got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)) or (args and args[-1] is not Ellipsis and len(value) != len(args)):
            raise ValueError(f"{name} must be a tuple of {len(args)} values; got {value!r}")
        kinds = [args[0]] * len(value) if args and args[-1] is Ellipsis else list(args) or [Any] * len(value)
        return tuple(_coerce(name, v, k) for v, k in zip(value, kinds))
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a dict; got {value!r}")
        return dict(value)
    return value


@dataclass(frozen=True)
class SamplerOptions:
    """Base of every sampler's options. Subclasses add typed fields (see :func:`knob`) and may
    override :meth:`check` for rules across fields; instances are immutable."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints.get(f.name, Any))
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {list(choices)}; got {value!r}")
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules that involve several fields, or values the annotation cannot express."""

    def replace(self, **changes: Any) -> "SamplerOptions":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class GridOptions(SamplerOptions):
    """Options of every fixed-step sampler: where its time grid comes from and how it ends."""

    schedule: str = knob("uniform", "time grid: a name in solvers.SCHEDULES", tuple(SCHEDULES))
    t_min: Optional[float] = knob(None, "last time of the grid (default: the SDE's t_min)")
    t_grid: Any = knob(None, "explicit grid: steps + 1 strictly decreasing times in (0, T] (replaces schedule and t_min)")
    denoise_final: bool = knob(True, "return Tweedie's x0 estimate at the last time")

    def check(self) -> None:
        if self.t_min is not None and not self.t_min > 0:
            raise ValueError(f"t_min must be positive; got {self.t_min!r}")

    def grid(self, sde: SDE, steps: int) -> Tensor:
        """The ``steps + 1`` float64 times this run walks: ``t_grid`` when given, else
        :func:`solvers.base.time_grid` of ``schedule``."""
        from .base import explicit_grid, time_grid

        if self.t_grid is not None:
            return explicit_grid(sde, self.t_grid, steps, self.t_min)
        return time_grid(sde, steps, self.schedule, t_min=self.t_min)


Implementation = Callable[[Run, int, Any], Tensor]


@dataclass(frozen=True)
class Sampler:
    """One registry record.

    ``name``; ``fn(run, steps, options) -> x_0``; ``options_type`` (a :class:`SamplerOptions`
    subclass); ``default_steps``; ``stochastic`` (draws noise after ``x_T`` with its default
    options: ``ddim`` does only with ``eta > 0``); ``requires`` (SDE
    methods asked at ``t_min`` and ``T`` before the run, so an SDE lacking one fails with a
    message naming it); ``supports_hook`` (calls ``state_hook`` after every step); ``summary``
    (one line for ``scoresde samplers``); ``nfe`` (network evaluations as a formula, for the docs).
    """

    name: str
    fn: Implementation
    options_type: Type[SamplerOptions]
    default_steps: int
    stochastic: bool
    requires: Tuple[str, ...] = ("alpha", "std")
    supports_hook: bool = True
    summary: str = ""
    nfe: str = "steps"

    def options(self, knobs: Optional[Mapping[str, Any]] = None, **more: Any) -> SamplerOptions:
        """The options instance for ``knobs``: the one place where sampler knobs are checked.

        An instance of ``options_type`` is passed through unchanged. Unknown keys raise
        ``TypeError`` naming them and the accepted ones; bad values ``ValueError``.
        """
        if isinstance(knobs, self.options_type) and not more:
            return knobs
        given = {**dict(knobs or {}), **more}
        known = [f.name for f in dataclasses.fields(self.options_type)]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise TypeError(f"sampler {self.name!r} got unknown option(s) {unknown}; it accepts {sorted(known)}")
        return self.options_type(**given)

    def defaults(self) -> Dict[str, Any]:
        """``{knob: default}`` of every option."""
        return self.options_type().as_dict()

    def describe(self) -> Dict[str, Tuple[Any, str]]:
        """``{knob: (default, help)}`` for ``scoresde samplers``."""
        out = {}
        for f in dataclasses.fields(self.options_type):
            helptext = f.metadata.get("help", "")
            if "choices" in f.metadata:
                helptext += f" (one of {', '.join(map(str, f.metadata['choices']))})"
            out[f.name] = (f.default, helptext)
        return out

    def __call__(
        self,
        model: Callable[..., Tensor],
        sde: SDE,
        x_T: Tensor,
        *,
        steps: Optional[int] = None,
        generator: Any = None,
        callback: Optional[Callable[[Dict[str, Any]], None]] = None,
        progress: bool = False,
        state_hook: Optional[Callable[..., Optional[Tensor]]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        **knobs: Any,
    ) -> Tensor:
        """Run the sampler from ``x_T`` (``(B, ...)``) and return ``x_0``.

        ``steps`` (default :attr:`default_steps`); ``generator`` (``None``, an int seed, a
        ``torch.Generator`` or a :class:`scoresde.noise.SampleNoise`: noise per sample);
        ``callback(info)`` after every step with ``{"step", "t", "x", "denoised"}``;
        ``state_hook(step) -> Optional[Tensor]`` after every step with a :class:`solvers.base.Step`,
        returning a replacement state or ``None`` (only where :attr:`supports_hook`);
        ``model_kwargs`` passed to every model call; ``knobs`` the options (see :meth:`options`).
        """
        opts = self.options(knobs)
        given = steps is not None
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer; got {steps!r}")
        if state_hook is not None and not self.supports_hook:
            raise ValueError(f"sampler {self.name!r} cannot act on the state between steps (it takes no state hook); "
                             f"use one of {sorted(n for n, s in REGISTRY.items() if s.supports_hook)}")
        run = Run(model, sde, x_T, generator, callback, progress, model_kwargs, state_hook)
        run.steps_given = given
        require(sde, self.name, *self.requires)
        return self.fn(run, steps, opts)


def require(sde: SDE, sampler: str, *methods: str) -> None:
    """Ask ``sde`` for each method at its own ``t_min`` / ``T``; raise ``ValueError`` naming the
    first one it cannot answer (no ``isinstance`` over SDE types)."""
    probe = torch.tensor([float(sde.t_min), float(sde.T)], dtype=torch.float64)
    for name in methods:
        fn = getattr(sde, name, None)
        try:
            if fn is None:
                raise NotImplementedError
            if name in ("t_from_log_snr", "t_from_sigma"):
                arg = sde.log_snr(probe) if name == "t_from_log_snr" else sde.sigma(probe)
                out = fn(arg)
            elif name == "sde":
                out = fn(torch.ones(2, 1, dtype=torch.float64), probe)[1]
            elif name == "transition":
                out = fn(probe[:1], probe[1:])[1]
            else:
                out = fn(probe)
            if not bool(torch.isfinite(torch.as_tensor(out)).all()):
                raise NotImplementedError
        except (NotImplementedError, AttributeError, TypeError):
            raise ValueError(
                f"sampler {sampler!r} needs sde.{name}() to be defined and finite on [t_min, T]; "
                f"{type(sde).__name__} does not provide it"
            ) from None


#: name -> record: the single registry read by :func:`solvers.sample`, the CLI, the docs and the experiments.
REGISTRY: Dict[str, Sampler] = {}


def register(record: Sampler, *, replace: bool = False) -> Sampler:
    """Add ``record`` to :data:`REGISTRY` (``replace=True`` to overwrite a name) and return it."""
    if not isinstance(record, Sampler):
        raise TypeError(f"register expects a solvers.Sampler record; got {type(record).__name__}")
    if not (isinstance(record.options_type, type) and issubclass(record.options_type, SamplerOptions)):
        raise TypeError(f"{record.name}: options_type must be a SamplerOptions subclass")
    if record.name in REGISTRY and not replace:
        raise ValueError(f"a sampler named {record.name!r} is already registered (pass replace=True)")
    record.options_type()  # the defaults must pass their own checks
    REGISTRY[record.name] = record
    return record


def get(name: str) -> Sampler:
    """The record of ``name``; ``ValueError`` listing the registered names otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(REGISTRY)}") from None
