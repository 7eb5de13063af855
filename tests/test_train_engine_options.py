"""Engine options the released recipes need beyond tests/test_train_recipes.py: the constant learning-rate
warm-up (``--warmup-epochs``, ``--warmup-lr``), the model EMA's start epoch (``--model-ema-start``), SADCL's
early-stop rule (``--early-stop-rule sadcl``), stopping on a NaN loss (``--stop-on-nan``), DualCoOp's
augmentation (``--augment autoaugment_crop``) and its Cutout."""

import random

import numpy as np
import pytest
import torch
from train_helpers import one_thread, tiny_args  # noqa: F401  (one_thread: autouse)

import mlcontrast.train.engine as engine
from mlcontrast.train.config import build_method, build_parser, resolved_config
from mlcontrast.train.engine import run
from mlcontrast.train.optim import ConstantWarmup, ModelEMA, build_optimizer, should_stop

# ---------------------------------------------------------------- constant warm-up


def _lrs(scheduler, n):
    """The learning rate of each of ``n`` optimizer steps under ``scheduler``."""
    out = []
    for _ in range(n):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def _built(*argv, steps_per_epoch=3):
    model = build_method("bce", 3, backbone="test_resnet", feature_index=2)
    return build_optimizer(model, build_parser().parse_args(list(argv)), steps_per_epoch)


@pytest.mark.parametrize("sched", ["cosine", "onecycle"])
def test_warmup_is_constant_then_the_schedule_at_its_position(sched):
    # per-iteration schedules: 2 warm-up epochs of 3 steps at 1e-5, then the plain schedule's own rates
    common = ["--scheduler", sched, "--epochs", "5", "--lr", "0.1"]
    _, plain, _ = _built(*common)
    _, warm, per_epoch = _built(*common, "--warmup-epochs", "2", "--warmup-lr", "1e-5")
    assert isinstance(warm, ConstantWarmup) and not per_epoch
    expect, got = _lrs(plain, 15), _lrs(warm, 15)
    assert got[:6] == pytest.approx([1e-5] * 6)
    assert got[6:] == pytest.approx(expect[6:])
    assert warm.get_last_lr() == pytest.approx(plain.get_last_lr())


def test_warmup_of_a_per_epoch_schedule_counts_epochs():
    common = ["--scheduler", "step", "--step-size", "2", "--step-gamma", "0.5", "--lr", "0.1"]
    _, plain, _ = _built(*common)
    _, warm, per_epoch = _built(*common, "--warmup-epochs", "1", "--warmup-lr", "1e-4")
    assert per_epoch
    assert _lrs(warm, 5) == pytest.approx([1e-4] + _lrs(plain, 5)[1:])  # StepLR's own halving at epoch 2, 4


def test_no_warmup_leaves_the_schedule_unwrapped():
    _, sched, _ = _built("--scheduler", "cosine")
    assert isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR)


def test_warmup_state_dict_resumes_exactly():
    argv = ["--scheduler", "cosine", "--epochs", "4", "--lr", "0.1", "--warmup-epochs", "1", "--warmup-lr", "1e-4"]
    _, full, _ = _built(*argv)
    expect = _lrs(full, 12)
    opt, first, _ = _built(*argv)
    head = _lrs(first, 2)  # interrupted inside the warm-up, and again after it
    opt2, second, _ = _built(*argv)
    opt2.load_state_dict(opt.state_dict())
    second.load_state_dict(first.state_dict())
    middle = _lrs(second, 4)
    opt3, third, _ = _built(*argv)
    opt3.load_state_dict(opt2.state_dict())
    third.load_state_dict(second.state_dict())
    assert head + middle + _lrs(third, 6) == pytest.approx(expect)


