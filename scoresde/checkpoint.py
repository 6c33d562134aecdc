"""Checkpoints: atomic writes, ``weights_only`` reads, and rebuilding a trained model.

A checkpoint is a ``dict`` of tensors and plain Python containers only (numbers, strings, lists,
dicts, tuples, ``None``), written with ``torch.save``. That buys two things:

- Safety: :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, which refuses any
  pickled object other than tensors and plain containers instead of running its code; such a file
  raises :class:`CheckpointError`.
- Portability: a user without this package reads it with plain ``torch.load(path)``.

Keys written by :func:`scoresde.training.train`: ``format``, ``format_version``, ``step``, ``config``
(the full training config), ``model_config`` and ``sde_config`` (enough to rebuild both),
``model``, ``ema`` (``{"decay", "warmup", "num_updates", "shadow"}``), ``optimizer``, ``scheduler``,
``rng`` (torch / numpy / python states, as tensors and lists), ``metrics`` and ``versions``.

Writes are atomic: the file goes to a temporary name in the same folder, is flushed to disk, then
renamed over the target with ``os.replace``, so a crash mid-save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

#: marker stored in every checkpoint this package writes
FORMAT = "scoresde-checkpoint"
FORMAT_VERSION = 1

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, unsafe to unpickle, or not ours."""


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``); returns the path."""
    path = Path(path)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict; got {type(state).__name__}")
    _check_plain(state, "state")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort; not every platform opens directories)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


_PLAIN_SCALARS = (bool, int, float, str, type(None))


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would reject, naming where it sits.

    Exact types only: a ``str`` subclass such as ``torch.__version__`` (``TorchVersion``) pickles as
    its class and would make the file unreadable without an allow-list.
    """
    if isinstance(obj, torch.Tensor):
        return
    if type(obj) in _PLAIN_SCALARS:
        return
    if isinstance(obj, dict) and type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if type(k) not in _PLAIN_SCALARS:
                raise ValueError(f"{where} has a key of type {type(k).__name__}; only plain keys can be saved")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise ValueError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only tensors, numbers, "
        "strings, None and lists/tuples/dicts of them (so weights_only loading can read them)"
    )


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` naming the path when the file is missing, truncated or corrupt,
    holds pickled objects other than tensors and plain containers (refused, never executed), or
    is not a scoresde checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors and plain containers, "
            f"and unpickling them could run arbitrary code (torch.load(weights_only=True) said: {_first_line(err)})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError) as err:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or corrupt ({_first_line(err)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a scoresde checkpoint (no format={FORMAT!r} entry)")
    version = state.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {version!r}; this scoresde reads up to {FORMAT_VERSION}")
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _require(state: Dict[str, Any], keys, path: PathLike) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")


def load_model(path: PathLike, *, ema: bool = True, device: Any = "cpu") -> Tuple[torch.nn.Module, Any, Dict[str, Any]]:
    """Rebuild the trained network and its SDE: ``(model in eval mode, sde, training config dict)``.

    With ``ema`` (default) the network carries the exponential-moving-average weights, which are
    what one samples with; ``ema=False`` gives the raw trained weights.
    """
    from .networks import model_from_config
    from .sde import sde_from_config

    state = load_checkpoint(path)
    _require(state, ("model_config", "sde_config", "model", "config"), path)
    if not isinstance(state["model_config"], dict):
        raise CheckpointError(f"checkpoint {path} has no model_config (trained with a network lacking .config); "
                              "build the network yourself and load state['model']")
    model = model_from_config(state["model_config"])
    weights = dict(state["model"])
    if ema:
        if not state.get("ema"):
            raise CheckpointError(f"checkpoint {path} has no EMA weights; pass ema=False for the raw weights")
        weights.update(state["ema"]["shadow"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {path} do not fit the model its config describes: {_first_line(err)}") from None
    model.to(device).eval()
    return model, sde_from_config(state["sde_config"]), state["config"]


def checkpoint_info(path: PathLike) -> Dict[str, Any]:
    """A summary: step, dataset, preset, conditional, SDE and model configs, whether EMA weights exist,
    parameter count, versions."""
    state = load_checkpoint(path)
    config = state.get("config") or {}
    n_params = sum(v.numel() for v in (state.get("model") or {}).values() if isinstance(v, torch.Tensor))
    return {
        "path": str(path),
        "step": state.get("step"),
        "dataset": config.get("dataset"),
        "preset": config.get("model"),
        "conditional": config.get("conditional"),
        "sde": state.get("sde_config"),
        "model": state.get("model_config"),
        "has_ema": bool(state.get("ema")),
        "ema_decay": (state.get("ema") or {}).get("decay"),
        "model_numel": n_params,
        "metrics": state.get("metrics"),
        "versions": state.get("versions"),
        "format_version": state.get("format_version"),
    }


__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "save_checkpoint", "load_checkpoint", "load_model", "checkpoint_info"]
