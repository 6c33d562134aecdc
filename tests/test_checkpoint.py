"""Checkpoints: atomic writes survive a failed save, unsafe or corrupt files are refused, plain
``torch.load`` reads them without this package, and ``load_model`` rebuilds the EMA network."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scoresde.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    checkpoint_info,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from scoresde.training import TrainConfig, train


def small_state(value: float) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": 3, "w": torch.full((4,), value),
            "config": {"a": [1, 2.5, "x", None], "b": {"c": True}}}


def test_roundtrip_keeps_tensors_and_plain_containers(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", small_state(1.5))
    state = load_checkpoint(path)
    assert torch.equal(state["w"], torch.full((4,), 1.5))
    assert state["config"] == {"a": [1, 2.5, "x", None], "b": {"c": True}}


def test_failure_during_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, small_state(1.0))
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")  # some bytes reach the disk, then the process "dies"
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_state(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["w"], torch.full((4,), 1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left behind


class _Payload:
    """Unpickling this would create a file: the attack weights_only loading must refuse."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_object_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = small_state(0.0)
    state["extra"] = _Payload(marker)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*arbitrary code"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_truncated_and_garbage_files_name_the_path(tmp_path):
    path = save_checkpoint(tmp_path / "good.pt", small_state(1.0))
    data = path.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt.*truncated or corrupt"):
        load_checkpoint(trunc)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no checkpoint file at .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.ones(2)}, foreign)
    with pytest.raises(CheckpointError, match="not a scoresde checkpoint"):
        load_checkpoint(foreign)
    assert issubclass(CheckpointError, ValueError)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(dataset="gmm", data_n=256, model="mlp", model_kwargs={"hidden": 32, "depth": 2},
                      steps=6, batch_size=32, warmup=2, out_dir=str(out), num_samples=0, log_every=2,
                      max_minutes=None, device="cpu")
    train(cfg, progress=False)
    return out / "checkpoint.pt"


def test_plain_torch_load_without_scoresde(trained):
    # A fresh interpreter in which `import scoresde` fails: torch.load (weights_only by default in
    # torch >= 2.6, and explicitly here) must still read everything.
    code = (
        "import sys; sys.modules['scoresde'] = None; sys.modules['solvers'] = None\n"
        "import torch\n"
        f"s = torch.load({str(trained)!r}, weights_only=True)\n"
        "assert s['format'] == 'scoresde-checkpoint' and s['step'] == 6\n"
        "assert isinstance(s['model'], dict) and all(isinstance(v, torch.Tensor) for v in s['model'].values())\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_load_model_rebuilds_network_with_ema_weights(trained):
    state = load_checkpoint(trained)
    model, sde, config = load_model(trained)
    assert config["dataset"] == "gmm" and sde.config() == state["sde_config"]
    live = dict(model.named_parameters())
    for k, v in state["ema"]["shadow"].items():
        assert torch.equal(live[k].detach(), v)
    raw, _, _ = load_model(trained, ema=False)
    for k, v in raw.named_parameters():
        assert torch.equal(v.detach(), state["model"][k])
    # the EMA and raw weights differ after training (else the test above proves nothing)
    assert any(not torch.equal(state["model"][k], v) for k, v in state["ema"]["shadow"].items())
    out = model(torch.zeros(5, 2), torch.full((5,), 0.5))
    assert out.shape == (5, 2) and not model.training
    info = checkpoint_info(trained)
    assert info["step"] == 6 and info["has_ema"] and info["dataset"] == "gmm" and info["model"]["arch"] == "mlp"
    assert info["versions"]["torch"] == torch.__version__


def test_save_refuses_objects_weights_only_could_not_read(tmp_path):
    with pytest.raises(ValueError, match=r"state\['extra'\] is a .*_Payload"):
        save_checkpoint(tmp_path / "c.pt", {**small_state(0.0), "extra": _Payload(tmp_path / "x")})
    with pytest.raises(ValueError, match="TorchVersion"):
        save_checkpoint(tmp_path / "c.pt", {**small_state(0.0), "v": torch.__version__})
    assert not (tmp_path / "c.pt").exists()
