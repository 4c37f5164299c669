"""Metrics against scikit-learn (the reference) and hand-worked examples."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from allcluster.metrics import (
    average_precision_ovr,
    calibration_report,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    per_class_prf_specificity,
    reliability_bins,
    roc_auc_ovr,
    softmax,
)

EXACT = 1e-9
NAMES = ["ALL-benign", "ALL-early", "ALL-pre", "ALL-pro"]


def random_case(seed: int, n: int = 80, c: int = 4, decimals: int | None = None):
    """Labels and Dirichlet probabilities loosely tied to them; rounding creates tied scores."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    alpha = np.ones((n, c))
    alpha[np.arange(n), y] += 2.0
    probs = np.array([rng.dirichlet(a) for a in alpha])
    if decimals is not None:
        probs = np.round(probs, decimals)
    return y, probs


def one_hot_labels(y: np.ndarray, k: int) -> np.ndarray:
    return (y == k).astype(int)


# --- softmax --------------------------------------------------------------------------------


def test_softmax_rows_sum_to_one_and_survive_huge_logits():
    logits = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0], [-5e3, 1.0, 2.0]])
    p = softmax(logits)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=EXACT)
    np.testing.assert_allclose(p[1], 1 / 3, atol=EXACT)
    np.testing.assert_allclose(p[0, :2], np.exp([0, -1]) / (1 + np.exp(-1)), atol=EXACT)


def test_softmax_temperature_divides_logits():
    logits = np.random.default_rng(0).normal(size=(5, 3))
    np.testing.assert_allclose(softmax(logits, 2.5), softmax(logits / 2.5), atol=EXACT)


# --- counts and per-class rates --------------------------------------------------------------


def test_confusion_matrix_matches_sklearn_with_rows_true():
    y, probs = random_case(1)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, 4)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=range(4)))


def test_confusion_matrix_rejects_labels_out_of_range():
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)


def test_precision_recall_f1_support_match_sklearn_per_class_and_macro():
    y, probs = random_case(2)
    pred = probs.argmax(axis=1)
    # A class never predicted and never present exercises zero_division=0.
    pred[pred == 3] = 2
    y[y == 3] = 1
    got = per_class_prf_specificity(confusion_matrix(y, pred, 4))
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=range(4), average=None,
                                                     zero_division=0)
    np.testing.assert_allclose(got["precision"], p, atol=EXACT)
    np.testing.assert_allclose(got["recall"], r, atol=EXACT)
    np.testing.assert_allclose(got["f1"], f, atol=EXACT)
    np.testing.assert_array_equal(got["support"], s)
    # macro: over the classes true or predicted (sklearn's default labels), so class 3 is no 0 in it
    mp, mr, mf, _ = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert mf > skm.f1_score(y, pred, labels=range(4), average="macro", zero_division=0)
    one_class = classification_metrics([0, 0, 0], np.eye(4)[[0, 0, 0]], NAMES)     # a one-class evaluation set
    assert one_class["macro_f1"] == 1.0 and math.isnan(one_class["macro_specificity"]), "0/0 is no specificity 0"
    result = classification_metrics(y, np.eye(4)[pred], NAMES)
    assert result["macro_precision"] == pytest.approx(mp, abs=EXACT)
    assert result["macro_recall"] == pytest.approx(mr, abs=EXACT)
    assert result["macro_f1"] == pytest.approx(mf, abs=EXACT)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=EXACT)


def test_specificity_is_true_negatives_over_actual_negatives_by_hand():
    # rows true, cols predicted
    cm = np.array([[5, 1, 0],
                   [2, 3, 1],
                   [0, 0, 4]])
    # class 0: TN = 3+1+0+4 = 8, FP = 2  -> 0.8
    # class 1: TN = 5+0+0+4 = 9, FP = 1  -> 0.9
    # class 2: TN = 5+1+2+3 = 11, FP = 1 -> 11/12
    got = per_class_prf_specificity(cm)["specificity"]
    np.testing.assert_allclose(got, [0.8, 0.9, 11 / 12], atol=EXACT)


