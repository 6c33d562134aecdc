"""diffusers models read from disk: our samplers on diffusers' timesteps reproduce diffusers' own
DDIM and DDPM schedulers from the same noise. Skipped when diffusers is not installed."""

import sys

import pytest
import torch

import solvers
import scoresde
from scoresde import diffusers_io
from scoresde.checkpoint import CheckpointError, load_model
from scoresde.noise import SampleNoise

diffusers = pytest.importorskip("diffusers", reason="diffusers not installed: pip install 'scoresde[diffusers]'")

B = 3


def tiny_unet(out_channels=1, seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=4,
    )


def _x_T():
    return torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _ours_ddim(model, sde, x_T, grid):
    """Our DDIM (eta = 0) on diffusers' timesteps as an explicit grid."""
    return solvers.sample(model, sde, x_T=x_T, sampler="ddim", steps=len(grid) - 1, t_grid=grid, denoise_final=False).x


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddim_from_a_pipeline_folder_matches_diffusers(tmp_path, spacing, prediction):
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction,
                                    timestep_spacing=spacing)
    diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(tmp_path)
    model, sde, info = scoresde.load_any(tmp_path)
    assert isinstance(sde, scoresde.DiscreteVPSDE) and info["shape"] == (1, 8, 8)
    assert info["prediction"] == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction]
    theirs = info["scheduler_object"]
    grid = diffusers_io.diffusers_timesteps(theirs, 10)
    x = _x_T()
    ours = _ours_ddim(model, sde, x, grid)
    with torch.no_grad():
        for ts in theirs.timesteps:
            x = theirs.step(model.net(x, ts).sample, ts, x, eta=0.0).prev_sample
    assert torch.isfinite(x).all()
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-4)


class RecordedNoise(SampleNoise):
    """SampleNoise that keeps every stream it hands out (so the test knows our sampler's noise)."""

    def __init__(self, seed, ids):
        super().__init__(seed, ids)
        self.drawn = {}

    def randn_streams(self, shape, stream, count, **kw):
        out = super().randn_streams(shape, stream, count, **kw)
        for k in range(count):
            self.drawn[stream + k] = out[k].clone()
        return out


def _diffusers_ddpm_with_noise(unet, sched, x, zs):
    """diffusers' DDPMScheduler chain, its noise replaced by ``zs``: each step is affine in its noise,
    ``step = m + c z``; two calls with known generator draws give ``c`` and ``m``."""
    with torch.no_grad():
        for i, ts in enumerate(sched.timesteps):
            out = unet(x, ts).sample
            draws = []
            for seed in (100 + i, 10_000 + i):
                prev = sched.step(out, ts, x, generator=torch.Generator().manual_seed(seed)).prev_sample
                draws.append((prev, torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))))
            (pa, za), (pb, zb) = draws
            c = ((pa - pb) / (za - zb)).median()  # a scalar per step (the posterior std)
            assert float(((pa - c * za) - (pb - c * zb)).abs().max()) <= 1e-4 * (1 + float(pa.abs().max()))
            x = pa - c * za + c * zs[i]
    return x


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_ddpm_ancestral_matches_diffusers_with_the_same_noise(tmp_path, prediction, spacing):
    n = 10
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False, prediction_type=prediction,
                                    timestep_spacing=spacing)
    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(tmp_path)
    model, sde, info = scoresde.load_any(tmp_path)
    theirs = info["scheduler_object"]
    grid = diffusers_io.diffusers_timesteps(theirs, n)
    x_T = _x_T()
    noise = RecordedNoise(5, torch.arange(B))
    ours = solvers.sample(model, sde, x_T=x_T, sampler="ancestral", steps=n, generator=noise, denoise_final=False,
                          t_grid=grid).x
    zs = [noise.drawn[k] for k in sorted(noise.drawn)][:n]
    assert len(zs) == n
    x = _diffusers_ddpm_with_noise(model.net, theirs, x_T.clone(), zs)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-4)


def test_a_bare_unet_folder_loads_with_the_default_ddpm_schedule(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path)
    model, sde, info = scoresde.load_any(tmp_path)
    assert "default DDPMScheduler" in info["scheduler"]
    abar = scoresde.ddpm.alphas_cumprod(scoresde.ddpm.linear_betas())
    torch.testing.assert_close(model.alphas_cumprod, abar, rtol=1e-6, atol=0)  # diffusers computes abar in float32
    x, t = _x_T(), torch.tensor([0.05, 0.5, 1.0])
    with torch.no_grad():
        want = unet(x, torch.tensor([49.0, 499.0, 999.0])).sample
        torch.testing.assert_close(model(x, t), want, rtol=1e-5, atol=1e-5)


