import json

import numpy as np
import pytest
import torch
from PIL import Image

from mlcontrast.train.data import (
    build_datasets,
    coco2014,
    cub200,
    digits,
    nuswide,
    simulate_partial_labels,
    visual_genome,
    visual_genome_200,
    voc2007,
)
from mlcontrast.train.data.base import default_transform

TF = default_transform(16)


def _img(path, color=(255, 0, 0), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 12), color).save(path, format=fmt)


# ---------------------------------------------------------------- partial labels


def test_partial_labels_bit_parity_with_numpy_global_seed():
    full01 = (np.random.RandomState(7).rand(10, 5) < 0.4).astype(np.int64)
    for p in (0.1, 0.5, 0.9):
        # the literal HST recipe, HST encoding (+1 / -1, 0 unknown)
        np.random.seed(0)
        mask = np.random.random((10, 5)) < p
        hst = mask * (2 * full01 - 1)
        expected = np.where(hst == 0, -1, (hst > 0).astype(np.int64))
        np.testing.assert_array_equal(simulate_partial_labels(full01, p), expected)


def test_partial_labels_values_and_errors():
    y = np.ones((4, 3), dtype=np.int64)
    assert (simulate_partial_labels(y, 1.0) == 1).all()
    out = simulate_partial_labels(y, 0.5, seed=3)
    assert set(np.unique(out)) <= {-1, 1}
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="known_ratio"):
            simulate_partial_labels(y, bad)


# ---------------------------------------------------------------- file datasets


