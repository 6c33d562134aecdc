"""Datasets: 2-D toys with seeded sampling, the embedded 8x8 ``digits``, and local MNIST / CIFAR-10 / image folders.

Nothing here downloads: ``digits`` ships with scikit-learn (1,797 real 8x8 handwritten digits,
values 0..16, with labels), and MNIST, CIFAR-10 and image folders are read from local files, with
an error naming the files expected and where they were looked for.

Every loader returns a :class:`Dataset` whose ``x`` is a float32 tensor ``(N, ...)``: images
``(N, C, H, W)`` scaled to ``[-1, 1]`` (``2 v / v_max - 1``), vectors as generated. Labels are kept
(``y`` LongTensor ``(N,)``) for conditional training. Random horizontal flips are a batch-time
transform (:func:`random_flip`), applied by :meth:`Dataset.batches` when the dataset was loaded
with ``flip=True``.

Toys (any ``n``, seeded; ``split="test"`` draws an independent sample of the same distribution):

- ``gmm``: the 8-component 2-D ring of :meth:`scoresde.GaussianMixture.ring` (radius 4, unequal
  weights and widths), exact scores available through ``Dataset.mixture``; labels = component.
- ``moons``: two interleaved half circles, ``(cos u, sin u)`` and ``(1 - cos u, 1/2 - sin u)`` with
  ``u ~ U(0, pi)``, plus ``N(0, 0.05^2)`` noise, then centred by ``(1/2, 1/4)`` and scaled by 2;
  labels = moon.
- ``swissroll``: ``u = 3 pi / 2 (1 + 2 v)``, ``v ~ U(0, 1)``, point ``(u cos u, u sin u) / 5`` plus
  ``N(0, 0.1^2)`` noise (the 2-D section of the classic swiss roll); no labels.
- ``checkerboard``: uniform on the 8 dark squares (side 2) of a 4x4 board covering ``[-4, 4]^2``; no labels.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ._tensor import append_dims

SPLITS = ("train", "test")
#: fraction of the 1,797 digits held out as the test split (fixed permutation, seed 0)
DIGITS_TEST_FRACTION = 0.2
#: default number of samples drawn from a toy distribution
TOY_DEFAULT_N = 10_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
#: number of levels L of each image dataset's stored values: ``x = 2 k / (L - 1) - 1``, ``k in 0..L-1``
IMAGE_LEVELS = {"digits": 17, "mnist": 256, "cifar10": 256, "folder": 256}


@dataclass
class Dataset:
    """An in-memory dataset.

    Attributes:
        x: float32 ``(N, ...)``; images ``(N, C, H, W)`` in ``[-1, 1]``.
        y: int64 labels ``(N,)`` or None.
        num_classes: number of classes when labelled, else None.
        name: the registry name.
        is_image: True for ``(C, H, W)`` images.
        flip: apply :func:`random_flip` in :meth:`batches` (images only).
        mixture: the exact :class:`scoresde.GaussianMixture` for ``gmm`` (else None).
        class_names: label names when known (image folders).
        levels: number of discrete levels L of the stored values (images, :data:`IMAGE_LEVELS`);
            None for the continuous toys.
    """

    x: torch.Tensor
    y: Optional[torch.Tensor]
    num_classes: Optional[int]
    name: str
    is_image: bool
    flip: bool = False
    mixture: object = None
    class_names: Optional[list] = field(default=None, repr=False)
    levels: Optional[int] = None

    @property
    def shape(self) -> tuple:
        """Per-sample shape, e.g. ``(1, 8, 8)`` or ``(2,)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, n={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes}, flip={self.flip})")

    def batches(
        self, batch_size: int, generator: Optional[torch.Generator] = None, *, shuffle: bool = True, drop_last: bool = True
    ) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """One epoch of ``(x, y)`` batches (``y`` None when unlabelled), flipped at random when ``flip``."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for i in range(0, stop, batch_size):
            idx = order[i : i + batch_size]
            yield self._take(idx, generator)

    def sample_batch(self, batch_size: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``batch_size`` examples drawn uniformly with replacement (flipped at random when ``flip``)."""
        idx = torch.randint(0, len(self), (int(batch_size),), generator=generator)
        return self._take(idx, generator)

    def _take(self, idx: torch.Tensor, generator: Optional[torch.Generator]):
        x = self.x[idx]
        if self.flip:
            x = random_flip(x, generator)
        return x, (self.y[idx] if self.y is not None else None)


