"""End-to-end tests of the ``scoresde`` CLI with Typer's CliRunner on tiny configurations.

One tiny run (the ``tiny`` U-Net on digits, a few steps) is trained once per module; the other
tests sample from it, resume it in a copy, compute likelihoods and provoke user errors. What is
checked is plumbing: files written, options reaching the library, exact batch-size invariance,
NFE matching the samplers' documented counts, and one-line error messages without tracebacks.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import solvers
from scoresde_cli.app import app

runner = CliRunner()



TINY = ["--model", "tiny", "--batch-size", "8", "--warmup", "0", "--num-samples", "4", "--sample-steps", "2",
        "--log-every", "2", "--device", "cpu", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(result):
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def assert_one_line_error(result, needle: str, code: int = 1):
    """Non-zero exit, no traceback, and the output ends with exactly one ``Error:`` line holding ``needle``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert needle in errors[0], result.output


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step tiny run whose base settings come from a TOML file that the options partly override."""
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "tiny.toml"
    cfg.write_text('dataset = "digits"\nsteps = 50\nseed = 3\n[sde_kwargs]\nbeta_max = 15.0\n')
    out = root / "run"
    ok(invoke("train", "--config", cfg, "--out", out, "--steps", 4, *TINY))
    return out


def test_no_args_prints_help():
    result = invoke()
    assert "Usage:" in result.output and "train" in result.output and "samplers" in result.output
    assert "Traceback" not in result.output


def test_every_option_has_help_and_a_shown_default():
    for command in ("train", "sample", "likelihood"):
        text = ok(invoke(command, "--help")).output
        assert "[default:" in text
    text = ok(invoke("train", "--help")).output
    for option in ("--steps", "--batch-size", "--lr", "--ema-decay", "--seed", "--device", "--sde", "--model"):
        block = text.split(option, 1)[1].split("\n  -", 1)[0]
        assert "[default:" in block, option


def test_train_writes_run_directory_with_file_values_and_overrides(run):
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 4  # option beats the file's 50
    assert saved["seed"] == 3 and saved["sde_kwargs"] == {"beta_max": 15.0}  # from the file
    assert saved["model"] == "tiny" and saved["batch_size"] == 8
    for name in ("checkpoint.pt", "metrics.jsonl", "samples.png", "samples_000004.png"):
        assert (run / name).is_file(), name
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_resume_continues_from_the_saved_step(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # only the new end is given: the rest of the config comes from the run's config.json
    result = ok(invoke("train", "--out", copy, "--resume", "--steps", 6, "--quiet"))
    assert "step 6" in result.output
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]  # appended, not restarted
    assert re.search(r"^step\s+6$", ok(invoke("info", copy / "checkpoint.pt")).output, re.M)


# documented NFE: ancestral = steps + 1 (the final Tweedie denoise is a call), pc = 2 per step + 1,
# ddim and dpm_solver exactly `steps` (their final denoise reuses the last evaluation)
@pytest.mark.parametrize("sampler,steps,nfe", [("ancestral", 3, 4), ("pc", 3, 7), ("ddim", 3, 3), ("dpm_solver", 3, 3)])
def test_sample_writes_grid_and_tensors(run, tmp_path, sampler, steps, nfe):
    out = tmp_path / "grid.png"
    result = ok(invoke("sample", run / "checkpoint.pt", "--sampler", sampler, "--steps", steps, "-n", 3,
                       "--batch-size", 2, "--out", out, "--quiet", "--device", "cpu"))
    assert out.is_file() and out.stat().st_size > 0
    data = np.load(tmp_path / "grid.npz")
    assert data["x"].shape == (3, 1, 8, 8) and np.isfinite(data["x"]).all()
    assert str(data["sampler"]) == sampler and int(data["steps"]) == steps
    assert "wall time:" in result.output
    assert f"NFE: {nfe} per batch ({2 * nfe} in 2 batch(es))" in result.output


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])  # one stochastic, one deterministic
def test_sample_is_identical_for_any_batch_size(run, tmp_path, sampler):
    def draw(batch_size, seed=0):
        path = tmp_path / f"b{batch_size}_{seed}.pt"
        ok(invoke("sample", run / "checkpoint.pt", "--sampler", sampler, "--steps", 3, "-n", 5, "--seed", seed,
                  "--batch-size", batch_size, "--out", tmp_path / "g.png", "--tensors", path, "--quiet", "--device", "cpu"))
        return torch.load(path, weights_only=True)["x"]

    one, many = draw(1), draw(64)
    assert torch.equal(one, many)
    assert not torch.equal(one, draw(1, seed=1))  # the seed matters, so equality above is not vacuous


def test_sample_trajectory_and_knobs(run, tmp_path):
    traj = tmp_path / "traj.png"
    ok(invoke("sample", run / "checkpoint.pt", "--sampler", "ddim", "--steps", 4, "--knob", "eta=0.5",
              "--schedule", "quadratic", "-n", 2, "--out", tmp_path / "g.png", "--trajectory", traj, "--quiet"))
    assert traj.is_file() and traj.stat().st_size > 0


def test_likelihood_prints_bits_per_dim_with_error_bar(run):
    result = ok(invoke("likelihood", run / "checkpoint.pt", "--n", 4, "--rtol", "1e-2", "--atol", "1e-2",
                       "--quiet", "--device", "cpu"))
    m = re.search(r"bits/dim.*: (-?[\d.]+) ± ([\d.]+) \(n=4", result.output)
    assert m, result.output
    assert np.isfinite(float(m.group(1))) and float(m.group(2)) > 0
    assert re.search(r"NFE: \d+ in 1 solve", result.output)


def test_info_reports_what_the_checkpoint_holds(run):
    text = ok(invoke("info", run / "checkpoint.pt")).output
    assert re.search(r"^step\s+4$", text, re.M)
    assert re.search(r"^dataset\s+digits", text, re.M)
    assert re.search(r"^sde\s+VPSDE .*beta_max=15", text, re.M)
    assert re.search(r"^model\s+tiny preset, unet", text, re.M)
    assert re.search(r"^ema\s+yes", text, re.M)
    assert "torch=" in text and "scoresde=" in text
    summary = json.loads(ok(invoke("info", run / "checkpoint.pt", "--json")).output)
    assert summary["step"] == 4 and summary["has_ema"] is True


def test_samplers_lists_every_sampler_with_knobs_and_defaults():
    text = ok(invoke("samplers")).output
    blocks = {}  # sampler name -> (header line, option lines)
    for line in text.splitlines():
        if line and not line.startswith(" "):
            name = line.split()[0]
            blocks[name] = (line, [])
        elif line.strip():
            blocks[name][1].append(line.strip())
    assert set(solvers.SAMPLERS) <= set(blocks)
    for name, record in solvers.SAMPLERS.items():
        header, lines = blocks[name]
        assert f"default steps {record.default_steps}" in header
        for knob, default in record.defaults().items():
            assert any(ln.startswith(f"{knob}={default!r}") for ln in lines), (name, knob)


# ---------------------------------------------------------------------------------------------
# User mistakes: one line, non-zero exit, no traceback.
# ---------------------------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path):
    for command in ("sample", "likelihood", "info"):
        assert_one_line_error(invoke(command, tmp_path / "nope.pt"), "no checkpoint file")


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a torch file")
    assert_one_line_error(invoke("sample", bad, "--quiet"), "truncated or corrupt")
    assert_one_line_error(invoke("info", bad), "truncated or corrupt")


def test_unknown_dataset_and_negative_steps(tmp_path):
    assert_one_line_error(invoke("train", "--dataset", "imagenet", "--out", tmp_path), "'--dataset'", code=2)
    assert_one_line_error(invoke("train", "--steps", -5, "--out", tmp_path), "'--steps'", code=2)
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "imagenet"\n')
    assert_one_line_error(invoke("train", "--config", cfg, "--out", tmp_path), "unknown dataset 'imagenet'")
    cfg.write_text("steps = -5\n")
    assert_one_line_error(invoke("train", "--config", cfg, "--out", tmp_path), "steps must be a positive integer")


def test_config_file_errors(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("steps = 10\nbogus = 1\n")
    assert_one_line_error(invoke("train", "--config", cfg, "--out", tmp_path), "unknown key(s) ['bogus']")
    cfg.write_text("steps = = 10\n")
    assert_one_line_error(invoke("train", "--config", cfg, "--out", tmp_path), "not valid TOML")
    assert_one_line_error(invoke("train", "--config", tmp_path / "none.toml", "--out", tmp_path), "no config file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu(run, tmp_path):
    assert_one_line_error(invoke("train", "--device", "cuda", "--out", tmp_path, "--steps", 1), "CUDA requested but not available")
    assert_one_line_error(invoke("sample", run / "checkpoint.pt", "--device", "cuda"), "CUDA requested but not available")


def test_unknown_or_misplaced_knob(run, tmp_path):
    ck = run / "checkpoint.pt"
    assert_one_line_error(invoke("sample", ck, "--knob", "foo=1", "--out", tmp_path / "g.png"), "got unknown option(s) ['foo']")
    assert_one_line_error(invoke("sample", ck, "--sampler", "pc", "--eta", 0.5, "--out", tmp_path / "g.png"), "got unknown option(s) ['eta']")
    assert_one_line_error(invoke("sample", ck, "--knob", "eta", "--out", tmp_path / "g.png"), "expects key=value")
    assert_one_line_error(invoke("sample", ck, "--sampler", "nope"), "unknown sampler 'nope'")
    assert_one_line_error(invoke("sample", ck, "--knob", "order=two", "--out", tmp_path / "g.png"), "order must be an integer")


def test_checkpoint_that_does_not_fit_the_request(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert_one_line_error(invoke("train", "--out", copy, "--resume", "--sde", "subvp", "--quiet"), "cannot resume")
    assert_one_line_error(invoke("train", "--out", copy, "--resume", "--model", "mlp", "--quiet"), "cannot resume")
    assert_one_line_error(invoke("sample", run / "checkpoint.pt", "--label", 3, "--quiet"), "class-conditional")


def test_vector_data_end_to_end(tmp_path):
    """A 2-D toy with the MLP preset: another preset drops the default preset's overrides; samples,
    trajectory and an exact-trace likelihood work on vectors."""
    out = tmp_path / "moons"
    ok(invoke("train", "--dataset", "moons", "--model", "mlp", "--steps", 2, "--batch-size", 16, "--num-samples", 8,
              "--sample-steps", 2, "--log-every", 1, "--out", out, "--device", "cpu", "--quiet"))
    assert json.loads((out / "config.json").read_text())["model_kwargs"] == {}
    ok(invoke("sample", out / "checkpoint.pt", "--sampler", "euler_maruyama", "--steps", 3, "-n", 6, "--batch-size", 4,
              "--out", tmp_path / "s.png", "--tensors", tmp_path / "s.npz", "--trajectory", tmp_path / "t.png", "--quiet"))
    assert np.load(tmp_path / "s.npz")["x"].shape == (6, 2) and (tmp_path / "t.png").is_file()
    result = ok(invoke("likelihood", out / "checkpoint.pt", "--n", 4, "--trace", "exact", "--rtol", "1e-3",
                       "--atol", "1e-3", "--quiet"))
    assert "continuous density" in result.output


def test_calibrate_then_sample_on_the_grid(run, tmp_path):
    """`calibrate` writes a grid JSON (small pilot: the path, not the fit, is under test); `sample
    --grid` runs dpm_solver on it at exactly its steps, and every mismatch is a one-line error."""
    ckpt, grid = run / "checkpoint.pt", tmp_path / "grid.json"
    result = ok(invoke("calibrate", ckpt, "--steps", 3, "--out", grid, "--pilot-samples", 16, "--typical-samples", 4,
                       "--pilot-steps", 6, "--device", "cpu", "--quiet"))
    assert "M sample-NFE" in result.output and "validation half" in result.output and "coefficient sets" in result.output
    fitted = solvers.CalibratedGrid.load(grid)
    assert fitted.steps == 3 and len(fitted.t) == 4 and fitted.coefficients_tried > 0
    plain = tmp_path / "plain.json"
    result = ok(invoke("calibrate", ckpt, "--steps", 3, "--out", plain, "--pilot-samples", 16, "--typical-samples", 4,
                       "--pilot-steps", 6, "--device", "cpu", "--quiet", "--no-coefficients"))
    assert "(not fitted)" in result.output and solvers.CalibratedGrid.load(plain).coefficients is None
    result = ok(invoke("sample", ckpt, "--grid", grid, "-n", 2, "--out", tmp_path / "s.png", "--quiet"))
    assert "NFE: 3 per batch" in result.output
    assert str(np.load(tmp_path / "s.npz")["grid"]) == str(grid)
    assert_one_line_error(invoke("sample", ckpt, "--grid", grid, "--sampler", "ddim", "--out", tmp_path / "d.png"),
                          "dpm_solver")
    assert_one_line_error(invoke("sample", ckpt, "--grid", grid, "--steps", 5, "--out", tmp_path / "d.png"), "fitted for 3")
    assert_one_line_error(invoke("sample", ckpt, "--grid", grid, "--schedule", "logsnr", "--out", tmp_path / "d.png"),
                          "fixes the time grid")
    assert_one_line_error(invoke("sample", ckpt, "--grid", grid, "--order", 2, "--out", tmp_path / "d.png"), "other knobs")
    (tmp_path / "bad.json").write_text("{}")
    assert_one_line_error(invoke("sample", ckpt, "--grid", tmp_path / "bad.json", "--out", tmp_path / "d.png"),
                          "not a calibrated grid")
    assert_one_line_error(invoke("calibrate", ckpt, "--steps", 3, "--pilot-steps", 2, "--out", grid), "--pilot-steps")
    assert_one_line_error(invoke("calibrate", ckpt, "--steps", 3, "--knob", "schedule=logsnr", "--out", grid, "--quiet"),
                          "schedule")
    assert_one_line_error(invoke("calibrate", ckpt, "--steps", 3, "--knob", "coefficients=none", "--out", grid, "--quiet"),
                          "--no-coefficients")


def test_a_sampler_registered_from_outside_runs_from_the_cli(run, tmp_path):
    from test_registry import ToyOptions, toy

    solvers.register(solvers.Sampler("toy_cli", toy, ToyOptions, 3, False, summary="test sampler"))
    try:
        out = tmp_path / "toy.png"
        result = ok(invoke("sample", run / "checkpoint.pt", "--sampler", "toy_cli", "--knob", "shrink=0.5", "-n", 3,
                           "--out", out, "--device", "cpu", "--quiet"))
        assert "NFE: 3 per batch" in result.output and out.is_file()
        assert "toy_cli" in ok(invoke("samplers")).output
        assert_one_line_error(invoke("sample", run / "checkpoint.pt", "--sampler", "toy_cli", "--knob", "shrink=big",
                                     "--out", out, "--quiet"), "shrink must be a finite number")
    finally:
        solvers.REGISTRY.pop("toy_cli", None)


def test_classifier_free_guidance_from_the_cli(tmp_path):
    """The README's guidance example end to end: a class-conditional checkpoint, --label, --guidance 2."""
    out = tmp_path / "cond"
    ok(invoke("train", "--out", out, "--steps", 3, "--conditional", *TINY))
    x = {}
    for w in (1.0, 2.0):
        grid = tmp_path / f"g{w}.png"
        result = ok(invoke("sample", out / "checkpoint.pt", "--label", 3, "--guidance", w, "-n", 5, "--steps", 4,
                           "--batch-size", 2, "--out", grid, "--quiet"))
        assert grid.is_file() and "NFE" in result.output
        x[w] = np.load(grid.with_suffix(".npz"))["x"]
    assert x[1.0].shape == x[2.0].shape == (5, 1, 8, 8)
    assert np.isfinite(x[2.0]).all() and not np.array_equal(x[1.0], x[2.0])
