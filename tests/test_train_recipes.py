"""Recipes (``--recipe``), ``--print-config`` and the engine options the recipes need: optimizer and
schedule choice, partial freezing with frozen BatchNorm, model EMA (and resume), early stopping, mixed
precision, gradient accumulation, feature pooling, augmentation pipelines, SSCL scope."""

import json

import numpy as np
import pytest
import torch
from train_helpers import TINY, one_thread, tiny_args  # noqa: F401  (one_thread: autouse)

import mlcontrast.train.engine as engine
from mlcontrast.train.cli import main
from mlcontrast.train.config import build_method, build_parser, resolved_config
from mlcontrast.train.engine import run
from mlcontrast.train.metrics import summarize
from mlcontrast.train.optim import ModelEMA, build_optimizer, configure_backbones, should_stop
from mlcontrast.train.recipes import PAPER

# The released numbers, read from the released files (see mlcontrast/train/recipes.py for file and line).
SADCL_COCO_RELEASED = {
    "optimizer": "adamw", "lr": 5e-5, "weight_decay": 5e-3, "scheduler": "onecycle", "pct_start": 0.2,
    "step_size": None, "epochs": 80, "batch_size": 32, "image_size": 448, "augment": "multiscale_crop",
    "backbone": "resnet101", "feature_index": -1, "feature_pool": 1, "train_layers": "layer2,layer3,layer4",
    "bn_mode": "frozen", "model_ema": 0.9998, "model_ema_start": 0, "early_stop": 8, "early_stop_rule": "sadcl",
    "stop_on_nan": True, "warmup_epochs": 0, "warmup_lr": None, "amp": "fp16", "accumulate": 1,
    "hidden_dim": 2048, "proj_dim": 1024, "sscl_scope": "local", "sscl_weight": 100.0, "pscl_weight": 50.0,
    "sscl_temperature": 0.2, "pscl_temperature": 0.07, "memory_threshold": 0.8, "cls_weight": 1000.0,
    "legacy_sadcl_mask": True, "legacy_learned_prototypes": True,
}
HST_COCO_RELEASED = {
    "optimizer": "adam", "lr": 1e-5, "weight_decay": 5e-4, "scheduler": "step", "step_size": 10,
    "step_gamma": 0.1, "pct_start": None, "epochs": 20, "batch_size": 32, "image_size": 448,
    "augment": "choice_crop", "backbone": "resnet101", "feature_pool": 2, "train_layers": "layer4",
    "bn_mode": "train", "model_ema": None, "early_stop": None, "stop_on_nan": False, "warmup_epochs": 0,
    "amp": None, "hidden_dim": 1024,
    "hst_sd_dim": 512, "hst_pair_dim": 1024, "hst_embed_dim": 300, "hst_ggnn_steps": 3,
    "hst_generate_label_epoch": 5, "hst_prototypes": 10, "hst_theta_init": 1.0, "hst_theta_decay": 5e-4,
    "hst_cooc_weight": 10.0, "hst_intra_bce_weight": 0.1, "hst_inter_bce_weight": 0.1,
    "hst_instance_weight": 0.05, "hst_prototype_weight": 0.05, "partial_seed": 0, "legacy_hst_sign": True,
    "legacy_hst_neg_neg_push": True, "legacy_hst_cooc_unknown_negative": True,
}
# TRM-ML released no code: the guesses from the author's DualCoOp (yu-gi-oh-leilei/DualCoop@018e7c5,
# config/dualcoop/coco2014_SGD.yaml; VOC's ema_epoch is 2 in voc2007_SGD.yaml)
TRMML_COCO_GUESSED = {
    "optimizer": "sgd", "lr": 2e-3, "weight_decay": 5e-4, "scheduler": "cosine", "warmup_epochs": 1,
    "warmup_lr": 1e-5, "epochs": 50, "batch_size": 32, "image_size": 448, "augment": "autoaugment_crop",
    "trmml_clip_model": "RN101", "model_ema": 0.9998, "model_ema_start": 0, "early_stop": 8,
    "early_stop_rule": "sadcl", "stop_on_nan": True, "amp": None, "accumulate": 1,
}
DIGITS = {
    "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "scheduler": "onecycle", "pct_start": 0.2,
    "epochs": 15, "batch_size": 64, "image_size": 224, "augment": "flip", "backbone": "resnet10t",
    "feature_index": 2, "train_layers": "all", "bn_mode": "train", "model_ema": None, "early_stop": None,
    "amp": None, "accumulate": 1, "hidden_dim": 128, "proj_dim": 64, "sscl_scope": "global",
    "legacy_sadcl_mask": False, "warmup_epochs": 0, "warmup_lr": None, "model_ema_start": None,
    "early_stop_rule": None, "stop_on_nan": False,
}
REQUIRED = ("method", "dataset", "recipe", "optimizer", "lr", "weight_decay", "scheduler", "epochs", "batch_size",
            "image_size", "backbone", "model_ema")


