import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import Subset
from train_helpers import TINY, one_thread, tiny_args  # noqa: F401  (one_thread: autouse)

from mlcontrast.train.config import build_method, resolve_args
from mlcontrast.train.data import DigitMosaics
from mlcontrast.train.engine import run
from mlcontrast.train.methods import HST
from mlcontrast.train.methods.hst import (
    asymmetric_pair_loss,
    cooccurrence_adjacency,
    cst_scores,
    dtl_psi,
    instance_loss,
    ist_scores,
    pair_targets,
    prototype_loss,
    pseudo_targets,
)

HST_TINY = ["--method", "hst", "--known-ratio", "0.5", "--epochs", "2", "--hst-generate-label-epoch", "1"]


def _tiny_hst(c=5, **kw):
    return HST(c, backbone="test_resnet", feature_index=2, hidden_dim=32, backend="torch", **kw)


PAIRS3 = torch.triu_indices(3, 3, offset=1)  # (0,1), (0,2), (1,2)
L3 = math.log(3.0)  # sigmoid(±log 3) = 0.75 / 0.25


# ---------------------------------------------------------------- IST, DTL, pseudo-targets


def test_ist_score_and_pseudo_targets_by_hand():
    q = torch.tensor([[L3, -L3, 0.0]] * 3)  # R01 = 0.75, R02 = 0.25, R12 = 0.5
    y = torch.tensor([[1, -1, 0],  # one known positive: s = R[c, 0]
                      [1, 1, -1],  # two: s = (R[c, 0] + R[c, 1]) / 2
                      [-1, -1, -1]])  # none: s = 0
    s = ist_scores(q, y, *PAIRS3)
    expect = torch.tensor([[1.0, 0.75, 0.25],
                           [(1 + 0.75) / 2, (0.75 + 1) / 2, (0.25 + 0.5) / 2],
                           [0.0, 0.0, 0.0]])
    torch.testing.assert_close(s, expect)
    assert s[0, 0].item() == 1.0  # exactly: the only known positive scores its own diagonal
    psi = dtl_psi(s, torch.tensor(0.5))
    torch.testing.assert_close(psi, (expect - 0.5).clamp(0, 1))
    yt = pseudo_targets(y, psi)
    # known entries kept (the known negative stays 0 though its ψ would be 0 anyway); unknown with ψ > 0 → 1;
    # unknown with ψ = 0 stays unknown: no pseudo-negatives
    assert yt.tolist() == [[1, 1, 0], [1, 1, -1], [-1, -1, -1]]


def test_dtl_no_gradient_at_theta_one_without_s_equal_one():
    theta = torch.nn.Parameter(torch.tensor(1.0))
    q = torch.tensor([[L3, -L3, 0.0], [0.3, 0.1, 2.0]], requires_grad=True)
    y = torch.tensor([[1, 1, 0], [1, -1, 1]])  # two known positives each: every s < 1
    s = ist_scores(q, y, *PAIRS3)
    assert (s < 1).all()
    psi = dtl_psi(s, theta)
    assert torch.equal(psi, torch.zeros_like(psi))
    from mlcontrast.train.models import masked_bce

    masked_bce(psi, y).backward()
    assert theta.grad.item() == 0.0
    assert q.grad.abs().sum().item() == 0.0


def test_dtl_gradient_flows_with_one_known_positive():
    theta = torch.nn.Parameter(torch.tensor(1.0))
    q = torch.tensor([[L3, -L3, 0.0]], requires_grad=True)
    y = torch.tensor([[1, -1, 0]])  # class 0 the only known positive → s = 1 = θ
    s = ist_scores(q, y, *PAIRS3)
    assert s[0, 0].item() == 1.0
    psi = dtl_psi(s, theta)
    assert psi[0, 0].item() == 0.0
    from mlcontrast.train.models import masked_bce

    masked_bce(psi, y).backward()
    # 2 known entries; d/dθ of −log σ(s − θ) at s − θ = 0 is σ(0) = 0.5 (clamp passes on its boundary);
    # the known negative (class 2, s = 0.25 < θ) is clamped: no gradient
    assert theta.grad.item() == pytest.approx(0.5 / 2)


