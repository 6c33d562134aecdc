"""Plumbing shared by the commands: one-line errors, ``key=value`` parsing, TOML configs, fixed-size model calls.

Nothing here computes anything about diffusion; it turns command-line text into the plain values
the library functions take, and library exceptions into one-line messages.
"""

from __future__ import annotations

import ast
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import typer

#: set to 1 to see the full traceback of an error instead of the one-line message
DEBUG_ENV = "SCORESDE_DEBUG"


class UserError(ValueError):
    """A mistake in what the user asked for, detected by the CLI itself."""


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``Error: message`` (one line) to stderr and return the Exit to raise."""
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn every exception escaping a command into ``Error: <first line>`` on stderr and exit code 1.

    Library errors (``ValueError`` and its ``CheckpointError``, ``FileNotFoundError``, the sampler's
    ``TypeError`` for unknown knobs, ``SamplingError``) are the expected ones; anything else is
    reported the same way, marked as unexpected, with a hint to rerun with ``SCORESDE_DEBUG=1``.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        typer.echo("Error: interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as err:  # noqa: BLE001 - the command boundary: never show a traceback
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        expected = isinstance(err, (ValueError, TypeError, OSError, RuntimeError, KeyError))
        if isinstance(err, FileNotFoundError) and err.filename is not None:
            msg = f"no such file: {err.filename}"
        elif isinstance(err, KeyError):
            msg = f"missing entry {_first_line(err)}"
        else:
            msg = _first_line(err)
        if not expected:
            msg = f"unexpected {type(err).__name__}: {msg} (rerun with {DEBUG_ENV}=1 for the traceback)"
        raise fail(msg) from None


def parse_value(text: str) -> Any:
    """A literal from command-line text: int, float, bool, None, tuple/list, or else the string itself.

    ``true``/``false``/``none`` are accepted in any case; quoted text stays a string.
    """
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_pairs(pairs: Optional[Sequence[str]], what: str) -> Dict[str, Any]:
    """``["a=1", "b=x"] -> {"a": 1, "b": "x"}``; ``what`` names the option in errors."""
    out: Dict[str, Any] = {}
    for item in pairs or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UserError(f"{what} expects key=value; got {item!r}")
        out[key] = parse_value(value)
    return out


def check_writable_dir(path: Path, what: str = "--out") -> Path:
    """Make sure ``path`` is (or can be created as) a directory this process can write files in.

    Creates missing directories (as the command would when it writes), then creates and deletes a
    probe file in it, so a read-only or virtual file system (``/proc``) fails here, before any
    expensive work, with one line naming the option and the reason. Returns ``path``.
    """
    import tempfile

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {what} {path}: {(err.strerror or str(err)).lower()}") from None
    return path


def check_writable_file(path: Path, what: str = "--out") -> Path:
    """Make sure the file ``path`` can be written: its folder passes :func:`check_writable_dir` and
    ``path`` is not a directory, nor an existing file this process may not write. The file itself is
    neither created nor changed. Returns ``path``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory; expected a file name")
    check_writable_dir(path.parent if str(path.parent) else Path("."), what=f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"cannot write to {what} {path}: permission denied")
    return path


def grid_drawer(sampler: str, steps: int, seed: int):
    """The trainer's ``draw`` (:data:`scoresde.training.DrawFn`): :func:`solvers.sample` with this
    sampler, steps and seed; returns the samples. The core package does not import ``solvers``: the
    CLI (or a library user) hands this in."""
    import solvers

    def draw(model, sde, shape, *, device=None, model_kwargs=None):
        kwargs = {} if model_kwargs is None else {"model_kwargs": model_kwargs}
        return solvers.sample(model, sde, shape, sampler=sampler, steps=steps, generator=seed, device=device,
                              **kwargs).x

    return draw


def load_toml(path: Path) -> Dict[str, Any]:
    """Read a TOML file into a dict (``tomllib`` on Python >= 3.11, else ``tomli`` when installed)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError("reading TOML configs on Python 3.10 needs the 'tomli' package (pip install tomli)") from None
    if not path.is_file():
        raise UserError(f"no config file at {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML: {_first_line(err)}") from None


def merge_config(base: Dict[str, Any], layers: List[Dict[str, Any]], known: Sequence[str], source: List[str]) -> Dict[str, Any]:
    """``base`` updated by each layer in order; keys outside ``known`` raise naming them and their source.

    Dict-valued fields (``sde_kwargs``, ``model_kwargs``) are merged key by key, so a file may set
    ``beta_max`` and the command line ``beta_min`` without one wiping the other.
    """
    out = dict(base)
    for layer, where in zip(layers, source):
        unknown = sorted(set(layer) - set(known))
        if unknown:
            raise UserError(f"unknown key(s) {unknown} in {where}; known keys: {', '.join(sorted(known))}")
        for k, v in layer.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = {**out[k], **v}
            else:
                out[k] = v
    return out

