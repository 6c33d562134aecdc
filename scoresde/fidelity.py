"""Sample-quality metrics for images: FID, KID, Inception score, precision/recall, with torch-fidelity's Inception.

The feature network is torch-fidelity's TensorFlow-compatible Inception-v3
(``torch_fidelity.FeatureExtractorInceptionV3``, the network of Heusel et al.'s reference FID
code, ported with bit-compatible resizing); its 2048-d pool features feed FID, KID and
precision/recall and its 1008 "unbiased" logits the Inception score. Any torch-fidelity
``FeatureExtractorBase`` (or an object with the same interface) can replace it: the metrics below
work on features and are checked against closed forms and against ``torch_fidelity.calculate_metrics``.

**Metrics** (features ``X`` of generated images, ``Y`` of reference images):

- FID (Heusel et al. 2017): ``|mu_X - mu_Y|^2 + tr(S_X + S_Y - 2 (S_X^{1/2} S_Y S_X^{1/2})^{1/2})``,
  the Fréchet distance of the Gaussians with the features' means and covariances (``ddof = 1``).
  The trace of the matrix square root is the sum of the square roots of the eigenvalues of the
  symmetric PSD matrix ``S_X^{1/2} S_Y S_X^{1/2}`` (clipped at 0), a stable form of
  ``tr sqrt(S_X S_Y)``.
- KID (Bińkowski et al. 2018): the unbiased estimate of ``MMD^2`` with the cubic polynomial kernel
  ``k(a, b) = (a.b / d + 1)^3``, ``(sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1))
  - 2 sum_{i,j} k(x_i, y_j) / m^2``, averaged over ``subsets`` random subsets of ``m`` rows of each
  set (drawn with ``numpy.random.RandomState(seed)``; mean and standard deviation reported).
- IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` on each of ``splits`` parts of the
  (seeded) shuffled samples, ``p(y)`` the part's mean prediction; mean and standard deviation.
- Precision / recall (Kynkäänniemi et al. 2019): the fraction of generated features inside the
  union of the reference features' k-nearest-neighbour balls (radius: distance to the k-th
  neighbour, ``k = 3``), and the fraction of reference features inside the generated ones' balls.

**Inputs.** Images are uint8 ``(N, C, H, W)`` with 1 or 3 channels (1 is repeated to 3 for the
network): a folder of PNG/JPEG files, an ``.npz`` / ``.pt`` of an array (float in ``[-1, 1]``, as
``scoresde sample`` writes, or uint8), a shard folder of :func:`scoresde.generate.generate_shards`,
or a dataset known to :mod:`scoresde.data`. A float value ``v`` becomes ``round((v + 1) 255 / 2)``
clipped to ``0..255`` (exact for the data's own levels ``2 k / 255 - 1``).

**Reference statistics** (``.npz``): ``mu``, ``sigma`` of all reference features (float64), up
to ``keep_features`` rows of the features themselves (float32; KID and precision/recall use
them), the number of images, their shape ``(C, H, W)``, and the feature extractor's name.

**Inception weights** (``weights-inception-2015-12-05-6726825d.pth``, ~95 MB): an explicit file
(``weights=`` / ``--weights``), else ``$SCORESDE_INCEPTION_WEIGHTS``, else torch-fidelity's cache
(``torch.hub.get_dir()/checkpoints``), else torch-fidelity downloads it into that cache when
``download`` is allowed. Without any of these one :class:`FidelityError` names the file and where
to get it; nothing falls back to another network.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

#: environment variable naming a local Inception weights file
WEIGHTS_ENV = "SCORESDE_INCEPTION_WEIGHTS"
#: torch-fidelity's Inception-v3 weights file (FID's reference network) and where it is published
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
#: torch-fidelity's registered name of that network
INCEPTION_NAME = "inception-v3-compat"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
REF_FORMAT = 1
METRICS = ("fid", "kid", "isc", "prc")


class FidelityError(ValueError):
    """Bad input to a metric (missing file, mismatched images, too few samples, no weights)."""


# ---------------------------------------------------------------------------------------------
# metrics on features
# ---------------------------------------------------------------------------------------------
def gaussian_statistics(features: Union[np.ndarray, torch.Tensor]) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)``: mean and unbiased (``ddof = 1``) covariance of ``(N, D)`` features, in float64."""
    f = np.asarray(features.cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise FidelityError(f"need at least 2 feature rows of shape (N, D); got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance squared between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1^{1/2} sigma2 sigma1^{1/2})^{1/2})``."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or mu1.ndim != 1 or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise FidelityError(f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    d = mu1 - mu2
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None, coef0: float = 1.0) -> float:
    """Unbiased ``MMD^2`` of two equal-size samples ``(m, d)`` with ``k(a, b) = (gamma a.b + coef0)^degree``
    (``gamma = 1 / d`` by default): within-set sums without the diagonal over ``m (m - 1)``, the
    cross sum over ``m^2``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = x.shape[0]
    if y.shape != x.shape or m < 2:
        raise FidelityError(f"MMD needs two samples of equal shape (m >= 2, d); got {x.shape} and {y.shape}")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (x @ x.T * g + coef0) ** degree
    kyy = (y @ y.T * g + coef0) ** degree
    kxy = (x @ y.T * g + coef0) ** degree
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def kernel_distance(
    x: Union[np.ndarray, torch.Tensor],
    y: Union[np.ndarray, torch.Tensor],
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 2020,
    **kernel: Any,
) -> Tuple[float, float]:
    """KID: mean and standard deviation of :func:`polynomial_mmd2` over ``subsets`` random subsets of
    ``subset_size`` rows of ``x`` and of ``y`` (without replacement within a subset; subset ``i``
    takes ``rng.choice(len(x))`` then ``rng.choice(len(y))`` from one ``RandomState(seed)``)."""
    x = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x, np.float64)
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, np.float64)
    if subsets < 1:
        raise FidelityError(f"KID needs at least one subset; got {subsets}")
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise FidelityError(f"KID subset size {subset_size} must be in 2..min(samples {len(x)}, reference {len(y)})")
    rng = np.random.RandomState(seed)
    vals = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        vals[i] = polynomial_mmd2(a, b, **kernel)
    return float(vals.mean()), float(vals.std())


def inception_score(logits: Union[np.ndarray, torch.Tensor], *, splits: int = 10, seed: int = 2020,
                    shuffle: bool = True) -> Tuple[float, float]:
    """IS: mean and standard deviation over ``splits`` parts of ``exp(mean_x KL(p(y|x) || p_part(y)))``,
    ``p(y|x) = softmax(logits)``, after a ``RandomState(seed).permutation`` of the rows when ``shuffle``."""
    z = torch.as_tensor(np.asarray(logits.cpu() if isinstance(logits, torch.Tensor) else logits), dtype=torch.float64)
    n = z.shape[0]
    if z.ndim != 2 or not 1 <= splits <= n:
        raise FidelityError(f"Inception score needs (N, K) logits with N >= splits ({splits}); got {tuple(z.shape)}")
    if shuffle:
        z = z[torch.as_tensor(np.random.RandomState(seed).permutation(n))]
    logp = z.log_softmax(dim=1)
    p = logp.exp()
    scores = []
    for i in range(splits):
        part_p, part_logp = p[i * n // splits : (i + 1) * n // splits], logp[i * n // splits : (i + 1) * n // splits]
        log_marginal = part_p.mean(dim=0, keepdim=True).log()
        scores.append(math.exp(float((part_p * (part_logp - log_marginal)).sum(dim=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_radius(f: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    return torch.cat([torch.cdist(b, f).kthvalue(k + 1, dim=1).values for b in f.split(batch)])  # k+1: self at 0


def _covered(query: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    hits = [(torch.cdist(b, centres) <= radii[None, :]).any(dim=1) for b in query.split(batch)]
    return float(torch.cat(hits).double().mean())


def precision_recall(generated: Union[np.ndarray, torch.Tensor], reference: Union[np.ndarray, torch.Tensor], *,
                     k: int = 3, batch: int = 10_000) -> Tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with ``k``-nearest-neighbour balls."""
    g = torch.as_tensor(np.asarray(generated.cpu() if isinstance(generated, torch.Tensor) else generated), dtype=torch.float32)
    r = torch.as_tensor(np.asarray(reference.cpu() if isinstance(reference, torch.Tensor) else reference), dtype=torch.float32)
    if min(len(g), len(r)) <= k:
        raise FidelityError(f"precision/recall with k={k} needs more than {k} samples and references; got {len(g)}, {len(r)}")
    precision = _covered(g, r, _kth_radius(r, k, batch), batch)
    recall = _covered(r, g, _kth_radius(g, k, batch), batch)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------
def to_uint8(x: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """Images as uint8 ``(N, C, H, W)``: floats in ``[-1, 1]`` map to ``round((v + 1) 255 / 2)`` clipped to
    ``0..255``; uint8 passes through; ``(N, H, W, C)`` with ``C`` in (1, 3) is transposed."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach().cpu()
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4:
        raise FidelityError(f"images must be (N, C, H, W); got shape {tuple(t.shape)}")
    if t.shape[1] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(0, 3, 1, 2)
    if t.shape[1] not in (1, 3):
        raise FidelityError(f"images must have 1 or 3 channels; got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t.contiguous()
    if not t.is_floating_point():
        raise FidelityError(f"images must be uint8 or float in [-1, 1]; got {t.dtype}")
    if not bool(torch.isfinite(t).all()):
        raise FidelityError("images hold NaN or infinite values")
    return ((t.double() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).contiguous()


def _read_image_folder(folder: Path) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FidelityError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    arrays, shapes = [], set()
    for p in files:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L") if im.mode in ("1", "L", "I", "I;16", "F") else im.convert("RGB"))
        shapes.add(a.shape)
        if len(shapes) > 1:
            raise FidelityError(f"images under {folder} differ in size or channels: {sorted(shapes)}")
        arrays.append(a)
    data = np.stack(arrays)
    return torch.from_numpy(data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)).contiguous()


def load_images(source: Union[str, os.PathLike, torch.Tensor, np.ndarray]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` images from a tensor / array, a folder of images, a shard folder
    (with ``manifest.json``), an ``.npz`` (its ``x`` array, else its only array) or a ``.pt``
    (a tensor or a dict with ``x``). Raises :class:`FidelityError` for a missing or empty source."""
    if isinstance(source, (torch.Tensor, np.ndarray)):
        imgs = to_uint8(source)
    else:
        path = Path(source)
        if not path.exists():
            raise FidelityError(f"no samples at {path}")
        if path.is_dir():
            if (path / "manifest.json").is_file():
                from .generate import load_shards

                imgs = load_shards(path, transform=to_uint8)
            else:
                imgs = _read_image_folder(path)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = [k for k in z.files if z[k].ndim >= 3]
                key = "x" if "x" in z.files else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise FidelityError(f"{path} holds no 'x' array and not exactly one image array: {z.files}")
                imgs = to_uint8(z[key])
        elif path.suffix == ".pt":
            d = torch.load(path, map_location="cpu", weights_only=True)
            d = d.get("x") if isinstance(d, dict) else d
            if not isinstance(d, torch.Tensor):
                raise FidelityError(f"{path} holds no image tensor (a tensor or a dict with 'x')")
            imgs = to_uint8(d)
        else:
            raise FidelityError(f"samples must be a folder of images, a shard folder, an .npz or a .pt; got {path}")
    if imgs.shape[0] == 0:
        raise FidelityError(f"no images in {source if not isinstance(source, (torch.Tensor, np.ndarray)) else 'the array'}")
    return imgs


def dataset_images(name: str, *, split: str = "train", root: Optional[str] = None, n: Optional[int] = None,
                   seed: int = 0) -> torch.Tensor:
    """uint8 images of an image dataset of :mod:`scoresde.data` (its stored levels, exactly)."""
    from .data import load_dataset

    ds = load_dataset(name, root=root, split=split, n=n, seed=seed)
    if not ds.is_image:
        raise FidelityError(f"dataset {name!r} holds no images; FID/KID/IS need image data")
    levels = ds.levels or 256
    k = ((ds.x.double() + 1) * (levels - 1) / 2).round()
    return (k * 255 / (levels - 1)).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# feature extraction
# ---------------------------------------------------------------------------------------------
def _import_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as err:
        raise FidelityError(
            "FID/KID/IS need torch-fidelity: pip install 'scoresde[eval]' (it imports torchvision, which must be "
            f"the build matching your torch {torch.__version__}); import failed: {err}") from None
    except RuntimeError as err:  # a torchvision built for another torch fails while registering its operators
        raise FidelityError(f"torch-fidelity could not be imported (torchvision does not match torch {torch.__version__}: "
                            f"install the torchvision built for it): {err}") from None
    return torch_fidelity


def inception_weights_path(weights: Optional[Union[str, os.PathLike]] = None, *, download: bool = True) -> Optional[Path]:
    """The Inception weights file to use: ``weights``, else ``$SCORESDE_INCEPTION_WEIGHTS``, else the
    copy in torch-fidelity's cache; None when none exists and ``download`` lets torch-fidelity fetch
    it. A named file that does not exist, or nothing at all without ``download``, is one
    :class:`FidelityError` naming the file and how to get it."""
    given = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
    how = (f"download {INCEPTION_WEIGHTS_URL} on a machine with internet and pass it with --weights FILE "
           f"or {WEIGHTS_ENV}=FILE")
    if given is not None:
        p = Path(given).expanduser()
        if not p.is_file():
            raise FidelityError(f"Inception weights file {p} does not exist (expected {INCEPTION_WEIGHTS_FILE}: {how})")
        return p
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return cached
    if download:
        return None
    raise FidelityError(f"no Inception weights: {INCEPTION_WEIGHTS_FILE} is not in torch-fidelity's cache "
                        f"{cached.parent} and downloading is off; {how}")


def inception_extractor(weights: Optional[Union[str, os.PathLike]] = None, *, download: bool = True,
                        device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (``inception-v3-compat``) giving ``2048`` pool features and
    ``logits_unbiased``, with weights from :func:`inception_weights_path`.

    A weights file is first read with ``torch.load(weights_only=True)`` (a state dict of tensors,
    never code) and checked to be a full Inception state dict before torch-fidelity loads it.
    """
    tf = _import_torch_fidelity()
    path = inception_weights_path(weights, download=download)
    if path is not None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise FidelityError(f"{path} is not a readable Inception weights file ({type(err).__name__}); "
                                f"expected {INCEPTION_WEIGHTS_FILE}") from None
        if not isinstance(state, dict) or "fc.weight" not in state or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise FidelityError(f"{path} is not torch-fidelity's Inception-v3 state dict (expected {INCEPTION_WEIGHTS_FILE})")
    try:
        net = tf.FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=None if path is None else str(path))
    except (OSError, RuntimeError, ValueError) as err:
        if path is not None:
            raise FidelityError(f"{path} could not be loaded as Inception-v3 weights: {str(err).splitlines()[0]}") from None
        raise FidelityError(f"could not download {INCEPTION_WEIGHTS_FILE} into torch-fidelity's cache "
                            f"({type(err).__name__}); download {INCEPTION_WEIGHTS_URL} elsewhere and pass it with "
                            f"--weights FILE or {WEIGHTS_ENV}=FILE") from None
    return net.to(device)


def extractor_layers(extractor: Any) -> Dict[str, str]:
    """``{"fid", "kid", "prc", "isc"} -> feature name`` of a torch-fidelity-style extractor."""
    return {m: extractor.get_default_feature_layer_for_metric(m) for m in METRICS}


def extract_features(
    images: torch.Tensor,
    extractor: Any,
    *,
    batch_size: int = 128,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    desc: str = "features",
) -> Dict[str, torch.Tensor]:
    """Run ``extractor`` (a torch-fidelity ``FeatureExtractorBase``: uint8 ``(B, 3, H, W)`` -> tuple of
    its ``features_list``) over uint8 ``images`` in batches; 1-channel images are repeated to 3.
    Returns ``{feature name: (N, D) float32 on the CPU}``."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise FidelityError(f"extract_features takes uint8 (N, C, H, W) images; got {images.dtype} {tuple(images.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FidelityError(f"batch_size must be a positive integer; got {batch_size!r}")
    if device is None:
        try:
            device = next(iter(extractor.parameters())).device
        except (AttributeError, StopIteration):
            device = torch.device("cpu")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=images.shape[0], unit="img", desc=desc, dynamic_ncols=True)
    out: Dict[str, list] = {}
    try:
        with torch.no_grad():
            for b in images.split(batch_size):
                b = b.to(device)
                if b.shape[1] == 1:
                    b = b.expand(-1, 3, -1, -1)
                feats = extractor.convert_features_tuple_to_dict(extractor(b))
                for k, v in feats.items():
                    out.setdefault(k, []).append(v.detach().float().cpu())
                if bar is not None:
                    bar.update(b.shape[0])
    finally:
        if bar is not None:
            bar.close()
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# reference statistics and the evaluation
# ---------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Statistics of reference images under one feature extractor (see the module docstring)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray
    n: int
    shape: Tuple[int, int, int]
    extractor: str

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``path`` (``.npz``) atomically."""
        path = Path(path)
        if path.suffix != ".npz":
            raise FidelityError(f"reference statistics are written as .npz; got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, features=self.features, n=np.int64(self.n),
                 shape=np.asarray(self.shape, np.int64), extractor=np.asarray(self.extractor), format=np.int64(REF_FORMAT))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Reference":
        """Read a file written by :meth:`save`; a missing or malformed file is one :class:`FidelityError`."""
        path = Path(path)
        if not path.is_file():
            raise FidelityError(f"no reference statistics file at {path} (make one with `scoresde fid ref`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
            ref = cls(mu=d["mu"].astype(np.float64), sigma=d["sigma"].astype(np.float64), features=d["features"],
                      n=int(d["n"]), shape=tuple(int(s) for s in d["shape"]), extractor=str(d["extractor"]))
        except (KeyError, ValueError, OSError, EOFError) as err:
            raise FidelityError(f"{path} is not a reference statistics file ({type(err).__name__}: {err})") from None
        dim = ref.mu.shape[0] if ref.mu.ndim == 1 else -1
        if dim < 1 or ref.sigma.shape != (dim, dim) or ref.features.ndim != 2 or ref.features.shape[1] != dim or len(ref.shape) != 3:
            raise FidelityError(f"{path} is not a reference statistics file (inconsistent mu/sigma/features shapes)")
        return ref


def reference_statistics(
    images: torch.Tensor,
    extractor: Any,
    *,
    keep_features: int = 10_000,
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
) -> Reference:
    """:class:`Reference` of uint8 ``images``: ``mu`` and ``sigma`` over all of them, and a seeded
    random subset of ``keep_features`` feature rows (all when fewer) for KID and precision/recall."""
    if images.shape[0] < 2:
        raise FidelityError(f"reference statistics need at least 2 images; got {images.shape[0]}")
    layer = extractor.get_default_feature_layer_for_metric("fid")
    f = extract_features(images, extractor, batch_size=batch_size, progress=progress, desc="reference")[layer]
    mu, sigma = gaussian_statistics(f)
    if f.shape[0] > keep_features:
        f = f[torch.randperm(f.shape[0], generator=torch.Generator().manual_seed(seed))[:keep_features].sort().values]
    return Reference(mu=mu, sigma=sigma, features=f.numpy().astype(np.float32), n=int(images.shape[0]),
                     shape=tuple(int(s) for s in images.shape[1:]), extractor=str(extractor.get_name()))


def evaluate(
    samples: torch.Tensor,
    reference: Reference,
    extractor: Any,
    *,
    metrics: Sequence[str] = METRICS,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    prc_k: int = 3,
    seed: int = 2020,
    batch_size: int = 128,
    progress: bool = False,
) -> Dict[str, Any]:
    """FID / KID / IS / precision-recall of uint8 ``samples`` against ``reference``.

    ``kid_subset_size`` is lowered to the smaller of the two sets when they hold fewer rows (the
    size used is reported). Returns a JSON-able dict: ``fid``, ``kid_mean``, ``kid_std``,
    ``kid_subset_size``, ``isc_mean``, ``isc_std``, ``precision``, ``recall`` (those asked for),
    ``n_samples``, ``n_reference``, ``extractor``.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise FidelityError(f"unknown metric(s) {unknown or 'none asked'}; choose from {list(METRICS)}")
    shape = tuple(int(s) for s in samples.shape[1:])
    if shape != tuple(reference.shape):
        raise FidelityError(f"samples are {'x'.join(map(str, shape))} (C x H x W) but the reference was computed on "
                            f"{'x'.join(map(str, reference.shape))} images")
    if str(extractor.get_name()) != reference.extractor:
        raise FidelityError(f"the reference was computed with {reference.extractor!r}, not {extractor.get_name()!r}")
    if samples.shape[0] < 2:
        raise FidelityError(f"metrics need at least 2 samples; got {samples.shape[0]}")
    layers = extractor_layers(extractor)
    for m in ("kid", "prc"):
        if m in metrics and layers[m] != layers["fid"]:
            raise FidelityError(f"the reference keeps {layers['fid']!r} features; {m} asks for {layers[m]!r}")
    feats = extract_features(samples, extractor, batch_size=batch_size, progress=progress, desc="samples")
    f = feats[layers["fid"]]
    if f.shape[1] != reference.mu.shape[0]:
        raise FidelityError(f"sample features have {f.shape[1]} dimensions, the reference {reference.mu.shape[0]}")
    out: Dict[str, Any] = {"n_samples": int(samples.shape[0]), "n_reference": reference.n, "extractor": reference.extractor}
    if "fid" in metrics:
        out["fid"] = frechet_distance(*gaussian_statistics(f), reference.mu, reference.sigma)
    if "kid" in metrics:
        m = min(kid_subset_size, f.shape[0], reference.features.shape[0])
        out["kid_mean"], out["kid_std"] = kernel_distance(feats[layers["kid"]], reference.features, subsets=kid_subsets,
                                                          subset_size=m, seed=seed)
        out["kid_subset_size"] = m
    if "isc" in metrics:
        out["isc_mean"], out["isc_std"] = inception_score(feats[layers["isc"]], splits=min(isc_splits, f.shape[0]), seed=seed)
    if "prc" in metrics:
        out["precision"], out["recall"] = precision_recall(feats[layers["prc"]], reference.features, k=prc_k)
    return out


__all__ = ["FidelityError", "Reference", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "WEIGHTS_ENV", "METRICS",
           "dataset_images", "evaluate", "extract_features", "frechet_distance", "gaussian_statistics",
           "inception_extractor", "inception_score", "inception_weights_path", "kernel_distance", "load_images",
           "polynomial_mmd2", "precision_recall", "reference_statistics", "to_uint8"]