def _config(*argv):
    return resolved_config(build_parser().parse_args(list(argv)))


def _check(cfg, table):
    for key, value in table.items():
        assert cfg[key] == (pytest.approx(value) if isinstance(value, float) else value), key


# ---------------------------------------------------------------- recipes and --print-config


@pytest.mark.parametrize("dataset", ["coco2014", "voc2007", "nuswide"])
def test_paper_recipe_sadcl(dataset):
    _check(_config("--recipe", "paper", "--method", "sadcl", "--dataset", dataset), SADCL_COCO_RELEASED)


def test_paper_recipe_sadcl_vg_is_576px():
    cfg = _config("--recipe", "paper", "--method", "sadcl", "--dataset", "vg")
    _check(cfg, {**SADCL_COCO_RELEASED, "image_size": 576})


@pytest.mark.parametrize("dataset", ["coco2014", "voc2007", "vg200"])
def test_paper_recipe_hst(dataset):
    _check(_config("--recipe", "paper", "--method", "hst", "--dataset", dataset), HST_COCO_RELEASED)


def test_paper_recipe_hst_vg_points_to_vg200(capsys):
    # HST's release trains on VG-200 (HCP-MLR-PL utils/dataloader.py:55-58): the VG-500 name has no HST table
    assert main(["--recipe", "paper", "--method", "hst", "--dataset", "vg", "--print-config"]) == 2
    assert "--dataset vg200" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["coco2014", "nuswide", "vg", "vg200", "cub"])
def test_paper_recipe_trmml_is_the_dualcoop_guess(dataset):
    _check(_config("--recipe", "paper", "--method", "trmml", "--dataset", dataset), TRMML_COCO_GUESSED)


def test_paper_recipe_trmml_voc_starts_the_ema_at_epoch_2():
    cfg = _config("--recipe", "paper", "--method", "trmml", "--dataset", "voc2007")
    _check(cfg, {**TRMML_COCO_GUESSED, "model_ema_start": 2})


def test_digits_recipe_is_the_unchanged_default():
    assert _config() == _config("--recipe", "digits")
    _check(_config(), {**DIGITS, "recipe": "digits", "method": "sadcl", "dataset": "digits"})


@pytest.mark.parametrize("key", sorted(PAPER))
def test_every_paper_table_names_real_options(key):
    dests = set(vars(build_parser().parse_args([])))
    assert set(PAPER[key]) <= dests
    cfg = _config("--recipe", "paper", "--method", key[0], "--dataset", key[1])
    assert cfg["recipe"] == "paper" and set(REQUIRED) <= set(cfg)


def test_paper_recipe_without_a_table_is_an_error(capsys):
    assert main(["--recipe", "paper", "--method", "bce", "--dataset", "coco2014", "--print-config"]) == 2
    assert "no settings" in capsys.readouterr().err


def test_explicit_flags_win_over_the_recipe():
    cfg = _config("--recipe", "paper", "--method", "sadcl", "--dataset", "coco2014", "--lr", "1e-4",
                  "--amp", "none", "--model-ema", "none", "--no-legacy-sadcl-mask", "--sscl-scope", "global",
                  "--epochs", "15", "--train-layers", "all")
    # --epochs 15 is the parser's default: it wins because it was given, not because it differs
    assert (cfg["lr"], cfg["amp"], cfg["model_ema"], cfg["legacy_sadcl_mask"], cfg["sscl_scope"], cfg["epochs"],
            cfg["train_layers"]) == (1e-4, None, None, False, "global", 15, "all")
    assert (cfg["weight_decay"], cfg["bn_mode"], cfg["early_stop"]) == (5e-3, "frozen", 8)  # the rest stays


