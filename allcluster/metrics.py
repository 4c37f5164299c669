"""Classification and calibration metrics for C-class problems, in plain numpy.

Conventions: ``y_true`` is an int array of labels in ``[0, C)``, ``probs`` an ``(N, C)`` array of
class probabilities and ``logits`` an ``(N, C)`` array of unnormalised scores. Per-class metrics
are one-vs-rest. Undefined values are ``float('nan')``; divisions by zero in precision, recall,
specificity and F1 give 0.0 (scikit-learn's ``zero_division=0``).

torch is imported only inside :func:`fit_temperature`, so importing this module stays cheap.
"""
from __future__ import annotations

import math

import numpy as np

NLL_EPS = 1e-12
# What training records per split and epoch (<split>_<metric> columns) and a trial row per split.
EVAL_METRICS = ("loss", "accuracy", "macro_f1", "auc", "macro_specificity", "ece")
T_MIN, T_MAX = 0.05, 100.0

# ---------------------------------------------------------------------------------------------
# Input helpers


def _labels(y_true) -> np.ndarray:
    return np.asarray(y_true, dtype=np.int64).reshape(-1)


def _probs(probs, n: int | None = None) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"expected a 2-D (N, C) array, got shape {probs.shape}")
    if n is not None and probs.shape[0] != n:
        raise ValueError(f"{probs.shape[0]} rows of scores for {n} labels")
    return probs


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _nanmean(values) -> float:
    """Mean ignoring NaN; NaN (without a RuntimeWarning) when every value is NaN."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# ---------------------------------------------------------------------------------------------
# Probabilities and counts


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``; subtracts the row maximum for stability."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if z.size:
        z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``(C, C)`` int64 counts; rows are true classes, columns predicted classes."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} true labels but {y_pred.size} predictions")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def per_class_prf_specificity(cm: np.ndarray) -> dict:
    """Per-class precision, recall, specificity, F1 and support from a confusion matrix.

    Zero divisions give 0.0, as scikit-learn does with ``zero_division=0``.
    """
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    fp, fn = predicted - tp, support - tp
    tn = cm.sum() - tp - fp - fn
    return {
        "precision": _safe_div(tp, predicted),
        "recall": _safe_div(tp, support),
        "specificity": _safe_div(tn, tn + fp),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "support": support,
    }


# ---------------------------------------------------------------------------------------------
# Ranking metrics


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(scores)[positive].sum()
    # Mann-Whitney U of the positives over the negatives, normalised to [0, 1].
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(y_true, probs) -> np.ndarray:
    """Per-class one-vs-rest ROC AUC (rank formula, ties at average rank).

    NaN for a class with no positives or no negatives.
    """
    y_true = _labels(y_true)
    probs = _probs(probs, y_true.size)
    return np.array([_binary_auc(y_true == k, probs[:, k]) for k in range(probs.shape[1])])


def _binary_average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, hit = scores[order], positive[order]
    # One operating point per distinct score: the last index of each run of equal scores.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tps = np.cumsum(hit)[last]
    precision = tps / (last + 1.0)
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision_ovr(y_true, probs) -> np.ndarray:
    """Per-class one-vs-rest average precision, ``sum_n (R_n - R_{n-1}) P_n``.

    Matches scikit-learn's ``average_precision_score``: one threshold per distinct score, no
    interpolation. NaN for a class with no positives.
    """
    y_true = _labels(y_true)
    probs = _probs(probs, y_true.size)
    return np.array([_binary_average_precision(y_true == k, probs[:, k])
                     for k in range(probs.shape[1])])


# ---------------------------------------------------------------------------------------------
# Calibration


def reliability_bins(probs, y_true, n_bins: int = 15) -> dict:
    """Top-label reliability per bin, as lists: bin_lower, bin_upper, confidence, accuracy, count.

    Bins are the equal-width half-open intervals ``((m-1)/M, m/M]`` for ``m = 1..M``, so a
    confidence exactly on an edge falls in the lower bin (a confidence of 0, impossible for a
    top-label probability, is put in the first bin). ``confidence`` and ``accuracy`` are the bin
    means, NaN for an empty bin.
    """
    y_true = _labels(y_true)
    probs = _probs(probs, y_true.size)
    edges = np.arange(n_bins + 1) / n_bins  # exact k/M, so literal edges compare as expected
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bin_idx = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bin_idx, minlength=n_bins)
    conf_sum = np.bincount(bin_idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(bin_idx, weights=correct.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, acc_sum / count, np.nan)
    return {
        "bin_lower": edges[:-1].tolist(),
        "bin_upper": edges[1:].tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": mean_acc.tolist(),
        "count": [int(c) for c in count],
    }


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017, eq. 3): ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|``.

    Binning as in :func:`reliability_bins`: ``n_bins`` equal-width bins ``((m-1)/M, m/M]`` over
    the top-label confidence. NaN for empty input.
    """
    bins = reliability_bins(probs, y_true, n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    n = count.sum()
    if n == 0:
        return float("nan")
    gap = np.abs(np.nan_to_num(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"])))
    return float(np.sum(count / n * gap))


def fit_temperature(logits, y_true, max_iter: int = 200) -> float:
    """Scalar temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Optimises ``log T`` (so ``T > 0``) with float64 L-BFGS from ``T = 1``; the result is clamped
    to ``[0.05, 100]``. Returns 1.0 for empty input or a failed fit.
    """
    import torch
    import torch.nn.functional as F

    y_true = _labels(y_true)
    logits = _probs(logits, y_true.size)
    if y_true.size == 0:
        return 1.0
    z = torch.from_numpy(logits)
    y = torch.from_numpy(y_true)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # Clamping inside the loss keeps exp() finite if a line search probes far out.
        loss = F.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach())
    if not math.isfinite(value):
        return 1.0
    return float(min(max(math.exp(min(max(value, lo), hi)), T_MIN), T_MAX))


# ---------------------------------------------------------------------------------------------
# Reports


def _nll(probs: np.ndarray, y_true: np.ndarray) -> float:
    if y_true.size == 0:
        return float("nan")
    p_true = probs[np.arange(y_true.size), y_true]
    return float(-np.mean(np.log(np.clip(p_true, NLL_EPS, None))))


def classification_metrics(y_true, probs, class_names: list[str]) -> dict:
    """A flat, JSON-serialisable summary of predictions ``argmax(probs)`` against ``y_true``.

    Keys: accuracy, macro_precision, macro_recall, macro_specificity, macro_f1 (unweighted means
    over the classes that occur in ``y_true`` or in the predictions, scikit-learn's default: a class
    absent from both, e.g. from an evaluation set holding some classes only, is no 0 in them;
    specificity also only over classes with negatives, NaN when none has), auc and map (means of the per-class one-vs-rest AUC / AP, ignoring NaN),
    ece, nll (mean of ``-log p_true``, p clipped at 1e-12), n, confusion (list of lists, rows
    true) and per_class ``{name: {precision, recall, specificity, f1, auc, ap, support}}``.
    With ``N = 0`` every float is NaN and the confusion matrix is all zeros.
    """
    y_true = _labels(y_true)
    probs = _probs(probs, y_true.size)
    num_classes = len(class_names)
    if probs.shape[1] != num_classes:
        raise ValueError(f"{probs.shape[1]} probability columns for {num_classes} class names")
    n = int(y_true.size)
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    prf = per_class_prf_specificity(cm)
    auc, ap = roc_auc_ovr(y_true, probs), average_precision_ovr(y_true, probs)
    if n == 0:
        for key in ("precision", "recall", "specificity", "f1"):
            prf[key] = np.full(num_classes, np.nan)

    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    with_negatives = seen & (n - cm.sum(axis=1) > 0)   # specificity of a class with no negatives is 0/0

    def macro(values, over: np.ndarray = seen) -> float:
        return float(np.mean(values[over])) if n and over.any() else float("nan")

    per_class = {
        name: {"precision": float(prf["precision"][k]), "recall": float(prf["recall"][k]),
               "specificity": float(prf["specificity"][k]), "f1": float(prf["f1"][k]),
               "auc": float(auc[k]), "ap": float(ap[k]), "support": int(prf["support"][k])}
        for k, name in enumerate(class_names)
    }
    return {
        "accuracy": float(np.trace(cm) / n) if n else float("nan"),
        "macro_precision": macro(prf["precision"]),
        "macro_recall": macro(prf["recall"]),
        "macro_specificity": macro(prf["specificity"], with_negatives),
        "macro_f1": macro(prf["f1"]),
        "auc": _nanmean(auc),
        "map": _nanmean(ap),
        "ece": expected_calibration_error(probs, y_true),
        "nll": _nll(probs, y_true),
        "n": n,
        "confusion": [[int(v) for v in row] for row in cm],
        "per_class": per_class,
    }


def calibration_report(val_logits, val_y, test_logits=None, test_y=None) -> dict:
    """Fit a temperature on validation logits; top-label ECE before and after, val and test.

    Test ECEs are NaN when there is no test data (``None`` or zero rows).
    """
    temperature = fit_temperature(val_logits, val_y)

    def eces(logits, y) -> tuple[float, float]:
        if logits is None or y is None or _labels(y).size == 0:
            return float("nan"), float("nan")
        return (expected_calibration_error(softmax(logits), y),
                expected_calibration_error(softmax(logits, temperature), y))

    val_before, val_after = eces(val_logits, val_y)
    test_before, test_after = eces(test_logits, test_y)
    return {"temperature": float(temperature),
            "val_ece_before": val_before, "val_ece_after": val_after,
            "test_ece_before": test_before, "test_ece_after": test_after}