def test_warmup_options_in_the_configuration():
    cfg = resolved_config(build_parser().parse_args([]))
    assert (cfg["warmup_epochs"], cfg["warmup_lr"]) == (0, None)  # off: its rate means nothing
    cfg = resolved_config(build_parser().parse_args(["--warmup-epochs", "2", "--warmup-lr", "3e-5"]))
    assert (cfg["warmup_epochs"], cfg["warmup_lr"]) == (2, 3e-5)
    for bad in (["--warmup-epochs", "-1"], ["--warmup-lr", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_warmup_resume_matches_uninterrupted_run(tmp_path):
    extra = ["--method", "bce", "--epochs", "3", "--scheduler", "cosine", "--warmup-epochs", "1", "--warmup-lr",
             "1e-4"]
    full = run(tiny_args(tmp_path / "full", *extra))
    run(tiny_args(tmp_path / "part", *extra), stop_after_epoch=1)
    resumed = run(tiny_args(tmp_path / "part", *extra, "--resume", str(tmp_path / "part")))
    np.testing.assert_allclose(resumed["step_losses"], full["step_losses"], rtol=1e-5)
    assert [r["lr"] for r in resumed["history"]] == pytest.approx([r["lr"] for r in full["history"]])
    assert full["history"][0]["lr"] > 1e-4  # the cosine took over at the end of the warm-up epoch


# ---------------------------------------------------------------- model EMA start


def test_model_ema_reset_copies_the_model():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(lin, 0.9)
    with torch.no_grad():
        lin[0].weight.add_(1.0)
    lin(torch.randn(5, 3))
    ema.reset(lin)
    for k, v in lin.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[k], v)


def test_model_ema_start_in_a_run(tmp_path, monkeypatch):
    calls = []
    for name in ("reset", "update"):
        real = getattr(ModelEMA, name)
        monkeypatch.setattr(ModelEMA, name, lambda self, m, _n=name, _r=real: (calls.append(_n), _r(self, m))[1])
    res = run(tiny_args(tmp_path, "--method", "bce", "--epochs", "3", "--model-ema", "0.9",
                        "--model-ema-start", "1"))
    assert calls == ["reset", "update", "update", "update", "update"]  # 2 steps in each of epochs 2 and 3
    assert ["ema" in r for r in res["history"]] == [False, True, True]  # evaluated from its start on


def test_model_ema_start_resume_matches_uninterrupted_run(tmp_path):
    extra = ["--method", "bce", "--epochs", "3", "--model-ema", "0.9", "--model-ema-start", "1"]
    full = run(tiny_args(tmp_path / "full", *extra))
    run(tiny_args(tmp_path / "part", *extra), stop_after_epoch=1)  # interrupted before the EMA starts
    resumed = run(tiny_args(tmp_path / "part", *extra, "--resume", str(tmp_path / "part")))
    sa, sb = full["ema"].module.state_dict(), resumed["ema"].module.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    assert resumed["history"][-1]["ema"]["mAP"] == pytest.approx(full["history"][-1]["ema"]["mAP"], abs=1e-6)


# ---------------------------------------------------------------- SADCL's early-stop rule


def _hist(raw, ema=None):
    return [{"mAP": r, **({"ema": {"mAP": e}} if ema is not None else {})}
            for r, e in zip(raw, ema if ema is not None else raw)]


def test_sadcl_rule_waits_for_the_raw_models_best_epoch():
    # the better-of-both best is epoch 0 (EMA 60) but the raw model peaks at epoch 2
    hist = _hist([40.0, 30.0, 45.0, 20.0], [60.0, 50.0, 40.0, 30.0])
    assert should_stop(hist, 1, "best")
    assert not should_stop(hist, 1, "sadcl")  # 3 - max(0, 2) = 1, not > 1
    assert should_stop(hist + _hist([10.0], [20.0]), 1, "sadcl")


def test_sadcl_rule_needs_the_last_ema_below_its_best():
    flat = _hist([50.0, 40.0, 40.0, 40.0], [30.0, 30.0, 30.0, 30.0])
    assert should_stop(flat, 1, "best") and not should_stop(flat, 1, "sadcl")  # the EMA sits at its best
    assert should_stop(_hist([50.0, 40.0, 40.0, 40.0], [30.0, 31.0, 30.0, 29.0]), 1, "sadcl")
    assert not should_stop(_hist([50.0, 40.0, 40.0, 40.0], [30.0, 31.0, 30.0, float("nan")]), 1, "sadcl")


def test_sadcl_rule_without_an_ema_and_before_it_starts():
    hist = _hist([50.0, 40.0, 40.0, 40.0])
    assert should_stop(hist, 1, "sadcl")  # no EMA at all: the EMA clause is skipped
    assert not should_stop(hist, 1, "sadcl", ema_expected=True)  # an EMA that has not started yet
    assert not should_stop(_hist([0.0] * 5), 1, "sadcl")  # no epoch above 0: the release's best epoch is -1
    assert not should_stop(hist, None, "sadcl")
    with pytest.raises(ValueError, match="early-stop rule"):
        should_stop(hist, 1, "never")


@pytest.mark.parametrize("rule, epochs", [("best", 3), ("sadcl", 5)])
def test_early_stop_rule_in_a_run(tmp_path, monkeypatch, rule, epochs):
    # evaluate runs for the raw model, then the EMA, each epoch
    scores = iter([40.0, 60.0, 30.0, 50.0, 45.0, 40.0, 20.0, 40.0, 10.0, 30.0, 5.0, 20.0])
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda s, t: {**real(s, t), "mAP": next(scores)})
    res = run(tiny_args(tmp_path, "--method", "bce", "--epochs", "6", "--model-ema", "0.9", "--early-stop", "1",
                        "--early-stop-rule", rule))
    assert len(res["history"]) == epochs