def test_print_config_cli_loads_nothing(capsys, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("--print-config must not load data or build the model")

    monkeypatch.setattr(engine, "build_datasets", boom)
    monkeypatch.setattr(engine, "build_method", boom)
    argv = ["--print-config", "--recipe", "paper", "--method", "hst", "--dataset", "coco2014", "--batch-size", "8"]
    assert main(argv) == 0  # no --data-root needed either
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    cfg = json.loads(lines[0])
    assert set(REQUIRED) <= set(cfg)
    assert (cfg["optimizer"], cfg["scheduler"], cfg["batch_size"], cfg["model_ema"]) == ("adam", "step", 8, None)
    assert "hst_generate_label_epoch" in cfg and "sscl_scope" not in cfg  # the method's own options only


# ---------------------------------------------------------------- optimizer and schedule


def test_optimizer_and_scheduler_choices():
    model = build_method("bce", 3, backbone="test_resnet", feature_index=2)
    for name, cls in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)):
        args = build_parser().parse_args(["--optimizer", name, "--scheduler", "step", "--weight-decay", "0.01"])
        opt, sched, per_epoch = build_optimizer(model, args, steps_per_epoch=3)
        assert type(opt) is cls and opt.param_groups[0]["weight_decay"] == 0.01
        assert isinstance(sched, torch.optim.lr_scheduler.StepLR) and per_epoch
    args = build_parser().parse_args(["--scheduler", "cosine"])
    _, sched, per_epoch = build_optimizer(model, args, steps_per_epoch=3)
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) and not per_epoch


def test_step_scheduler_steps_per_epoch_in_a_run(tmp_path):
    res = run(tiny_args(tmp_path, "--method", "bce", "--epochs", "2", "--optimizer", "adam", "--scheduler", "step",
                        "--step-size", "1", "--step-gamma", "0.5"))
    assert [r["lr"] for r in res["history"]] == pytest.approx([5e-4, 2.5e-4])


# ---------------------------------------------------------------- partial freezing and BatchNorm


def _bn_stats(module):
    return {n: b.clone() for n, b in module.named_buffers() if "running" in n}


def _one_step(model, args):
    opt, _, _ = build_optimizer(model, args, steps_per_epoch=1)
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 3))
    loss, _ = model.training_loss(x, y)
    loss.backward()
    opt.step()


@pytest.mark.parametrize("bn_mode", ["train", "frozen"])
def test_partial_freezing(bn_mode):
    torch.manual_seed(0)
    model = build_method("bce", 3, backbone="test_resnet", feature_index=2)
    args = build_parser().parse_args(["--train-layers", "layer2", "--bn-mode", bn_mode, "--weight-decay", "0.1"])
    configure_backbones(model, args)
    body = model.backbone.body
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen_stats, trained_stats = _bn_stats(body.layer1), _bn_stats(body.layer2)
    stem_stats = _bn_stats(body.bn1)
    bn_params = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)
                 for pn, _ in m.named_parameters(recurse=False)}
    _one_step(model, args)
    for n, p in model.named_parameters():
        frozen = n.startswith("backbone.body.") and not n.startswith("backbone.body.layer2.")
        if bn_mode == "frozen" and n.startswith("backbone.body.layer2.") and n in bn_params:
            frozen = True  # FrozenBatchNorm: affine parameters do not train either
        assert p.requires_grad == (not frozen), n
        if frozen:
            assert torch.equal(p, before[n]), n
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    moved_params = {n for n in trained if not torch.equal(dict(model.named_parameters())[n], before[n])}
    assert any(n.startswith("backbone.body.layer2.") for n in moved_params)
    assert any(not n.startswith("backbone.") for n in moved_params)  # the heads train
    for name, stats in (("layer1", frozen_stats), ("bn1", stem_stats)):
        after = _bn_stats(getattr(body, name))
        assert all(torch.equal(after[k], v) for k, v in stats.items()), name
    moved = any(not torch.equal(_bn_stats(body.layer2)[k], v) for k, v in trained_stats.items())
    assert moved == (bn_mode == "train")
    model.train()  # model.train() must not wake the frozen BatchNorms
    assert not body.layer1[0].bn1.training and body.layer2[0].bn1.training == (bn_mode == "train")


