"""Every metric against a value worked out by hand, the majority-class floor, and the aggregate's rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bertpipe.downstream.downstream import TaskResult, build_report
from bertpipe.downstream.finetune import Outcome
from bertpipe.downstream.metrics import majority, median_and_spread, metric_name, score, task_score
from bertpipe.downstream.tasks import TaskData


def one(metric: str, labels: list, predictions: list) -> float:
    return score([metric], "validation", np.array(labels), np.array(predictions))[metric]


def test_accuracy() -> None:
    assert one("accuracy", [1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(75.0)  # 3 of 4


def test_f1_of_the_positive_class() -> None:
    # TP 2 (rows 0, 3), FP 1 (row 1), FN 1 (row 2): precision 2/3, recall 2/3, F1 2/3
    assert one("f1", [1, 0, 1, 1], [1, 1, 0, 1]) == pytest.approx(200 / 3)


def test_macro_f1_weighs_every_class_alike() -> None:
    # class 0: P 1, R 1/2, F1 2/3; class 1: P 1/2, R 1, F1 2/3; class 2: F1 1 -> (2/3 + 2/3 + 1) / 3 = 7/9
    assert one("macro_f1", [0, 0, 1, 2], [0, 1, 1, 2]) == pytest.approx(700 / 9)


def test_matthews_correlation() -> None:
    # TP 1, TN 2, FP 0, FN 1: (1*2 - 0*1) / sqrt((1+0)(1+1)(2+0)(2+1)) = 2 / sqrt(12)
    assert one("matthews_correlation", [1, 1, 0, 0], [1, 0, 0, 0]) == pytest.approx(100 * 2 / math.sqrt(12))


def test_pearson() -> None:
    # x - mean = (-1, 0, 1), y - mean = (-4/3, -1/3, 5/3): cov 3, var 2 and 14/3 -> 3 / sqrt(28/3)
    assert one("pearson", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(100 * 3 / math.sqrt(28 / 3))


def test_spearman() -> None:
    # rank differences (0, 1, -1, 0): 1 - 6 * 2 / (4 * 15) = 0.8
    assert one("spearmanr", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(80.0)


@pytest.mark.parametrize("metric", ["pearson", "spearmanr", "matthews_correlation"])
def test_a_constant_prediction_has_no_correlation(metric: str) -> None:
    labels = [0, 1, 1, 0] if metric == "matthews_correlation" else [0.5, 1.0, 4.0, 2.0]
    assert one(metric, labels, [1] * 4 if metric == "matthews_correlation" else [2.0] * 4) == 0.0


def test_mnli_names_its_two_dev_sets() -> None:
    assert metric_name("accuracy", "validation") == "accuracy"
    assert metric_name("accuracy", "validation_matched") == "accuracy_matched"
    assert metric_name("accuracy", "validation_mismatched") == "accuracy_mismatched"


def test_majority_class_and_mean() -> None:
    floor = majority(["accuracy", "f1"], np.array([0, 1, 1, 1]), {"validation": np.array([1, 0, 0, 1])}, False)
    assert floor == pytest.approx({"accuracy": 50.0, "f1": 100 * 2 / 3})  # always 1: P 1/2, R 1
    regression = majority(["pearson"], np.array([1.0, 3.0]), {"validation": np.array([0.0, 5.0])}, True)
    assert regression == {"pearson": 0.0}


def test_median_and_spread_over_seeds() -> None:
    medians, spreads = median_and_spread([{"accuracy": 70.0}, {"accuracy": 80.0}, {"accuracy": 74.0}])
    assert medians == {"accuracy": 74.0} and spreads == {"accuracy": 10.0}


def task(name: str, metrics: tuple[str, ...], glue: bool = True) -> TaskData:
    return TaskData(name, glue, ("no", "yes"), metrics, False, {"train": 10, "validation": 4}, {}, None)


def outcome(**scores: float) -> Outcome:
    return Outcome(scores, [], 1.0, 100.0)


def test_the_aggregate_is_the_mean_of_task_scores_over_glue_tasks_only() -> None:
    """MRPC's score is the mean of its accuracy and F1, each the median over seeds; your own task is left out."""
    mrpc = TaskResult(task("mrpc", ("accuracy", "f1")), majority={"accuracy": 68.0, "f1": 81.0})
    mrpc.runs = {("pretrained", 0): outcome(accuracy=70.0, f1=80.0), ("pretrained", 1): outcome(accuracy=74.0, f1=84.0),
                 ("pretrained", 2): outcome(accuracy=90.0, f1=82.0), ("random", 0): outcome(accuracy=60.0, f1=70.0)}
    rte = TaskResult(task("rte", ("accuracy",)), majority={"accuracy": 52.0})
    rte.runs = {("pretrained", 0): outcome(accuracy=60.0), ("random", 0): outcome(accuracy=50.0)}
    mine = TaskResult(task("mine", ("accuracy",), glue=False), majority={"accuracy": 10.0})
    mine.runs = {("pretrained", 0): outcome(accuracy=99.0), ("random", 0): outcome(accuracy=1.0)}
    report = build_report([mrpc, rte, mine], 1.0, "cpu", "fp32")
    assert report["mrpc"]["accuracy"] == 74.0 and report["mrpc"]["accuracy_spread"] == 20.0
    assert report["mrpc"]["score"] == 78.0 and report["mrpc"]["seeds"] == 3  # (74 + 82) / 2
    assert report["glue_score"] == 69.0  # (78 + 60) / 2: `mine` is not GLUE
    assert report["glue_score_random_init"] == 57.5 and report["glue_score_majority"] == pytest.approx(63.25)
    assert report["mine"]["score"] == 99.0 and "GLUE" in report["score_rule"]
    assert task_score({"pearson": 80.0, "spearmanr": 78.0}) == 79.0
