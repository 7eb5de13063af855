"""The error contract: bad input raises before any work, with the right type, naming the argument."""

from __future__ import annotations

import math
import os

import pytest
import torch
from utils import cpu_backends

import mlcontrast
from mlcontrast import reference

META = torch.device("meta")
BAD_TEMPERATURES = [0.0, -0.1, math.nan, math.inf]


def _rows(n=6, d=4):
    return torch.randn(n, d), torch.tensor([0, 0, 1, 1, -1, 2][:n] + [0] * max(0, n - 6))


# ----------------------------------------------------------------------------------------------
# label_supcon_loss
# ----------------------------------------------------------------------------------------------


class TestLabelSupCon:
    def call(self, features=None, labels=None, **kw):
        z, y = _rows()
        return mlcontrast.label_supcon_loss(z if features is None else features, y if labels is None else labels, **kw)

    @pytest.mark.parametrize("shape", [(6,), (6, 4, 1), ()])
    def test_features_of_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(shape))

    def test_features_without_feature_dimension(self):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(6, 0))

    @pytest.mark.parametrize("labels", [torch.zeros(5, dtype=torch.long), torch.zeros(6, 1, dtype=torch.long)])
    def test_labels_of_wrong_shape(self, labels):
        with pytest.raises(ValueError, match="labels"):
            self.call(labels=labels)

    def test_labels_below_minus_one(self):
        with pytest.raises(ValueError, match="labels"):
            self.call(labels=torch.tensor([0, 0, 1, 1, -2, 2]))

    @pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
    def test_bad_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature"):
            self.call(temperature=temperature)

    @pytest.mark.parametrize("base_temperature", BAD_TEMPERATURES)
    def test_bad_base_temperature(self, base_temperature):
        with pytest.raises(ValueError, match="base_temperature"):
            self.call(base_temperature=base_temperature)

    def test_bad_reduction(self):
        with pytest.raises(ValueError, match="reduction"):
            self.call(reduction="max")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    def test_floating_labels(self, dtype):
        with pytest.raises(TypeError, match="labels"):
            self.call(labels=torch.zeros(6, dtype=dtype))

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
    def test_integer_features(self, dtype):
        with pytest.raises(TypeError, match="features"):
            self.call(features=torch.ones(6, 4, dtype=dtype))

    def test_labels_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(labels=torch.zeros(6, dtype=torch.long, device=META))

    def test_features_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(features=torch.randn(6, 4, device=META))

    # Reference rows (DESIGN.md §10).

    def test_ref_features_without_ref_labels_and_the_reverse(self):
        with pytest.raises(ValueError, match="ref_features and ref_labels"):
            self.call(ref_features=torch.randn(3, 4))
        with pytest.raises(ValueError, match="ref_features and ref_labels"):
            self.call(ref_labels=torch.zeros(3, dtype=torch.long))

    @pytest.mark.parametrize("shape", [(3, 5), (3,), (3, 4, 1), (3, 0)])
    def test_ref_rows_of_another_dimension(self, shape):
        with pytest.raises(ValueError, match="ref_features"):
            self.call(ref_features=torch.randn(shape), ref_labels=torch.zeros(3, dtype=torch.long))

    @pytest.mark.parametrize("shape", [(2,), (4,), (3, 1), ()])
    def test_ref_labels_of_wrong_shape(self, shape):
        with pytest.raises(ValueError, match=r"ref_labels must be \[M=3\]"):
            self.call(ref_features=torch.randn(3, 4), ref_labels=torch.zeros(shape, dtype=torch.long))

    def test_bad_ref_labels_and_ref_features(self):
        with pytest.raises(TypeError, match="ref_labels"):
            self.call(ref_features=torch.randn(3, 4), ref_labels=torch.zeros(3))
        with pytest.raises(TypeError, match="ref_labels"):
            self.call(ref_features=torch.randn(3, 4), ref_labels=torch.zeros(3, dtype=torch.bool))
        with pytest.raises(ValueError, match="ref_labels must be class ids"):
            self.call(ref_features=torch.randn(3, 4), ref_labels=torch.tensor([0, -2, 1]))
        with pytest.raises(TypeError, match="ref_features"):
            self.call(ref_features=torch.ones(3, 4, dtype=torch.long), ref_labels=torch.zeros(3, dtype=torch.long))

    def test_ref_rows_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(ref_features=torch.randn(3, 4, device=META), ref_labels=torch.zeros(3, dtype=torch.long))
        with pytest.raises(ValueError, match="device"):
            self.call(ref_features=torch.randn(3, 4), ref_labels=torch.zeros(3, dtype=torch.long, device=META))

    def test_ref_row_errors_come_before_any_work(self, monkeypatch):
        from mlcontrast.ops import registry

        def no_work(*args, **kwargs):
            raise AssertionError("a kernel was looked up before the arguments were checked")

        monkeypatch.setattr(registry, "op", no_work)
        for backend in ("cpu", "torch"):
            with pytest.raises(ValueError, match="ref_features"):
                self.call(ref_features=torch.randn(3, 5), ref_labels=torch.zeros(3, dtype=torch.long), backend=backend)
            with pytest.raises(ValueError, match="ref_labels"):
                self.call(ref_features=torch.randn(3, 4), ref_labels=torch.zeros(2, dtype=torch.long), backend=backend)

    def test_module_forward_checks_ref_rows(self):
        z, y = _rows()
        with pytest.raises(ValueError, match="ref_features and ref_labels"):
            mlcontrast.LabelSupConLoss()(z, y, torch.randn(3, 4))
        with pytest.raises(ValueError, match="ref_features"):
            mlcontrast.LabelSupConLoss()(z, y, torch.randn(3, 2), torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# supcon_loss
# ----------------------------------------------------------------------------------------------


class TestSupCon:
    def call(self, features=None, labels="default", **kw):
        z = torch.randn(4, 2, 5) if features is None else features
        y = torch.tensor([0, 1, 0, 1]) if isinstance(labels, str) else labels
        return mlcontrast.supcon_loss(z, y, **kw)

    @pytest.mark.parametrize("shape", [(8,), (8, 5)])
    def test_features_of_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(shape))

    @pytest.mark.parametrize("labels", [torch.zeros(3, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long)])
    def test_labels_of_wrong_shape(self, labels):
        with pytest.raises(ValueError, match="labels"):
            self.call(labels=labels)

    def test_bad_contrast_mode(self):
        with pytest.raises(ValueError, match="contrast_mode"):
            self.call(contrast_mode="two")

    @pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
    def test_bad_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature"):
            self.call(temperature=temperature)

    @pytest.mark.parametrize("base_temperature", BAD_TEMPERATURES)
    def test_bad_base_temperature(self, base_temperature):
        with pytest.raises(ValueError, match="base_temperature"):
            self.call(base_temperature=base_temperature)

    def test_floating_labels(self):
        with pytest.raises(TypeError, match="labels"):
            self.call(labels=torch.zeros(4))

    def test_integer_features(self):
        with pytest.raises(TypeError, match="features"):
            self.call(features=torch.ones(4, 2, 5, dtype=torch.long))

    def test_labels_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(labels=torch.zeros(4, dtype=torch.long, device=META))


