"""The evaluation's figures, as pure numpy functions on arrays of labels, logits and probabilities:
accuracy, top-k, bootstrap intervals, per-class precision/recall/F1, confusion, calibration (ECE, NLL,
Brier) and McNemar's exact test."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cifarkit.evaluation.config import CALIBRATION_BINS

BOOTSTRAP_RESAMPLES = 10_000  # an end's standard deviation over seeds: 0.012 points at N = 10,000, 69 %
BOOTSTRAP_SEED = 0
CONFIDENCE_LEVEL = 0.95


# ---------------------------------------------------------------------------------------------------------
# Metrics: pure numpy, on arrays of labels, logits and probabilities
# ---------------------------------------------------------------------------------------------------------


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class, value = images."""
    idx = np.asarray(y_true, np.int64) * num_classes + np.asarray(y_pred, np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(confusion: np.ndarray) -> float:
    """Fraction on the diagonal (0.0 for an empty matrix)."""
    total = int(confusion.sum())
    return float(np.trace(confusion)) / total if total else 0.0


def predicted_classes(logits: np.ndarray) -> np.ndarray:
    """int64 [N]: the most likely class; a tie goes to the lower index, as Classifier ranks."""
    return np.argmax(logits, axis=1).astype(np.int64)


def top_k_hits(logits: np.ndarray, y_true: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: the true class is among the k largest logits (stable ranking: ties to the lower index)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # [N, k]
    return (order == np.asarray(y_true)[:, None]).any(axis=1)


def bootstrap_interval(
    successes: int,
    n: int,
    *,
    confidence: float = CONFIDENCE_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of an accuracy (successes of n). Resampling n right/wrong outcomes with
    replacement gives a success count that is exactly Binomial(n, successes / n), so each resample is drawn as
    that: the same distribution as resampling indices, in O(resamples) rather than O(n * resamples)."""
    if n <= 0:
        return (0.0, 0.0)
    draws = np.random.default_rng(seed).binomial(n, successes / n, size=resamples) / n
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(draws, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class ClassScores:
    """One class's figures. A ratio with a zero denominator is None (no images of the class, or none
    predicted as it)."""

    name: str
    support: int  # images of this class
    correct: int  # of those, predicted as this class
    predicted: int  # images predicted as this class
    precision: float | None  # correct / predicted
    recall: float | None  # correct / support: the blog's per-class accuracy
    f1: float | None  # harmonic mean of precision and recall (0 when both are 0)


def per_class_scores(confusion: np.ndarray, class_names: tuple[str, ...] | list[str]) -> list[ClassScores]:
    """Precision, recall and F1 of every class from a confusion matrix (rows true, columns predicted)."""
    out = []
    for i, name in enumerate(class_names):
        tp, support, predicted = int(confusion[i, i]), int(confusion[i].sum()), int(confusion[:, i].sum())
        precision = tp / predicted if predicted else None
        recall = tp / support if support else None
        if precision is None or recall is None:
            f1 = None
        else:
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append(ClassScores(name, support, tp, predicted, precision, recall, f1))
    return out


def macro_average(scores: list[ClassScores]) -> tuple[float, float, float]:
    """(precision, recall, F1) averaged over the classes that have images; a class with images that was
    never predicted counts as precision 0 and F1 0 (scikit-learn's zero_division=0)."""
    present = [s for s in scores if s.support]
    if not present:
        return (0.0, 0.0, 0.0)
    mean = [sum((getattr(s, f) or 0.0) for s in present) / len(present) for f in ("precision", "recall", "f1")]
    return mean[0], mean[1], mean[2]


@dataclass(frozen=True)
class ConfusedPair:
    true: str
    predicted: str
    count: int  # images of `true` predicted as `predicted`
    fraction: float  # of the images of `true`


def most_confused(confusion: np.ndarray, class_names: tuple[str, ...] | list[str], n: int = 10) -> list[ConfusedPair]:
    """The n largest off-diagonal cells, largest first (ties by true class, then predicted class)."""
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    rows, cols = np.nonzero(off)
    counts = off[rows, cols]
    order = np.lexsort((cols, rows, -counts))[:n]  # the last key sorts first
    support = confusion.sum(axis=1)
    return [
        ConfusedPair(class_names[i], class_names[j], int(c), int(c) / int(support[i]))
        for i, j, c in zip(rows[order].tolist(), cols[order].tolist(), counts[order].tolist(), strict=True)
    ]


def calibration_counts(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """float64 [3, bins]: images, summed confidence and summed correctness per equal-width confidence bin
    (bin m holds confidences in ((m-1)/bins, m/bins]; 0 goes to the first). Additive over batches."""
    conf = np.asarray(confidence, np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = np.zeros((3, bins), np.float64)
    out[0] = np.bincount(idx, minlength=bins)
    out[1] = np.bincount(idx, weights=conf, minlength=bins)
    out[2] = np.bincount(idx, weights=np.asarray(correct, np.float64), minlength=bins)
    return out


def ece_from_counts(counts: np.ndarray) -> float:
    """Expected calibration error: sum over bins of (images in bin / N) * |accuracy - mean confidence|,
    which is sum |correct - confidence sums| / N."""
    n = counts[0].sum()
    return float(np.abs(counts[2] - counts[1]).sum() / n) if n else 0.0


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    return ece_from_counts(calibration_counts(confidence, correct, bins))


def nll_per_image(logits: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """float64 [N]: -ln p(true class), from the logits (log-softmax in float64, so that a confident mistake
    costs its real value instead of -ln 0 from a probability rounded to zero)."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return lse - z[np.arange(len(z)), np.asarray(y_true)]


def negative_log_likelihood(logits: np.ndarray, y_true: np.ndarray) -> float:
    return float(nll_per_image(logits, y_true).mean()) if len(logits) else 0.0


def brier_per_image(probs: np.ndarray, y_true: np.ndarray) -> np.ndarray:
    """float64 [N]: sum over classes of (p_c - [c is the true class])^2, in [0, 2] (Brier, 1950)."""
    p = np.asarray(probs, np.float64)
    return (p * p).sum(axis=1) - 2.0 * p[np.arange(len(p)), np.asarray(y_true)] + 1.0


def brier_score(probs: np.ndarray, y_true: np.ndarray) -> float:
    return float(brier_per_image(probs, y_true).mean()) if len(probs) else 0.0


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact test: two-sided p-value of b and c, the images only one of two models got right, under
    the null hypothesis that either model is as likely to be the one (a binomial test of min(b, c) in b + c
    at 1/2; scipy.stats.binomtest gives the same). Summed in log space, so b + c in the millions is fine."""
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0 or 2 * k >= n:
        return 1.0
    i = np.arange(k + 1, dtype=np.float64)
    log_pmf = math.lgamma(n + 1) - _lgamma(i + 1) - _lgamma(n - i + 1) - n * math.log(2.0)
    top = log_pmf.max()
    return float(min(1.0, 2.0 * math.exp(top) * np.exp(log_pmf - top).sum()))


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.array([math.lgamma(v) for v in x.tolist()])
