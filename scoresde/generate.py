"""Generating many samples: fixed-size network calls, per-sample noise, one progress bar, shards on disk.

:func:`generate` draws the samples with global ids ``ids`` (``0..n-1`` for a plain ``n``) in
batches. Sample ``i`` takes all its randomness from ``SampleNoise(seed, [i])`` (its prior draw
``x_T`` is stream 0, a stochastic sampler's step noise the later streams), and with
:class:`FixedChunk` every network call is made on exactly ``chunk`` rows, so sample ``i``'s bits
do not depend on ``batch_size``, on which other ids are drawn with it, or on how a run is split
over processes.

:func:`generate_shards` writes ``n`` samples as shard files ``shard-KKKKKK.pt`` of ``shard_size``
samples each (shard ``k`` holds ids ``[k s, min((k + 1) s, n))``). Under ``torchrun`` (``RANK`` /
``WORLD_SIZE`` in the environment) rank ``r`` of ``W`` takes the contiguous block of shards
``[r S / W, (r + 1) S / W)`` (``S`` shards in all); no communication is needed to draw, and a
process group, when one is initialised (gloo on CPU, NCCL on CUDA), is only used for a closing
barrier. Each shard is written to a temporary file and moved into place with ``os.replace``, so a
shard file is either absent or complete; a rerun validates the shards present (loadable with
``weights_only=True``, the ids, shape, dtype and run fingerprint expected) and draws only the
missing or invalid ones. Because of the per-sample noise the concatenated shards of a W-process
run equal, bit for bit, one process drawing the same ids (same device type and ``chunk``).

Mixed precision (``autocast="bf16" | "fp16"``) runs only the network under :func:`torch.autocast`;
its output is cast back to the state's dtype (:class:`AutocastModel`), so the solver's arithmetic
and state stay in float32 (or float64 when the state is float64).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .noise import SampleNoise

#: autocast names -> dtypes
AUTOCAST_DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHARD_FORMAT = 1
MANIFEST = "manifest.json"


class FixedChunk:
    """Call ``model`` on chunks of exactly ``size`` samples, padding the last chunk with copies of its last row.

    Floating-point kernels (GEMV vs GEMM, blocked convolutions) round differently for different
    batch sizes, so ``model(x)[i]`` depends on ``len(x)`` in its last bits. With every call made at
    one fixed size, sample i's network outputs, and hence its whole trajectory under per-sample
    noise, are the same bits whatever batch it is drawn in.

    Every positional and keyword argument that is a tensor with the batch's leading size (``t``,
    class labels ``y``, passed by position as :class:`~scoresde.networks.ClassifierFreeGuidance`
    does or by keyword) is chunked alongside ``x``; a 0-dim ``t`` is expanded to the batch; other
    arguments pass through unchanged. ``size <= 0`` calls ``model`` directly.
    """

    def __init__(self, model: Callable[..., torch.Tensor], size: int):
        self.model, self.size = model, int(size)

    def __getattr__(self, name: str) -> Any:  # num_classes, config, parameters() ... of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor, t: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        b, c = x.shape[0], self.size
        if c <= 0 or b == c:
            return self.model(x, t, *args, **kwargs)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t

        def piece(v: Any, i: int) -> Any:
            if not (isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b):
                return v
            v = v[i : i + c]
            n = v.shape[0]
            return v if n == c else torch.cat([v, v[-1:].expand(c - n, *v.shape[1:])])

        outs = []
        for i in range(0, b, c):
            out = self.model(piece(x, i), piece(t, i), *(piece(a, i) for a in args),
                             **{k: piece(v, i) for k, v in kwargs.items()})
            outs.append(out[: min(c, b - i)])
        return torch.cat(outs)


class AutocastModel:
    """Run ``model`` under ``torch.autocast(device_type, dtype)`` and return its output in ``x``'s dtype.

    The solver's state, times and arithmetic stay in the caller's precision; only the network's
    matrix products and convolutions run in ``dtype`` (bfloat16 or float16).
    """

    def __init__(self, model: Callable[..., torch.Tensor], dtype: torch.dtype):
        self.model, self.dtype = model, dtype

    def __getattr__(self, name: str) -> Any:
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x: torch.Tensor, t: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            eps = self.model(x, t, *args, **kwargs)
        return eps.to(x.dtype)


def default_chunk(device: Union[torch.device, str]) -> int:
    """The fixed network-call size used when ``chunk`` is None: 512 on CUDA (launch-bound), 16 elsewhere."""
    return 512 if torch.device(device).type == "cuda" else 16


def _device_of(model: Any) -> torch.device:
    try:
        return next(iter(model.parameters())).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _as_ids(ids_or_n: Union[int, Sequence[int], torch.Tensor, range]) -> torch.Tensor:
    if isinstance(ids_or_n, bool):
        raise ValueError(f"ids_or_n must be a positive count or a 1-D sequence of sample ids; got {ids_or_n!r}")
    if isinstance(ids_or_n, int):
        if ids_or_n < 1:
            raise ValueError(f"the number of samples must be positive; got {ids_or_n}")
        return torch.arange(ids_or_n, dtype=torch.int64)
    if isinstance(ids_or_n, range):
        ids = torch.arange(ids_or_n.start, ids_or_n.stop, ids_or_n.step, dtype=torch.int64)
    else:
        ids = torch.as_tensor(ids_or_n)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"sample ids must be integers; got dtype {ids.dtype}")
        ids = ids.to(torch.int64).cpu()
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"sample ids must be a non-empty 1-D sequence; got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0:
        raise ValueError("sample ids must be non-negative")
    return ids


def wrap_model(
    model: Callable[..., torch.Tensor],
    *,
    chunk: int = 0,
    guidance: float = 1.0,
    null_label: Optional[int] = None,
    autocast: Optional[str] = None,
) -> Callable[..., torch.Tensor]:
    """The model :func:`generate` hands to the sampler: ``CFG(Autocast(FixedChunk(model)))``.

    Classifier-free guidance (when ``guidance != 1``) is outermost, so its combination
    ``eps_u + w (eps_c - eps_u)`` is made in the state's precision; the guided model's doubled
    batch ``[x; x]`` is cut into fixed chunks like any other call.
    """
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}; got {autocast!r}")
    wrapped: Callable[..., torch.Tensor] = FixedChunk(model, chunk) if chunk else model
    if autocast is not None:
        wrapped = AutocastModel(wrapped, AUTOCAST_DTYPES[autocast])
    if guidance != 1.0:
        from .networks import ClassifierFreeGuidance

        if null_label is None:
            null_label = getattr(model, "num_classes", None)
        if null_label is None:
            raise ValueError("guidance needs a class-conditional model (one with num_classes) or an explicit null_label")
        wrapped = ClassifierFreeGuidance(wrapped, guidance, null_label=null_label)
    return wrapped


@dataclass
class GenerateResult:
    """What :func:`generate` returns.

    Attributes:
        x: ``(N, *shape)`` samples on the CPU, in the order of the ids asked for.
        ids: ``(N,)`` int64 global sample ids.
        nfe: network evaluations summed over the batches (guidance's doubled call counts once).
        batches: number of sampler runs.
        first: the first batch's :class:`solvers.SampleResult` when ``keep_trajectory`` (its
            ``trajectory`` / ``denoised`` / ``times``), else None.
    """

    x: torch.Tensor
    ids: torch.Tensor
    nfe: int
    batches: int
    first: Any = None

    @property
    def nfe_per_batch(self) -> float:
        return self.nfe / max(1, self.batches)


def generate(
    model: Callable[..., torch.Tensor],
    sde: Any,
    shape: Sequence[int],
    ids_or_n: Union[int, Sequence[int], torch.Tensor, range],
    *,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 64,
    chunk: Optional[int] = None,
    label: Union[None, int, torch.Tensor] = None,
    guidance: float = 1.0,
    null_label: Optional[int] = None,
    model_kwargs_fn: Optional[Callable[[torch.Tensor], Dict[str, Any]]] = None,
    autocast: Optional[str] = None,
    device: Optional[Union[torch.device, str]] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = False,
    keep_trajectory: bool = False,
    **knobs: Any,
) -> GenerateResult:
    """Draw the samples with global ids ``ids_or_n`` (an int ``n`` means ids ``0..n-1``) in batches.

    Batch ``j`` covers ids ``ids[j B : (j + 1) B]`` and runs ``solvers.sample`` with
    ``generator=SampleNoise(seed, those ids)``; the network is called through :func:`wrap_model`.
    The result is a deterministic function of ``(model, sde, shape, ids, sampler, steps, seed,
    chunk, knobs, label, guidance, autocast, device type)``: ``batch_size`` only trades memory for
    speed.

    Args:
        model: ``model(x, t, **model_kwargs) -> eps``.
        sde: the SDE the model was trained with.
        shape: per-sample shape, e.g. ``(3, 32, 32)``.
        ids_or_n: a positive count, or a non-empty 1-D sequence / tensor / ``range`` of ids.
        sampler, steps: as in :func:`solvers.sample` (None: its defaults).
        seed: the noise seed.
        batch_size: samples per sampler run.
        chunk: rows per network call (:class:`FixedChunk`); None: :func:`default_chunk` of the
            device; 0: one call on the whole batch (faster, but last-bit rounding then depends on
            the batch size).
        label: class label(s) for a conditional model: an int for every sample, or an ``(N,)``
            tensor aligned with the ids. Passed as ``model_kwargs={"y": ...}``.
        guidance: classifier-free guidance scale ``w`` (1: plain conditional); needs ``label``.
        null_label: the "no class" label for guidance (default ``model.num_classes``).
        model_kwargs_fn: ``fn(batch_ids) -> dict`` of extra model keyword arguments per batch
            (merged with the label's ``y``).
        autocast: None, ``"bf16"`` or ``"fp16"``: the network's precision (the state stays in
            ``dtype``).
        device: where the state lives (default: the model's device).
        dtype: the state's dtype (default ``torch.get_default_dtype()``).
        progress: one bar over all N samples (advanced per finished batch).
        keep_trajectory: keep the first batch's trajectory in ``result.first``.
        knobs: sampler knobs (``schedule``, ``eta``, ``order``, ``t_grid`` ...).

    Returns:
        :class:`GenerateResult` with ``x`` ``(N, *shape)`` on the CPU and the total NFE.
    """
    import solvers

    ids = _as_ids(ids_or_n)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    shape = tuple(int(s) for s in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be a non-empty per-sample shape with positive sizes; got {shape}")
    if "model_kwargs" in knobs:
        raise ValueError("pass per-batch model keyword arguments through model_kwargs_fn (or label=), not model_kwargs")
    if label is None and guidance != 1.0:
        raise ValueError("guidance needs a label (the class to guide towards)")
    n = ids.numel()
    labels: Optional[torch.Tensor] = None
    if label is not None:
        labels = torch.as_tensor(label, dtype=torch.long)
        labels = labels.expand(n) if labels.ndim == 0 else labels
        if labels.shape != (n,):
            raise ValueError(f"label must be an int or a tensor of {n} labels; got shape {tuple(labels.shape)}")
        k = getattr(model, "num_classes", None)
        if k is not None and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"labels must lie in 0..{k - 1}; got {int(labels.min())}..{int(labels.max())}")
    dev = torch.device(device) if device is not None else _device_of(model)
    chunk = default_chunk(dev) if chunk is None else int(chunk)
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0; got {chunk}")
    net = wrap_model(model, chunk=chunk, guidance=guidance, null_label=null_label, autocast=autocast)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="sample", desc=f"{sampler or 'default sampler'}", dynamic_ncols=True)
    parts: List[torch.Tensor] = []
    nfe, batches, first = 0, 0, None
    try:
        for start in range(0, n, batch_size):
            bid = ids[start : start + batch_size]
            b = bid.numel()
            kw: Dict[str, Any] = dict(knobs)
            mk: Dict[str, Any] = dict(model_kwargs_fn(bid)) if model_kwargs_fn is not None else {}
            if labels is not None:
                mk["y"] = labels[start : start + b].to(dev)
            if mk:
                kw["model_kwargs"] = mk
            if sampler is not None:
                kw["sampler"] = sampler
            keep = keep_trajectory and start == 0
            res = solvers.sample(net, sde, (b, *shape), steps=steps, generator=SampleNoise(seed, bid), device=dev,
                                 dtype=dtype, progress=False, keep_trajectory=keep, **kw)
            parts.append(res.x.detach().cpu())
            nfe += int(res.nfe)
            batches += 1
            if keep:
                first = res
            if bar is not None:
                bar.update(b)
                bar.set_postfix(nfe=nfe, refresh=False)
    finally:
        if bar is not None:
            bar.close()
    return GenerateResult(x=torch.cat(parts), ids=ids, nfe=nfe, batches=batches, first=first)


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------
def dist_env() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)``: from an initialised process group when there is one,
    else from ``torchrun``'s ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (``(0, 1, 0)`` without them)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), local
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local


def local_device(device: Union[torch.device, str]) -> torch.device:
    """The device a rank should sample on: ``cuda:LOCAL_RANK`` when ``device`` is CUDA without an
    index under ``torchrun``, else ``device`` itself. ``"auto"`` means CUDA when available, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_ranges(n: int, shard_size: int) -> List[Tuple[int, int]]:
    """``[(start, stop), ...]`` of every shard: shard ``k`` holds ids ``[k s, min((k + 1) s, n))``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer; got {shard_size!r}")
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def rank_shards(num_shards: int, rank: int, world_size: int) -> range:
    """The contiguous block of shard indices of ``rank``: ``[r S / W, (r + 1) S / W)`` (floor division),
    so the ranks' id ranges are contiguous, disjoint and cover ``0..n-1``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..world_size-1; got rank {rank} of {world_size}")
    return range(rank * num_shards // world_size, (rank + 1) * num_shards // world_size)


def shard_path(out_dir: Union[str, os.PathLike], k: int) -> Path:
    return Path(out_dir) / f"shard-{k:06d}.pt"


def _plain(v: Any) -> Any:
    """JSON stand-in for a setting: tensors as lists, dataclasses as dicts, else ``str`` (no addresses)."""
    import dataclasses

    if isinstance(v, torch.Tensor) or type(v).__module__ == "numpy":
        return v.tolist()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    text = str(v)
    if " at 0x" in text:
        raise ValueError(f"setting {text} has no stable text form to record in the shard manifest")
    return text


def _fingerprint(settings: Mapping[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_shard(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Load a shard file (``weights_only=True``: plain tensors and numbers, never code).

    Returns ``{"x": (m, *shape) tensor, "start": int, "stop": int, "fingerprint": str, "format": int}``;
    raises ``ValueError`` naming the file when it is not a complete shard.
    """
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is an invalid shard
        raise ValueError(f"{path} is not a readable shard ({type(err).__name__})") from None
    if not isinstance(d, dict) or not {"x", "start", "stop", "fingerprint", "format"} <= set(d):
        raise ValueError(f"{path} is not a scoresde shard (expected keys x, start, stop, fingerprint, format)")
    x = d["x"]
    if not isinstance(x, torch.Tensor) or x.shape[0] != int(d["stop"]) - int(d["start"]):
        raise ValueError(f"{path}: holds {getattr(x, 'shape', None)} for ids {d['start']}..{d['stop']}")
    return d


def _valid_shard(path: Path, start: int, stop: int, shape: Tuple[int, ...], fp: str) -> bool:
    try:
        d = read_shard(path)
    except (ValueError, OSError):
        return False
    x = d["x"]
    return (d["format"] == SHARD_FORMAT and d["fingerprint"] == fp and int(d["start"]) == start and int(d["stop"]) == stop
            and tuple(x.shape) == (stop - start, *shape) and x.is_floating_point() and bool(torch.isfinite(x).all()))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class ShardReport:
    """What :func:`generate_shards` did on this rank.

    Attributes:
        out_dir: the shard folder.
        shards: paths of this rank's shards (all present and valid when ``complete``).
        drawn: shard indices drawn by this call; ``skipped``: valid ones found and kept.
        nfe: network evaluations spent by this call.
        complete: every shard of this rank is on disk (False when ``max_shards`` stopped early).
        rank, world_size: where this process sat.
    """

    out_dir: Path
    shards: List[Path]
    drawn: List[int] = field(default_factory=list)
    skipped: List[int] = field(default_factory=list)
    nfe: int = 0
    complete: bool = True
    rank: int = 0
    world_size: int = 1


def generate_shards(
    model: Callable[..., torch.Tensor],
    sde: Any,
    shape: Sequence[int],
    n: int,
    out_dir: Union[str, os.PathLike],
    *,
    shard_size: int = 1000,
    seed: int = 0,
    sampler: Optional[str] = None,
    steps: Optional[int] = None,
    run_info: Optional[Mapping[str, Any]] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    max_shards: Optional[int] = None,
    progress: bool = False,
    on_shard: Optional[Callable[[int, Path], None]] = None,
    **generate_kwargs: Any,
) -> ShardReport:
    """Draw samples ``0..n-1`` into ``out_dir`` as shard files, this rank's share only; resumable.

    Each rank (``rank`` / ``world_size``, default :func:`dist_env`) draws the shards of
    :func:`rank_shards` with :func:`generate` and writes each one atomically as
    ``{"x", "start", "stop", "fingerprint", "format"}`` (``x`` float, ``(stop - start, *shape)``).
    Shards already present and valid for the same run are kept; invalid ones (truncated, foreign,
    another run's) are drawn again. Stale temporary files of this rank's shards are removed.

    The run's settings (``n``, ``shard_size``, ``shape``, ``seed``, ``sampler``, ``steps``, the
    ``generate_kwargs`` and the caller's ``run_info``, e.g. the checkpoint's path and step) are written to
    ``out_dir/manifest.json``; a rerun into a folder made with other settings is refused with a
    ``ValueError`` instead of mixing two runs' samples. ``chunk`` can change the last bits and is
    recorded; ``batch_size`` and the device index cannot and are not, so a rerun may use other ones.

    Args:
        n: total number of samples of the whole run (all ranks).
        out_dir: the shard folder (created).
        shard_size: samples per shard file.
        run_info: plain JSON-able data identifying the model (checkpoint path, training step ...).
        max_shards: draw at most this many shards in this call, then return (``complete`` False
            when some remain): a budget, and how the tests stop a run part-way.
        progress: one bar over this rank's missing samples.
        on_shard: ``fn(k, path)`` called after shard ``k`` is in place.
        generate_kwargs: passed to :func:`generate` (``batch_size``, ``chunk``, ``label``,
            ``guidance``, ``autocast``, ``device``, knobs ...).

    Returns:
        :class:`ShardReport` for this rank. When a process group is initialised, all ranks meet at
        a barrier before returning.
    """
    ranges = shard_ranges(n, shard_size)
    env_rank, env_world, _ = dist_env()
    rank = env_rank if rank is None else int(rank)
    world_size = env_world if world_size is None else int(world_size)
    mine = rank_shards(len(ranges), rank, world_size)
    if max_shards is not None and (isinstance(max_shards, bool) or not isinstance(max_shards, int) or max_shards < 0):
        raise ValueError(f"max_shards must be a non-negative integer or None; got {max_shards!r}")
    if "keep_trajectory" in generate_kwargs:
        raise ValueError("generate_shards keeps no trajectories; call generate for that")
    shape = tuple(int(s) for s in shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gk = dict(generate_kwargs)
    gk.pop("batch_size", None)
    if gk.get("chunk") is None:
        gk["chunk"] = default_chunk(gk.get("device") or _device_of(model))
    label = gk.get("label")
    if isinstance(label, torch.Tensor):
        raise ValueError("generate_shards takes one int label for every sample (per-sample labels: use generate)")
    settings = {"format": SHARD_FORMAT, "n": n, "shard_size": shard_size, "shape": list(shape), "seed": int(seed),
                "sampler": sampler, "steps": steps, "settings": {k: v for k, v in sorted(gk.items()) if k != "device"},
                "device_type": torch.device(gk.get("device") or _device_of(model)).type, "run": dict(run_info or {})}
    settings = json.loads(json.dumps(settings, default=_plain))
    fp = _fingerprint(settings)
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if old is not None and old.get("fingerprint") != fp:
            diff = sorted(k for k in set(old.get("settings", {})) | set(settings)
                          if old.get("settings", {}).get(k) != settings.get(k))
            raise ValueError(f"{out} holds shards of another run (different {', '.join(diff) or 'settings'}); "
                             "use a new output folder or delete it")
    _write_text_atomic(manifest, json.dumps({"fingerprint": fp, "settings": settings}, indent=1) + "\n")

    for k in mine:  # temporaries a killed run of this rank left behind
        for stale in out.glob(f".{shard_path(out, k).name}.tmp-*"):
            stale.unlink(missing_ok=True)
    todo, report = [], ShardReport(out_dir=out, shards=[shard_path(out, k) for k in mine], rank=rank, world_size=world_size)
    for k in mine:
        start, stop = ranges[k]
        if _valid_shard(shard_path(out, k), start, stop, shape, fp):
            report.skipped.append(k)
        else:
            todo.append(k)
    if max_shards is not None:
        report.complete = len(todo) <= max_shards
        todo = todo[:max_shards]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        total = sum(ranges[k][1] - ranges[k][0] for k in todo)
        bar = tqdm(total=total, unit="sample", desc=f"rank {rank} shards" if world_size > 1 else "shards",
                   dynamic_ncols=True, position=rank if world_size > 1 else None)
    try:
        for k in todo:
            start, stop = ranges[k]
            res = generate(model, sde, shape, range(start, stop), sampler=sampler, steps=steps, seed=seed,
                           batch_size=generate_kwargs.get("batch_size", 64), progress=False, **gk)
            _atomic_save({"x": res.x.contiguous(), "start": start, "stop": stop, "fingerprint": fp,
                          "format": SHARD_FORMAT}, shard_path(out, k))
            report.drawn.append(k)
            report.nfe += res.nfe
            if bar is not None:
                bar.update(stop - start)
            if on_shard is not None:
                on_shard(k, shard_path(out, k))
    finally:
        if bar is not None:
            bar.close()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return report


def load_shards(out_dir: Union[str, os.PathLike], *, require_complete: bool = True,
                transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """Concatenate the shards of ``out_dir`` in id order into ``(n, *shape)``.

    Reads the manifest for ``n`` and ``shard_size``; with ``require_complete`` a missing or invalid
    shard is a ``ValueError`` naming it (a run still in progress, or one that was stopped).
    ``transform`` is applied to each shard's samples before concatenation (e.g. a conversion to
    uint8 images, so 50,000 float samples never sit in memory at once).
    """
    out = Path(out_dir)
    manifest = out / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{out} has no {MANIFEST}: not a shard folder written by generate_shards")
    meta = json.loads(manifest.read_text())
    s = meta["settings"]
    ranges = shard_ranges(int(s["n"]), int(s["shard_size"]))
    shape = tuple(s["shape"])
    parts = []
    for k, (start, stop) in enumerate(ranges):
        p = shard_path(out, k)
        if not _valid_shard(p, start, stop, shape, meta["fingerprint"]):
            if require_complete:
                raise ValueError(f"{out}: shard {p.name} (ids {start}..{stop - 1}) is missing or incomplete; "
                                 "rerun the same command to finish it")
            continue
        x = read_shard(p)["x"]
        parts.append(x if transform is None else transform(x))
    if not parts:
        raise ValueError(f"{out} holds no complete shard")
    return torch.cat(parts)


__all__ = ["AUTOCAST_DTYPES", "FixedChunk", "AutocastModel", "GenerateResult", "ShardReport", "default_chunk", "dist_env",
           "generate", "generate_shards", "load_shards", "local_device", "rank_shards", "read_shard", "shard_path",
           "shard_ranges", "wrap_model"]