# ----------------------------------------------------------------------------------------------
# multilabel_supcon_loss
# ----------------------------------------------------------------------------------------------


class TestMultiLabelSupCon:
    def call(self, features=None, targets=None, **kw):
        z = torch.randn(3, 2, 4, 5) if features is None else features
        t = torch.tensor([[1, 0, 1, -1], [0, 1, 1, 0], [1, 1, 0, 0]]) if targets is None else targets
        return mlcontrast.multilabel_supcon_loss(z, t, **kw)

    @pytest.mark.parametrize("shape", [(3, 4), (3, 2, 4, 5, 1)])
    def test_features_of_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(shape))

    @pytest.mark.parametrize("shape", [(3, 5), (2, 4), (3, 4, 1), (12,)])
    def test_targets_of_wrong_shape(self, shape):
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=torch.zeros(shape, dtype=torch.long))

    @pytest.mark.parametrize("bad", [2, -2])
    def test_targets_outside_the_encoding(self, bad):
        t = torch.zeros(3, 4, dtype=torch.long)
        t[1, 2] = bad
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=t)

    def test_floating_targets(self):
        with pytest.raises(TypeError, match="targets"):
            self.call(targets=torch.zeros(3, 4))

    def test_integer_features(self):
        with pytest.raises(TypeError, match="features"):
            self.call(features=torch.ones(3, 4, 5, dtype=torch.int32))

    @pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
    def test_bad_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature"):
            self.call(temperature=temperature)

    def test_bad_base_temperature(self):
        with pytest.raises(ValueError, match="base_temperature"):
            self.call(base_temperature=0.0)

    def test_targets_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(targets=torch.zeros(3, 4, dtype=torch.long, device=META))

    def test_features_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(features=torch.randn(3, 2, 4, 5, device=META))


