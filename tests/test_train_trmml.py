import json
import math
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import TINY, one_thread, tiny_args  # noqa: F401  (one_thread: autouse)

from mlcontrast import reference
from mlcontrast.train.config import build_method
from mlcontrast.train.engine import run
from mlcontrast.train.methods import METHODS
from mlcontrast.train.methods.trmml import TRMML, distill_kl, partial_asl, pseudo_labels


def _tiny(**kw):
    kw = {"backbone": "test_resnet", "feature_index": 2, "hidden_dim": 32, "heads": 4, "backend": "torch",
          "quiet": True, **kw}
    return TRMML(5, **kw)


Y = torch.tensor([[1, 0, -1, 0, -1], [0, 1, 1, -1, 0], [1, -1, 0, 0, 0], [-1, 0, 1, 1, 0]])


class _Capture:
    """Records the region features the model computed (a forward hook on the region learner)."""

    def __init__(self, model):
        self.out = None
        model.regions.register_forward_hook(lambda mod, inp, out: setattr(self, "out", out))


# ---------------------------------------------------------------- pieces


def test_registered_and_shapes(capsys):
    assert METHODS["trmml"] is TRMML and TRMML.makes_pseudo_labels
    torch.manual_seed(0)
    m = TRMML(5, backbone="test_resnet", feature_index=2, hidden_dim=32, heads=4)
    assert "no --trmml-clip-checkpoint" in capsys.readouterr().err  # the run says CLIP is not used
    assert not m.uses_clip and m.kd == "none" and m.clip_tower is None
    x = torch.randn(4, 3, 32, 32)
    tokens, g = m.encode_image(x)
    assert tokens.shape == (4, 16, 32) and g.shape == (4, 32)  # 4x4 map at stride 8
    assert m.regions(tokens).shape == (4, 5, 32)
    assert m(x).shape == (4, 5)
    assert m.text_protos().shape == (5, 32) and m.visual_protos.shape == (5, 32)
    torch.testing.assert_close(m.visual_protos, m.text_protos().detach())  # the prototypes start at T
    with pytest.raises(ValueError, match="frozen CLIP teacher"):
        _tiny(kd="kl")


def test_matching_logits_hand_made():
    m = _tiny(logit_scale=10.0)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # normalised inside
    r = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 1.0, 0.0]],
                      [[-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])
    expect = 10.0 * torch.tensor([[0.6, 1.0], [-1.0, 1 / math.sqrt(2)]])
    torch.testing.assert_close(m.match(r, text), expect)
    r2 = r.clone()
    r2[:, 1] = torch.tensor([0.0, 0.0, 5.0])  # one-to-one: class 1's region never meets class 0's text
    torch.testing.assert_close(m.match(r2, text)[:, 0], expect[:, 0])
    with torch.no_grad():
        m.log_scale.fill_(math.log(1000.0))  # κ is clamped at CLIP's 100
    torch.testing.assert_close(m.match(r, text), 100.0 * expect / 10.0)
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    torch.testing.assert_close(m(x), m.match(m.regions(m.encode_image(x)[0]), m.text_protos()))


def test_bce_classification_loss_weighs_pseudo_labels():
    torch.manual_seed(5)
    m = _tiny(cls_loss="bce", warmup_epochs=0, pseudo_threshold=-2.0, pseudo_inter_threshold=0.0,
              pseudo_min_precision=0.0, pseudo_weight=0.25)
    x = torch.randn(4, 3, 32, 32)
    logits = []
    m.regions.register_forward_hook(lambda mod, inp, out: logits.append(m.match(out, m.text_protos())))
    _, parts = m.training_loss(x, Y, epoch=0)
    z = logits[0].detach().float()
    y = torch.where(Y == -1, 1, Y)  # every unknown entry is a pseudo-positive with these thresholds
    w = torch.where(Y == -1, 0.25, 1.0)
    bce = F.binary_cross_entropy_with_logits(z, (y == 1).float(), reduction="none")
    torch.testing.assert_close(parts["cls"], (bce * w).sum() / 20)  # 4 x 5 entries, all labelled