def test_train_layers_rejects_unknown_stage():
    model = build_method("bce", 3, backbone="test_resnet", feature_index=2)
    with pytest.raises(ValueError, match="layer9"):
        configure_backbones(model, build_parser().parse_args(["--train-layers", "layer9"]))


def test_feature_pool_halves_the_map():
    model = build_method("bce", 3, backbone="test_resnet", feature_index=2)
    x = torch.randn(2, 3, 64, 64)
    h = model.backbone(x).shape[-1]
    configure_backbones(model, build_parser().parse_args(["--feature-pool", "2"]))
    assert model.backbone(x).shape[-1] == h // 2


# ---------------------------------------------------------------- EMA, resume, early stopping, summary


def test_model_ema_update_rule():
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(lin, 0.9)
    e0 = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        lin[0].weight.add_(1.0)
    lin(torch.randn(5, 3))  # moves the BatchNorm statistics and its int counter
    ema.update(lin)
    s = lin.state_dict()
    for k, v in ema.module.state_dict().items():
        expect = 0.9 * e0[k] + 0.1 * s[k] if v.is_floating_point() else s[k]
        torch.testing.assert_close(v, expect)


def test_ema_resume_matches_uninterrupted_run(tmp_path):
    extra = ["--method", "sadcl", "--epochs", "2", "--backend", "cpu", "--model-ema", "0.9"]
    full = run(tiny_args(tmp_path / "full", *extra))
    run(tiny_args(tmp_path / "part", *extra), stop_after_epoch=1)
    resumed = run(tiny_args(tmp_path / "part", *extra, "--resume", str(tmp_path / "part")))
    np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-5)
    assert resumed["history"][-1]["ema"]["mAP"] == pytest.approx(full["history"][-1]["ema"]["mAP"], abs=1e-6)
    for a, b in ((full["model"], resumed["model"]), (full["ema"].module, resumed["ema"].module)):
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(full["summary"]))
    assert summary["last"]["epoch"] == 2 and summary["best"]["model"] in ("raw", "ema")


def test_summary_best_and_last_pick_raw_or_ema():
    hist = [{"epoch": 1, "mAP": 50.0, "CF1": 1.0, "ema": {"mAP": 60.0, "CF1": 2.0}},
            {"epoch": 2, "mAP": 55.0, "CF1": 3.0, "ema": {"mAP": 40.0, "CF1": 4.0}}]
    s = summarize(hist)
    assert (s["best"]["epoch"], s["best"]["model"], s["best"]["mAP"], s["best"]["CF1"]) == (1, "ema", 60.0, 2.0)
    assert (s["last"]["epoch"], s["last"]["model"], s["last"]["mAP"]) == (2, "raw", 55.0)


def test_should_stop_counts_epochs_since_the_best():
    hist = [{"mAP": m} for m in (10.0, 30.0, 20.0, 25.0)]
    assert not should_stop(hist, 2) and should_stop(hist, 1) and not should_stop(hist, None)
    assert not should_stop(hist[:3] + [{"mAP": 0.0, "ema": {"mAP": 31.0}}], 1)  # the EMA's best counts


def test_early_stop_in_a_run(tmp_path, monkeypatch):
    scores = iter([40.0, 30.0, 20.0, 10.0, 5.0])
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda s, t: {**real(s, t), "mAP": next(scores)})
    res = run(tiny_args(tmp_path, "--method", "bce", "--epochs", "5", "--early-stop", "1"))
    assert [r["epoch"] for r in res["history"]] == [1, 2, 3]  # epoch 3 is 2 > 1 epochs after the best
    assert res["summary"]["best"]["epoch"] == 1 and res["summary"]["last"]["epoch"] == 3


# ---------------------------------------------------------------- mixed precision and accumulation