# ---------------------------------------------------------------- stop on a NaN loss


@pytest.mark.parametrize("stop", [True, False])
def test_stop_on_nan(tmp_path, monkeypatch, capsys, stop):
    from mlcontrast.train.methods.bce import BCEBaseline

    real = BCEBaseline.training_loss

    def nan_valued(self, *a, **k):  # the value is NaN, the gradient the real loss's (the weights stay finite)
        loss, parts = real(self, *a, **k)
        return loss - loss.detach() + float("nan"), parts

    monkeypatch.setattr(BCEBaseline, "training_loss", nan_valued)
    flag = "--stop-on-nan" if stop else "--no-stop-on-nan"
    res = run(tiny_args(tmp_path, "--method", "bce", "--epochs", "3", flag))
    assert len(res["history"]) == (1 if stop else 3)
    assert np.isnan(res["history"][0]["loss"]) and np.isfinite(res["history"][0]["mAP"])
    assert ("training loss is NaN" in capsys.readouterr().err) == stop


# ---------------------------------------------------------------- DualCoOp's augmentation


def test_cutout_paints_one_rectangle_of_one_colour():
    from PIL import Image

    from mlcontrast.train.data.transforms import Cutout

    img = Image.new("RGB", (100, 50), (0, 0, 0))
    random.seed(3)
    out = np.asarray(Cutout(0.4)(img))
    assert np.asarray(img).max() == 0  # the input is left alone
    painted = np.argwhere(out.any(axis=2))
    (y0, x0), (y1, x1) = painted.min(0), painted.max(0)
    assert len(painted) == (y1 - y0 + 1) * (x1 - x0 + 1)  # a filled rectangle
    assert x1 - x0 + 1 <= 41 and y1 - y0 + 1 <= 21  # 0.4 of each side (+1: PIL's inclusive corners)
    assert len({tuple(out[y, x]) for y, x in painted}) == 1
    random.seed(3)
    assert np.array_equal(np.asarray(Cutout(0.4)(img)), out)


def test_autoaugment_crop_pipeline():
    from PIL import Image
    from torchvision import transforms as T

    from mlcontrast.train.data.transforms import build_transform

    train = build_transform(64, True, "autoaugment_crop")
    crop, policies, flip = train.transforms[:3]
    assert isinstance(crop, T.RandomChoice) and isinstance(flip, T.RandomHorizontalFlip)
    rrc = crop.transforms[0]
    assert isinstance(rrc, T.RandomResizedCrop) and rrc.scale == (0.5, 1.0)
    assert {p.policy for p in policies.transforms} == {T.AutoAugmentPolicy.IMAGENET, T.AutoAugmentPolicy.CIFAR10}
    test = build_transform(64, False, "autoaugment_crop")
    assert test.transforms[0].interpolation == T.InterpolationMode.BICUBIC
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8))
    torch.manual_seed(0)
    random.seed(0)
    a = train(img)
    torch.manual_seed(0)
    random.seed(0)
    assert a.shape == (3, 64, 64) and torch.equal(a, train(img))  # seeded: deterministic


# ---------------------------------------------------------------- TRM-ML's paper recipe runs (scaled down)


def test_trmml_paper_recipe_runs_scaled_down(tmp_path, monkeypatch):
    # the DualCoOp guesses for VOC (warm-up, EMA from epoch 2, the SADCL stop rule) on the digits data
    import json

    import mlcontrast.train.recipes as recipes

    monkeypatch.setitem(recipes.PAPER, ("trmml", "digits"), recipes.PAPER[("trmml", "voc2007")])
    res = run(tiny_args(tmp_path, "--recipe", "paper", "--method", "trmml", "--epochs", "3", "--known-ratio", "0.5",
                        "--backend", "torch"))
    assert np.isfinite(res["step_losses"]).all() and len(res["history"]) == 3
    saved = json.loads((tmp_path / "args.json").read_text())
    expect = {"optimizer": "sgd", "scheduler": "cosine", "warmup_epochs": 1, "warmup_lr": 1e-5, "model_ema": 0.9998,
              "model_ema_start": 2, "early_stop": 8, "early_stop_rule": "sadcl", "stop_on_nan": True}
    assert {k: saved[k] for k in expect} == expect
    assert ["ema" in r for r in res["history"]] == [False, False, True]
    assert res["history"][0]["lr"] > 1e-5  # the cosine (at --lr 1e-3) took over after the warm-up epoch
