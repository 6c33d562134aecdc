"""Chunked, per-sample-seeded generation and resumable shards (scoresde.generate).

What must hold: sample i depends only on its id (not the batch size, the ids drawn with it, or
the process that drew it); the fixed-size wrapper passes labels given by position (classifier-free
guidance); one progress bar covers all samples; autocast keeps the state's dtype; shards from two
gloo processes concatenate to exactly one process's samples; a stopped run resumes without
redrawing finished shards and redraws a corrupt one.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import pytest
import torch

from scoresde.generate import (
    AutocastModel,
    FixedChunk,
    generate,
    generate_shards,
    load_shards,
    rank_shards,
    read_shard,
    shard_path,
    shard_ranges,
)
from scoresde.networks import ClassifierFreeGuidance, build_model
from scoresde.noise import SampleNoise
from scoresde.sde import VPSDE

SHAPE = (1, 8, 8)


def _net(num_classes=None, seed=0):
    """The tiny U-Net with random (non-zero) output weights, so every sample's bits depend on the network."""
    torch.manual_seed(seed)
    model = build_model("tiny", data_shape=SHAPE, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def net():
    return _net()


@pytest.fixture(scope="module")
def cond_net():
    return _net(num_classes=3, seed=5)


def test_fixed_chunk_passes_positional_and_keyword_batch_arguments():
    calls = []

    def toy(x, t, y, *, scale=1.0, tag=None):
        calls.append((x.shape[0], t.shape[0], y.shape[0], tag))
        return x * t.reshape(-1, 1) + y.reshape(-1, 1).to(x.dtype) * scale

    x = torch.arange(14.0).reshape(7, 2)
    t = torch.linspace(0.1, 0.7, 7)
    y = torch.arange(7)
    want = toy(x, t, y, scale=2.0)
    calls.clear()
    got = FixedChunk(toy, 3)(x, t, y, scale=2.0, tag="k")
    assert torch.equal(got, want)
    assert calls == [(3, 3, 3, "k")] * 3  # exactly 3 rows per call, the last chunk padded
    got = FixedChunk(toy, 3)(x, torch.tensor(0.5), y=y)  # 0-dim t expanded, label by keyword
    assert torch.equal(got, toy(x, torch.full((7,), 0.5), y))


def test_guidance_runs_through_the_fixed_chunk_wrapper(cond_net):
    # the CLI bug: FixedChunk.__call__() takes 3 positional arguments but 4 were given
    x = torch.randn(5, *SHAPE)
    t = torch.full((5,), 0.4)
    y = torch.tensor([0, 1, 2, 0, 1])
    guided = ClassifierFreeGuidance(FixedChunk(cond_net, 4), 2.0, null_label=3)
    with torch.no_grad():
        got = guided(x, t, y)
        eps_c = cond_net(x, t, y)
        eps_u = cond_net(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(got, eps_u + 2.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("euler_maruyama", 6)])
def test_samples_do_not_depend_on_batch_size_or_companions(net, sampler, steps):
    sde = VPSDE()
    kw = dict(sampler=sampler, steps=steps, seed=3, chunk=4)
    full = generate(net, sde, SHAPE, 11, batch_size=11, **kw)
    assert full.x.shape == (11, *SHAPE) and full.batches == 1 and torch.isfinite(full.x).all()
    for bs in (1, 3, 5):
        assert torch.equal(generate(net, sde, SHAPE, 11, batch_size=bs, **kw).x, full.x), bs
    part = generate(net, sde, SHAPE, range(4, 9), batch_size=2, **kw)
    assert torch.equal(part.x, full.x[4:9])
    assert torch.equal(part.ids, torch.arange(4, 9))
    other_seed = generate(net, sde, SHAPE, 11, batch_size=11, **{**kw, "seed": 4})
    assert not torch.equal(other_seed.x, full.x)


def test_generate_equals_one_sampler_call_with_the_same_noise(net):
    import solvers

    sde = VPSDE()
    res = generate(net, sde, SHAPE, range(2, 8), sampler="ddim", steps=3, seed=1, batch_size=6, chunk=0)
    ref = solvers.sample(net, sde, (6, *SHAPE), sampler="ddim", steps=3, generator=SampleNoise(1, torch.arange(2, 8)))
    assert torch.equal(res.x, ref.x)
    assert res.nfe == ref.nfe


def test_generate_with_guidance_equals_the_guided_model(cond_net):
    import solvers

    sde = VPSDE()
    res = generate(cond_net, sde, SHAPE, 4, sampler="ddim", steps=3, seed=2, batch_size=4, chunk=0, label=1, guidance=2.0)
    ref = solvers.sample(ClassifierFreeGuidance(cond_net, 2.0, null_label=3), sde, (4, *SHAPE), sampler="ddim", steps=3,
                         generator=SampleNoise(2, torch.arange(4)), model_kwargs={"y": torch.ones(4, dtype=torch.long)})
    assert torch.equal(res.x, ref.x)
    # and chunked: the doubled batch is cut into fixed chunks without error and with the same answer up to rounding
    chunked = generate(cond_net, sde, SHAPE, 4, sampler="ddim", steps=3, seed=2, batch_size=3, chunk=2, label=1, guidance=2.0)
    torch.testing.assert_close(chunked.x, ref.x, atol=1e-4, rtol=1e-4)


def test_one_progress_bar_over_all_samples(net, capsys):
    generate(net, VPSDE(), SHAPE, 7, sampler="ddim", steps=2, batch_size=3, chunk=0, progress=True)
    err = capsys.readouterr().err
    assert err.count("7/7") >= 1
    assert "3/7" in err or "6/7" in err or "7/7" in err
    assert " 2/2 " not in err and "it/s" not in err.replace("sample/s", "")  # no per-batch step bars


def test_autocast_runs_the_network_in_low_precision_and_keeps_the_state_dtype(net):
    seen = []

    def probe(x, t):
        out = net(x, t)
        seen.append(out.dtype)
        return out

    x = torch.randn(3, *SHAPE)
    t = torch.full((3,), 0.5)
    with torch.no_grad():
        out = AutocastModel(probe, torch.bfloat16)(x, t)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    sde = VPSDE()
    kw = dict(sampler="ddim", steps=4, seed=0, batch_size=6, chunk=0)
    f32 = generate(net, sde, SHAPE, 6, **kw).x
    bf16 = generate(net, sde, SHAPE, 6, autocast="bf16", **kw).x
    assert bf16.dtype == torch.float32
    err = (bf16 - f32).abs().max().item()
    assert 0 < err < 0.1 * f32.abs().max().item()  # it did change the arithmetic, and only by rounding
    f64 = generate(net.double(), sde, SHAPE, 2, autocast="bf16", dtype=torch.float64, **{**kw, "batch_size": 2}).x
    net.float()
    assert f64.dtype == torch.float64


def test_bad_input_is_one_clear_error(net, tmp_path):
    sde = VPSDE()
    with pytest.raises(ValueError, match="must be positive"):
        generate(net, sde, SHAPE, 0)
    with pytest.raises(ValueError, match="batch_size"):
        generate(net, sde, SHAPE, 3, batch_size=0)
    with pytest.raises(ValueError, match="guidance needs a label"):
        generate(net, sde, SHAPE, 3, guidance=2.0)
    with pytest.raises(ValueError, match="autocast"):
        generate(net, sde, SHAPE, 3, autocast="int8")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        generate_shards(net, sde, SHAPE, -5, tmp_path)
    with pytest.raises(ValueError, match="shard_size"):
        generate_shards(net, sde, SHAPE, 5, tmp_path, shard_size=0)


def test_shard_plan_is_contiguous_and_covers_every_id():
    ranges = shard_ranges(10, 3)
    assert ranges == [(0, 3), (3, 6), (6, 9), (9, 10)]
    for world in (1, 2, 3, 5, 7):
        blocks = [list(rank_shards(len(ranges), r, world)) for r in range(world)]
        assert sum(blocks, []) == list(range(len(ranges)))


# ---------------------------------------------------------------------------------------------
# shards: two gloo processes, stop and resume
# ---------------------------------------------------------------------------------------------
SHARD_KW = dict(shard_size=3, seed=11, sampler="euler_maruyama", steps=4, batch_size=2, chunk=4)
N_SHARDED = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, errdir: str) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        try:
            rep = generate_shards(_net(), VPSDE(), SHAPE, N_SHARDED, out, **SHARD_KW)
            assert rep.rank == rank and rep.world_size == world and rep.complete
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:
        with open(os.path.join(errdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_two_gloo_processes_write_shards_equal_to_one_process(tmp_path):
    import torch.multiprocessing as mp

    out, errdir = tmp_path / "shards", tmp_path / "err"
    errdir.mkdir()
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(out), str(errdir))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    errs = "".join(f.read_text() for f in sorted(errdir.iterdir()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errs}"
    x2 = load_shards(out)
    one = generate(_net(), VPSDE(), SHAPE, N_SHARDED, seed=11, sampler="euler_maruyama", steps=4, batch_size=N_SHARDED,
                   chunk=4).x
    assert torch.equal(x2, one)
    # rank 0 wrote shards 0-1 (ids 0..5), rank 1 shards 2-3 (ids 6..9): contiguous blocks
    assert [read_shard(shard_path(out, k))["start"] for k in range(4)] == [0, 3, 6, 9]


def test_a_stopped_run_resumes_without_redrawing_finished_shards(net, tmp_path):
    sde = VPSDE()
    drawn = []
    first = generate_shards(net, sde, SHAPE, N_SHARDED, tmp_path, max_shards=2, on_shard=lambda k, p: drawn.append(k),
                            **SHARD_KW)
    assert first.drawn == [0, 1] and not first.complete and drawn == [0, 1]
    with pytest.raises(ValueError, match="shard-000002.pt .*missing or incomplete"):
        load_shards(tmp_path)
    stamps = {k: shard_path(tmp_path, k).stat().st_mtime_ns for k in (0, 1)}
    # what a kill can leave: a temporary file of the shard being written, and (simulated) a torn shard
    (tmp_path / f".{shard_path(tmp_path, 2).name}.tmp-99999").write_bytes(b"half a shard")
    shard_path(tmp_path, 3).write_bytes(shard_path(tmp_path, 0).read_bytes()[:100])
    second = generate_shards(net, sde, SHAPE, N_SHARDED, tmp_path, on_shard=lambda k, p: drawn.append(k), **SHARD_KW)
    assert second.skipped == [0, 1] and second.drawn == [2, 3] and second.complete
    assert drawn == [0, 1, 2, 3]
    assert {k: shard_path(tmp_path, k).stat().st_mtime_ns for k in (0, 1)} == stamps
    assert not list(tmp_path.glob(".*tmp-*"))
    x = load_shards(tmp_path)
    assert torch.equal(x, generate(net, sde, SHAPE, N_SHARDED, seed=11, sampler="euler_maruyama", steps=4,
                                   batch_size=5, chunk=4).x)
    third = generate_shards(net, sde, SHAPE, N_SHARDED, tmp_path, **SHARD_KW)
    assert third.drawn == [] and third.nfe == 0


def test_a_folder_of_another_run_is_refused(net, tmp_path):
    sde = VPSDE()
    generate_shards(net, sde, SHAPE, 4, tmp_path, max_shards=1, **{**SHARD_KW, "steps": 2})
    with pytest.raises(ValueError, match="holds shards of another run .*seed"):
        generate_shards(net, sde, SHAPE, 4, tmp_path, **{**SHARD_KW, "steps": 2, "seed": 12})


def test_quality_sweep_script_writes_its_table_and_plot(tmp_path):
    import importlib.util
    from pathlib import Path

    from scoresde.training import TrainConfig, train

    cfg = TrainConfig(steps=2, max_minutes=None, batch_size=16, warmup=1, num_samples=0, ckpt_every=0, log_every=1,
                      device="cpu", out_dir=str(tmp_path / "run"))
    ckpt = train(cfg, progress=False).final_checkpoint
    path = Path(__file__).resolve().parents[1] / "experiments" / "sweep_quality.py"
    spec = importlib.util.spec_from_file_location("sweep_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main([str(ckpt), "--samplers", "ddim", "heun", "--nfe", "2", "4", "-n", "8", "--batch-size", "8",
                     "--out-dir", str(tmp_path / "q"), "--quiet"])
    # heun spends 2 NFE per step but 1 on its last: 2 NFE -> 1 step (1 NFE), 4 -> 2 steps (3 NFE)
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [("ddim", 2, 2), ("ddim", 4, 4), ("heun", 1, 1), ("heun", 2, 3)]
    assert all("fd" in r for r in rows)
    assert {p.name for p in (tmp_path / "q").iterdir()} == {"quality.csv", "quality.md", "quality.png"}


KILLED_WORKER = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from test_generate import SHARD_KW, N_SHARDED, SHAPE, _net
from scoresde.generate import generate_shards
from scoresde.sde import VPSDE

real_save = torch.save

def save_then_die(obj, path, *a, **k):
    if "shard-000002" in str(path):  # die half-way through writing the third shard
        with open(path, "wb") as f:
            f.write(b"PK half a shard")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *a, **k)

