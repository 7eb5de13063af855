import math

import numpy as np
import pytest

from mlcontrast.train.metrics import (
    mean_average_precision,
    multilabel_metrics,
    pseudo_label_counts,
    pseudo_label_metrics,
    pseudo_label_rates,
    voc_ap,
)


def test_voc_ap_hand_worked():
    # ranks: tp, fp, tp, fp -> prec 1, 1/2, 2/3, 1/2 ; rec .5,.5,1,1 ; interpolated: .5*1 + .5*2/3
    assert voc_ap([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # -1 and 0 are both negatives at test time
    assert voc_ap([0.9, 0.8, 0.7, 0.6], [1, -1, 1, 0]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert voc_ap([3.0, 2.0, 1.0], [1, 1, 0]) == pytest.approx(1.0)


def test_voc_ap_ties_follow_stable_order():
    # all tied: stable order fp, tp, tp -> prec 0, 1/2, 2/3 -> interpolated 2/3 over both recall steps
    assert voc_ap([0.5, 0.5, 0.5], [0, 1, 1]) == pytest.approx(2 / 3)
    assert voc_ap([0.5, 0.5, 0.5], [1, 1, 0]) == pytest.approx(1.0)


def test_class_without_positive_is_nan_and_excluded():
    assert math.isnan(voc_ap([0.1, 0.2], [0, 0]))
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    assert mean_average_precision(scores, targets) == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))


def test_mean_over_classes():
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    targets = np.array([[1, 1], [0, 0], [1, 0], [0, 0]])
    # class 1 ranking: rows 3,2,1,0 -> fp fp fp tp -> AP 1/4
    assert mean_average_precision(scores, targets) == pytest.approx(100 * ((0.5 + 0.5 * 2 / 3) + 0.25) / 2)


def test_prf_all_and_top3_hand_worked():
    scores = np.array([[2.0, 1.0, 0.5, 0.2], [-1.0, 0.0, -2.0, 3.0]])
    targets = np.array([[1, 0, 1, 1], [0, 1, 0, 0]])
    m = multilabel_metrics(scores, targets, threshold=0.0)
    # predictions (logit >= 0): [[1,1,1,1],[0,1,0,1]]
    assert m["CP"] == pytest.approx(75.0)
    assert m["CR"] == pytest.approx(100.0)
    assert m["CF1"] == pytest.approx(100 * 2 * 0.75 / 1.75)
    assert m["OP"] == pytest.approx(100 * 4 / 6)
    assert m["OR"] == pytest.approx(100.0)
    assert m["OF1"] == pytest.approx(80.0)
    # top-3: [[1,1,1,0],[0,1,0,1]]
    assert m["CP_top3"] == pytest.approx(62.5)
    assert m["CR_top3"] == pytest.approx(75.0)
    assert m["CF1_top3"] == pytest.approx(100 * 2 * 0.625 * 0.75 / 1.375)
    assert m["OP_top3"] == pytest.approx(60.0)
    assert m["OR_top3"] == pytest.approx(75.0)
    assert m["OF1_top3"] == pytest.approx(100 * 2 * 0.6 * 0.75 / 1.35)
    # SADCL's per-class-mean CF1: per-class F1 = 2·N_c/(N_p + N_g) = 1, 2/3, 1, 2/3
    assert m["CF1_perclass"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 2 / 3) / 4)


def test_cf1_perclass_differs_from_cf1_and_zeroes_a_class_without_true_positive():
    scores = np.array([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0]])
    targets = np.array([[1, 1, 0], [0, 1, 1]])
    # class 0: P 1/2, R 1, F1 2/3; class 1: P 1, R 1/2, F1 2/3; class 2: no true positive, P = R = F1 = 0
    m = multilabel_metrics(scores, targets)
    assert m["CF1_perclass"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert m["CF1"] == pytest.approx(50.0)  # from CP = CR = 1/2


def test_probability_threshold_matches_logits():
    rng = np.random.RandomState(0)
    logits = rng.randn(20, 6)
    targets = (rng.rand(20, 6) < 0.3).astype(int)
    a = multilabel_metrics(logits, targets, threshold=0.0)
    b = multilabel_metrics(1 / (1 + np.exp(-logits)), targets, threshold=0.5)
    assert a == pytest.approx(b)


def test_pseudo_label_metrics():
    truth = np.array([[1, 0, 1], [0, 1, 1]])
    partial = np.array([[1, -1, -1], [-1, -1, 1]])
    pseudo = np.array([[1, 1, 1], [-1, 0, 1]])
    # unknown entries: (0,1) truth 0, (0,2) truth 1, (1,0) truth 0, (1,1) truth 1
    # pseudo-positives among them: (0,1) wrong, (0,2) right -> precision 1/2; hidden positives 2 -> recall 1/2
    m = pseudo_label_metrics(pseudo, truth, partial)
    assert m == pytest.approx({"pseudo_precision": 50.0, "pseudo_recall": 50.0})
    assert pseudo_label_counts(pseudo, truth, partial).tolist() == [2, 1, 2]
    # counts of two batches add up; without any pseudo-positive the precision is what the caller says
    assert pseudo_label_rates([0, 0, 3], empty_precision=None) == {"pseudo_precision": None, "pseudo_recall": 0.0}
    assert pseudo_label_rates([0, 0, 0]) == {"pseudo_precision": 0.0, "pseudo_recall": 0.0}


def test_shape_errors():
    with pytest.raises(ValueError, match="scores and targets"):
        multilabel_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