# ----------------------------------------------------------------------------------------------
# multihot_supcon_loss (and MultiHotSupConLoss.forward)
# ----------------------------------------------------------------------------------------------

_MULTIHOT = torch.tensor([[1, 0, 1, -1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])


class TestMultiHotSupCon:
    def call(self, features=None, targets=None, **kw):
        z = torch.randn(5, 3) if features is None else features
        return mlcontrast.multihot_supcon_loss(z, _MULTIHOT if targets is None else targets, **kw)

    @pytest.mark.parametrize("shape", [(5,), (5, 3, 1), ()])
    def test_features_of_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(shape))

    def test_features_without_feature_dimension(self):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(5, 0))

    def test_integer_features(self):
        with pytest.raises(TypeError, match="features"):
            self.call(features=torch.ones(5, 3, dtype=torch.int64))

    @pytest.mark.parametrize("shape", [(4, 4), (6, 4), (5,), (5, 4, 1), (5, 0)])
    def test_targets_of_wrong_shape(self, shape):
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=torch.zeros(shape, dtype=torch.long))

    @pytest.mark.parametrize("bad", [2, -2])
    def test_targets_outside_the_encoding(self, bad):
        t = _MULTIHOT.clone()
        t[4, 3] = bad
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=t)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
    def test_floating_targets(self, dtype):
        with pytest.raises(TypeError, match="targets"):
            self.call(targets=_MULTIHOT.to(dtype))

    def test_integer_and_bool_targets_are_accepted(self):
        for targets in (_MULTIHOT.int(), _MULTIHOT.to(torch.int8), _MULTIHOT == 1, (_MULTIHOT == 1).to(torch.uint8)):
            self.call(targets=targets, backend="torch")

    @pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
    def test_bad_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature"):
            self.call(temperature=temperature)

    @pytest.mark.parametrize("base_temperature", BAD_TEMPERATURES)
    def test_bad_base_temperature(self, base_temperature):
        with pytest.raises(ValueError, match="base_temperature"):
            self.call(base_temperature=base_temperature)

    @pytest.mark.parametrize("threshold", [0.0, -0.5, 1.0001, 2.0, math.nan, math.inf])
    def test_threshold_outside_zero_one(self, threshold):
        with pytest.raises(ValueError, match="threshold"):
            self.call(threshold=threshold)

    @pytest.mark.parametrize("threshold", [1e-9, 0.5, 1.0, 1])
    def test_threshold_inside_zero_one(self, threshold):
        self.call(threshold=threshold, backend="torch")

    def test_threshold_of_another_type(self):
        with pytest.raises(TypeError, match="threshold"):
            self.call(threshold="0.5")

    @pytest.mark.parametrize("positives", ["Jaccard", "some", "", None, "label"])
    def test_unknown_positives(self, positives):
        with pytest.raises(ValueError, match="positives"):
            self.call(positives=positives)

    @pytest.mark.parametrize("reduction", ["avg", None, "Mean"])
    def test_unknown_reduction(self, reduction):
        with pytest.raises(ValueError, match="reduction"):
            self.call(reduction=reduction)

    def test_ref_features_without_ref_targets_and_the_reverse(self):
        with pytest.raises(ValueError, match="ref_features and ref_targets"):
            self.call(ref_features=torch.randn(3, 3))
        with pytest.raises(ValueError, match="ref_features and ref_targets"):
            self.call(ref_targets=torch.zeros(3, 4, dtype=torch.long))

    def test_ref_rows_of_another_dimension(self):
        with pytest.raises(ValueError, match="ref_features"):
            self.call(ref_features=torch.randn(3, 4), ref_targets=torch.zeros(3, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="ref_features"):
            self.call(ref_features=torch.randn(3), ref_targets=torch.zeros(3, 4, dtype=torch.long))

    @pytest.mark.parametrize("shape", [(3, 3), (3, 5), (2, 4), (3,)])
    def test_ref_targets_of_wrong_shape(self, shape):
        with pytest.raises(ValueError, match="ref_targets"):
            self.call(ref_features=torch.randn(3, 3), ref_targets=torch.zeros(shape, dtype=torch.long))

    def test_bad_ref_targets(self):
        with pytest.raises(TypeError, match="ref_targets"):
            self.call(ref_features=torch.randn(3, 3), ref_targets=torch.zeros(3, 4))
        with pytest.raises(ValueError, match="ref_targets"):
            self.call(ref_features=torch.randn(3, 3), ref_targets=torch.full((3, 4), 3))
        with pytest.raises(TypeError, match="ref_features"):
            self.call(ref_features=torch.ones(3, 3, dtype=torch.long), ref_targets=torch.zeros(3, 4, dtype=torch.long))

    def test_tensors_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(targets=_MULTIHOT.to(META))
        with pytest.raises(ValueError, match="device"):
            self.call(features=torch.randn(5, 3, device=META))
        with pytest.raises(ValueError, match="device"):
            self.call(ref_features=torch.randn(3, 3, device=META), ref_targets=torch.zeros(3, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="device"):
            self.call(ref_features=torch.randn(3, 3), ref_targets=torch.zeros(3, 4, dtype=torch.long, device=META))

    def test_module_forward_checks_its_tensors(self):
        loss_fn = mlcontrast.MultiHotSupConLoss(backend="torch")
        with pytest.raises(TypeError, match="targets"):
            loss_fn(torch.randn(5, 3), _MULTIHOT.float())
        with pytest.raises(ValueError, match="ref_features and ref_targets"):
            loss_fn(torch.randn(5, 3), _MULTIHOT, torch.randn(2, 3))

    def test_bad_value_raises_before_any_kernel(self, monkeypatch):
        from mlcontrast import _multihot

        def fail(*args, **kw):
            raise AssertionError("ran before the arguments were checked")

        monkeypatch.setattr(_multihot, "_anchor_rows", fail)
        bad = _MULTIHOT.clone()
        bad[0, 0] = 5
        for backend in mlcontrast.available_backends("cpu"):
            with pytest.raises(ValueError, match="targets"):
                self.call(targets=bad, backend=backend)


# ----------------------------------------------------------------------------------------------
# prototype_nce_loss
# ----------------------------------------------------------------------------------------------


class TestPrototypeNCE:
    def call(self, features=None, prototypes=None, targets=None, **kw):
        z = torch.randn(3, 4, 5) if features is None else features
        p = torch.randn(4, 5) if prototypes is None else prototypes
        t = torch.tensor([[1, 0, 1, -1], [0, 1, 1, 0], [1, 1, 0, 0]]) if targets is None else targets
        return mlcontrast.prototype_nce_loss(z, p, t, **kw)

    @pytest.mark.parametrize("shape", [(3, 4), (3, 1, 4, 5)])
    def test_features_of_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(shape))

    @pytest.mark.parametrize("shape", [(5, 5), (4, 6), (4,), (1, 4, 5)])
    def test_prototypes_of_wrong_shape(self, shape):
        with pytest.raises(ValueError, match="prototypes"):
            self.call(prototypes=torch.randn(shape))

    @pytest.mark.parametrize("shape", [(3, 5), (4, 4), (3,)])
    def test_targets_of_wrong_shape(self, shape):
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=torch.zeros(shape, dtype=torch.long))

    @pytest.mark.parametrize("bad", [2, -2])
    def test_targets_outside_the_encoding(self, bad):
        t = torch.ones(3, 4, dtype=torch.long)
        t[0, 0] = bad
        with pytest.raises(ValueError, match="targets"):
            self.call(targets=t)

    def test_floating_targets(self):
        with pytest.raises(TypeError, match="targets"):
            self.call(targets=torch.ones(3, 4, dtype=torch.float64))

    def test_integer_features(self):
        with pytest.raises(TypeError, match="features"):
            self.call(features=torch.ones(3, 4, 5, dtype=torch.long))

    def test_integer_prototypes(self):
        with pytest.raises(TypeError, match="prototypes"):
            self.call(prototypes=torch.ones(4, 5, dtype=torch.long))

    @pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
    def test_bad_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature"):
            self.call(temperature=temperature)

    def test_prototypes_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(prototypes=torch.randn(4, 5, device=META))

    def test_targets_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(targets=torch.ones(3, 4, dtype=torch.long, device=META))