def random_flip(x: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    """Mirror each image ``(B, ..., W)`` along its last (width) axis with probability ``p``."""
    mask = torch.rand(x.shape[0], generator=generator) < p  # (B,)
    return torch.where(append_dims(mask.to(x.device), x.ndim), x.flip(-1), x)


# -- toys ------------------------------------------------------------------------------------------
def _toy_generator(seed: int, split: str) -> torch.Generator:
    # distinct streams for every (seed, split): 2 seed + 0 for train, 2 seed + 1 for test
    return torch.Generator().manual_seed(2 * int(seed) + (split == "test"))


def _gmm(n: int, g: torch.Generator):
    from .analytic import GaussianMixture

    mix = GaussianMixture.ring()
    idx = torch.multinomial(mix.weights, n, replacement=True, generator=g)
    noise = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = mix.means[idx] + mix.stds[idx, None] * noise
    return x.float(), idx, mix.num_components, mix


def _moons(n: int, g: torch.Generator):
    y = torch.randint(0, 2, (n,), generator=g)
    u = math.pi * torch.rand(n, generator=g)
    outer = torch.stack([torch.cos(u), torch.sin(u)], 1)
    inner = torch.stack([1 - torch.cos(u), 0.5 - torch.sin(u)], 1)
    x = torch.where(y[:, None] == 0, outer, inner) + 0.05 * torch.randn(n, 2, generator=g)
    return (x - torch.tensor([0.5, 0.25])) * 2.0, y, 2, None


def _swissroll(n: int, g: torch.Generator):
    u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([u * torch.cos(u), u * torch.sin(u)], 1) / 5.0 + 0.1 * torch.randn(n, 2, generator=g)
    return x, None, None, None


def _checkerboard(n: int, g: torch.Generator):
    col = torch.randint(0, 4, (n,), generator=g)  # column 0..3 covers [-4 + 2 col, -2 + 2 col]
    row = 2 * torch.randint(0, 2, (n,), generator=g) + (col % 2)  # rows with (row + col) even
    cell = torch.stack([col, row], 1).float()
    x = -4.0 + 2.0 * (cell + torch.rand(n, 2, generator=g))
    return x, None, None, None


_TOYS = {"gmm": _gmm, "moons": _moons, "swissroll": _swissroll, "checkerboard": _checkerboard}


def _load_toy(name: str, *, n: Optional[int], seed: int, split: str) -> Dataset:
    n = TOY_DEFAULT_N if n is None else n
    x, y, k, mixture = _TOYS[name](n, _toy_generator(seed, split))
    return Dataset(x=x.float().contiguous(), y=None if y is None else y.long(), num_classes=k, name=name,
                   is_image=False, mixture=mixture)


# -- images ----------------------------------------------------------------------------------------
def _to_unit_range(images: np.ndarray, vmax: float) -> torch.Tensor:
    """uint-valued images in ``[0, vmax]`` -> float32 in ``[-1, 1]``."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) * (2.0 / vmax) - 1.0)


def digits_split_indices(split: str) -> np.ndarray:
    """Indices of the ``split`` digits: a fixed permutation (``np.random.RandomState(0)``), last 20% = test."""
    n = 1797
    perm = np.random.RandomState(0).permutation(n)
    n_test = int(round(DIGITS_TEST_FRACTION * n))  # 359
    return np.sort(perm[n - n_test :] if split == "test" else perm[: n - n_test])


def _load_digits(root, split: str):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = digits_split_indices(split)
    images = bunch.images[idx].reshape(-1, 1, 8, 8)  # values 0..16
    return _to_unit_range(images, IMAGE_LEVELS["digits"] - 1), torch.from_numpy(bunch.target[idx]).long(), 10, None


def _default_root(root) -> Path:
    return Path(root if root is not None else os.environ.get("SCORESDE_DATA", "data")).expanduser()


def _find(dirs: list[Path], names: list[str], what: str) -> Path:
    for d in dirs:
        for nm in names:
            if (d / nm).is_file():
                return d / nm
    raise ValueError(f"{what}: expected one of {names} in {[str(d) for d in dirs]}, found none")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format; gzip if the name ends in .gz): magic ``0 0 0x08 ndim``, big-endian dims, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header promises dims {dims} ({expected} bytes) but holds {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _load_mnist(root, split: str):
    base = _default_root(root)
    dirs = [base, base / "MNIST" / "raw", base / "mnist"]
    prefix = "train" if split == "train" else "t10k"
    names = lambda kind, d: [f"{prefix}-{kind}-idx{d}-ubyte", f"{prefix}-{kind}-idx{d}-ubyte.gz"]
    images = read_idx(_find(dirs, names("images", 3), f"MNIST {split} images"))
    labels = read_idx(_find(dirs, names("labels", 1), f"MNIST {split} labels"))
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    return _to_unit_range(images[:, None], IMAGE_LEVELS["mnist"] - 1), torch.from_numpy(labels.astype(np.int64)), 10, None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches allowing only numpy array reconstruction (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _read_cifar_batch(path: Path):
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as err:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (dict with b'data' (N, 3072) uint8, b'labels'): {err}") from None
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def _load_cifar10(root, split: str):
    base = _default_root(root)
    dirs = [base / "cifar-10-batches-py", base]
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder = next((d for d in dirs if all((d / nm).is_file() for nm in names)), None)
    if folder is None:
        raise ValueError(f"CIFAR-10 {split}: expected files {names} in one of {[str(d) for d in dirs]}, not found")
    parts = [_read_cifar_batch(folder / nm) for nm in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _to_unit_range(data, IMAGE_LEVELS["cifar10"] - 1), torch.from_numpy(labels), 10, None


def _load_folder(root, split: str, image_size: Optional[int] = None):
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow ships with matplotlib
        raise ImportError("the 'folder' dataset reads PNG/JPEG with Pillow: pip install pillow") from err
    base = _default_root(root)
    if not base.is_dir():
        raise ValueError(f"image folder {str(base)!r} does not exist")
    if (base / split).is_dir():
        base = base / split
    elif split != "train":
        raise ValueError(f"image folder {str(base)!r} has no {split!r} subfolder (split={split!r})")
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {str(base)!r}")
    # labels from the first-level subfolder when every image lies in one; otherwise unlabelled
    labelled = all(p.parent != base for p in files)
    class_names = sorted({p.relative_to(base).parts[0] for p in files}) if labelled else None
    modes = []
    for p in files:  # opening reads the header only
        with Image.open(p) as im:
            modes.append(im.mode)
    gray = all(m in ("1", "L", "I", "I;16", "F") for m in modes)
    arrays, sizes = [], set()
    for p in files:
        with Image.open(p) as raw:
            im = raw.convert("L" if gray else "RGB")
        if image_size is not None:
            side = min(im.size)
            left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
        sizes.add(im.size)
        arrays.append(np.asarray(im, dtype=np.uint8))
    if len(sizes) > 1:
        raise ValueError(f"images under {str(base)!r} have different sizes {sorted(sizes)}; pass image_size= to resize")
    data = np.stack(arrays)
    data = data[:, None] if gray else data.transpose(0, 3, 1, 2)  # (N, C, H, W)
    y = None
    if labelled:
        index = {c: i for i, c in enumerate(class_names)}
        y = torch.tensor([index[p.relative_to(base).parts[0]] for p in files], dtype=torch.long)
    return _to_unit_range(data, IMAGE_LEVELS["folder"] - 1), y, (len(class_names) if labelled else None), class_names


_IMAGES: dict[str, Callable] = {"digits": _load_digits, "mnist": _load_mnist, "cifar10": _load_cifar10, "folder": _load_folder}

#: every dataset name -> kind ("toy" | "image")
DATASETS: dict[str, str] = {**{k: "toy" for k in _TOYS}, **{k: "image" for k in _IMAGES}}


def load_dataset(
    name: str,
    *,
    root: Optional[str | os.PathLike] = None,
    n: Optional[int] = None,
    seed: int = 0,
    split: str = "train",
    flip: bool = False,
    image_size: Optional[int] = None,
) -> Dataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`).

    Args:
        root: folder of local files (mnist, cifar10, folder); default ``$SCORESDE_DATA`` or ``./data``.
        n: number of examples: toys draw ``n`` samples (default 10,000); image sets keep a seeded
            random subset of ``n`` (default: all).
        seed: seeds toy sampling and image subsetting (the digits train/test split itself is fixed).
        split: ``"train"`` or ``"test"`` (digits: fixed 80/20 split; toys: an independent draw).
        flip: random horizontal flips in :meth:`Dataset.batches` (images only).
        image_size: resize (centre crop + bicubic) images of an image folder to this side.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    if n is not None and (int(n) != n or n < 1):
        raise ValueError(f"n must be a positive integer or None; got {n!r}")
    if image_size is not None and name != "folder":
        raise ValueError(f"image_size applies to the 'folder' dataset only; got image_size={image_size} for {name!r}")
    if name in _TOYS:
        if flip:
            raise ValueError(f"flip=True needs image data; {name!r} is a 2-D toy")
        return _load_toy(name, n=n, seed=seed, split=split)
    loader = _IMAGES[name]
    x, y, k, class_names = loader(root, split, image_size) if name == "folder" else loader(root, split)
    if n is not None:
        if n > x.shape[0]:
            raise ValueError(f"n={n} exceeds the {x.shape[0]} examples of {name!r} ({split})")
        keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))[:n].sort().values
        x, y = x[keep], (y[keep] if y is not None else None)
    return Dataset(x=x.contiguous(), y=y, num_classes=k, name=name, is_image=True, flip=bool(flip), class_names=class_names,
                   levels=IMAGE_LEVELS[name])