# ---------------------------------------------------------------- CST


def test_cst_cosine_score_by_hand():
    f = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, C=2, d=2]
    protos = torch.tensor([[[1.0, 1.0], [3.0, 0.0]],  # class 0: cos 1/√2 and 1
                           [[0.0, -1.0], [5.0, 5.0]]])  # class 1: only the first is valid, cos −1
    mask = torch.tensor([[True, True], [True, False]])
    s = cst_scores(f, protos, mask)
    torch.testing.assert_close(s, torch.tensor([[(1 / math.sqrt(2) + 1) / 2, -1.0]]))
    none = cst_scores(f, protos, torch.zeros(2, 2, dtype=torch.bool))
    assert torch.equal(none, torch.zeros(1, 2))


# ---------------------------------------------------------------- pair targets and ASL


def test_pair_targets_intended_and_legacy():
    y = torch.tensor([[1, 1, -1], [1, -1, 0], [-1, -1, 1]])
    assert pair_targets(y, *PAIRS3).tolist() == [[1, -1, -1], [-1, 0, 0], [-1, -1, -1]]
    assert pair_targets(y, *PAIRS3, unknown_as_negative=True).tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_asymmetric_pair_loss_by_hand():
    q = torch.tensor([[0.0, 0.0, 5.0]])
    t = torch.tensor([[1, 0, -1]])
    pos = -math.log(0.5) * 0.5  # γ+ = 1
    neg = -math.log(0.55) * 0.45**2  # p shifted by clip 0.05, γ− = 2
    assert asymmetric_pair_loss(q, t).item() == pytest.approx((pos + neg) / 2, rel=1e-6)
    # a confidently absent pair within the clip margin costs nothing
    assert asymmetric_pair_loss(torch.tensor([[-4.0]]), torch.tensor([[0]])).item() == 0.0


# ---------------------------------------------------------------- instance loss


def _feats(angles):
    """[B, 1, 2] unit features at the given angles (class 0 only)."""
    a = torch.tensor(angles, dtype=torch.float32)
    return torch.stack([a.cos(), a.sin()], -1)[:, None]


def test_instance_loss_pair_sets_without_positive_pairs():
    f = _feats([0.0, 1.0, 2.5, 0.3])
    d = lambda i, j: math.cos([0.0, 1.0, 2.5, 0.3][i] - [0.0, 1.0, 2.5, 0.3][j])  # noqa: E731
    y = torch.tensor([[1], [0], [0], [-1]])  # PN: (0,1), (0,2); NN: (1,2); image 3 unknown: no pairs
    intended = instance_loss(f, y)
    assert intended.item() == pytest.approx(((1 + d(0, 1)) + (1 + d(0, 2))) / 2, rel=1e-6)
    legacy = instance_loss(f, y, neg_neg_push=True)
    assert legacy.item() == pytest.approx(((1 + d(0, 1)) + (1 + d(0, 2)) + (1 + d(1, 2))) / 3, rel=1e-6)
    y_none = torch.tensor([[-1], [0], [-1], [-1]])
    assert instance_loss(f, y_none).item() == 0.0


def test_instance_loss_hard_mining_with_positive_pairs():
    angles = [0.0, 0.4, 2.0, 3.0, 1.1]
    f = _feats(angles)
    d = lambda i, j: math.cos(angles[i] - angles[j])  # noqa: E731
    y = torch.tensor([[1], [1], [0], [0], [-1]])
    pp = 1 - d(0, 1)
    pn = [1 + d(i, j) for i in (0, 1) for j in (2, 3)]
    nn_ = 1 + d(2, 3)
    # n = |PP| = 1: PN' = 2 random PN terms + the largest, NN' (legacy) = its one term twice
    loss = instance_loss(f, y).item()
    rest = 4 * loss - pp - max(pn)
    assert any(abs(rest - (a + b)) < 1e-5 for a, b in itertools.combinations(pn, 2))
    legacy = instance_loss(f, y, neg_neg_push=True).item()
    rest = 6 * legacy - pp - max(pn) - 2 * nn_
    assert any(abs(rest - (a + b)) < 1e-5 for a, b in itertools.combinations(pn, 2))
    # the random part comes from torch's global RNG: same seed, same loss
    torch.manual_seed(5)
    a = instance_loss(f, y)
    torch.manual_seed(5)
    assert torch.equal(a, instance_loss(f, y))


