"""Datasets: seeded toys against their defining geometry, digits split, local MNIST/CIFAR/folder readers, flips."""

import gzip
import math
import pickle

import numpy as np
import pytest
import torch

from scoresde.data import DATASETS, digits_split_indices, load_dataset, random_flip

TOYS = ["gmm", "moons", "swissroll", "checkerboard"]




def test_registry_names():
    assert set(DATASETS) == {"gmm", "moons", "swissroll", "checkerboard", "digits", "mnist", "cifar10", "folder"}


@pytest.mark.parametrize("name", TOYS)
def test_toys_any_count_seeded_and_splits_independent(name):
    a = load_dataset(name, n=123, seed=4)
    assert a.x.shape == (123, 2) and a.x.dtype == torch.float32 and a.shape == (2,) and not a.is_image
    assert torch.equal(a.x, load_dataset(name, n=123, seed=4).x)
    assert not torch.equal(a.x, load_dataset(name, n=123, seed=5).x)
    assert not torch.equal(a.x, load_dataset(name, n=123, seed=4, split="test").x)
    if a.y is not None:
        assert a.y.shape == (123,) and int(a.y.max()) < a.num_classes


def test_gmm_matches_the_exact_mixture_moments():
    d = load_dataset("gmm", n=20000)
    mix = d.mixture
    # each coordinate of the sample mean has std sqrt(var / n) <= sqrt(16 / 20000) = 0.028: allow 5 of them
    err = (d.x.double().mean(0) - mix.mean()).abs().max()
    assert err < 5 * math.sqrt(float(mix.covariance().diag().max()) / 20000)
    # labels are the components: their frequencies match the weights (binomial sd <= 0.0036, 5 sd)
    freq = torch.bincount(d.y, minlength=8).double() / 20000
    assert (freq - mix.weights).abs().max() < 0.018


def test_checkerboard_points_lie_on_dark_squares():
    x = load_dataset("checkerboard", n=5000).x
    cell = torch.floor(x / 2.0).long()  # square indices in -2..1
    assert bool(((cell[:, 0] + cell[:, 1]) % 2 == 0).all())
    assert bool((x.abs() <= 4).all())


def test_moons_lie_near_unit_half_circles():
    d = load_dataset("moons", n=4000)
    p = d.x / 2.0 + torch.tensor([0.5, 0.25])  # undo centring and scaling
    outer = p[d.y == 0]
    inner = p[d.y == 1] - torch.tensor([1.0, 0.5])
    # noise N(0, 0.05^2) per axis: radii within 0.25 (5 sd) of 1
    assert ((outer.norm(dim=1) - 1).abs() < 0.25).all() and ((inner.norm(dim=1) - 1).abs() < 0.25).all()
    assert outer[:, 1].mean() > 0.5 > inner[:, 1].mean()  # outer arc above, inner arc below


def test_digits_split_fixed_disjoint_scaled_and_labelled():
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and len(test) == 359
    assert set(digits_split_indices("train")).isdisjoint(digits_split_indices("test"))
    assert train.shape == (1, 8, 8) and train.is_image and train.num_classes == 10
    assert float(train.x.min()) == -1.0 and float(train.x.max()) == 1.0
    # values 0..16 map to v/8 - 1: multiples of 1/8
    assert torch.equal(train.x * 8, torch.round(train.x * 8))
    assert set(test.y.tolist()) == set(range(10))
    assert torch.equal(train.x, load_dataset("digits", seed=7).x)  # the split ignores the seed
    sub = load_dataset("digits", n=100, seed=3)
    assert len(sub) == 100 and torch.equal(sub.x, load_dataset("digits", n=100, seed=3).x)


def _write_idx(path, array, gz):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:  # closed, so the gzip trailer is written
        f.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_local_idx_files(tmp_path, gz):
    ext = ".gz" if gz else ""
    images = np.zeros((3, 28, 28), dtype=np.uint8)
    images[0, 0, 0], images[1, 5, 7], images[2] = 255, 128, 51
    _write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", images, gz)
    _write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", np.array([7, 0, 9]), gz)
    d = load_dataset("mnist", root=tmp_path)
    assert d.x.shape == (3, 1, 28, 28) and d.y.tolist() == [7, 0, 9] and d.num_classes == 10
    assert float(d.x[0, 0, 0, 0]) == 1.0 and float(d.x[0, 0, 1, 1]) == -1.0
    assert abs(float(d.x[1, 0, 5, 7]) - (128 / 127.5 - 1)) < 1e-6
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path, split="test")


