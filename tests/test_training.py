"""The trainer: exact resume, EMA arithmetic, label dropout, outputs, bad input, and a 2-D toy that
trains to the exact mixture it was drawn from."""

import json
import math

import pytest
import torch

from scoresde.ema import EMA
from scoresde.training import BatchSchedule, TrainConfig, resolve_device, train


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(dataset="gmm", data_n=512, model="mlp", model_kwargs={"hidden": 32, "depth": 2, "dropout": 0.1},
                steps=8, batch_size=64, warmup=3, lr=1e-3, out_dir=str(tmp_path), num_samples=0, log_every=2,
                ckpt_every=0, max_minutes=None, device="cpu", ema_decay=0.9)
    base.update(kw)
    return TrainConfig(**base)


def _state(path):
    return torch.load(path, weights_only=True)


def test_resume_is_bit_identical(tmp_path):
    # N steps straight vs N/2, stop, resume, N/2 more. Dropout is on, so the global torch RNG state
    # must be restored as well as the optimiser, schedule, EMA and data position.
    straight = train(tiny(tmp_path / "a"), progress=False)
    train(tiny(tmp_path / "b", steps=4), progress=False)
    resumed = train(tiny(tmp_path / "b"), resume=True, progress=False)
    assert straight.step == resumed.step == 8
    a, b = _state(straight.final_checkpoint), _state(resumed.final_checkpoint)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    # and the run did move: parameters differ from the initial ones
    init = train(tiny(tmp_path / "c", steps=1, lr=1e-12), progress=False)
    assert any(not torch.equal(a["model"][k], _state(init.final_checkpoint)["model"][k]) for k in a["model"])
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [2, 4, 6, 8]


def test_resume_refuses_a_changed_config(tmp_path):
    train(tiny(tmp_path, steps=2), progress=False)
    with pytest.raises(ValueError, match="lr: 0.001 -> 0.002"):
        train(tiny(tmp_path, lr=2e-3), resume=True, progress=False)


def test_ema_follows_its_recursion():
    # One scalar parameter set to 1, 2, 3, ...: shadow_n = d_n shadow + (1 - d_n) theta_n, with
    # d_n = min(decay, (1 + n)/(10 + n)), checked against the recursion written out in float64.
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    m = torch.nn.Module()
    m.p = p
    ema = EMA(m, decay=0.9, warmup=True)
    ref = 0.0
    for n in range(40):
        with torch.no_grad():
            p.fill_(n + 1.0)
        d = min(0.9, (1 + n) / (10 + n))
        ref = d * ref + (1 - d) * (n + 1.0)
        ema.update(m)
    assert float(ema.shadow["p"]) == pytest.approx(ref, rel=1e-12)
    with ema.average_parameters(m):
        assert float(p.detach()) == pytest.approx(ref, rel=1e-12)
    assert float(p.detach()) == 40.0  # restored
    no_warm = EMA(m, decay=0.5, warmup=False)
    with torch.no_grad():
        p.fill_(0.0)
    no_warm.update(m)
    assert float(no_warm.shadow["p"]) == 20.0


def test_batch_schedule_visits_each_example_once_per_epoch():
    sched = BatchSchedule(n=100, batch_size=30, seed=3)  # 3 batches per epoch, 10 left out
    for epoch in range(2):
        seen = torch.cat([sched.indices(epoch * 3 + k) for k in range(3)])
        assert seen.unique().numel() == 90
    assert not torch.equal(sched.indices(0), sched.indices(3))  # a new order each epoch


class _Spy(torch.nn.Module):
    """Records the labels the trainer passes (to check label dropout)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.labels = []

    def forward(self, x, t, y=None):
        self.labels.append(y.clone())
        return self.lin(x)


def test_label_dropout_replaces_labels_with_the_null_class(tmp_path):
    from scoresde.data import load_dataset

    data = load_dataset("gmm", n=512)  # 8 labelled components
    spy = _Spy()
    train(tiny(tmp_path, conditional=True, label_dropout=0.3, steps=20, batch_size=128), progress=False,
          model=spy, dataset=data)
    y = torch.cat(spy.labels)
    null = float((y == data.num_classes).float().mean())
    # 2560 Bernoulli(0.3) draws: standard error 0.009; 5 SE = 0.045
    assert abs(null - 0.3) < 0.045
    assert int(y.max()) == data.num_classes and int(y.min()) >= 0


def _draw(sampler, steps, seed=0):
    """What the CLI hands the trainer: solvers.sample with the config's sampler, steps and seed."""
    import solvers

    def draw(model, sde, shape, *, device=None, model_kwargs=None):
        kw = {} if model_kwargs is None else {"model_kwargs": model_kwargs}
        return solvers.sample(model, sde, shape, sampler=sampler, steps=steps, generator=seed, device=device, **kw).x

    return draw


