"""The ``msupcon`` training method: BCE + multihot_supcon_loss on a projection of the pooled embedding.

Its training runs (fused ``cpu`` backend against ``torch``, resume against an uninterrupted run) are in
tests/test_train_methods.py with the other methods'.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from train_helpers import TINY, one_thread, tiny_args  # noqa: F401  (one_thread: autouse)

from mlcontrast import reference
from mlcontrast.train.cli import main
from mlcontrast.train.config import build_method, build_parser, resolve_args
from mlcontrast.train.methods import METHODS, MSupCon


def _tiny(**kw):
    return MSupCon(5, backbone="test_resnet", feature_index=2, hidden_dim=32, proj_dim=16, **kw)


TARGETS = torch.tensor([[1, 0, 1, 0, -1], [1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, -1, 1], [1, 0, 1, 1, 0],
                        [0, 0, 0, 0, -1]])


@pytest.mark.parametrize("positives", ["jaccard", "any", "all", "mulsupcon"])
def test_loss_is_bce_plus_weighted_multihot_supcon_of_the_normalised_projection(positives):
    torch.manual_seed(0)
    m = _tiny(backend="torch", msupcon_weight=0.7, msupcon_temperature=0.2, msupcon_positives=positives,
              msupcon_threshold=0.4)
    x = torch.randn(6, 3, 32, 32)
    loss, parts = m.training_loss(x, TARGETS)
    with torch.no_grad():
        e = m.embed(x)
        z = F.normalize(m.head(e), dim=1)
        # -1 (unknown) entries are absent for the contrastive term: the same loss as with 0 there
        expect = reference.multihot_supcon_loss(z, TARGETS.clamp(min=0), temperature=0.2, positives=positives,
                                                threshold=0.4)
    assert expect > 0
    torch.testing.assert_close(parts["msupcon"], expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), 1000 * parts["cls"] + 0.7 * parts["msupcon"])
    loss.backward()
    assert m.head[0].weight.grad.abs().sum() > 0 and m.fc.weight.grad.abs().sum() > 0
    assert m(x).shape == (6, 5)


def test_the_contrastive_term_trains_the_backbone():
    torch.manual_seed(0)
    m = _tiny(backend="torch", cls_weight=0.0)  # the contrastive term alone
    loss, parts = m.training_loss(torch.randn(6, 3, 32, 32), TARGETS)
    torch.testing.assert_close(loss.detach(), parts["msupcon"])
    loss.backward()
    assert m.fc.weight.grad is None or m.fc.weight.grad.abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())


def test_cli_options_reach_the_model():
    assert METHODS["msupcon"] is MSupCon
    argv = ["--method", "msupcon", "--backbone", "test_resnet", "--feature-index", "2", "--backend", "cpu",
            "--msupcon-weight", "0.5", "--msupcon-temperature", "0.3", "--msupcon-threshold", "1",
            "--msupcon-positives", "mulsupcon", "--hidden-dim", "24", "--proj-dim", "12"]
    m = build_method("msupcon", 7, resolve_args(build_parser().parse_args(argv)))
    assert (m.msupcon_weight, m.temperature, m.threshold, m.positives, m.backend) == (0.5, 0.3, 1.0, "mulsupcon",
                                                                                      "cpu")
    assert m.head[0].out_features == 24 and m.head[2].out_features == 12 and m.fc.out_features == 7
    defaults = build_method("msupcon", 7, resolve_args(build_parser().parse_args(argv[:6])))
    assert (defaults.msupcon_weight, defaults.temperature, defaults.threshold, defaults.positives) == (
        1.0, 0.1, 0.5, "jaccard")
    assert defaults.cls_weight == 1000.0


@pytest.mark.parametrize("argv", [["--msupcon-threshold", "0"], ["--msupcon-threshold", "1.5"],
                                  ["--msupcon-temperature", "0"], ["--msupcon-positives", "some"]])
def test_cli_bad_msupcon_options(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--method", "msupcon", *argv])
    assert e.value.code == 2
    assert "msupcon" in capsys.readouterr().err


def test_cli_msupcon_runs(tmp_path, capsys):
    assert main([*TINY, "--epochs", "1", "--method", "msupcon", "--output", str(tmp_path)]) == 0
    assert "final: mAP" in capsys.readouterr().out
    line = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"loss_msupcon"' in line and '"loss_cls"' in line


def _rank_main(rank: int, port: int, argv: list[str], folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from mlcontrast.train.engine import run
    from mlcontrast.train.methods import msupcon

    seen, original = [], msupcon.multihot_supcon_loss

    def spy(*args, **kwargs):  # records whether the contrastive loss got the process group
        seen.append(kwargs.get("process_group") is not None)
        return original(*args, **kwargs)

    msupcon.multihot_supcon_loss = spy
    result = run(build_parser().parse_args(argv))
    params = {k: v.detach() for k, v in result["model"].named_parameters()}
    torch.save({"params": params, "losses": result["step_losses"], "seen": seen}, os.path.join(folder, f"{rank}.pt"))


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_ddp_contrasts_every_ranks_images(tmp_path):
    """Under DDP (2 gloo processes) the loss gets the process group and the ranks stay in sync."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*TINY, "--batch-size", "4", "--backend", "cpu", "--method", "msupcon", "--known-ratio", "0.5",
            "--epochs", "1", "--output", str(tmp_path / "run")]
    mp.spawn(_rank_main, args=(port, argv, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["seen"] == r1["seen"] == [True, True]  # 16 images, 2 ranks x batch 4: 2 steps
    assert len(r0["losses"]) == 2 and r0["losses"] == r1["losses"]
    for name, value in r1["params"].items():
        torch.testing.assert_close(value, r0["params"][name], rtol=0, atol=0, msg=name)
