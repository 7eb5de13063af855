"""Loaders of the public multi-label datasets (research/seeds_methods.md §1.4).

Each returns an :class:`~mlcontrast.train.data.base.ImageFileDataset` of ``(image, targets)`` with
1 / 0 targets (partial labels are applied afterwards). Layouts expected under ``root``:

- VOC 2007: ``Annotations/*.xml``, ``ImageSets/Main/{trainval,test}.txt``, ``JPEGImages/`` (``root`` may also be
  a folder holding ``VOCdevkit/VOC2007`` or ``VOC2007``). Objects with ``difficult == 1`` are skipped.
- COCO 2014: ``annotations/instances_{train,val}2014.json``, ``{train,val}2014/``. All images of the JSON, in its
  order (images without annotations get all-negative targets); category id → index by sorted category id.
- NUS-WIDE: ``ImageList/{Train,Test}Imagelist.txt`` (Windows ``\\`` separators allowed), ``Groundtruth/Labels_{Train,
  Test}.txt`` (one line of 81 0/1 per image), images under ``Flickr/``; images without any label are dropped.
- Visual Genome: ``{train,test}_list_500.txt`` (file names), ``vg_category_500_labels_index.json`` (file name →
  class indices), images under ``VG_100K/``. VG-200 (``--dataset vg200``, what HST trains on) reads the same
  lists and images with ``vg_category_200_labels_index.json``.
- CUB-200-2011: ``images.txt``, ``train_test_split.txt``, ``attributes/image_attribute_labels.txt``, ``images/``;
  targets are the 312 binary attributes (``is_present``).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

import numpy as np

from mlcontrast.train.data.base import ImageFileDataset, require_dir, require_file

__all__ = ["VOC_CLASSES", "voc2007", "coco2014", "nuswide", "visual_genome", "visual_genome_200", "cub200"]

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


def voc2007(root, split: str = "trainval", transform: Callable | None = None) -> ImageFileDataset:
    _check_split(split, ("trainval", "train", "val", "test"))
    root = Path(root)
    for sub in ("VOCdevkit/VOC2007", "VOC2007"):
        if (root / sub / "Annotations").is_dir():
            root = root / sub
            break
    require_dir(root, "a VOC 2007 folder with Annotations/, ImageSets/Main/ and JPEGImages/")
    ann = require_dir(root / "Annotations", "VOC XML annotations")
    ids_file = require_file(root / "ImageSets" / "Main" / f"{split}.txt", f"the VOC image list of split {split!r}")
    ids = [line.split()[0] for line in ids_file.read_text().splitlines() if line.strip()]
    index = {name: i for i, name in enumerate(VOC_CLASSES)}
    targets = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int8)
    for row, image_id in enumerate(ids):
        tree = ET.parse(require_file(ann / f"{image_id}.xml", "a VOC XML annotation"))
        for obj in tree.getroot().iter("object"):
            difficult = obj.find("difficult")
            if difficult is not None and int(difficult.text or 0) == 1:
                continue
            name = obj.find("name").text.strip()
            if name not in index:
                raise ValueError(f"{ann / (image_id + '.xml')}: unknown VOC class {name!r}")
            targets[row, index[name]] = 1
    paths = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
    return ImageFileDataset(paths, targets, VOC_CLASSES, transform)


def coco2014(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    _check_split(split, ("train", "val"))
    root = require_dir(Path(root), "a COCO 2014 folder with annotations/ and train2014/, val2014/")
    ann_file = require_file(root / "annotations" / f"instances_{split}2014.json", "the COCO instances JSON")
    data = json.loads(ann_file.read_text())
    cat_ids = sorted(c["id"] for c in data["categories"])
    names = {c["id"]: c["name"] for c in data["categories"]}
    cat_index = {cid: i for i, cid in enumerate(cat_ids)}
    images = data["images"]
    row_of = {img["id"]: r for r, img in enumerate(images)}
    targets = np.zeros((len(images), len(cat_ids)), dtype=np.int8)
    for a in data.get("annotations", []):
        targets[row_of[a["image_id"]], cat_index[a["category_id"]]] = 1
    paths = [root / f"{split}2014" / img["file_name"] for img in images]
    return ImageFileDataset(paths, targets, [names[c] for c in cat_ids], transform)


def nuswide(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    _check_split(split, ("train", "test"))
    root = require_dir(Path(root), "a NUS-WIDE folder with ImageList/, Groundtruth/ and Flickr/")
    tag = "Train" if split == "train" else "Test"
    lst = require_file(root / "ImageList" / f"{tag}Imagelist.txt", "the NUS-WIDE image list")
    lab = require_file(root / "Groundtruth" / f"Labels_{tag}.txt", "the NUS-WIDE label file (0/1 per class)")
    names = [n.strip().replace("\\", "/") for n in lst.read_text().splitlines() if n.strip()]
    rows = [line.split() for line in lab.read_text().splitlines() if line.strip()]
    if len(rows) != len(names):
        raise ValueError(f"{lab}: {len(rows)} label lines for {len(names)} images in {lst}")
    targets = (np.array(rows, dtype=np.int64) > 0).astype(np.int8)
    keep = targets.sum(1) > 0
    concepts = root / "Concepts81.txt"
    classes = ([c.strip() for c in concepts.read_text().splitlines() if c.strip()] if concepts.is_file()
               else [f"class{i}" for i in range(targets.shape[1])])
    if len(classes) != targets.shape[1]:
        raise ValueError(f"{concepts}: {len(classes)} concepts for {targets.shape[1]} label columns")
    paths = [root / "Flickr" / n for n, k in zip(names, keep) if k]
    return ImageFileDataset(paths, targets[keep], classes, transform)


def visual_genome(root, split: str = "train", transform: Callable | None = None, num_classes: int = 500,
                  index_file: str | None = None) -> ImageFileDataset:
    _check_split(split, ("train", "test"))
    root = require_dir(Path(root), "a Visual Genome folder with the image lists, the label index JSON and VG_100K/")
    lst = require_file(root / f"{split}_list_500.txt", "the Visual Genome image list")
    idx = require_file(root / (index_file or f"vg_category_{num_classes}_labels_index.json"),
                       "the JSON mapping image file name → class indices")
    index = json.loads(idx.read_text())
    names = [n.strip() for n in lst.read_text().splitlines() if n.strip()]
    targets = np.zeros((len(names), num_classes), dtype=np.int8)
    for r, n in enumerate(names):
        if n not in index:
            raise ValueError(f"{idx}: no labels for image {n!r} of {lst}")
        cls = np.asarray(index[n], dtype=np.int64)
        if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
            raise ValueError(f"{idx}: class index out of [0, {num_classes}) for image {n!r}")
        targets[r, cls] = 1
    paths = [root / "VG_100K" / n for n in names]
    return ImageFileDataset(paths, targets, [f"class{i}" for i in range(num_classes)], transform)


def visual_genome_200(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    """Visual Genome with the 200 categories HST's release trains on: the VG-500 image lists with
    ``vg_category_200_labels_index.json`` (HCP-MLR-PL@d9fd300 ``utils/dataloader.py:55-58``, 200 classes at
    ``config.py:25``; SADCL's VG-500 reads ``vg_category_500_labels_index.json``, ``get_dataset.py:207-215``)."""
    return visual_genome(root, split, transform, num_classes=200)


def cub200(root, split: str = "train", transform: Callable | None = None) -> ImageFileDataset:
    _check_split(split, ("train", "test"))
    root = Path(root)
    if (root / "CUB_200_2011" / "images.txt").is_file():
        root = root / "CUB_200_2011"
    require_dir(root, "a CUB-200-2011 folder with images.txt, train_test_split.txt, attributes/ and images/")
    images = require_file(root / "images.txt", "the CUB image list (id path)")
    split_file = require_file(root / "train_test_split.txt", "the CUB split file (id is_train)")
    attr_file = require_file(root / "attributes" / "image_attribute_labels.txt", "the CUB attribute labels")
    paths = {}
    for line in images.read_text().splitlines():
        if line.strip():
            i, p = line.split(maxsplit=1)
            paths[int(i)] = p.strip()
    is_train = {int(a): int(b) for a, b in (ln.split()[:2] for ln in split_file.read_text().splitlines() if ln.strip())}
    ids = sorted(i for i in paths if is_train.get(i, -1) == (1 if split == "train" else 0))
    row_of = {i: r for r, i in enumerate(ids)}
    num_attr = 312
    targets = np.zeros((len(ids), num_attr), dtype=np.int8)
    for line in attr_file.read_text().splitlines():
        f = line.split()
        if len(f) < 3:
            continue
        img, attr, present = int(f[0]), int(f[1]), int(f[2])
        if img in row_of and present == 1:
            if not 1 <= attr <= num_attr:
                raise ValueError(f"{attr_file}: attribute id {attr} outside 1..{num_attr}")
            targets[row_of[img], attr - 1] = 1
    names_file = root / "attributes" / "attributes.txt"
    if not names_file.is_file():
        names_file = root.parent / "attributes.txt"
    classes = ([ln.split(maxsplit=1)[1] for ln in names_file.read_text().splitlines() if ln.strip()]
               if names_file.is_file() else [f"attr{i + 1}" for i in range(num_attr)])
    return ImageFileDataset([root / "images" / paths[i] for i in ids], targets, classes[:num_attr], transform)
