"""Device handling: samples are drawn where the model lives, training runs and resumes on every
device present (the ``device`` fixture adds CUDA when a GPU is visible; CI has none)."""

import pytest
import torch

import solvers
from scoresde import VPSDE
from scoresde.networks import build_model
from scoresde.training import TrainConfig, train


def test_sample_draws_x_T_on_the_models_device(device):
    model = build_model("mlp", data_shape=(2,), hidden=16, depth=1).to(device).eval()
    res = solvers.sample(model, VPSDE(), (8, 2), sampler="ddim", steps=3, generator=0)
    assert res.x.device.type == device.type and res.nfe == 3
    assert torch.isfinite(res.x).all() and not res.x.requires_grad  # no graph through the steps
    # gradients through the sampler when asked for (e.g. to differentiate a sample w.r.t. weights)
    res = solvers.sample(model, VPSDE(), (8, 2), sampler="ddim", steps=3, generator=0, enable_grad=True)
    res.x.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    # a plain function has no parameters: its samples are drawn on the CPU unless told otherwise
    res = solvers.sample(lambda x, t: torch.zeros_like(x), VPSDE(), (4, 2), sampler="ddim", steps=2)
    assert res.x.device.type == "cpu"


def test_sample_on_the_model_device_matches_cpu(device):
    # the same per-sample noise and arithmetic on either device: float64 samples agree closely
    torch.manual_seed(0)
    model = build_model("mlp", data_shape=(2,), hidden=16, depth=1).double().eval()
    cpu = solvers.sample(model, VPSDE(), (16, 2), sampler="dpm_solver", steps=8, generator=3, dtype=torch.float64).x
    other = solvers.sample(model.to(device), VPSDE(), (16, 2), sampler="dpm_solver", steps=8, generator=3,
                           dtype=torch.float64).x
    assert torch.allclose(other.cpu(), cpu, rtol=1e-9, atol=1e-9)


def test_training_on_device_writes_a_cpu_checkpoint(device, tmp_path):
    cfg = TrainConfig(dataset="gmm", data_n=256, model="mlp", model_kwargs={"hidden": 32, "depth": 2}, steps=6,
                      batch_size=64, warmup=2, out_dir=str(tmp_path), num_samples=8, sample_steps=3, log_every=3,
                      ckpt_every=0, max_minutes=None, device=str(device))
    res = train(cfg, progress=False)
    assert res.step == 6 and res.metrics["loss"] == res.metrics["loss"]  # finite, not NaN
    state = torch.load(res.final_checkpoint, weights_only=True)
    assert all(v.device.type == "cpu" for v in state["model"].values())
    if device.type == "cuda":
        assert state["optimizer"]["param_groups"][0]["fused"] is True
    # resuming on the same device continues the run
    more = train(TrainConfig.from_dict({**cfg.to_dict(), "steps": 9}), resume=True, progress=False)
    assert more.step == 9


def test_compile_mode_is_validated(tmp_path):
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        TrainConfig(compile_mode="fast", out_dir=str(tmp_path)).validate()
