import json

import numpy as np
import pytest
import torch
from train_helpers import TINY, one_thread, tiny_args  # noqa: F401  (one_thread: autouse)

from mlcontrast.train.cli import main
from mlcontrast.train.config import build_method
from mlcontrast.train.engine import CHECKPOINT_NAME, run
from mlcontrast.train.methods import SADCL, BCEBaseline


def _tiny_sadcl(**kw):
    return SADCL(5, backbone="test_resnet", feature_index=2, hidden_dim=32, proj_dim=16, batch_size=4, **kw)


# ---------------------------------------------------------------- SADCL pieces


def test_sadcl_shapes_and_state_updates():
    torch.manual_seed(0)
    m = _tiny_sadcl(backend="torch")
    x = torch.randn(4, 3, 32, 32)
    assert m(x).shape == (4, 5)
    h = torch.randn(4, 5, 32)
    logits = torch.full((4, 5), -5.0)
    logits[0, 1] = 5.0  # confident positive -> replaced
    logits[1, 2] = 5.0  # confident but target 0 -> kept
    logits[2, 3] = float(torch.logit(torch.tensor(0.8)))  # p == 0.8 is not > 0.8 -> kept (about, in fp32)
    targets = torch.zeros(4, 5, dtype=torch.long)
    targets[0, 1] = targets[2, 3] = 1
    targets[3, 4] = -1
    mem0, proto0 = m.memory.clone(), m.prototypes.clone()
    m.update_state_(h, logits, targets)
    changed = (m.memory != mem0).any(-1)
    assert changed.nonzero().tolist() == [[0, 1]]
    assert torch.equal(m.memory[0, 1], h[0, 1])
    # prototype EMA only for classes with a positive (1 and 3); momentum 0.99, no normalisation
    moved = (m.prototypes != proto0).any(-1)
    assert moved.nonzero().flatten().tolist() == [1, 3]
    torch.testing.assert_close(m.prototypes[1], 0.99 * proto0[1] + 0.01 * h[0, 1])


def test_sadcl_loss_parts_and_gradients():
    torch.manual_seed(0)
    m = _tiny_sadcl(backend="torch")
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([[1, 0, 1, 0, -1], [0, 1, 1, 0, 0], [1, 1, 0, -1, 0], [0, 0, 1, 1, 1]])
    loss, parts = m.training_loss(x, y)
    expect = 1000 * parts["cls"] + 100 * parts["sscl"] + 50 * parts["pscl"]
    torch.testing.assert_close(loss.detach(), expect)
    loss.backward()
    assert m.proj.net[0].weight.grad is not None and m.decoder.query_embed.weight.grad.abs().sum() > 0


def test_sadcl_legacy_flags():
    torch.manual_seed(0)
    m = _tiny_sadcl(backend="torch", legacy_learned_prototypes=True, legacy_sadcl_mask=True)
    assert isinstance(m.learned_prototypes, torch.nn.Parameter)
    y = torch.tensor([[1, 0, 1, 0, 1], [0, 1, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 1, 1, 1]])
    loss, _ = m.training_loss(torch.randn(4, 3, 32, 32), y)
    loss.backward()
    assert m.learned_prototypes.grad is not None and m.learned_prototypes.grad.abs().sum() > 0


def test_build_method_unknown():
    with pytest.raises(ValueError, match="unknown method"):
        build_method("nope", 3)
    assert isinstance(build_method("bce", 3, backbone="test_resnet", feature_index=2), BCEBaseline)


# ---------------------------------------------------------------- training runs


@pytest.mark.parametrize("method", ["sadcl", "bce", "msupcon"])
def test_tiny_run_cpu_and_torch_backends_agree(tmp_path, method):
    a = run(tiny_args(tmp_path / "cpu", "--method", method, "--epochs", "2", "--backend", "cpu"))
    b = run(tiny_args(tmp_path / "torch", "--method", method, "--epochs", "2", "--backend", "torch"))
    la, lb = np.array(a["step_losses"]), np.array(b["step_losses"])
    assert len(la) == 4 and np.isfinite(la).all()
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    lines = [json.loads(s) for s in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in ("loss", "mAP", "CF1", "OF1", "time_s"):
        assert key in lines[-1]
    assert "pseudo_precision" not in lines[-1]
    assert json.loads((tmp_path / "cpu" / "args.json").read_text())["method"] == method
    assert (tmp_path / "cpu" / CHECKPOINT_NAME).is_file()


@pytest.mark.parametrize("method", ["sadcl", "msupcon"])
def test_resume_matches_uninterrupted_run(tmp_path, method):
    extra = ["--method", method, "--epochs", "2", "--backend", "cpu", "--known-ratio", "0.5"]
    full = run(tiny_args(tmp_path / "full", *extra))
    part = run(tiny_args(tmp_path / "part", *extra), stop_after_epoch=1)
    assert len(part["history"]) == 1
    assert not list((tmp_path / "part").glob("*.tmp"))
    resumed = run(tiny_args(tmp_path / "part", *extra, "--resume", str(tmp_path / "part")))
    np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-5)
    for k in ("loss", "mAP", "CF1", "OF1"):
        assert resumed["history"][-1][k] == pytest.approx(full["history"][-1][k], rel=1e-5, abs=1e-6)
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2]


# ---------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    "argv",
    [["--method", "nope"], ["--dataset", "imagenet"], ["--known-ratio", "0"], ["--known-ratio", "1.5"],
     ["--epochs", "0"], ["--batch-size", "-2"], ["--lr", "abc"], ["--backend", "gpu"], ["--num-workers", "-1"],
     ["--dataset", "voc2007"]],
)
def test_cli_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_cli_missing_dataset_folder(tmp_path, capsys):
    missing = tmp_path / "no_voc_here"
    assert main(["--dataset", "voc2007", "--data-root", str(missing), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no_voc_here" in err and "not found" in err


def test_cli_missing_resume_checkpoint(tmp_path, capsys):
    assert main([*TINY, "--epochs", "1", "--output", str(tmp_path), "--resume", str(tmp_path / "x.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_cli_main_runs(tmp_path, capsys):
    assert main([*TINY, "--epochs", "1", "--method", "bce", "--output", str(tmp_path)]) == 0
    assert "final: mAP" in capsys.readouterr().out


def test_backbone_local_weights_file(tmp_path):
    import timm

    from mlcontrast.train.models import Backbone

    torch.manual_seed(3)
    full = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(full.state_dict(), path)
    bb = Backbone("test_resnet", feature_index=2, weights=str(path))
    torch.testing.assert_close(bb.body.state_dict()["conv1.0.weight"], full.state_dict()["conv1.0.weight"])
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        Backbone("test_resnet", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="unknown timm backbone"):
        Backbone("no_such_net")


def test_build_prototypes_averages_confident_positives():
    from mlcontrast.train.methods.sadcl import build_prototypes

    torch.manual_seed(0)
    m = _tiny_sadcl(backend="torch")
    m.eval()
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([[1, 0, 0, 0, 0]] * 3 + [[0, 1, 0, 0, -1]] * 3)
    with torch.no_grad():
        h = m.label_features(x)
        m.fc.bias.data[:] = torch.tensor([20.0, -20.0, 20.0, 20.0, 20.0])  # class 0 confident, class 1 never
        expect0 = h[:3, 0].mean(0)
    before = m.prototypes.clone()
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    out = build_prototypes(m, loader, score_thr=0.85)
    torch.testing.assert_close(out[0], expect0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.prototypes[0], expect0, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.prototypes[1:], before[1:])
    assert torch.equal(m.memory[:, 0], m.prototypes[0].expand_as(m.memory[:, 0]))