# ----------------------------------------------------------------------------------------------
# prototype_ce_loss
# ----------------------------------------------------------------------------------------------


class TestPrototypeCE:
    def call(self, features=None, labels=None, prototypes=None, **kw):
        z = torch.randn(6, 5) if features is None else features
        y = torch.tensor([0, 1, 2, -1, 2, 0]) if labels is None else labels
        p = torch.randn(3, 5) if prototypes is None else prototypes
        return mlcontrast.prototype_ce_loss(z, y, p, **kw)

    @pytest.mark.parametrize("shape", [(6,), (6, 1, 5)])
    def test_features_of_wrong_rank(self, shape):
        with pytest.raises(ValueError, match="features"):
            self.call(features=torch.randn(shape))

    @pytest.mark.parametrize("shape", [(3, 4), (3,), (0, 5), (1, 3, 5)])
    def test_prototypes_of_wrong_shape(self, shape):
        with pytest.raises(ValueError, match="prototypes"):
            self.call(prototypes=torch.randn(shape))

    def test_labels_of_wrong_shape(self):
        with pytest.raises(ValueError, match="labels"):
            self.call(labels=torch.zeros(7, dtype=torch.long))

    def test_label_not_below_the_number_of_prototypes(self):
        with pytest.raises(ValueError, match="labels"):
            self.call(labels=torch.tensor([0, 1, 3, -1, 2, 0]))

    def test_labels_below_minus_one(self):
        with pytest.raises(ValueError, match="labels"):
            self.call(labels=torch.tensor([0, 1, -3, -1, 2, 0]))

    def test_floating_labels(self):
        with pytest.raises(TypeError, match="labels"):
            self.call(labels=torch.zeros(6))

    def test_integer_features(self):
        with pytest.raises(TypeError, match="features"):
            self.call(features=torch.ones(6, 5, dtype=torch.long))

    @pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
    def test_bad_temperature(self, temperature):
        with pytest.raises(ValueError, match="temperature"):
            self.call(temperature=temperature)

    def test_labels_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(labels=torch.zeros(6, dtype=torch.long, device=META))

    def test_prototypes_on_another_device(self):
        with pytest.raises(ValueError, match="device"):
            self.call(prototypes=torch.randn(3, 5, device=META))