torch.save = save_then_die
generate_shards(_net(), VPSDE(), SHAPE, N_SHARDED, {out!r}, **SHARD_KW)
"""


def test_a_killed_run_leaves_no_corrupt_shard_and_resumes(net, tmp_path):
    import signal
    import subprocess
    from pathlib import Path

    out = tmp_path / "shards"
    code = KILLED_WORKER.format(tests=str(Path(__file__).resolve().parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    # two finished shards, the temporary of the third (never under its final name), the manifest
    assert [n for n in names if n.startswith("shard-")] == ["shard-000000.pt", "shard-000001.pt"], names
    assert any(n.startswith(".shard-000002.pt.tmp-") for n in names), names
    stamps = {k: shard_path(out, k).stat().st_mtime_ns for k in (0, 1)}
    rep = generate_shards(_net(), VPSDE(), SHAPE, N_SHARDED, out, **SHARD_KW)
    assert rep.skipped == [0, 1] and rep.drawn == [2, 3] and rep.complete
    assert {k: shard_path(out, k).stat().st_mtime_ns for k in (0, 1)} == stamps
    assert not list(out.glob(".*tmp-*"))
    one = generate(_net(), VPSDE(), SHAPE, N_SHARDED, seed=11, sampler="euler_maruyama", steps=4, batch_size=N_SHARDED,
                   chunk=4).x
    assert torch.equal(load_shards(out), one)


def test_local_device_under_torchrun(monkeypatch):
    from scoresde.generate import local_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device("cuda") == torch.device("cuda", 1)
    assert local_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert local_device("cpu") == torch.device("cpu")
    assert local_device("auto") == (torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu"))