# --- ranking metrics -------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct-scores", "tied-scores"])
def test_roc_auc_ovr_matches_sklearn_per_class(decimals):
    y, probs = random_case(3, decimals=decimals)
    got = roc_auc_ovr(y, probs)
    want = [skm.roc_auc_score(one_hot_labels(y, k), probs[:, k]) for k in range(4)]
    np.testing.assert_allclose(got, want, atol=EXACT)


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct-scores", "tied-scores"])
def test_average_precision_ovr_matches_sklearn_per_class(decimals):
    y, probs = random_case(4, decimals=decimals)
    got = average_precision_ovr(y, probs)
    want = [skm.average_precision_score(one_hot_labels(y, k), probs[:, k]) for k in range(4)]
    np.testing.assert_allclose(got, want, atol=EXACT)


def test_auc_of_all_tied_scores_is_one_half():
    y = np.array([0, 1, 0, 1, 1])
    probs = np.full((5, 2), 0.5)
    np.testing.assert_allclose(roc_auc_ovr(y, probs), [0.5, 0.5], atol=EXACT)


def test_absent_class_has_nan_auc_and_ap_and_macro_ignores_it():
    y, probs = random_case(5, c=3)
    y[y == 2] = 0
    auc, ap = roc_auc_ovr(y, probs), average_precision_ovr(y, probs)
    assert math.isnan(auc[2]) and math.isnan(ap[2])
    want_auc = [skm.roc_auc_score(one_hot_labels(y, k), probs[:, k]) for k in range(2)]
    want_ap = [skm.average_precision_score(one_hot_labels(y, k), probs[:, k]) for k in range(2)]
    result = classification_metrics(y, probs, NAMES[:3])
    assert result["auc"] == pytest.approx(np.mean(want_auc), abs=EXACT)
    assert result["map"] == pytest.approx(np.mean(want_ap), abs=EXACT)
    assert math.isnan(result["per_class"][NAMES[2]]["auc"])
    assert result["per_class"][NAMES[2]]["support"] == 0


def test_auc_is_nan_for_a_class_without_negatives():
    y = np.zeros(4, dtype=int)
    probs = softmax(np.random.default_rng(6).normal(size=(4, 2)))
    auc = roc_auc_ovr(y, probs)
    assert np.isnan(auc).all()  # class 0 has no negatives, class 1 no positives
    assert math.isnan(classification_metrics(y, probs, NAMES[:2])["auc"])


# --- calibration -----------------------------------------------------------------------------


ECE_PROBS = np.array([
    [0.90, 0.05, 0.05],  # conf .90, correct -> bin (.8, 1]
    [0.05, 0.85, 0.10],  # conf .85, wrong   -> bin (.8, 1]
    [0.80, 0.10, 0.10],  # conf .80, correct -> bin (.6, .8]: the upper edge is inclusive
    [0.50, 0.30, 0.20],  # conf .50, wrong   -> bin (.4, .6]
    [0.45, 0.30, 0.25],  # conf .45, correct -> bin (.4, .6]
])
ECE_Y = np.array([0, 0, 0, 2, 0])


def test_ece_matches_hand_worked_example_with_upper_edge_inclusive_bins():
    # (.8,1]: 2/5 * |0.5 - 0.875| = 0.15; (.6,.8]: 1/5 * |1 - 0.8| = 0.04;
    # (.4,.6]: 2/5 * |0.5 - 0.475| = 0.01  -> 0.2
    assert expected_calibration_error(ECE_PROBS, ECE_Y, n_bins=5) == pytest.approx(0.2, abs=EXACT)
    bins = reliability_bins(ECE_PROBS, ECE_Y, n_bins=5)
    assert bins["count"] == [0, 0, 2, 1, 2]
    np.testing.assert_allclose(bins["bin_upper"], [0.2, 0.4, 0.6, 0.8, 1.0], atol=EXACT)
    np.testing.assert_allclose(bins["confidence"][2:], [0.475, 0.8, 0.875], atol=EXACT)
    np.testing.assert_allclose(bins["accuracy"][2:], [0.5, 1.0, 0.5], atol=EXACT)
    assert all(math.isnan(v) for v in bins["confidence"][:2])