def test_mnist_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*" + str(tmp_path.name)):
        load_dataset("mnist", root=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03junk")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        load_dataset("mnist", root=tmp_path)


def _cifar_batch(n, seed):
    rng = np.random.RandomState(seed)
    return {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), b"labels": rng.randint(0, 10, n).tolist()}


def test_cifar10_reads_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": _cifar_batch(2, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, 9)
    for name, b in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump(b, f, protocol=2)
    train = load_dataset("cifar10", root=tmp_path)
    assert train.x.shape == (10, 3, 32, 32) and train.y.tolist() == sum((b[b"labels"] for k, b in batches.items() if k != "test_batch"), [])
    # row layout: the first 1024 bytes are the red plane in row-major order
    first = batches["data_batch_1"][b"data"][0]
    assert abs(float(train.x[0, 0, 0, 1]) - (first[1] / 127.5 - 1)) < 1e-6
    assert abs(float(train.x[0, 1, 0, 0]) - (first[1024] / 127.5 - 1)) < 1e-6
    test = load_dataset("cifar10", root=folder, split="test")  # root may also be the batch folder itself
    assert test.x.shape == (3, 3, 32, 32)


def test_cifar10_missing_files_and_unsafe_pickles(tmp_path):
    with pytest.raises(ValueError, match="data_batch_1"):
        load_dataset("cifar10", root=tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_dataset("cifar10", root=tmp_path, split="test")


def _png(path, array):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_flat_grayscale_and_labelled_rgb(tmp_path):
    flat = tmp_path / "flat"
    _png(flat / "a.png", np.full((4, 4), 255, np.uint8))
    _png(flat / "b.png", np.zeros((4, 4), np.uint8))
    d = load_dataset("folder", root=flat)
    assert d.x.shape == (2, 1, 4, 4) and d.y is None and d.num_classes is None
    assert d.x[0].eq(1).all() and d.x[1].eq(-1).all()

    tree = tmp_path / "tree"
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    _png(tree / "cat" / "1.png", rgb)
    _png(tree / "dog" / "1.png", rgb)
    _png(tree / "dog" / "2.png", rgb)
    d = load_dataset("folder", root=tree)
    assert d.x.shape == (3, 3, 8, 8) and d.y.tolist() == [0, 1, 1] and d.class_names == ["cat", "dog"]
    assert d.x[:, 0].eq(1).all() and d.x[:, 1:].eq(-1).all()  # channel-first, red plane first
    assert load_dataset("folder", root=tree, image_size=4).x.shape == (3, 3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset("folder", root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_dataset("folder", root=tmp_path / "empty")
    _png(tmp_path / "mixed" / "a.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "mixed" / "b.png", np.zeros((6, 6), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):
        load_dataset("folder", root=tmp_path / "mixed")


def test_random_flip_mirrors_a_seeded_random_half():
    x = torch.arange(1000 * 4, dtype=torch.float32).reshape(1000, 1, 2, 2)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())  # each image is either mirrored or untouched
    # Binomial(1000, 1/2): sd 15.8, allow 5 sd
    assert abs(int(flipped.sum()) - 500) < 80
    assert torch.equal(out, random_flip(x, torch.Generator().manual_seed(0)))


def test_batches_cover_an_epoch_and_apply_flips():
    d = load_dataset("digits", n=50, flip=True)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([y for _, y in d.batches(16, g, drop_last=False)])
    assert torch.equal(seen.sort().values, d.y.sort().values)
    assert len(list(d.batches(16, g))) == 3  # drop_last
    x, y = d.sample_batch(64, g)
    assert x.shape == (64, 1, 8, 8) and y.shape == (64,)
    # with flips on, some drawn digits are mirror images of training digits and not digits themselves
    flat = d.x.flatten(1)
    in_data = (x.flatten(1)[:, None] == flat[None]).all(-1).any(1)
    assert 0 < int(in_data.sum()) < 64


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="flip=True needs image data"):
        load_dataset("moons", flip=True)
    with pytest.raises(ValueError, match="n=5000 exceeds"):
        load_dataset("digits", n=5000)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        load_dataset("moons", n=0)
