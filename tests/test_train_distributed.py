"""The training CLI under torchrun: DistributedDataParallel over 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

# 16 images over 2 ranks, 4 per rank-batch: 2 steps per epoch on each rank
TINY = ["--threads", "1", "--backbone", "test_resnet", "--feature-index", "2", "--hidden-dim", "32", "--proj-dim", "16",
        "--limit-train", "16", "--limit-test", "16", "--batch-size", "4", "--no-progress", "--backend", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str], folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from mlcontrast.train.cli import build_parser
    from mlcontrast.train.engine import run

    seen = {}
    from mlcontrast.train.methods import sadcl

    original = sadcl.multilabel_supcon_loss

    def spy(*args, **kwargs):  # records whether SSCL got the process group
        seen["process_group"] = kwargs.get("process_group") is not None
        return original(*args, **kwargs)

    sadcl.multilabel_supcon_loss = spy
    result = run(build_parser().parse_args(argv))
    params = {k: v.detach() for k, v in result["model"].named_parameters()}
    torch.save({"params": params, "losses": result["step_losses"], "seen": seen,
                "history": result["history"]}, os.path.join(folder, f"rank{rank}.pt"))


# local: SSCL per rank as released; with accumulation (no_sync on the first micro-batch) and a model EMA
@pytest.mark.parametrize("extra, gathered", [([], True),
                                             (["--sscl-scope", "local", "--accumulate", "2", "--model-ema", "0.9"],
                                              False)])
def test_ddp_ranks_stay_in_sync(tmp_path, extra, gathered):
    argv = [*TINY, "--method", "sadcl", "--known-ratio", "0.5", "--epochs", "2", "--output", str(tmp_path / "run"),
            *extra]
    mp.spawn(_rank_main, args=(2, _free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["seen"] == r1["seen"] == {"process_group": gathered}
    assert len(r0["losses"]) == 4 and r0["losses"] == r1["losses"]  # 2 epochs x 2 steps, means over ranks
    assert r0["params"].keys() == r1["params"].keys()
    for name, value in r1["params"].items():  # DDP averaged the gradients: the same parameters on both ranks
        torch.testing.assert_close(value, r0["params"][name], rtol=0, atol=0, msg=name)
    assert len(r0["history"]) == 2 and r1["history"] == []  # only rank 0 evaluates
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]


def test_torchrun_cli(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mlcontrast.train", *TINY, "--method", "bce", "--known-ratio", "0.5", "--epochs", "1",
           "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("final: mAP") == 1  # rank 0 reports
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["epoch"] == 1 and 0 <= rec["mAP"] <= 100
    assert (out / "checkpoint.pt").is_file()


def test_collectives_use_the_device_the_backend_needs(monkeypatch):
    """NCCL all-reduces CUDA tensors only: the engine's loss sums and early-stop flag go through the GPU there."""
    from mlcontrast.train import engine

    monkeypatch.setenv("LOCAL_RANK", "3")
    backend = {"name": "nccl"}
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend["name"])
    assert engine._collective_device(None, torch.device("cpu")) == torch.device("cuda", 3)
    assert engine._collective_device(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    backend["name"] = "gloo"
    assert engine._collective_device(None, torch.device("cuda", 1)) == torch.device("cpu")

    # _Dist picks the device from the initialised group's backend
    backend["name"] = "nccl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    d = engine._Dist(torch.device("cpu"))
    assert (d.rank, d.world, d.owned, d.device) == (1, 2, False, torch.device("cuda", 3))

    # sum_ reduces a tensor on that device and writes the sum back into the caller's tensor
    seen = []

    def fake_all_reduce(t, group=None):
        seen.append(t.device)
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    d.device = torch.device("cpu")  # no GPU here: check the round trip on the CPU
    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert d.sum_(t) is t and t.tolist() == [3.0, 4.0] and seen == [torch.device("cpu")]
