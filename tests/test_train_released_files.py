"""Loading the files the released code loads (mlcontrast/train/released_files.py): SADCL's stage-1 checkpoint
and prototype .npy, HST's GloVe class vectors, written here in the released formats into tiny models."""

import json

import numpy as np
import pytest
import torch
from train_helpers import one_thread, tiny_args  # noqa: F401  (one_thread: autouse)

from mlcontrast.train.cli import main
from mlcontrast.train.config import build_method, resolve_args, resolved_config
from mlcontrast.train.methods.sadcl import build_prototypes
from mlcontrast.train.released_files import VOC_FROM_COCO, load_sadcl_state, load_torch_file

TINY_SADCL = dict(backbone="test_resnet", feature_index=2, hidden_dim=32, proj_dim=16, batch_size=8)


def _sadcl(num_classes=5, seed=0, **kw):
    """A tiny SADCL whose every float tensor is distinct (LayerNorm and BatchNorm start at ones and zeros, which
    would hide a swapped name)."""
    torch.manual_seed(seed)
    m = build_method("sadcl", num_classes, **{**TINY_SADCL, **kw})
    with torch.no_grad():
        for v in m.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.1)  # positive: running variances stay valid
    return m


def _released_name(ours: str) -> str | None:
    """Our name → the released one, written from the released files (S code/lib_sadcl/models/backbone.py Joiner,
    transformer/transformer_{encoder,decoder}.py, sadcl.py); None for what stage 1 does not have."""
    parts = ours.split(".")
    if ours.startswith(("proj.", "prototype_bank.", "learned_prototypes", "memory")) or \
            ours.endswith("num_batches_tracked"):
        return None  # stage 2's additions, and FrozenBatchNorm2d keeps no counter
    if parts[0] == "backbone":
        return "backbone.0." + ".".join(parts[1:])
    if parts[0] == "fc":
        return {"weight": "fc.W", "bias": "fc.b"}[parts[1]]
    if parts[1] in ("input_proj", "query_embed"):
        return ".".join(parts[1:])
    if parts[1] == "norm":
        return "transformer.decoder.norm." + parts[2]
    kind, i, mod, rest = parts[1], parts[2], parts[3], parts[4:]
    if mod == "attn":
        mod = "self_attn" if kind == "encoder" else "multihead_attn"
    elif mod == "ffn":
        mod, rest = {"0": "linear1", "3": "linear2"}[rest[0]], rest[1:]
    elif kind == "decoder":  # the released decoder layer lost norm1 with its self-attention
        mod = {"norm1": "norm2", "norm2": "norm3"}[mod]
    return ".".join([f"transformer.{kind}.layers.{i}", mod, *rest])


