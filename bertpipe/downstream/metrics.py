"""Each task's metrics as GLUE reports them, the majority-class floor, and the rule of the aggregate score.

The formulas are scikit-learn's and scipy's, as Hugging Face `evaluate`'s `glue` metric (@3a62fc3f) calls them:
accuracy, F1 of the positive class (MRPC, QQP), Matthews correlation (CoLA), Pearson and Spearman correlation
(STS-B); your own tasks add macro-F1 (every class counts alike). Scores are on GLUE's scale, x100. A constant
prediction (the majority class, a collapsed model) has no correlation with the labels: scipy calls Pearson's
and Spearman's undefined (nan) there, and it is scored 0, as scikit-learn scores Matthews' correlation.

The aggregate (`glue_score`) follows GLUE's own: each task's score is the mean of its metrics (MRPC: accuracy
and F1; MNLI: matched and mismatched accuracy), each metric the median over fine-tuning seeds, and the
aggregate is the mean over the GLUE tasks run. Your own tasks are reported beside it, not in it.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def _correlation(formula: Callable[..., object]) -> Callable[[np.ndarray, np.ndarray], float]:
    def score(labels: np.ndarray, predictions: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            value = float(formula(labels, predictions).statistic)
        return 0.0 if math.isnan(value) else value

    return score


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda y, p: float(accuracy_score(y, p)),
    "f1": lambda y, p: float(f1_score(y, p, zero_division=0.0)),
    "macro_f1": lambda y, p: float(f1_score(y, p, average="macro", zero_division=0.0)),
    "matthews_correlation": lambda y, p: float(matthews_corrcoef(y, p)),
    "pearson": _correlation(pearsonr),
    "spearmanr": _correlation(spearmanr),
}
SCORE_RULE = ("mean over the GLUE tasks run of each task's dev score (the mean of its metrics: MRPC and QQP "
              "accuracy and F1, STS-B Pearson and Spearman, MNLI matched and mismatched accuracy), each metric the "
              "median over seeds, x100; WNLI and your own tasks left out")


def metric_name(metric: str, split: str) -> str:
    """`accuracy` on `validation`; `accuracy_matched` on MNLI's `validation_matched`."""
    return metric if split == "validation" else f"{metric}_{split.removeprefix('validation_')}"


def score(metrics: Sequence[str], split: str, labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """`metrics` of `predictions` (class ids, or scores) against `labels` on one split, x100.

    Args:
        metrics: names in METRICS.
        split: the dev split's name, which suffixes the metric names (`metric_name`).
        labels, predictions: [N] class ids (int) or scores (float).
    """
    return {metric_name(m, split): 100.0 * METRICS[m](labels, predictions) for m in metrics}


def majority(metrics: Sequence[str], train_labels: np.ndarray, dev: Mapping[str, np.ndarray],
             regression: bool) -> dict[str, float]:
    """The floor no model should fall below: every dev example given the train split's most frequent class
    (the lowest id among ties), or for a score the train split's mean."""
    if regression:
        guess: float = float(np.mean(train_labels))
    else:
        guess = int(np.bincount(train_labels.astype(np.int64)).argmax())
    out: dict[str, float] = {}
    for split, labels in dev.items():
        out |= score(metrics, split, labels, np.full(len(labels), guess))
    return out


def task_score(values: Mapping[str, float]) -> float:
    """A task's one number: the mean of its metrics (GLUE's rule for tasks with two)."""
    return statistics.fmean(values.values())


def median_and_spread(per_seed: Sequence[Mapping[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per metric, the median over seeds and the spread (max - min)."""
    names = per_seed[0].keys()
    medians = {n: statistics.median(run[n] for run in per_seed) for n in names}
    spreads = {n: max(run[n] for run in per_seed) - min(run[n] for run in per_seed) for n in names}
    return medians, spreads