def test_ece_of_perfectly_confident_correct_predictions_is_zero():
    assert expected_calibration_error(np.eye(3), [0, 1, 2]) == pytest.approx(0.0, abs=EXACT)


def known_model_logits(seed: int, n: int = 4000, c: int = 4):
    """Labels drawn from softmax(z): z are calibrated logits by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, c))
    p = softmax(z)
    y = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(y, c - 1)


def test_fit_temperature_recovers_overconfidence_factor_and_lowers_ece():
    z, y = known_model_logits(7)
    temperature = fit_temperature(3 * z, y)
    assert temperature == pytest.approx(3.0, rel=0.15)
    report = calibration_report(3 * z[:2000], y[:2000], 3 * z[2000:], y[2000:])
    assert report["temperature"] == pytest.approx(3.0, rel=0.15)
    assert report["val_ece_after"] < report["val_ece_before"]
    assert report["test_ece_after"] < report["test_ece_before"]


def test_fit_temperature_is_about_one_for_calibrated_logits_and_one_for_empty_input():
    z, y = known_model_logits(8)
    assert fit_temperature(z, y) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(np.zeros((0, 4)), np.zeros(0, dtype=int)) == 1.0


def test_fit_temperature_stays_in_bounds_for_separable_logits():
    y = np.array([0, 1, 2, 0, 1, 2])
    temperature = fit_temperature(5 * np.eye(3)[y], y)
    # NLL -> 0 as T -> 0, so the fit sharpens (and stops once the gradient vanishes).
    assert 0.05 <= temperature < 1.0


def test_calibration_report_without_test_data_gives_nan_test_keys():
    z, y = known_model_logits(9, n=300)
    report = calibration_report(z, y, None, None)
    assert math.isnan(report["test_ece_before"]) and math.isnan(report["test_ece_after"])
    assert report["val_ece_before"] >= 0


# --- the report ------------------------------------------------------------------------------


def test_classification_metrics_is_flat_json_of_python_numbers():
    y, probs = random_case(10)
    result = classification_metrics(y, probs, NAMES)
    json.dumps(result)
    assert result["n"] == 80 and isinstance(result["n"], int)
    assert sum(map(sum, result["confusion"])) == 80
    assert set(result["per_class"]) == set(NAMES)
    assert all(type(v) is float for k, v in result.items()
               if k not in ("n", "confusion", "per_class"))
    nll = -np.mean(np.log(probs[np.arange(80), y]))
    assert result["nll"] == pytest.approx(nll, abs=EXACT)
    assert result["nll"] == pytest.approx(skm.log_loss(y, probs, labels=range(4)), abs=1e-6)
    assert result["macro_specificity"] == pytest.approx(
        np.mean([v["specificity"] for v in result["per_class"].values()]), abs=EXACT)


def test_nll_clips_zero_probability_of_true_class():
    result = classification_metrics([1], np.array([[1.0, 0.0]]), NAMES[:2])
    assert result["nll"] == pytest.approx(-math.log(1e-12), abs=EXACT)


def test_empty_input_gives_nan_metrics_zero_count_and_zero_confusion():
    result = classification_metrics(np.zeros(0, dtype=int), np.zeros((0, 3)), NAMES[:3])
    json.dumps(result)
    assert result["n"] == 0
    assert result["confusion"] == [[0] * 3 for _ in range(3)]
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_specificity", "macro_f1",
                "auc", "map", "ece", "nll"):
        assert math.isnan(result[key]), key
    assert result["per_class"][NAMES[0]]["support"] == 0
    assert math.isnan(result["per_class"][NAMES[0]]["f1"])
    report = calibration_report(np.zeros((0, 3)), np.zeros(0, dtype=int))
    assert report["temperature"] == 1.0 and math.isnan(report["val_ece_before"])
