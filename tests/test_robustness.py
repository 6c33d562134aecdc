"""Rough edges a newcomer or a hostile tester meets (issue 17): no run is lost or mixed, bad input
gets one clear line before any expensive work, pictures are large enough to see, and likelihoods
refuse non-finite data and models. Each test names the item it covers."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from scoresde.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_info,
    clean_temporaries,
    load_checkpoint,
    save_checkpoint,
)
from scoresde.memory import MemoryEstimateError, check_fits
from scoresde.training import (
    RunDirectory,
    RunDirectoryError,
    TrainConfig,
    progress_status,
    save_sample_grid,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny(out, **kw) -> TrainConfig:
    base = dict(dataset="gmm", data_n=256, model="mlp", model_kwargs={"hidden": 16, "depth": 1}, steps=4,
                batch_size=32, warmup=0, lr=1e-3, out_dir=str(out), num_samples=0, log_every=2, ckpt_every=0,
                max_minutes=None, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _cli():
    from typer.testing import CliRunner

    from scoresde_cli.app import app

    return lambda *args: CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, needle: str, code: int = 1) -> str:
    """:func:`test_cli.assert_one_line_error`, returning the error line."""
    from test_cli import assert_one_line_error

    assert_one_line_error(result, needle, code)
    return [ln for ln in result.output.splitlines() if ln.startswith("Error:")][0]


# ---------------------------------------------------------------------------------------------
# 2. an existing run is never overwritten without --resume or --force
# ---------------------------------------------------------------------------------------------
def test_existing_run_is_refused_without_resume_or_force(tmp_path):
    train(tiny(tmp_path, steps=6), progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RunDirectoryError, match="already holds a run .*--resume.*--force"):
        train(tiny(tmp_path, steps=2), progress=False)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 6  # untouched
    assert (tmp_path / "metrics.jsonl").read_text() == before
    # a directory with only a config.json (a run that died before its first checkpoint) counts too
    (tmp_path / "checkpoint.pt").unlink()
    with pytest.raises(RunDirectoryError, match="config.json"):
        train(tiny(tmp_path, steps=2), progress=False)
    res = train(tiny(tmp_path, steps=2), force=True, progress=False)  # --force: a fresh run
    assert res.step == 2 and load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]
    assert not (tmp_path / ".lock").exists()


def test_cli_refuses_an_existing_run_in_one_line(tmp_path):
    invoke = _cli()
    args = ["--dataset", "gmm", "--data-n", 256, "--model", "mlp", "--steps", 2, "--batch-size", 32,
            "--num-samples", 0, "--device", "cpu", "--quiet", "--out", tmp_path]
    assert invoke("train", *args).exit_code == 0
    line = one_line_error(invoke("train", *args), "already holds a run")
    assert "--resume" in line and "--force" in line
    assert invoke("train", *args, "--force").exit_code == 0


# ---------------------------------------------------------------------------------------------
# 3 and 4. a locked run directory; SIGTERM saves a final checkpoint; stale temporaries go
# ---------------------------------------------------------------------------------------------
WORKER = textwrap.dedent(
    """
    import json, sys
    from scoresde.training import TrainConfig, TrainingInterrupted, train

    cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
    try:
        train(cfg, progress=False)
    except TrainingInterrupted as stop:
        print(json.dumps({"signal": stop.signal, "step": stop.step, "checkpoint": stop.checkpoint}))
        sys.exit(3)
    """
)


def test_lock_sigterm_checkpoint_and_resume(tmp_path):
    out = tmp_path / "run"
    cfg = tiny(out, steps=10**6, max_minutes=2.0, ckpt_every=50, log_every=10)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(cfg.to_dict())], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        log, seen = out / "metrics.jsonl", 0
        deadline = time.time() + 90
        while seen < 60:  # past the first periodic checkpoint (step 50)
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
            lines = log.read_text().splitlines() if log.is_file() else []
            seen = json.loads(lines[-1])["step"] if lines else 0
        # 3. a second run on the same directory fails at once, naming the holder; so does a resume
        with pytest.raises(RunDirectoryError, match=f"in use by another training run \\(pid {proc.pid} "):
            train(cfg, progress=False, force=True)
        with pytest.raises(RunDirectoryError, match="in use by another training run"):
            train(cfg, resume=True, progress=False)
        # 4. SIGTERM: the run stops at a step boundary with a checkpoint of that step
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, stderr
    stop = json.loads(stdout.strip().splitlines()[-1])
    assert stop["signal"] == signal.SIGTERM and stop["step"] >= seen > 50
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == stop["step"]  # not the periodic step-50 checkpoint
    assert not (out / ".lock").exists()
    # a temporary left by a save that was killed, and one of a process that is gone, are removed on start
    (out / ".checkpoint.pt.tmp-999999999").write_bytes(b"half a file")
    res = train(TrainConfig.from_dict({**cfg.to_dict(), "steps": stop["step"] + 3}), resume=True, progress=False)
    assert res.step == stop["step"] + 3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


def test_clean_temporaries_keeps_a_live_writer_unless_told(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    live = tmp_path / f".checkpoint.pt.tmp-{os.getpid()}"
    dead = tmp_path / ".checkpoint.pt.tmp-999999999"
    for p in (live, dead):
        p.write_bytes(b"x")
    assert clean_temporaries(ckpt) == [dead] and live.exists()
    assert clean_temporaries(ckpt, all_pids=True) == [live]


def test_lock_is_exclusive_and_released(tmp_path):
    first = RunDirectory(tmp_path).open()
    try:
        with pytest.raises(RunDirectoryError, match=f"pid {os.getpid()} holds"):
            RunDirectory(tmp_path).open()
    finally:
        first.close()
    RunDirectory(tmp_path).open().close()  # free again, and no lock file left behind
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 6. the bar measures progress against whichever limit ends the run
# ---------------------------------------------------------------------------------------------
def test_progress_follows_the_limit_that_ends_the_run():
    # 5-minute budget, 100,000 steps: after 150 s and 1,000 steps the run is half done (by time)
    frac, text = progress_status(1000, 100_000, 150.0, 300.0)
    assert frac == pytest.approx(0.5)
    assert "2:30 of 5:00" in text and "2:30 left" in text
    # 100 steps that end long before the budget: half done after 50 steps, 10 s left at 5 steps/s
    frac, text = progress_status(50, 100, 10.0, 300.0)
    assert frac == pytest.approx(0.5) and "0:10 left" in text
    frac, text = progress_status(75, 100, 10.0, None, start_step=50)  # resumed at 50: 25 steps in 10 s
    assert frac == pytest.approx(0.75) and "0:10 left" in text


def test_time_bound_run_shows_the_time_limit(tmp_path, capfd):
    res = train(tiny(tmp_path, steps=10**6, max_minutes=0.01), progress=True)
    err = capfd.readouterr().err
    assert res.stopped_by == "time"
    assert "100%" in err and "of 0:01" in err, err[-500:]
    assert "/1000000 [" not in err  # not a step count that the time limit will never reach


# ---------------------------------------------------------------------------------------------
# 7. small images are enlarged (nearest neighbour) in grids and trajectory strips
# ---------------------------------------------------------------------------------------------
def test_sample_grid_of_small_images_is_at_least_256_px(tmp_path):
    import matplotlib.image as mpimg

    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_sample_grid(x, tmp_path / "g.png")
    img = mpimg.imread(tmp_path / "g.png")[..., 0]
    # 8 x 8 tiles of 8 px with 1 px borders: 73 px, enlarged 4 x to 292 px in 4 x 4 blocks
    assert img.shape[:2] == (292, 292)
    blocks = torch.from_numpy(img.copy()).reshape(73, 4, 73, 4)
    assert torch.equal(blocks, blocks[:, :1, :, :1].expand_as(blocks))  # each pixel is one flat block
    # the first image sits at rows/cols 1..8 of the 73 px grid: its pixels, in order
    first = blocks[1:9, 0, 1:9, 0]
    expected = ((x[0, 0].clamp(-1, 1) + 1) / 2)
    assert (first - expected).abs().max() < 2 / 255  # the gray colormap has 256 levels


def test_trajectory_strip_is_wide_enough_even_with_one_step(tmp_path):
    import matplotlib.image as mpimg

    from scoresde_cli.pictures import trajectory_strip

    xs = torch.rand(1, 2, 1, 8, 8)
    trajectory_strip(torch.tensor([1.0]), xs, xs, tmp_path / "t.png")
    assert mpimg.imread(tmp_path / "t.png").shape[1] >= 256


# ---------------------------------------------------------------------------------------------
# 8. output paths and the grid sampler are checked before any work
# ---------------------------------------------------------------------------------------------
def test_unwritable_out_and_bad_sampler_fail_before_the_data_is_built(tmp_path, monkeypatch):
    import scoresde.training as training

    def no_data(config):
        raise AssertionError("the data was built before the paths were checked")

    monkeypatch.setattr(training, "build_data", no_data)
    invoke = _cli()
    one_line_error(invoke("train", "--out", "/proc/scoresde-run", "--quiet"), "cannot write to --out /proc/scoresde-run")
    one_line_error(invoke("train", "--out", tmp_path / "r", "--set", "sampler=bogus", "--quiet"),
                   "sampler must be one of")
    (tmp_path / "file").write_text("")
    one_line_error(invoke("train", "--out", tmp_path / "file", "--quiet"), "not a directory")
    with pytest.raises(RunDirectoryError, match="cannot"):  # the library checks too
        train(tiny("/proc/scoresde-run"), progress=False)


def test_writable_checks(tmp_path):
    from scoresde_cli._util import UserError, check_writable_dir, check_writable_file

    assert check_writable_dir(tmp_path / "a" / "b").is_dir()
    assert check_writable_file(tmp_path / "c" / "x.png") == tmp_path / "c" / "x.png"
    assert not (tmp_path / "c" / "x.png").exists() and list((tmp_path / "c").iterdir()) == []
    with pytest.raises(UserError, match="cannot write to the folder of --out /proc"):
        check_writable_file(Path("/proc/g.json"))
    with pytest.raises(UserError, match="is a directory"):
        check_writable_file(tmp_path, what="--tensors")


# ---------------------------------------------------------------------------------------------
# 9. --set and TOML values are type-checked like the named options
# ---------------------------------------------------------------------------------------------
def test_set_and_toml_values_are_type_checked(tmp_path):
    invoke = _cli()
    out = ["--out", tmp_path / "r", "--quiet"]
    one_line_error(invoke("train", "--set", "lr=nan", *out), "lr must be a finite number; got 'nan'")
    one_line_error(invoke("train", "--set", "conditional=maybe", *out), "conditional must be true or false; got 'maybe'")
    one_line_error(invoke("train", "--set", "steps=1e3", *out), "steps must be an integer; got 1000.0")
    cfg = tmp_path / "c.toml"
    cfg.write_text("grad_clip = nan\n")
    one_line_error(invoke("train", "--config", cfg, *out), "grad_clip must be a finite number; got nan")
    cfg.write_text("ema_decay = inf\n")
    one_line_error(invoke("train", "--config", cfg, *out), "ema_decay must be a finite number; got inf")
    assert not (tmp_path / "r" / "config.json").exists()


def test_every_field_is_type_checked():
    bad = {"flip": 1, "steps": True, "lr": float("inf"), "grad_clip": float("nan"), "sde": 3, "model_kwargs": [],
           "max_minutes": float("nan"), "data_n": 2.5, "betas": (0.9, float("nan")), "t_min": "small"}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=f"^{name} must be"):
            TrainConfig(**{name: value}).validate()
    TrainConfig(lr=1, t_min=None, data_n=None).validate()  # an int where a float goes is fine


# ---------------------------------------------------------------------------------------------
# 10. requests too large for the memory are refused with the number
# ---------------------------------------------------------------------------------------------
def test_huge_toy_dataset_is_refused_before_allocating(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(MemoryEstimateError, match=r"n=10000000000000 examples of 'gmm' needs about 720 TB of memory"):
        train(tiny(tmp_path, data_n=10**13), progress=False)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(MemoryEstimateError, match="needs about 2 GB of memory but 1 GB is available"):
        check_fits(2e9, "this", available=10**9)


def test_huge_likelihood_solve_is_refused_before_allocating():
    from scoresde.likelihood import log_likelihood
    from scoresde.sde import VPSDE

    x = torch.zeros(1, 1000).expand(10**9, 1000)  # a view: no memory behind it
    with pytest.raises(MemoryEstimateError, match=r"likelihood solve on \(1000000000, 1000\) float32 data needs about"):
        log_likelihood(lambda x, t: torch.zeros_like(x), VPSDE(), x)


def test_cli_likelihood_refuses_a_huge_n(tmp_path):
    train(tiny(tmp_path, steps=1), progress=False)
    one_line_error(_cli()("likelihood", tmp_path / "checkpoint.pt", "--n", 10**13, "--quiet", "--device", "cpu"),
                   "needs about")


# ---------------------------------------------------------------------------------------------
# 11. non-finite data or model outputs are errors, never numbers
# ---------------------------------------------------------------------------------------------
def test_likelihood_refuses_non_finite_data_and_models():
    from scoresde.likelihood import bits_per_dim, decode, encode, log_likelihood
    from scoresde.sde import VPSDE

    sde = VPSDE()
    # N(0, I) data stay N(0, I) under a VP SDE: score = -x, so the exact eps = -std * score = std(t) x
    exact = lambda x, t: sde.std(t)[:, None] * x  # noqa: E731
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    # the exact answer first, so the refusals below are not about a broken setup: log p = -|x|^2/2 - log(2 pi)
    res = log_likelihood(exact, sde, x, trace="exact")
    torch.testing.assert_close(res.logp, -0.5 * (x ** 2).sum(1) - math.log(2 * math.pi), atol=1e-3, rtol=0)
    zero = exact
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[1, 0] = value
        for fn in (log_likelihood, encode, decode):
            with pytest.raises(ValueError, match="holds 1 non-finite value"):
                fn(zero, sde, bad)
    images = torch.full((2, 1, 2, 2), -1.0)  # level 0 of 256: on the grid, but for one NaN pixel
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images holds 1 non-finite value"):
        bits_per_dim(zero, sde, images)
    nan_model = lambda x, t: x * float("nan")  # noqa: E731 - e.g. a network with NaN weights
    for trace in ("exact", "hutchinson"):
        with pytest.raises(RuntimeError, match="the model returned NaN or inf during the ODE solve"):
            log_likelihood(nan_model, sde, x, trace=trace)
    with pytest.raises(RuntimeError, match="the model returned NaN or inf"):
        encode(nan_model, sde, x)
    late_nan = lambda x, t: torch.where(t[:, None] > 0.5, float("nan"), 0.0) * x  # noqa: E731
    with pytest.raises(RuntimeError, match=r"first at t=0\.5"):
        log_likelihood(late_nan, sde, x, trace="exact")


# ---------------------------------------------------------------------------------------------
# 13. malformed checkpoint entries and full disks: one line, nothing left behind
# ---------------------------------------------------------------------------------------------
def _state(**entries):
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": 3, "config": {}, "model": {},
            **entries}


@pytest.mark.parametrize("ema", [5, {"decay": 0.9, "shadow": 3}, {"shadow": {}}, [1, 2]])
def test_info_on_a_malformed_ema_entry(tmp_path, ema):
    path = save_checkpoint(tmp_path / "c.pt", _state(ema=ema))
    with pytest.raises(CheckpointError, match="malformed 'ema' entry: expected a dict with a number 'decay'"):
        checkpoint_info(path)
    one_line_error(_cli()("info", path), "malformed 'ema' entry")


def test_info_on_other_malformed_entries(tmp_path):
    for key, value in (("sde_config", 7), ("model_config", "unet"), ("model", {"w": 1}), ("step", "3")):
        path = save_checkpoint(tmp_path / f"{key}.pt", _state(**{key: value}))
        one_line_error(_cli()("info", path), f"malformed {key!r} entry")


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                 "file write failed"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_full_disk_during_save(tmp_path, monkeypatch, failure):
    import shutil

    import scoresde.checkpoint as checkpoint

    path = save_checkpoint(tmp_path / "checkpoint.pt", _state())

    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 part of a zip")
        raise failure

    real_usage = shutil.disk_usage
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    with pytest.raises(CheckpointWriteError, match=f"could not write checkpoint to {path}: no space left on device$"):
        save_checkpoint(path, _state(step=4))
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary left


# ---------------------------------------------------------------------------------------------
# issue 13: resume rules live next to TrainConfig; the core does not import solvers
# ---------------------------------------------------------------------------------------------
def test_resume_config_from_the_run_directory(tmp_path):
    saved = tiny(tmp_path, model_kwargs={"hidden": 8, "depth": 1}, sde_kwargs={"beta_max": 15.0}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = TrainConfig.for_run({"out_dir": str(tmp_path), "steps": 9, "sde_kwargs": {"beta_min": 0.2}}, resume=True)
    assert cfg.steps == 9 and cfg.model == "mlp" and cfg.model_kwargs == {"hidden": 8, "depth": 1}
    assert cfg.sde_kwargs == {"beta_max": 15.0, "beta_min": 0.2}  # merged key by key
    fresh = TrainConfig.for_run({"out_dir": str(tmp_path), "model": "mlp"})  # not resumed: the defaults
    assert fresh.steps == TrainConfig().steps and fresh.model_kwargs == {}  # the default preset's overrides dropped
    with pytest.raises(ValueError, match=r"cannot resume from X: .*sde_kwargs: \{'beta_max': 15.0\} -> "):
        cfg.check_resume(saved, "X")
    longer = TrainConfig.for_run({"out_dir": str(tmp_path), "steps": 9, "log_every": 3}, resume=True)
    longer.check_resume(saved)  # steps and log_every may change
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.002"):
        longer.replace(lr=2e-3).check_resume(saved)
    with pytest.raises(ValueError, match="steps: 4 -> 9"):  # a cosine schedule decays to `steps`
        longer.replace(lr_schedule="cosine").check_resume({**saved, "lr_schedule": "cosine"})
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        TrainConfig.for_run({"out_dir": str(tmp_path)}, resume=True)


def test_core_package_does_not_import_solvers():
    import ast

    offenders = []
    # the trainer and what it builds on (scoresde.generate and scoresde.conditioning are layers on
    # top of the samplers by design)
    names = ("training", "checkpoint", "distributed", "ema", "losses", "sde", "data", "memory", "likelihood", "_tensor")
    paths = [ROOT / "scoresde" / f"{n}.py" for n in names] + sorted((ROOT / "scoresde" / "networks").rglob("*.py"))
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "solvers"]
    assert offenders == []