def test_voc2007(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    objs = {"a": [("dog", 0), ("person", 0)], "b": [("cat", 1), ("car", 0)]}
    for name, o in objs.items():
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in o)
        (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>{body}</annotation>")
        _img(root / "JPEGImages" / f"{name}.jpg", fmt="JPEG")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("a\nb\n")
    ds = voc2007(tmp_path, "trainval", transform=TF)
    assert len(ds) == 2 and ds.num_classes == 20
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and y.dtype == torch.int64
    assert np.flatnonzero(ds.targets[0]).tolist() == [11, 14]  # dog, person
    assert np.flatnonzero(ds.targets[1]).tolist() == [6]  # car; the difficult cat is skipped


def test_coco2014(tmp_path):
    (tmp_path / "annotations").mkdir()
    data = {
        "images": [{"id": 5, "file_name": "x.jpg"}, {"id": 2, "file_name": "y.png"}, {"id": 9, "file_name": "z.jpg"}],
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
        "annotations": [{"image_id": 5, "category_id": 90}, {"image_id": 5, "category_id": 1},
                        {"image_id": 2, "category_id": 3}, {"image_id": 2, "category_id": 3}],
    }
    (tmp_path / "annotations" / "instances_train2014.json").write_text(json.dumps(data))
    for n in ("x.jpg", "y.png", "z.jpg"):
        _img(tmp_path / "train2014" / n)
    ds = coco2014(tmp_path, "train", transform=TF)
    assert ds.classes == ["person", "car", "toothbrush"]
    np.testing.assert_array_equal(ds.targets, [[1, 0, 1], [0, 1, 0], [0, 0, 0]])  # unannotated image kept
    assert ds[1][0].shape == (3, 16, 16)


def test_nuswide(tmp_path):
    (tmp_path / "ImageList").mkdir()
    (tmp_path / "Groundtruth").mkdir()
    (tmp_path / "ImageList" / "TrainImagelist.txt").write_text("actor\\a.jpg\nsky\\b.jpg\nsky\\c.jpg\n")
    lines = ["1 0 " + " ".join(["0"] * 79), " ".join(["0"] * 81), "0 1 " + " ".join(["0"] * 78) + " 1"]
    (tmp_path / "Groundtruth" / "Labels_Train.txt").write_text("\n".join(lines) + "\n")
    for n in ("actor/a.jpg", "sky/b.jpg", "sky/c.jpg"):
        _img(tmp_path / "Flickr" / n)
    ds = nuswide(tmp_path, "train", transform=TF)
    assert len(ds) == 2 and ds.num_classes == 81  # the unlabelled image is dropped
    assert ds.paths[1].name == "c.jpg"
    assert np.flatnonzero(ds.targets[1]).tolist() == [1, 80]
    assert ds[0][0].shape == (3, 16, 16)


def test_visual_genome(tmp_path):
    (tmp_path / "train_list_500.txt").write_text("1.jpg\n2.jpg\n")
    (tmp_path / "vg_category_500_labels_index.json").write_text(json.dumps({"1.jpg": [0, 499], "2.jpg": [7]}))
    for n in ("1.jpg", "2.jpg"):
        _img(tmp_path / "VG_100K" / n)
    ds = visual_genome(tmp_path, "train", transform=TF)
    assert ds.targets.shape == (2, 500)
    assert np.flatnonzero(ds.targets[0]).tolist() == [0, 499]
    assert ds[1][1].sum().item() == 1


def test_visual_genome_200_reads_the_200_class_index(tmp_path):
    # HST's release: the VG-500 image lists with vg_category_200_labels_index.json (HCP-MLR-PL
    # utils/dataloader.py:55-58); no VG-500 index file is needed
    for split in ("train", "test"):
        (tmp_path / f"{split}_list_500.txt").write_text("1.jpg\n2.jpg\n")
    (tmp_path / "vg_category_200_labels_index.json").write_text(json.dumps({"1.jpg": [0, 199], "2.jpg": [7]}))
    for n in ("1.jpg", "2.jpg"):
        _img(tmp_path / "VG_100K" / n)
    ds = visual_genome_200(tmp_path, "train", transform=TF)
    assert ds.targets.shape == (2, 200) and np.flatnonzero(ds.targets[0]).tolist() == [0, 199]
    train, test = build_datasets("vg200", tmp_path, img_size=16)
    assert train.num_classes == test.num_classes == 200 and len(test) == 2
    (tmp_path / "vg_category_200_labels_index.json").write_text(json.dumps({"1.jpg": [200], "2.jpg": [7]}))
    with pytest.raises(ValueError, match=r"out of \[0, 200\)"):
        visual_genome_200(tmp_path, "train", transform=TF)


def test_cub(tmp_path):
    (tmp_path / "attributes").mkdir()
    (tmp_path / "images.txt").write_text("1 001.Bird/a.jpg\n2 001.Bird/b.jpg\n3 002.Other/c.jpg\n")
    (tmp_path / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    (tmp_path / "attributes" / "image_attribute_labels.txt").write_text(
        "1 1 1 3 2.5\n1 2 0 1 1.0\n1 312 1 4 3.0\n2 5 1 4 1.0\n3 2 1 3 0.5 0\n")
    for n in ("001.Bird/a.jpg", "001.Bird/b.jpg", "002.Other/c.jpg"):
        _img(tmp_path / "images" / n)
    tr = cub200(tmp_path, "train", transform=TF)
    te = cub200(tmp_path, "test", transform=TF)
    assert tr.targets.shape == (2, 312) and te.targets.shape == (1, 312)
    assert np.flatnonzero(tr.targets[0]).tolist() == [0, 311]
    assert np.flatnonzero(tr.targets[1]).tolist() == [1]
    assert np.flatnonzero(te.targets[0]).tolist() == [4]
    assert tr[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("fn", [voc2007, coco2014, nuswide, visual_genome, cub200])
def test_missing_dataset_folder(tmp_path, fn):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fn(missing)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        coco2014(tmp_path)


def test_build_datasets_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_datasets("imagenet")
    with pytest.raises(ValueError, match="--data-root"):
        build_datasets("voc2007", None)


def test_partial_labels_on_dataset(tmp_path):
    ds = digits("train", num_images=50)
    full = ds.full_targets.copy()
    ds.apply_partial_labels(0.3)
    np.testing.assert_array_equal(ds.targets, simulate_partial_labels(full, 0.3))
    np.testing.assert_array_equal(ds.full_targets, full)


# ---------------------------------------------------------------- digits


def test_digits_disjoint_correct_deterministic():
    from sklearn.datasets import load_digits

    tr = digits("train", num_images=400, seed=1)
    te = digits("test", num_images=200, seed=1)
    src_tr = set(tr.source_indices[tr.source_indices >= 0].tolist())
    src_te = set(te.source_indices[te.source_indices >= 0].tolist())
    assert src_tr and src_te and not (src_tr & src_te)
    lab = load_digits().target
    for ds in (tr, te):
        for i in range(len(ds)):
            used = ds.source_indices[i][ds.source_indices[i] >= 0]
            assert 1 <= len(used) <= 4
            expect = np.zeros(10, dtype=np.int8)
            expect[lab[used]] = 1
            np.testing.assert_array_equal(ds.targets[i], expect)
            assert len(set(lab[used].tolist())) == len(used)  # distinct digits
    again = digits("train", num_images=400, seed=1)
    assert torch.equal(again.images, tr.images)
    np.testing.assert_array_equal(again.targets, tr.targets)
    other = digits("train", num_images=400, seed=2)
    assert not torch.equal(other.images, tr.images)
    x, y = tr[3]
    assert x.shape == (3, 32, 32) and y.shape == (10,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1


def test_digits_cooccurrence():
    ds = digits("train", num_images=1000)
    y = ds.targets.astype(float)
    # partners (0, 6) co-occur far more often than an unrelated pair (0, 1)
    assert (y[:, 0] * y[:, 6]).sum() > 2 * (y[:, 0] * y[:, 1]).sum()