def test_outputs_and_time_budget(tmp_path):
    res = train(tiny(tmp_path, steps=10_000, max_minutes=0.02, num_samples=16, sampler="ddim", sample_steps=2),
                progress=False, draw=_draw("ddim", 2))
    assert res.stopped_by == "time" and 0 < res.step < 10_000
    cfg = TrainConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert cfg.max_minutes == 0.02 and cfg.dataset == "gmm"
    assert (tmp_path / f"samples_{res.step:06d}.png").stat().st_size > 0
    assert torch.load(res.final_checkpoint, weights_only=True)["step"] == res.step


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        train(tiny(tmp_path, dataset="nope"), progress=False)
    with pytest.raises(ValueError, match="batch_size=1024 is larger than the dataset \\(512 examples\\)"):
        train(tiny(tmp_path, batch_size=1024), progress=False)
    with pytest.raises(ValueError, match="unknown TrainConfig field\\(s\\) \\['learning_rate'\\]"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="weighting"):
        tiny(tmp_path, weighting="snr").validate()
    with pytest.raises(ValueError, match="conditional=True needs class labels"):
        train(tiny(tmp_path, dataset="swissroll", conditional=True), progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA requested but not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


def test_corrupt_checkpoint_on_resume_is_named(tmp_path):
    from scoresde.checkpoint import CheckpointError

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        train(tiny(tmp_path), resume=True, progress=False)


def test_toy_mixture_trains_and_samples_match_the_data(tmp_path):
    # A 2-D mixture of four Gaussians (unequal weights 0.1..0.4 and widths 0.3..0.6, means on a
    # circle of radius 2) whose exact law judges the samples. 600 MLP steps: about 15 s of CPU.
    import solvers
    from scoresde import GaussianMixture
    from scoresde.checkpoint import load_model
    from scoresde.data import Dataset

    ang = torch.arange(4, dtype=torch.float64) * (math.pi / 2)
    mix = GaussianMixture(2.0 * torch.stack([ang.cos(), ang.sin()], 1), torch.tensor([0.3, 0.4, 0.5, 0.6]),
                          torch.tensor([0.1, 0.2, 0.3, 0.4]))
    data = Dataset(x=mix.sample(8000, generator=torch.Generator().manual_seed(0)).float(), y=None,
                   num_classes=None, name="mix4", is_image=False)
    cfg = TrainConfig(dataset="gmm", model="mlp", model_kwargs={"hidden": 128, "depth": 3}, steps=600,
                      batch_size=256, lr=3e-3, warmup=50, ema_decay=0.99, out_dir=str(tmp_path),
                      num_samples=0, log_every=100, max_minutes=None, device="cpu")
    res = train(cfg, progress=False, dataset=data)
    model, sde, _ = load_model(res.final_checkpoint)
    n = 4000
    with torch.no_grad():
        x = solvers.sample(model, sde, (n, 2), sampler="heun", steps=20, generator=1).x.double()
    # (1) mode weights by nearest mean: exact samples give chi2 ~ 3 +- 2.5 (3 degrees of freedom;
    # P(chi2 > 30) ~ 1e-6), a missed mode gives >= 400 (smallest expected count).
    k = torch.cdist(x, mix.means).argmin(1)
    counts = torch.bincount(k, minlength=4).double()
    expected = n * mix.weights
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30, (chi2, counts.tolist())
    # (2) widths: the distance to the nearest mean in units of that component's width has median
    # 1.08, 1.20, 1.17, 1.16 for exact samples (Rayleigh: 1.18, less where neighbours steal the tail);
    # the sample median of >= 400 points has ~5% standard error. 600 steps resolve the three heavier
    # modes to ~12% (allow 25%); the lightest, narrowest one (weight 0.1) comes out ~50% too wide
    # (allow 80%). A model that blurs the modes together gives medians of 3 and more.
    r = (x - mix.means[k]).norm(dim=1) / mix.stds[k]
    for j, tol in zip(range(4), (0.8, 0.25, 0.25, 0.25)):
        med = float(r[k == j].median())
        assert med == pytest.approx(math.sqrt(2 * math.log(2)), rel=tol), (j, med)
    # (3) tails: 1.1% of exact samples lie beyond 3 widths; deterministic sampling with a
    # learned score scatters a few more between modes: allow 10%.
    assert float((r > 3).double().mean()) < 0.10


def test_resume_after_a_crash_logs_each_step_once(tmp_path):
    # a crashed run has logged steps past its last checkpoint; the resumed run logs them again
    train(tiny(tmp_path, steps=4), progress=False)
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 6, "loss": -1.0, "crashed": True}) + "\n")
    train(tiny(tmp_path), resume=True, progress=False)
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4, 6, 8]
    assert not any(l.get("crashed") for l in lines)