def test_partial_asl_and_distill_hand_made():
    z = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 1.0]])
    y = torch.tensor([[1, 0, -1], [0, 1, 0]])
    p = torch.sigmoid(z)
    pm = (p - 0.05).clamp(min=0)
    terms = [(1 - p[0, 0]) * torch.log(p[0, 0]), pm[0, 1] ** 2 * torch.log(1 - pm[0, 1]),
             pm[1, 0] ** 2 * torch.log(1 - pm[1, 0]), (1 - p[1, 1]) * torch.log(p[1, 1]),
             pm[1, 2] ** 2 * torch.log(1 - pm[1, 2])]
    torch.testing.assert_close(partial_asl(z, y), -sum(terms) / 2)
    w = torch.ones(2, 3)
    w[1, 1] = 0.5
    torch.testing.assert_close(partial_asl(z, y, w), -(sum(terms) - 0.5 * terms[3]) / 2)
    t = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    pt, ps = F.softmax(t / 4, 1), F.softmax(z / 4, 1)
    torch.testing.assert_close(distill_kl(z, t, 4.0), 16 * (pt * (pt.log() - ps.log())).sum() / 2)


def test_contrast_term_equals_direct_call():
    torch.manual_seed(1)
    m = _tiny(mcl_temperature=0.2)
    cap = _Capture(m)
    _, parts = m.training_loss(torch.randn(4, 3, 32, 32), Y, epoch=0)  # warm-up: no pseudo-labels
    r, text = cap.out.detach(), m.text_protos().detach()
    b, c = (Y == 1).nonzero(as_tuple=True)
    nb, nc = (Y == 0).nonzero(as_tuple=True)
    present = torch.tensor([0, 1, 2, 3])  # class 4 has no known positive
    # known negatives of class c form a class of their own (5 + c): pushed from c's text and positive regions
    rows = torch.cat([r[b, c], r[nb, nc], text[present]])
    labels = torch.cat([c, nc + 5, present])
    expect = reference.label_supcon_loss(rows, labels, temperature=0.2, normalize=True)
    torch.testing.assert_close(parts["mcl"], expect)
    rows_m, labels_m = m.contrast_set(r, text, Y == 1, Y == 0)
    assert torch.equal(labels_m, labels) and torch.equal(rows_m, rows)
    m.mcl_negatives = False  # --trmml-mcl-no-negatives: positives and texts only
    _, parts = m.training_loss(torch.randn(4, 3, 32, 32), Y, epoch=0)
    r = cap.out.detach()
    expect = reference.label_supcon_loss(torch.cat([r[b, c], text[present]]), torch.cat([c, present]),
                                         temperature=0.2, normalize=True)
    torch.testing.assert_close(parts["mcl"], expect)
    m.mcl_text = "all"
    _, labels_all = m.contrast_set(r, text, Y == 1)
    assert labels_all[-5:].tolist() == [0, 1, 2, 3, 4]


def test_prototype_ema_only_at_known_positives():
    torch.manual_seed(2)
    m = _tiny()
    p0 = m.visual_protos.clone()
    r = torch.randn(4, 5, 32)
    m.update_prototypes_(r, Y)
    rn = F.normalize(r, dim=-1)
    for cls in range(5):
        pos = Y[:, cls] == 1
        if pos.any():
            expect = F.normalize(0.99 * p0[cls] + 0.01 * rn[pos, cls].mean(0), dim=0)
            torch.testing.assert_close(m.visual_protos[cls], expect)
        else:  # class 4: only negatives and unknowns -> bit-for-bit unchanged
            assert torch.equal(m.visual_protos[cls], p0[cls])
    # pseudo-positives (every unknown entry, with these thresholds) never move the prototypes
    m = _tiny(warmup_epochs=0, pseudo_threshold=-2.0, pseudo_inter_threshold=0.0, pseudo_min_precision=0.0)
    p0 = m.visual_protos.clone()
    _, parts = m.training_loss(torch.randn(4, 3, 32, 32), Y, epoch=0)
    assert parts["pseudo"][:, 4].tolist() == [1, -1, -1, -1]  # its one unknown entry
    assert torch.equal(m.visual_protos[4], p0[4])