def test_learned_variance_keeps_the_mean_half(tmp_path):
    unet = tiny_unet(out_channels=2)
    sched = diffusers.DDPMScheduler(variance_type="learned_range")
    model, sde = scoresde.from_diffusers(unet, sched)
    assert model.learned_variance
    x, t = _x_T(), torch.full((B,), 0.3)
    with torch.no_grad():
        full = unet(x, model.timestep(t)).sample
        torch.testing.assert_close(model(x, t), full[:, :1], rtol=0, atol=0)


def test_safetensors_files_are_named_as_such(tmp_path):
    tiny_unet().save_pretrained(tmp_path)
    weights = next(tmp_path.glob("*.safetensors"))
    with pytest.raises(ValueError, match="is a safetensors file .* pass the folder"):
        scoresde.load_any(weights)
    with pytest.raises(CheckpointError, match="safetensors file"):
        load_model(weights)


def test_missing_diffusers_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'scoresde\[diffusers\]'"):
        diffusers_io.load_diffusers(tmp_path)


def test_a_folder_that_is_neither_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a scoresde checkpoint.pt nor a diffusers model"):
        scoresde.load_any(tmp_path)


def test_ddim_linspace_spacing_is_refused_with_the_reason():
    sched = diffusers.DDIMScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="not a time grid"):
        diffusers_io.diffusers_timesteps(sched, 10)


def test_clipping_and_thresholding_follow_the_scheduler(tmp_path):
    """clip_sample=True reproduces diffusers' clipped DDPM (clip_sample, range 1) and DDIM with dynamic
    thresholding (use_clipped_model_output=True: the eps consistent with the thresholded x0)."""
    unet = tiny_unet()
    # DDPM, clipping x0 to [-1, 1]
    sched = diffusers.DDPMScheduler(clip_sample=True, timestep_spacing="trailing")
    model, sde = scoresde.from_diffusers(unet, sched, clip_sample=True)
    assert isinstance(model, scoresde.ClipX0)
    grid = diffusers_io.diffusers_timesteps(sched, 10)
    noise = RecordedNoise(7, torch.arange(B))
    knobs = dict(t_grid=grid)
    ours = solvers.sample(model, sde, x_T=_x_T(), sampler="ancestral", steps=10, generator=noise,
                          denoise_final=False, **knobs).x
    zs = [noise.drawn[k] for k in sorted(noise.drawn)][:10]
    theirs = _diffusers_ddpm_with_noise(unet, sched, _x_T(), zs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-4)
    unclipped = solvers.sample(scoresde.from_diffusers(unet, sched)[0], sde, x_T=_x_T(), sampler="ancestral", steps=10,
                               generator=RecordedNoise(7, torch.arange(B)), denoise_final=False, **knobs).x
    assert float((unclipped - theirs).abs().max()) > 0.1  # the clipping matters here
    # DDIM with dynamic thresholding
    sched = diffusers.DDIMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    model, sde = scoresde.from_diffusers(unet, sched, clip_sample=True)
    grid = diffusers_io.diffusers_timesteps(sched, 10)
    ours = _ours_ddim(model, sde, _x_T(), grid)
    x = _x_T()
    with torch.no_grad():
        for ts in sched.timesteps:
            x = sched.step(unet(x, ts).sample, ts, x, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-4)


def test_scoresde_sample_runs_end_to_end_on_a_diffusers_folder(tmp_path):
    from typer.testing import CliRunner

    from scoresde_cli.app import app

    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=sched).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "pipe"), "--sampler", "ddim", "--steps", "4", "-n", "3",
                                      "--out", str(out), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "NFE: 4 per batch" in result.output
    import numpy as np

    x = np.load(out.with_suffix(".npz"))["x"]
    assert x.shape == (3, 1, 8, 8) and np.isfinite(x).all()


def test_likelihood_on_a_diffusers_folder_needs_and_takes_a_dataset(tmp_path):
    from typer.testing import CliRunner

    from scoresde_cli.app import app

    diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=diffusers.DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    run = lambda *extra: CliRunner().invoke(app, ["likelihood", str(tmp_path / "pipe"), "-n", "2", "--rtol", "1e-2",  # noqa: E731
                                                  "--atol", "1e-2", "--device", "cpu", "--quiet", *extra])
    result = run()
    assert result.exit_code == 1 and "records no dataset: pass --dataset" in result.output
    result = run("--dataset", "digits")
    assert result.exit_code == 0, result.output
    assert "bits/dim" in result.output