def _q2l_checkpoint(model, path, drop=(), extra=None):
    """``model``'s weights as the released stage-1 ``model_best.pth.tar``: DDP names, fc as [1, C, d] / [1, C]."""
    state = {}
    for k, v in model.state_dict().items():
        name = _released_name(k)
        if name is not None and name not in drop:
            state["module." + name] = v.unsqueeze(0) if name in ("fc.W", "fc.b") else v.clone()
    state.update(extra or {})
    torch.save({"epoch": 12, "arch": "Q2L-R101-448", "state_dict": state, "best_mAP": np.float64(85.006),
                "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "betas": (0.9, 0.999)}]}}, path)
    return path


# ---------------------------------------------------------------- SADCL stage-1 checkpoint


def test_stage1_checkpoint_lands_where_the_names_map(tmp_path):
    src, dst = _sadcl(seed=1), _sadcl(seed=2)
    path = _q2l_checkpoint(src, tmp_path / "model_best.pth.tar")
    proj_before, proto_before = dst.proj.net[0].weight.clone(), dst.prototypes.clone()
    loaded = load_sadcl_state(dst, path)
    ours = src.state_dict()
    assert "decoder.decoder.1.norm1.weight" in loaded and "fc.weight" in loaded and "proj.net.0.weight" not in loaded
    for name in loaded:
        torch.testing.assert_close(dst.state_dict()[name], ours[name], rtol=0, atol=0, msg=name)
    assert torch.equal(dst.proj.net[0].weight, proj_before) and torch.equal(dst.prototypes, proto_before)
    src.eval(), dst.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_stage1_checkpoint_through_the_cli_option(tmp_path):
    path = _q2l_checkpoint(_sadcl(seed=3), tmp_path / "q2l.pth.tar")
    args = resolve_args(tiny_args(tmp_path, "--method", "sadcl", "--sadcl-init", str(path)))
    m = build_method("sadcl", 5, args)
    torch.testing.assert_close(m.fc.weight, _sadcl(seed=3).fc.weight)


def test_stage1_checkpoint_errors_list_what_did_not_load(tmp_path):
    src = _sadcl(seed=1)
    with pytest.raises(FileNotFoundError, match="--sadcl-init: file not found: .*nope.pth"):
        load_sadcl_state(_sadcl(), tmp_path / "nope.pth")
    bad = {"module.transformer.decoder.layers.0.self_attn.in_proj_weight": torch.zeros(96, 32),
           "module.query_embed.weight": torch.zeros(7, 32)}
    path = _q2l_checkpoint(src, tmp_path / "bad.pth", drop=("transformer.decoder.norm.weight",), extra=bad)
    dst = _sadcl(seed=2)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_sadcl_state(dst, path)
    msg = str(err.value)
    assert "no counterpart in the model (1): transformer.decoder.layers.0.self_attn.in_proj_weight" in msg
    assert "shapes differ (1): query_embed.weight (7, 32) → decoder.query_embed.weight (5, 32)" in msg
    assert "in the model, not in the file (1): decoder.norm.weight" in msg
    assert "nothing was loaded" in msg
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())


def test_stage1_checkpoint_of_another_width_is_refused(tmp_path):
    path = _q2l_checkpoint(_sadcl(hidden_dim=16, proj_dim=8), tmp_path / "narrow.pth")
    with pytest.raises(ValueError, match=r"shapes differ \(\d+\): input_proj.weight \(16, 48, 1, 1\) → "
                                         r"decoder.input_proj.weight \(32, 48, 1, 1\), .* … \(\+\d+\)"):
        load_sadcl_state(_sadcl(), path)


def test_checkpoint_with_code_objects_is_refused(tmp_path):
    torch.save({"state_dict": {"x": torch.zeros(1)}, "fn": json.dumps}, tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_torch_file(tmp_path / "unsafe.pth", option="--sadcl-init")


def test_voc_model_takes_coco_class_rows_through_the_released_map(tmp_path):
    coco = _sadcl(num_classes=80, seed=4)
    path = _q2l_checkpoint(coco, tmp_path / "coco.pth")
    voc = _sadcl(num_classes=20, seed=5)
    load_sadcl_state(voc, path)
    idx = torch.tensor(VOC_FROM_COCO)
    torch.testing.assert_close(voc.decoder.query_embed.weight, coco.decoder.query_embed.weight[idx])
    torch.testing.assert_close(voc.fc.weight, coco.fc.weight[idx])
    torch.testing.assert_close(voc.fc.bias, coco.fc.bias[idx])
    assert VOC_FROM_COCO[0] == 4 and VOC_FROM_COCO[14] == 0  # aeroplane ← airplane, person ← person
    with pytest.raises(ValueError, match="shapes differ"):
        load_sadcl_state(_sadcl(num_classes=20), path, class_map=None)


@pytest.mark.parametrize("legacy", [False, True])
def test_stage2_checkpoint_brings_projector_and_prototypes(tmp_path, legacy):
    src = _sadcl(seed=6, legacy_learned_prototypes=legacy)
    protos = torch.randn(1, 5, 32)
    extra = {"module.prototype": protos, "module.proj_head.layers.0.weight": src.proj.net[0].weight,
             "module.proj_head.layers.0.bias": src.proj.net[0].bias,
             "module.proj_head.layers.1.weight": src.proj.net[2].weight,
             "module.proj_head.layers.1.bias": src.proj.net[2].bias}
    path = _q2l_checkpoint(src, tmp_path / "sadcl.pth", extra=extra)
    dst = _sadcl(seed=7, legacy_learned_prototypes=legacy)
    load_sadcl_state(dst, path)
    torch.testing.assert_close(dst.proj.net[2].weight, src.proj.net[2].weight)
    torch.testing.assert_close(dst.prototypes, protos[0])
    torch.testing.assert_close(dst.memory, protos.expand(8, -1, -1))  # every slot, as the released bank starts


# ---------------------------------------------------------------- SADCL prototypes file


def _proto_args(tmp_path, *extra):
    return resolve_args(tiny_args(tmp_path, "--method", "sadcl", *extra))


@pytest.mark.parametrize("legacy", [False, True])
def test_prototype_file_fills_prototypes_and_every_memory_slot(tmp_path, legacy):
    protos = np.random.RandomState(0).randn(5, 32).astype(np.float32)  # the released format: float32 [C, d]
    np.save(tmp_path / "vis_prototype.npy", protos)
    flag = ["--legacy-learned-prototypes"] if legacy else []
    m = build_method("sadcl", 5, _proto_args(tmp_path, *flag, "--sadcl-prototypes", str(tmp_path / "vis_prototype.npy")))
    torch.testing.assert_close(m.prototypes, torch.from_numpy(protos))
    torch.testing.assert_close(m.memory, torch.from_numpy(protos).expand(8, -1, -1))
    assert m.prototypes.requires_grad == legacy  # the released prototype is a trainable nn.Parameter
    np.save(tmp_path / "boxed.npy", protos[None])  # [1, C, d] (the released parameter's shape) is accepted
    m = build_method("sadcl", 5, _proto_args(tmp_path, "--sadcl-prototypes", str(tmp_path / "boxed.npy")))
    torch.testing.assert_close(m.prototypes, torch.from_numpy(protos))


def test_prototype_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--sadcl-prototypes: file not found"):
        build_method("sadcl", 5, _proto_args(tmp_path, "--sadcl-prototypes", str(tmp_path / "none.npy")))
    np.save(tmp_path / "wide.npy", np.zeros((5, 2048), np.float32))  # a released file for hidden 2048
    with pytest.raises(ValueError, match=r"prototypes in .*wide.npy have shape \(5, 2048\), expected \[C=5, 32\]"):
        build_method("sadcl", 5, _proto_args(tmp_path, "--sadcl-prototypes", str(tmp_path / "wide.npy")))
    np.save(tmp_path / "ints.npy", np.zeros((5, 32), np.int64))
    with pytest.raises(ValueError, match="float array"):
        build_method("sadcl", 5, _proto_args(tmp_path, "--sadcl-prototypes", str(tmp_path / "ints.npy")))
    np.save(tmp_path / "ok.npy", np.zeros((5, 32), np.float32))
    with pytest.raises(ValueError, match="give one"):
        build_method("sadcl", 5, _proto_args(tmp_path, "--sadcl-prototypes", str(tmp_path / "ok.npy"),
                                             "--sadcl-build-prototypes"))


def test_build_prototypes_runs_before_the_first_epoch_only(tmp_path):
    m = build_method("sadcl", 5, _proto_args(tmp_path, "--sadcl-build-prototypes", "--sadcl-prototype-threshold",
                                             "0.0"))
    m.eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    with torch.no_grad():
        h = m.label_features(x)
    before = m.prototypes.clone()
    m.start_epoch(1, [(x, y)], "cpu")
    assert torch.equal(m.prototypes, before)
    m.start_epoch(0, [(x, y)], "cpu")
    torch.testing.assert_close(m.prototypes[0], h[:2, 0].mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.prototypes[1], h[[1, 3], 1].mean(0), rtol=1e-5, atol=1e-5)
    assert torch.equal(m.prototypes[2:], before[2:])  # classes without a positive keep theirs
    assert torch.equal(m.memory[:, :2], m.prototypes[:2].expand(8, -1, -1))
    assert m.training is False  # build_prototypes restores the mode
    out = build_prototypes(m, [(x, y)], score_thr=1.0)  # nothing exceeds 1: nothing changes
    torch.testing.assert_close(out, m.prototypes)


def test_tiny_run_starts_from_the_files(tmp_path, monkeypatch):
    # the engine builds the model from the files, then --sadcl-build-prototypes runs once, before epoch 0
    import mlcontrast.train.engine as engine
    import mlcontrast.train.methods.sadcl as sadcl

    ckpt = _q2l_checkpoint(_sadcl(num_classes=10, seed=8), tmp_path / "q2l.pth")
    calls = []
    real = sadcl.build_prototypes
    monkeypatch.setattr(sadcl, "build_prototypes", lambda m, loader, thr, device: calls.append(
        (len(loader.dataset), thr, m.fc.weight.detach().clone())) or real(m, loader, thr, device))
    args = tiny_args(tmp_path / "run", "--method", "sadcl", "--epochs", "2", "--backend", "torch",
                     "--sadcl-init", str(ckpt), "--sadcl-build-prototypes", "--sadcl-prototype-threshold", "0.5")
    res = engine.run(args)
    assert len(res["history"]) == 2 and np.isfinite(res["step_losses"]).all()
    assert len(calls) == 1 and calls[0][:2] == (16, 0.5)
    torch.testing.assert_close(calls[0][2], _sadcl(num_classes=10, seed=8).fc.weight)  # built on the loaded model
    # this package's own checkpoint (our names under "model") loads too, projector and prototypes included
    fresh = _sadcl(num_classes=10, seed=9)
    loaded = load_sadcl_state(fresh, tmp_path / "run" / "checkpoint.pt")
    assert {"proj.net.0.weight", "prototype_bank.prototypes", "memory"} <= set(loaded)
    for name, value in res["model"].state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- HST word vectors


@pytest.mark.parametrize("flag", ["--hst-word-vectors", "--hst-class-embeddings"])
def test_hst_word_vectors_file(tmp_path, flag):
    glove = np.random.RandomState(1).randn(5, 300).astype(np.float32)  # released: float [C, 300] .npy
    np.save(tmp_path / "vectors.npy", glove)
    args = resolve_args(tiny_args(tmp_path, "--method", "hst", flag, str(tmp_path / "vectors.npy")))
    m = build_method("hst", 5, args)
    torch.testing.assert_close(m.sd.embeddings, torch.from_numpy(glove))
    assert m.sd.fc2.in_features == 300 and not m.sd.embeddings.requires_grad  # frozen, as released


def test_hst_word_vectors_errors(tmp_path):
    args = resolve_args(tiny_args(tmp_path, "--method", "hst", "--hst-word-vectors", str(tmp_path / "none.npy")))
    with pytest.raises(FileNotFoundError, match="--hst-word-vectors: file not found"):
        build_method("hst", 5, args)
    np.save(tmp_path / "coco.npy", np.zeros((80, 300), np.float32))
    args.hst_class_embeddings = str(tmp_path / "coco.npy")
    with pytest.raises(ValueError, match=r"class embeddings in .*coco.npy have shape \(80, 300\), expected \[C=5, E\]"):
        build_method("hst", 5, args)
    np.save(tmp_path / "obj.npy", np.array([{"cat": 1}], dtype=object), allow_pickle=True)
    args.hst_class_embeddings = str(tmp_path / "obj.npy")
    with pytest.raises(ValueError, match="not a numeric .npy"):
        build_method("hst", 5, args)


# ---------------------------------------------------------------- the paper recipe names the files


@pytest.mark.parametrize("method, dataset, keys", [
    ("sadcl", "coco2014", {"weights", "sadcl_init", "sadcl_prototypes"}),
    ("sadcl", "voc2007", {"weights", "sadcl_init", "sadcl_prototypes"}),
    ("hst", "coco2014", {"weights", "hst_class_embeddings"}),
    ("trmml", "coco2014", {"trmml_clip_checkpoint"}),
])
def test_print_config_names_the_released_files(capsys, method, dataset, keys):
    assert main(["--print-config", "--recipe", "paper", "--method", method, "--dataset", dataset]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert set(cfg["released_files"]) == keys
    assert all(cfg.get(k) is None for k in keys)  # the recipe cannot know the user's paths
    if method == "sadcl":
        px = "448" if dataset != "vg" else "576"
        name = {"coco2014": "coco", "voc2007": "voc"}[dataset]
        assert f"resnet101_{px}_{name}_085.npy" in cfg["released_files"]["sadcl_prototypes"]
        assert ("VOC ← COCO" in cfg["released_files"]["sadcl_init"]) == (dataset == "voc2007")
    if method == "hst":
        assert "data/coco/vectors.npy" in cfg["released_files"]["hst_class_embeddings"]


def test_digits_recipe_expects_no_files():
    from mlcontrast.train.config import build_parser

    assert "released_files" not in resolved_config(build_parser().parse_args([]))