# ---------------------------------------------------------------- prototype loss


def test_prototype_loss_sign_intended_and_legacy():
    s = torch.tensor([[0.6, 0.2, 0.9], [-0.5, 0.4, 0.1]], requires_grad=True)
    y = torch.tensor([[1, 0, -1], [0, 1, 1]])
    valid = torch.tensor([True, True, False])  # class 2 has no prototype
    loss = prototype_loss(s, y, valid)
    assert loss.item() == pytest.approx(((1 - 0.6) + (1 + 0.2) + (1 - 0.5) + (1 - 0.4)) / 4, rel=1e-6)
    loss.backward()
    # pulls positives up (negative gradient), pushes negatives down, ignores class 2
    torch.testing.assert_close(s.grad, torch.tensor([[-0.25, 0.25, 0.0], [0.25, -0.25, 0.0]]))
    s.grad = None
    legacy = prototype_loss(s, y, valid, legacy_sign=True)
    assert legacy.item() == pytest.approx(((1 + 0.6) + (1 - 0.2) + (1 + 0.5) + (1 + 0.4)) / 4, rel=1e-6)
    legacy.backward()
    torch.testing.assert_close(s.grad, torch.tensor([[0.25, -0.25, 0.0], [-0.25, 0.25, 0.0]]))
    # unknown entries are constant 1
    assert prototype_loss(s, torch.full_like(y, -1), valid).item() == pytest.approx(1.0)


# ---------------------------------------------------------------- adjacency and prototypes in start_epoch


PARTIAL = torch.tensor([[1, 1, -1], [1, 0, 1], [-1, 1, 1], [1, -1, -1], [0, -1, 0]])


def test_adjacency_from_partial_labels():
    g = cooccurrence_adjacency(PARTIAL)
    # known positives: class 0 rows {0,1,3}, class 1 rows {0,2}, class 2 rows {1,2}; each pair once
    expect = torch.tensor([[1.0, 1 / 3, 1 / 3], [1 / 2, 1.0, 1 / 2], [1 / 2, 1 / 2, 1.0]])
    torch.testing.assert_close(g, expect)
    # a class without known positives: a zero row but for the diagonal
    g2 = cooccurrence_adjacency(torch.tensor([[1, -1], [1, 0]]))
    torch.testing.assert_close(g2, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))


def test_adjacency_from_args_and_lazily_from_the_loader():
    m = build_method("hst", 3, None, backbone="test_resnet", feature_index=2, hidden_dim=32,
                     train_targets=PARTIAL.numpy().astype(np.int8))
    assert bool(m.adjacency_ready)
    torch.testing.assert_close(m.adjacency, cooccurrence_adjacency(PARTIAL))
    # lazily: from the loader's dataset (through Subset), or by iterating a loader without one
    ds = DigitMosaics("train", num_images=12, seed=0).apply_partial_labels(0.5, seed=0)
    lazy = _tiny_hst(10, generate_label_epoch=3)
    loader = torch.utils.data.DataLoader(Subset(ds, range(10)), batch_size=4)
    lazy.start_epoch(0, loader, "cpu")
    torch.testing.assert_close(lazy.adjacency, cooccurrence_adjacency(torch.from_numpy(ds.targets[:10]).long()))
    plain = _tiny_hst(10, generate_label_epoch=3)
    plain.start_epoch(0, [(x, y) for x, y in loader], "cpu")
    torch.testing.assert_close(plain.adjacency, lazy.adjacency)
    assert not bool(plain.has_prototypes)