# ----------------------------------------------------------------------------------------------
# update_prototypes_: errors, and nothing modified in place
# ----------------------------------------------------------------------------------------------


def _update_cases():
    p = lambda: torch.randn(3, 4)  # noqa: E731
    z, y = torch.randn(6, 4), torch.tensor([0, 1, 2, -1, 2, 0])
    zb, t = torch.randn(2, 3, 4), torch.tensor([[1, 0, -1], [0, 1, 1]])
    long = torch.long
    return [
        ("prototypes 1-D", p().flatten(), z, y, {}, ValueError, "prototypes"),
        ("features D mismatch", p(), torch.randn(6, 5), y, {}, ValueError, "features"),
        ("features 4-D", p(), torch.randn(2, 3, 4, 1), y, {}, ValueError, "features"),
        ("3-D features C mismatch", p(), torch.randn(2, 4, 4), t, {}, ValueError, "features"),
        ("targets shape", p(), zb, torch.zeros(2, 4, dtype=long), {}, ValueError, "targets"),
        ("targets value", p(), zb, torch.tensor([[1, 0, 2], [0, 1, 1]]), {}, ValueError, "targets"),
        ("labels shape", p(), z, torch.zeros(5, dtype=long), {}, ValueError, "labels"),
        ("label >= C", p(), z, torch.tensor([0, 1, 3, -1, 2, 0]), {}, ValueError, "labels"),
        ("label < -1", p(), z, torch.tensor([0, 1, -2, -1, 2, 0]), {}, ValueError, "labels"),
        ("momentum < 0", p(), z, y, {"momentum": -0.1}, ValueError, "momentum"),
        ("momentum > 1", p(), z, y, {"momentum": 1.5}, ValueError, "momentum"),
        ("momentum NaN", p(), z, y, {"momentum": math.nan}, ValueError, "momentum"),
        ("floating labels", p(), z, y.float(), {}, TypeError, "labels"),
        ("floating targets", p(), zb, t.float(), {}, TypeError, "targets"),
        ("integer features", p(), z.long(), y, {}, TypeError, "features"),
        ("integer prototypes", p().long(), z, y, {}, TypeError, "prototypes"),
        ("labels on meta", p(), z, y.to(META), {}, ValueError, "device"),
        ("features on meta", p(), z.to(META), y, {}, ValueError, "device"),
        ("prototypes on meta", p().to(META), z, y, {}, ValueError, "device"),
        ("unknown backend", p(), z, y, {"backend": "gpu"}, ValueError, "backend"),
        ("cuda backend on CPU", p(), z, y, {"backend": "cuda"}, RuntimeError, "unavailable"),
    ]