@pytest.mark.parametrize("method, amp", [("bce", "bf16"), ("sadcl", "bf16"), ("bce", "fp16")])
def test_amp_on_cpu(tmp_path, method, amp):
    res = run(tiny_args(tmp_path, "--method", method, "--epochs", "1", "--amp", amp, "--backend", "torch"))
    assert np.isfinite(res["step_losses"]).all() and np.isfinite(res["history"][-1]["mAP"])
    ckpt = torch.load(tmp_path / engine.CHECKPOINT_NAME, weights_only=False)
    assert (ckpt["scaler"] is not None) == (amp == "fp16")  # fp16's loss scale resumes with the run


def test_accumulation_equals_one_big_batch(tmp_path):
    # BatchNorm in eval mode (frozen) and the BCE mean over fully known labels: two micro-batches of 4 give
    # the gradient of one batch of 8, and the shuffled order does not depend on the batch size. SGD, not
    # Adam: Adam's update barely changes if the gradient is off by a constant factor.
    common = ["--method", "bce", "--epochs", "1", "--bn-mode", "frozen", "--limit-train", "16", "--optimizer", "sgd"]
    big = run(tiny_args(tmp_path / "big", *common, "--batch-size", "8"))
    acc = run(tiny_args(tmp_path / "acc", *common, "--batch-size", "4", "--accumulate", "2"))
    assert len(acc["step_losses"]) == 4 and len(big["step_losses"]) == 2
    np.testing.assert_allclose(np.add.reduceat(acc["step_losses"], [0, 2]) / 2, big["step_losses"], rtol=1e-5)
    sa, sb = big["model"].state_dict(), acc["model"].state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- SSCL scope and augmentations


@pytest.mark.parametrize("scope, expect_group", [("global", True), ("local", False)])
def test_sscl_scope(monkeypatch, scope, expect_group):
    import mlcontrast.train.methods.sadcl as sadcl

    seen = {}
    real = sadcl.multilabel_supcon_loss

    def spy(*a, process_group=None, **k):
        seen["group"] = process_group
        return real(*a, **k)

    monkeypatch.setattr(sadcl, "multilabel_supcon_loss", spy)
    model = build_method("sadcl", 3, backbone="test_resnet", feature_index=2, hidden_dim=16, proj_dim=8,
                         batch_size=4, sscl_scope=scope, backend="torch")
    marker = object()
    model.process_group = marker
    model.training_loss(torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4, 3)))
    assert (seen["group"] is marker) == expect_group


@pytest.mark.parametrize("augment", ["flip", "multiscale_crop", "choice_crop", "autoaugment_crop"])
def test_augment_pipelines(augment):
    from PIL import Image

    from mlcontrast.train.data.transforms import build_transform

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    for train in (True, False):
        assert build_transform(48, train, augment)(img).shape == (3, 48, 48)


# ---------------------------------------------------------------- the paper recipes run (scaled down)


@pytest.mark.parametrize("method", ["sadcl", "hst"])
def test_paper_recipe_runs_scaled_down(tmp_path, monkeypatch, method):
    # the released settings on the digits data, with the tiny model's options given explicitly (they win)
    import mlcontrast.train.recipes as recipes

    monkeypatch.setitem(recipes.PAPER, (method, "digits"), recipes.PAPER[(method, "coco2014")])
    args = tiny_args(tmp_path, "--recipe", "paper", "--method", method, "--epochs", "2", "--train-layers", "layer2",
                     "--known-ratio", "0.5", "--backend", "torch")
    res = run(args)
    assert np.isfinite(res["step_losses"]).all() and len(res["history"]) == 2
    saved = json.loads((tmp_path / "args.json").read_text())
    expect = {"sadcl": {"optimizer": "adamw", "amp": "fp16", "model_ema": 0.9998, "bn_mode": "frozen"},
              "hst": {"optimizer": "adam", "scheduler": "step", "feature_pool": 2, "hst_sd_dim": 512}}[method]
    assert {k: saved[k] for k in expect} == expect and saved["hidden_dim"] == 32
    assert ("ema" in res["history"][-1]) == (method == "sadcl")
