"""The CIFAR-10 recipe (configs/cifar10.toml) and its CPU smoke version (configs/cifar10_tiny.toml).

The smoke test writes fake batches in CIFAR-10's python format (pickled dicts of ``b"data"``
``(N, 3072)`` uint8 and ``b"labels"``), trains the tiny config for its few steps through the same
loader, and samples from the checkpoint with the library's generation function.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from scoresde.training import TrainConfig, train

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import pytest

    tomllib = pytest.importorskip("tomli", reason="reading TOML on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]
#: the keys the smoke version may change (sizes, device, output); everything else is the recipe
SMOKE_ONLY = {"model", "data_n", "steps", "batch_size", "device", "out_dir", "log_every", "ckpt_every", "sample_every",
              "sample_steps", "num_samples"}


def _toml(name: str) -> dict:
    with open(ROOT / "configs" / name, "rb") as f:
        return tomllib.load(f)


def test_recipe_is_a_valid_config_of_the_papers_setup():
    d = _toml("cifar10.toml")
    cfg = TrainConfig.from_dict(d)
    assert (cfg.dataset, cfg.sde, cfg.model, cfg.batch_size, cfg.lr, cfg.ema_decay) == ("cifar10", "vp", "cifar10", 128, 2e-4, 0.9999)
    from scoresde.networks import build_model, count_parameters

    n = count_parameters(build_model(cfg.model, data_shape=(3, 32, 32), **cfg.model_kwargs))
    assert 50e6 < n < 70e6  # DDPM++ cont. (VP) has 62 M


def test_smoke_version_differs_only_in_size_and_output():
    full, tiny = _toml("cifar10.toml"), _toml("cifar10_tiny.toml")
    for key in set(full) | set(tiny):
        if key not in SMOKE_ONLY:
            assert full.get(key) == tiny.get(key), key


def _fake_cifar(folder: Path, n_per_batch: int = 40) -> None:
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.randint(0, 256, (n_per_batch, 3072)).astype(np.uint8),
                 b"labels": rng.randint(0, 10, n_per_batch).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_tiny_recipe_trains_and_samples_on_cpu(tmp_path):
    from scoresde.checkpoint import load_model
    from scoresde.generate import generate

    _fake_cifar(tmp_path / "data" / "cifar-10-batches-py")
    d = {**_toml("cifar10_tiny.toml"), "data_root": str(tmp_path / "data"), "out_dir": str(tmp_path / "run")}
    res = train(TrainConfig.from_dict(d), progress=False)
    ckpt = Path(res.final_checkpoint)
    assert ckpt.is_file()
    model, sde, _ = load_model(ckpt, ema=True, device=torch.device("cpu"))
    out = generate(model, sde, (3, 32, 32), 3, sampler="ddim", steps=2, seed=0, batch_size=3)
    assert out.x.shape == (3, 3, 32, 32) and torch.isfinite(out.x).all()