@pytest.mark.parametrize(
    "prototypes,features,labels,kw,error,match", [c[1:] for c in _update_cases()], ids=[c[0] for c in _update_cases()]
)
def test_update_prototypes_errors_modify_nothing(prototypes, features, labels, kw, error, match):
    before = prototypes.clone()
    with pytest.raises(error, match=match):
        mlcontrast.update_prototypes_(prototypes, features, labels, **kw)
    if prototypes.device != META:  # a meta tensor holds no values to compare
        assert torch.equal(prototypes, before), "nothing is modified in place when an exception is raised"


@pytest.mark.parametrize("backend", cpu_backends() + ["torch"])
def test_update_prototypes_bad_label_after_valid_ones_modifies_nothing(backend):
    # The bad label comes last, after classes that would be updated first by a row-by-row loop.
    protos = torch.randn(4, 3)
    before = protos.clone()
    with pytest.raises(ValueError, match="labels"):
        mlcontrast.update_prototypes_(protos, torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 4]), backend=backend)
    assert torch.equal(protos, before)


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


ALL_CALLS = {
    "label_supcon_loss": lambda **kw: mlcontrast.label_supcon_loss(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), **kw),
    "supcon_loss": lambda **kw: mlcontrast.supcon_loss(torch.randn(4, 2, 3), **kw),
    "multilabel_supcon_loss": lambda **kw: mlcontrast.multilabel_supcon_loss(
        torch.randn(2, 3, 4), torch.tensor([[1, 0, 1], [1, 1, 0]]), **kw
    ),
    "prototype_nce_loss": lambda **kw: mlcontrast.prototype_nce_loss(
        torch.randn(2, 3, 4), torch.randn(3, 4), torch.tensor([[1, 0, 1], [1, 1, 0]]), **kw
    ),
    "prototype_ce_loss": lambda **kw: mlcontrast.prototype_ce_loss(
        torch.randn(4, 3), torch.tensor([0, 1, 1, -1]), torch.randn(2, 3), **kw
    ),
    "multihot_supcon_loss": lambda **kw: mlcontrast.multihot_supcon_loss(torch.randn(5, 3), _MULTIHOT, **kw),
    "update_prototypes_": lambda **kw: mlcontrast.update_prototypes_(
        torch.randn(2, 3), torch.randn(4, 3), torch.tensor([0, 1, 1, -1]), **kw
    ),
}


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_unknown_backend_name(name):
    with pytest.raises(ValueError, match="backend"):
        ALL_CALLS[name](backend="fast")


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_cuda_backend_on_cpu_tensors_says_why(name):
    # Either why CUDA cannot run these tensors, or (an op without CUDA kernels: FusedOp.backends) that it has none.
    with pytest.raises(RuntimeError, match=r'backend "cuda" is unavailable: .*(CUDA|no "cuda" kernels)'):
        ALL_CALLS[name](backend="cuda")


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_triton_backend_on_cpu_tensors_says_why(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r'backend "triton" is unavailable: .*TRITON_INTERPRET'):
        ALL_CALLS[name](backend="triton")


@pytest.mark.parametrize("name", list(ALL_CALLS))
def test_every_backend_that_is_listed_runs(name):
    for backend in mlcontrast.available_backends("cpu") + ["auto"]:
        ALL_CALLS[name](backend=backend)


