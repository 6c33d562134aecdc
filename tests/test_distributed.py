"""Data-parallel training under torchrun with 2 CPU (gloo) processes.

On failure the fixture reports each worker's own stdout/stderr (torchrun ``--log-dir`` with
``--redirects 3``) and, through ``PYTHONFAULTHANDLER``, the Python stack of a worker killed by a
signal.

Checks: both ranks end with bit-identical parameters and EMA weights; each rank's network sees
half the global batch; the 2-process run equals a single process on the whole batch (so the
effective batch is the sum of the per-rank batches); only rank 0 writes files.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from scoresde.training import TrainConfig, train

CONFIG = dict(dataset="gmm", data_n=512, model="mlp", model_kwargs={"hidden": 32, "depth": 2}, steps=6,
              batch_size=64, warmup=2, lr=1e-3, num_samples=0, log_every=3, ckpt_every=0, max_minutes=None,
              device="cpu", ema_decay=0.9)

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from scoresde.training import TrainConfig, train, build_network, build_data

    out = sys.argv[1]
    cfg = TrainConfig.from_dict({**json.loads(sys.argv[2]), "out_dir": os.path.join(out, "run")})
    rank = int(os.environ["RANK"])
    data = build_data(cfg)
    model = build_network(cfg, data.shape, None)
    sizes = []
    model.register_forward_hook(lambda m, inp, outp: sizes.append(int(inp[0].shape[0])))
    res = train(cfg, progress=False, model=model, dataset=data)
    ema = torch.load(res.final_checkpoint, weights_only=True)["ema"]["shadow"] if rank == 0 else None
    # the threads left once train() has destroyed its process group (Linux: /proc/self/task)
    tasks = "/proc/self/task"
    threads = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else None
    torch.save({"params": {k: v.detach() for k, v in model.named_parameters()}, "sizes": sizes, "ema": ema,
                "threads": threads}, os.path.join(out, f"rank{rank}.pt"))
    """
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    # PYTHONFAULTHANDLER: a worker killed by a signal (SIGABRT, SIGSEGV) prints its Python stack
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    logs = out / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(logs), "--redirects", "3", str(script), str(out), json.dumps(CONFIG)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:  # each worker's own stdout/stderr, then torchrun's summary
        workers = "".join(f"\n--- {p.relative_to(logs)} ---\n{p.read_text()[-4000:]}" for p in sorted(logs.rglob("*.log")))
        pytest.fail(f"torchrun exited with {proc.returncode}{workers}\n--- torchrun ---\n{proc.stderr[-2000:]}")
    return out


def test_ranks_hold_identical_parameters_and_ema(ddp_run):
    r0 = torch.load(ddp_run / "rank0.pt", weights_only=True)
    r1 = torch.load(ddp_run / "rank1.pt", weights_only=True)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    ckpt = torch.load(ddp_run / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["step"] == CONFIG["steps"]
    for k, v in ckpt["model"].items():
        assert torch.equal(v, r1["params"][k])  # rank 0 saved what rank 1 holds


def test_each_rank_sees_half_the_global_batch(ddp_run):
    for r in (0, 1):
        sizes = torch.load(ddp_run / f"rank{r}.pt", weights_only=True)["sizes"]
        assert sizes == [CONFIG["batch_size"] // 2] * CONFIG["steps"]


def test_two_ranks_equal_one_process_on_the_whole_batch(ddp_run, tmp_path):
    # DDP averages the two half-batch mean gradients = the full-batch mean gradient; the only
    # difference is float summation order (~1e-7 relative), which six Adam steps of lr 1e-3 keep
    # well below 1e-5 in the parameters.
    single = train(TrainConfig(**{**CONFIG, "out_dir": str(tmp_path)}), progress=False)
    ref = torch.load(single.final_checkpoint, weights_only=True)
    ddp = torch.load(ddp_run / "rank0.pt", weights_only=True)
    moved = 0.0
    for k, v in ddp["params"].items():
        torch.testing.assert_close(v, ref["model"][k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ddp["ema"][k], ref["ema"]["shadow"][k], atol=1e-5, rtol=1e-5)
    init = train(TrainConfig(**{**CONFIG, "out_dir": str(tmp_path / "init"), "steps": 1, "lr": 1e-12}), progress=False)
    init_state = torch.load(init.final_checkpoint, weights_only=True)["model"]
    moved = max(float((ref["model"][k] - init_state[k]).abs().max()) for k in init_state)
    assert moved > 1e-3  # training moved the weights far beyond the tolerance


def test_only_rank_zero_writes(ddp_run):
    files = sorted(p.name for p in (ddp_run / "run").iterdir())
    assert files == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    steps = [json.loads(l)["step"] for l in (ddp_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 6]  # one line per logged step, not one per rank


def test_cleanup_stops_the_backend_threads(ddp_run):
    # A gloo group that outlives destroy_process_group keeps its threads (gloo_tcp_loop, two
    # pt_gloo_runloop) running into interpreter shutdown, where they sporadically ended a finished
    # worker with SIGABRT (exit code -6). train() must leave none behind.
    for r in (0, 1):
        threads = torch.load(ddp_run / f"rank{r}.pt", weights_only=True)["threads"]
        if threads is None:
            pytest.skip("no /proc/self/task on this platform")
        assert not [t for t in threads if "gloo" in t], threads


def test_batch_must_split_evenly():
    from scoresde.distributed import DistInfo, rank_slice

    assert rank_slice(64, DistInfo(rank=1, world_size=2)) == slice(32, 64)
    with pytest.raises(ValueError, match="batch_size=63 must be divisible by the number of processes \\(2\\)"):
        rank_slice(63, DistInfo(rank=0, world_size=2))