def test_pseudo_labels_hand_made():
    # D = 2; class prototypes: visual v, text t; regions chosen so a = ½(cos(R, v) + cos(R, t)) is known
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    r = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],     # a = [1, 1, 0.5]
                      [[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]])   # a = [0, 0, -0.5]
    a = torch.tensor([[1.0, 1.0, 0.5], [0.0, 0.0, -0.5]])
    e = 3 * torch.softmax(a / 0.5, 1)
    targets = torch.tensor([[-1, 1, -1], [-1, -1, -1]])
    out = pseudo_labels(r, v, t, targets, pos_threshold=0.4, inter_threshold=1.0, temperature=0.5)
    assert out.tolist() == [[1, -1, -1], [-1, -1, -1]]  # [0, 2]: a = 0.5 > 0.4 but e[0, 2] < 1
    assert e[0, 2] < 1.0 < e[0, 0]
    out = pseudo_labels(r, v, t, targets, pos_threshold=-0.1, inter_threshold=0.4, temperature=0.5,
                        neg_threshold=-0.2)
    expect = torch.where(targets == -1, torch.where((a > -0.1) & (e > 0.4), 1, torch.where(a < -0.2, 0, -1)), -1)
    assert torch.equal(out, expect) and out.tolist() == [[1, -1, 1], [1, 1, 0]]


def test_pseudo_labels_only_after_warmup_and_only_on_unknowns():
    torch.manual_seed(3)
    m = _tiny(warmup_epochs=2, pseudo_threshold=-2.0, pseudo_inter_threshold=0.0, pseudo_neg_threshold=-3.0,
              pseudo_min_precision=0.0)
    x = torch.randn(4, 3, 32, 32)
    for epoch in (0, 1):
        _, parts = m.training_loss(x, Y, epoch=epoch, progress=0.5)
        assert (parts["pseudo"] == -1).all()
    _, parts = m.training_loss(x, Y, epoch=2)
    assert torch.equal(parts["pseudo"], torch.where(Y == -1, 1, -1))  # every unknown passes these thresholds


def test_pseudo_labels_gated_by_their_precision_on_known_labels():
    # the rule flags every entry; on Y's known entries that is 6 right out of 15 flagged (precision 0.4)
    m = _tiny(pseudo_threshold=-2.0, pseudo_inter_threshold=0.0)
    r, protos, text = torch.randn(4, 5, 32), torch.randn(5, 32), torch.randn(5, 32)
    assert int((Y == 1).sum()) == 6 and int((Y >= 0).sum()) == 15
    m.pseudo_min_precision = 0.39
    assert torch.equal(m.pseudo_labels(r, protos, text, Y), torch.where(Y == -1, 1, -1))
    m.pseudo_min_precision = 0.41  # the rule is not trusted yet: no pseudo-positives in this step
    assert (m.pseudo_labels(r, protos, text, Y) == -1).all()
    m.pseudo_neg_threshold = 10.0  # pseudo-negatives are not gated (a <= 1 < 10 for every entry not flagged)
    m.pseudo_threshold = 2.0  # nothing flagged, on known entries either: the gate stays closed for positives
    assert torch.equal(m.pseudo_labels(r, protos, text, Y), torch.where(Y == -1, 0, -1))


