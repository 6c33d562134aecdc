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

import errno
import os
import pickle
import shutil
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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, no permission, ...); the previous file is intact."""


def _temporary(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.tmp-{pid}")


def save_checkpoint(path: PathLike, state: Dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``); returns the path.

    A failed write removes its temporary, leaves any previous checkpoint at ``path`` whole, and
    raises :class:`CheckpointWriteError` naming the path and the reason (``no space left on device``
    when the disk is full, whether the error came from Python or from torch's C++ writer).
    """
    path = Path(path)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict; got {type(state).__name__}")
    _check_plain(state, "state")
    tmp = _temporary(path, os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        reason = _write_failure(err, path.parent)
        tmp.unlink(missing_ok=True)
        raise CheckpointWriteError(f"could not write checkpoint to {path}: {reason}") from None
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


#: below this many free bytes a failed write is reported as a full disk
_FULL_DISK_BYTES = 1 << 20


def _write_failure(err: BaseException, folder: Path) -> str:
    """The reason a write failed, in words: the OS error's text, or, for torch's C++ writer (which
    drops the errno: ``PytorchStreamWriter failed writing file ...``), a full disk when the folder's
    file system has (almost) no free space left."""
    if isinstance(err, OSError) and err.errno is not None:
        return (err.strerror or os.strerror(err.errno)).lower()
    try:
        if shutil.disk_usage(folder).free < _FULL_DISK_BYTES:
            return os.strerror(errno.ENOSPC).lower()
    except OSError:
        pass
    return _first_line(err)


def clean_temporaries(path: PathLike, *, all_pids: bool = False) -> list:
    """Remove the temporaries ``.NAME.tmp-PID`` that interrupted :func:`save_checkpoint` calls left
    next to ``path``: those whose process is gone, or all of them with ``all_pids`` (for a caller
    that holds the run directory's lock, so no other writer can be active). Returns the paths removed."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not all_pids and pid.isdigit() and _alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


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
    from .diffusers_io import looks_like_safetensors, safetensors_message

    if looks_like_safetensors(path):
        raise CheckpointError(safetensors_message(path))
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
    what one samples with; ``ema=False`` gives the raw trained weights. A network trained with
    ``prediction`` x0, v or edm is returned wrapped as ``model(x, t) -> eps``
    (:func:`scoresde.adapters.trained_eps_model`; the raw network is its ``.net``).
    """
    from .networks import model_from_config
    from .sde import sde_from_config

    state = load_checkpoint(path)
    _require(state, ("model_config", "sde_config", "model", "config"), path)
    _check_entries(state, path)
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
    sde = sde_from_config(state["sde_config"])
    # a network trained on x0 / v / EDM targets comes back wrapped as model(x, t) -> eps; old checkpoints are eps
    from .adapters import trained_eps_model

    return trained_eps_model(model, sde, state["config"]), sde, state["config"]


def _check_entries(state: Dict[str, Any], path: PathLike) -> None:
    """Refuse entries of the wrong kind with one line naming the entry, what it should be and what it is."""

    def bad(key: str, expected: str) -> CheckpointError:
        value = state[key]
        return CheckpointError(f"checkpoint {path} has a malformed {key!r} entry: expected {expected}; "
                               f"got {type(value).__name__}")

    def tensors(d: Any) -> bool:
        return isinstance(d, dict) and all(isinstance(v, torch.Tensor) for v in d.values())

    for key in ("config", "model_config", "sde_config", "metrics", "versions"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise bad(key, "a dict")
    if "step" in state and (isinstance(state["step"], bool) or not isinstance(state["step"], int)):
        raise bad("step", "an integer")
    if "model" in state and not tensors(state["model"]):
        raise bad("model", "a dict of tensors")
    ema = state.get("ema")
    if ema:
        decay = ema.get("decay") if isinstance(ema, dict) else None
        if (not isinstance(ema, dict) or not tensors(ema.get("shadow"))
                or isinstance(decay, bool) or not isinstance(decay, (int, float))):
            raise bad("ema", "a dict with a number 'decay' and a dict of tensors 'shadow'")


def checkpoint_info(path: PathLike) -> Dict[str, Any]:
    """A summary: step, dataset, preset, conditional, SDE and model configs, whether EMA weights exist,
    parameter count, versions. A malformed entry raises :class:`CheckpointError` naming it."""
    state = load_checkpoint(path)
    _check_entries(state, path)
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


__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "CheckpointWriteError", "save_checkpoint", "load_checkpoint",
           "load_model", "checkpoint_info", "clean_temporaries"]