def test_environment_variable_makes_auto_use_the_reference(monkeypatch):
    calls = []
    original = reference.label_supcon_loss

    def spy(*args, **kw):
        calls.append(args)
        return original(*args, **kw)

    monkeypatch.setattr(reference, "label_supcon_loss", spy)
    monkeypatch.setenv("MLCONTRAST_BACKEND", "torch")
    ALL_CALLS["label_supcon_loss"]()
    assert len(calls) == 1, 'MLCONTRAST_BACKEND=torch makes "auto" run reference.py'
    if cpu_backends():
        ALL_CALLS["label_supcon_loss"](backend=cpu_backends()[0])
        assert len(calls) == 1, "an explicit backend is not overridden by MLCONTRAST_BACKEND"
    monkeypatch.delenv("MLCONTRAST_BACKEND")
    ALL_CALLS["label_supcon_loss"]()
    assert len(calls) == (1 if cpu_backends() else 2), '"auto" picks the fused backend when one is built'


@pytest.mark.parametrize("name", list(ALL_CALLS))
@pytest.mark.parametrize("value", ["fastest", "TORCH", "cpu,torch"])
def test_invalid_environment_variable(name, value, monkeypatch):
    monkeypatch.setenv("MLCONTRAST_BACKEND", value)
    with pytest.raises(ValueError, match="MLCONTRAST_BACKEND"):
        ALL_CALLS[name]()


def test_environment_variable_naming_an_unavailable_backend(monkeypatch):
    monkeypatch.setenv("MLCONTRAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        ALL_CALLS["label_supcon_loss"]()


def test_available_backends_on_cpu():
    backends = mlcontrast.available_backends("cpu")
    assert backends[-1] == "torch"
    assert mlcontrast.available_backends(torch.device("cpu")) == backends
    try:
        from mlcontrast import _C  # noqa: F401
    except ImportError:
        pytest.skip("the extension is not built")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"  # set by tests/conftest.py without a GPU
    assert backends == (["cpu", "triton", "torch"] if interpreting else ["cpu", "torch"])


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_torch_is_always_available_and_last(device):
    backends = mlcontrast.available_backends(device)
    assert backends[-1] == "torch"
    if device == "meta" or not torch.cuda.is_available():
        assert backends == ["torch"]


# ----------------------------------------------------------------------------------------------
# Modules check their hyper-parameters in __init__
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: mlcontrast.LabelSupConLoss(temperature=0.0), "temperature"),
        (lambda: mlcontrast.LabelSupConLoss(base_temperature=-1.0), "base_temperature"),
        (lambda: mlcontrast.LabelSupConLoss(reduction="avg"), "reduction"),
        (lambda: mlcontrast.LabelSupConLoss(backend="gpu"), "backend"),
        (lambda: mlcontrast.SupConLoss(temperature=math.nan), "temperature"),
        (lambda: mlcontrast.SupConLoss(contrast_mode="both"), "contrast_mode"),
        (lambda: mlcontrast.MultiLabelSupConLoss(temperature=-0.2), "temperature"),
        (lambda: mlcontrast.MultiHotSupConLoss(temperature=0.0), "temperature"),
        (lambda: mlcontrast.MultiHotSupConLoss(base_temperature=-1.0), "base_temperature"),
        (lambda: mlcontrast.MultiHotSupConLoss(positives="most"), "positives"),
        (lambda: mlcontrast.MultiHotSupConLoss(threshold=0.0), "threshold"),
        (lambda: mlcontrast.MultiHotSupConLoss(threshold=1.5), "threshold"),
        (lambda: mlcontrast.MultiHotSupConLoss(reduction="avg"), "reduction"),
        (lambda: mlcontrast.MultiHotSupConLoss(backend="gpu"), "backend"),
        (lambda: mlcontrast.PrototypeNCELoss(temperature=0.0), "temperature"),
        (lambda: mlcontrast.PrototypeCELoss(backend="gpu"), "backend"),
        (lambda: mlcontrast.PrototypeBank(3, 4, momentum=1.5), "momentum"),
        (lambda: mlcontrast.PrototypeBank(0, 4), "num_classes"),
        (lambda: mlcontrast.PrototypeBank(3, 4, init=torch.randn(4, 3)), "init"),
    ],
)
def test_module_constructors_reject_bad_hyper_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()