def test_loss_parts_and_gradients():
    torch.manual_seed(4)
    m = _tiny(kd="cos", kd_weight=0.5, mcl_weight=2.0, proto_weight=0.3, cls_weight=1.5, warmup_epochs=0,
              pseudo_threshold=0.0, pseudo_weight=0.5)
    loss, parts = m.training_loss(torch.randn(4, 3, 32, 32), Y, epoch=1)
    assert set(parts) == {"cls", "kd", "mcl", "proto", "pseudo"}
    expect = 1.5 * parts["cls"] + 0.5 * parts["kd"] + 2.0 * parts["mcl"] + 0.3 * parts["proto"]
    torch.testing.assert_close(loss.detach(), expect)
    loss.backward()
    trained = ("regions.queries", "text_table", "log_scale", "image_tower.proj.weight", "regions.attn.in_proj_weight")
    for name in trained:
        p = dict(m.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(b.grad is None for b in m.buffers())
    m = _tiny()
    _, parts = m.training_loss(torch.randn(4, 3, 32, 32), Y)
    assert set(parts) == {"cls", "mcl", "pseudo"}


# ---------------------------------------------------------------- the CLIP path (a tiny open_clip model)


def _tiny_clip_files(tmp_path, kind: str):
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    if kind == "rn":  # ModifiedResNet: stride 32, 64 px -> a 2x2 map
        vision = {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None}
    else:  # ViT: 8-px patches on 32 px -> 4x4 tokens
        vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
    cfg = tmp_path / f"tiny-{kind}-clip.json"
    cfg.write_text(json.dumps({"embed_dim": 24, "vision_cfg": vision, "text_cfg": text_cfg}))
    open_clip.add_model_config(cfg)
    torch.manual_seed(5)
    model = open_clip.create_model(cfg.stem)
    ckpt = tmp_path / f"tiny-{kind}.pt"
    torch.save(model.state_dict(), ckpt)
    return open_clip, model.eval(), cfg, ckpt, vision["image_size"]


@pytest.mark.parametrize("kind", ["rn", "vit"])
def test_clip_path_tiny_open_clip(tmp_path, kind):
    open_clip, clip, cfg, ckpt, size = _tiny_clip_files(tmp_path, kind)
    names = ["cat", "dog", "traffic_light", "person", "car"]
    m = _tiny(clip_model=str(cfg), clip_checkpoint=str(ckpt), class_names=names, input_norm="clip", heads=4)
    assert m.uses_clip and m.kd == "kl" and m.image_tower is None
    tok = open_clip.get_tokenizer(cfg.stem)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(tok([f"a photo of a {n.replace('_', ' ')}." for n in names])), dim=-1)
    torch.testing.assert_close(m.text_protos(), text)
    torch.testing.assert_close(m.regions.queries.detach(), text)  # the queries start at the text features
    x = torch.randn(3, 3, size, size)
    tokens, g = m.encode_image(x)
    with torch.no_grad():
        torch.testing.assert_close(g, clip.encode_image(x), rtol=1e-4, atol=1e-5)  # CLIP's own global feature
        if kind == "rn":
            v = clip.visual
            fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))
            dense = v.attnpool.c_proj(v.attnpool.v_proj(fmap.flatten(2).transpose(1, 2)))
            torch.testing.assert_close(tokens, dense)
        else:
            out = clip.visual.forward_intermediates(x, indices=1, normalize_intermediates=True, output_fmt="NLC")
            torch.testing.assert_close(tokens, out["image_intermediates"][-1] @ clip.visual.proj)
    assert tokens.shape == (3, 4 if kind == "rn" else 16, 24)
    big, _ = m.encode_image(torch.randn(2, 3, 2 * size, 2 * size))  # other input sizes: positions resized
    assert big.shape[1] == 4 * tokens.shape[1]
    # frozen encoders: no gradient, not trained, not in the checkpoint; the trained parts get gradients
    m.train()
    assert not m.clip_tower.training
    loss, parts = m.training_loss(x, Y[:3], epoch=0)
    assert set(parts) == {"cls", "kd", "mcl", "pseudo"} and torch.isfinite(loss)
    loss.backward()
    frozen = list(m.clip_tower.parameters())
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert m.regions.queries.grad.abs().sum() > 0 and m.log_scale.grad is not None
    assert not any(k.startswith("_clip") or "visual" in k for k in m.state_dict())
    assert {id(p) for p in m.parameters()}.isdisjoint(id(p) for p in frozen)
    m.double()  # .to() moves the unregistered tower too
    assert next(m.clip_tower.parameters()).dtype == torch.float64


def test_clip_path_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="trmml-clip-checkpoint"):
        _tiny(clip_checkpoint=str(tmp_path / "none.pt"))


# ---------------------------------------------------------------- torchrun: one copy of the text rows