def test_kmeans_prototypes_in_start_epoch_use_known_positives_only():
    torch.manual_seed(0)
    m = _tiny_hst(3, num_prototypes=2, generate_label_epoch=2)
    m.train()
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([[1, -1, 0], [1, 0, -1], [-1, -1, 1], [1, 0, 0], [0, -1, -1], [-1, 0, 0]])
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    m.start_epoch(1, loader, "cpu")  # not a prototype epoch (E = 2)
    assert not bool(m.has_prototypes)
    m.start_epoch(2, loader, "cpu")
    assert m.training  # mode restored
    assert bool(m.has_prototypes)
    assert m.prototypes.shape == (3, 2, 32) and m.prototype_mask.shape == (3, 2)
    # K capped by the features available: class 0 has 3 known positives, class 2 one, class 1 none
    assert m.prototype_mask.tolist() == [[True, True], [False, False], [True, False]]
    m.eval()
    with torch.no_grad():
        f = m.label_features(x)
    # class 2: its one centre is the feature of image 2 (not of images 1 and 4, where class 2 is unknown)
    torch.testing.assert_close(m.prototypes[2, 0], f[2, 2], rtol=1e-4, atol=1e-5)
    # class 0: each centre is a mean of a non-empty subset of the known positives {0, 1, 3}
    pos = f[[0, 1, 3], 0]
    subsets = [pos[list(s)].mean(0) for r in (1, 2) for s in itertools.combinations(range(3), r)]
    for k in range(2):
        assert min((m.prototypes[0, k] - c).abs().max().item() for c in subsets) < 1e-4
    assert torch.equal(m.prototypes[1], torch.zeros(2, 32))
    # the same epoch gives the same prototypes (random_state from seed and epoch)
    before = m.prototypes.clone()
    m.start_epoch(2, loader, "cpu")
    torch.testing.assert_close(m.prototypes, before)


# ---------------------------------------------------------------- the loss


def test_loss_parts_weights_and_gradients():
    torch.manual_seed(0)
    m = _tiny_hst(5, generate_label_epoch=2, theta_init=0.5)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([[1, 0, 1, -1, -1], [0, 1, -1, 0, 0], [1, -1, 0, -1, 1], [-1, 0, 1, 1, -1],
                      [1, 1, -1, 0, 0], [0, -1, -1, 1, 0]])
    loss0, p0 = m.training_loss(x, y, epoch=0, progress=0.25)
    l2 = 0.5 * 5e-4 * (0.5**2 + 0.5**2)
    expect0 = p0["cls"] + 0.25 * (10 * p0["cooc"] + 0.05 * p0["inst"]) + l2
    torch.testing.assert_close(loss0.detach(), expect0)
    for k in ("ist_cls", "dtl_intra", "cst_cls", "dtl_inter", "proto"):
        assert p0[k].item() == 0.0
    assert torch.equal(p0["pseudo"], torch.full_like(y, -1))
    # prototypes at epoch 2, then the full loss
    m.start_epoch(2, [(x, y)], "cpu")
    assert bool(m.has_prototypes)
    loss, p = m.training_loss(x, y, epoch=2, progress=0.0)
    expect = (p["cls"] + 10 * p["cooc"] + 0.05 * p["inst"] + l2 + p["ist_cls"] + 0.1 * p["dtl_intra"]
              + p["cst_cls"] + 0.1 * p["dtl_inter"] + 0.05 * p["proto"])
    torch.testing.assert_close(loss.detach(), expect)
    assert p["dtl_intra"] > 0 and p["proto"] > 0
    assert p["theta_intra"].item() == 0.5
    pseudo = p["pseudo"]
    assert set(pseudo.unique().tolist()) <= {-1, 1}
    assert (pseudo[y >= 0] == -1).all() and (pseudo == 1).any()  # only unknown entries, positives only
    loss.backward()
    for name in ("theta_intra", "theta_inter"):
        assert getattr(m, name).grad is not None and getattr(m, name).grad.item() != 0.0
    for mod in (m.sd.fc1, m.cooc.fc2, m.fuse, m.ggnn.w):
        assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    assert m.sd.embeddings.grad.abs().sum() > 0
    assert m(x).shape == (6, 5)