def _ddp_rank(rank: int, world: int, port: int, folder: str) -> None:
    import os

    import torch.distributed as dist

    from mlcontrast import label_supcon_loss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m = _tiny(backend="cpu")
    m.process_group = dist.group.WORLD
    r = _DDP_R[4 * rank: 4 * rank + 4].clone().requires_grad_(True)
    text = m.text_protos().detach().clone().requires_grad_(True)
    rows, labels = m.contrast_set(r, text, _DDP_Y[4 * rank: 4 * rank + 4])
    loss = label_supcon_loss(rows, labels, temperature=0.1, normalize=True, backend="cpu",
                             process_group=m.process_group)
    loss.backward()
    torch.save({"loss": loss.detach(), "r": r.grad, "t": text.grad, "text": text.detach()}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


_DDP_R = torch.randn(8, 5, 32, generator=torch.Generator().manual_seed(1))
_DDP_Y = torch.zeros(8, 5, dtype=torch.bool)
_DDP_Y[[0, 1, 3, 5, 6, 7], [1, 0, 1, 4, 1, 2]] = True  # class 4 only on rank 1, class 3 nowhere


def test_ddp_contrast_set_equals_one_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    m = _tiny(backend="cpu")
    r = _DDP_R.clone().requires_grad_(True)
    text = a["text"].clone().requires_grad_(True)
    rows, labels = m.contrast_set(r, text, _DDP_Y)
    assert labels[-4:].tolist() == [0, 1, 2, 4]  # the text rows of the classes present on any rank
    loss = reference.label_supcon_loss(rows, labels, temperature=0.1, normalize=True)
    loss.backward()
    torch.testing.assert_close(a["loss"], loss.detach())
    torch.testing.assert_close(b["loss"], loss.detach())
    # DDP averages gradients: the ranks' mean equals the one-process gradient (one copy of T, from rank 0)
    torch.testing.assert_close((a["t"] + b["t"]) / 2, text.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([a["r"], b["r"]]) / 2, r.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- training runs


def _run_extra(*more):
    return ["--method", "trmml", "--known-ratio", "0.5", "--epochs", "2", "--trmml-warmup-epochs", "1",
            "--trmml-pseudo-threshold", "0.0", "--trmml-pseudo-inter-threshold", "0.5",
            "--trmml-pseudo-min-precision", "0", *more]


def test_tiny_run_cpu_and_torch_backends_agree(tmp_path):
    a = run(tiny_args(tmp_path / "cpu", *_run_extra("--backend", "cpu")))
    b = run(tiny_args(tmp_path / "torch", *_run_extra("--backend", "torch")))
    la, lb = np.array(a["step_losses"]), np.array(b["step_losses"])
    assert len(la) == 4 and np.isfinite(la).all()
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    lines = [json.loads(s) for s in (tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert lines[0]["pseudo_positives"] == 0 and lines[1]["pseudo_positives"] > 0  # active after the warm-up
    for key in ("loss_cls", "loss_mcl", "mAP", "CF1", "OF1", "pseudo_precision", "pseudo_recall"):
        assert key in lines[-1]


def test_resume_matches_uninterrupted_run(tmp_path):
    extra = _run_extra("--backend", "cpu")
    full = run(tiny_args(tmp_path / "full", *extra))
    part = run(tiny_args(tmp_path / "part", *extra), stop_after_epoch=1)
    assert len(part["history"]) == 1
    resumed = run(tiny_args(tmp_path / "part", *extra, "--resume", str(tmp_path / "part")))
    np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-5)
    for k in ("loss", "mAP", "CF1", "OF1"):
        assert resumed["history"][-1][k] == pytest.approx(full["history"][-1][k], rel=1e-5, abs=1e-6)
    for k in ("pseudo_precision", "pseudo_recall", "pseudo_positives"):  # from integer counts: exact (or both null)
        assert resumed["history"][-1][k] == full["history"][-1][k]
    sa, sb = full["model"].state_dict(), resumed["model"].state_dict()
    assert "prototype_bank.prototypes" in sa
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_build_method_from_parser_defaults():
    m = build_method("trmml", 5, backbone="test_resnet", feature_index=2, hidden_dim=32, class_names=list("abcde"))
    assert isinstance(m, TRMML) and m.warmup_epochs >= 1 and m.kd == "none" and m.cls_loss == "asl"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_learned_mcl_temperature_gets_its_gradient(backend):
    torch.manual_seed(3)
    m = _tiny(mcl_learn_temperature=True, mcl_temperature=0.2, backend=backend)
    assert "mcl_log_temperature" in dict(m.named_parameters())
    x = torch.randn(4, 3, 32, 32)
    loss, parts = m.training_loss(x, Y, epoch=0)
    loss.backward()
    assert torch.isclose(parts["mcl_tau"], torch.tensor(0.2))
    grad = m.mcl_log_temperature.grad
    assert grad is not None and torch.isfinite(grad) and grad != 0
    fixed = _tiny(mcl_temperature=0.2, backend=backend)
    assert "mcl_log_temperature" not in dict(fixed.named_parameters())  # old checkpoints still load


def test_learned_mcl_temperature_gradient_is_that_of_the_reference():
    torch.manual_seed(4)
    grads = {}
    for backend in ("torch", "cpu"):
        torch.manual_seed(4)
        m = _tiny(mcl_learn_temperature=True, mcl_weight=1.0, cls_weight=0.0, backend=backend)
        loss, _ = m.training_loss(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), Y, epoch=0)
        loss.backward()
        grads[backend] = m.mcl_log_temperature.grad
    torch.testing.assert_close(grads["cpu"], grads["torch"], rtol=1e-4, atol=1e-6)