def test_param_groups_keep_theta_out_of_decoupled_decay():
    m = _tiny_hst(4)
    groups = m.param_groups(1e-4)
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert groups[1]["params"] == [m.theta_intra, m.theta_inter]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters()) and len(set(ids)) == len(ids)
    # θ alone: Adam on the explicit ½λθ² term moves θ down by about lr per step (released Adam-L2 dynamics)
    opt = torch.optim.AdamW(groups, lr=1e-2, weight_decay=1e-4)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * m.theta_decay * m.theta_intra.square()).backward()
        opt.step()
    assert m.theta_intra.item() == pytest.approx(1.0 - 3e-2, abs=1e-4)
    assert m.theta_inter.item() == 1.0


def test_cli_options_and_class_embeddings_file(tmp_path):
    args = tiny_args(tmp_path, "--method", "hst", "--legacy-hst-sign", "--legacy-hst-neg-neg-push",
                     "--legacy-hst-cooc-unknown-negative", "--hst-prototypes", "4", "--hst-theta-init", "0.9")

    emb = np.random.RandomState(0).randn(10, 7).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    args = resolve_args(args)
    args.hst_class_embeddings = str(tmp_path / "emb.npy")
    m = build_method("hst", 10, args)
    assert m.legacy_sign and m.legacy_neg_neg_push and m.legacy_cooc_unknown_negative
    assert m.prototypes.shape == (10, 4, 32) and m.theta_inter.item() == pytest.approx(0.9)
    assert "sd.embeddings" in m.state_dict() and not any(p is m.sd.embeddings for p in m.parameters())
    torch.testing.assert_close(m.sd.embeddings, torch.from_numpy(emb))
    args.hst_class_embeddings = str(tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        build_method("hst", 10, args)
    np.save(tmp_path / "bad.npy", emb[:3])
    args.hst_class_embeddings = str(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="class embeddings"):
        build_method("hst", 10, args)


# ---------------------------------------------------------------- training runs


def test_tiny_run_cpu_and_torch_backends_agree(tmp_path):
    a = run(tiny_args(tmp_path / "cpu", *HST_TINY, "--backend", "cpu"))
    b = run(tiny_args(tmp_path / "torch", *HST_TINY, "--backend", "torch"))
    la, lb = np.array(a["step_losses"]), np.array(b["step_losses"])
    assert len(la) == 4 and np.isfinite(la).all()
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    lines = [json.loads(s) for s in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[0]["loss_proto"] == 0.0 and lines[1]["loss_proto"] > 0.0  # prototypes from epoch 2 (E = 1)
    assert lines[1]["loss_dtl_inter"] > 0.0 and lines[1]["loss_ist_cls"] > 0.0
    for key in ("pseudo_precision", "pseudo_recall", "mAP", "CF1", "OF1"):
        assert key in lines[-1]
    assert bool(a["model"].has_prototypes) and bool(a["model"].adjacency_ready)


def test_resume_matches_uninterrupted_run(tmp_path):
    extra = [*HST_TINY, "--backend", "cpu"]
    full = run(tiny_args(tmp_path / "full", *extra))
    part = run(tiny_args(tmp_path / "part", *extra), stop_after_epoch=1)
    assert len(part["history"]) == 1 and not bool(part["model"].has_prototypes)
    resumed = run(tiny_args(tmp_path / "part", *extra, "--resume", str(tmp_path / "part")))
    np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-5)
    for k in ("loss", "mAP", "CF1", "OF1", "loss_proto"):
        assert resumed["history"][-1][k] == pytest.approx(full["history"][-1][k], rel=1e-5, abs=1e-6)
    for k in ("pseudo_precision", "pseudo_recall", "pseudo_positives"):  # from integer counts: exact (or both null)
        assert resumed["history"][-1][k] == full["history"][-1][k]
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    assert set(sa) == set(sb) and {"prototypes", "prototype_mask", "has_prototypes", "adjacency"} <= set(sa)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_tiny_run_with_the_released_quirks(tmp_path):
    r = run(tiny_args(tmp_path, *HST_TINY, "--backend", "cpu", "--legacy-hst-sign", "--legacy-hst-neg-neg-push",
                      "--legacy-hst-cooc-unknown-negative"))
    m = r["model"]
    assert m.legacy_sign and m.legacy_neg_neg_push and m.legacy_cooc_unknown_negative
    assert np.isfinite(r["step_losses"]).all() and r["history"][-1]["loss_proto"] > 0.0
