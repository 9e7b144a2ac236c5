"""engine/evaluate.py: the authors' metrics on hand-computed cases, predictions, submission files and their writes."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from engine import evaluate
from engine.evaluate import (
    Accumulator,
    gqa_accuracy,
    nlvr2_accuracy,
    nlvr2_predictions_from_logits,
    predictions_from_scores,
    read_gqa_submission,
    read_nlvr2_submission,
    read_vqa_submission,
    vqa_score,
    vqa_soft_score_from_humans,
    write_gqa_submission,
    write_nlvr2_submission,
    write_vqa_submission,
)

VQA_LABELS = {
    1: {"yes": 1.0, "no": 0.3},
    2: {"2": 0.6, "3": 1.0},
    3: {},  # no answer scored: every prediction gets 0
    4: {"red": 0.9},  # never predicted: not in the denominator
}


# --- metrics ---


def test_vqa_score_hand_computed():
    predicted = {1: "no", 2: "3", 3: "blue"}
    assert vqa_score(predicted, VQA_LABELS) == pytest.approx((0.3 + 1.0 + 0.0) / 3)


def test_vqa_score_answer_absent_from_label_scores_zero():
    assert vqa_score({1: "maybe", 2: "4"}, VQA_LABELS) == 0.0


def test_gqa_accuracy_hand_computed():
    labels = {"a": {"left": 1.0}, "b": {"cat": 1.0}, "c": {"no": 1.0}, "d": {"x": 1.0}}
    assert gqa_accuracy({"a": "left", "b": "dog", "c": "no"}, labels) == pytest.approx(2 / 3)


def test_nlvr2_accuracy_hand_computed():
    labels = {"dev-1-0-0": 1, "dev-1-0-1": 0, "dev-2-0-0": 0, "dev-3-1-0": 1}
    assert nlvr2_accuracy({"dev-1-0-0": 1, "dev-1-0-1": 1, "dev-2-0-0": 0, "dev-3-1-0": 1}, labels) == 0.75


@pytest.mark.parametrize(
    "metric, labels", [(vqa_score, VQA_LABELS), (gqa_accuracy, {"a": {"x": 1.0}}), (nlvr2_accuracy, {"a": 1})]
)
def test_empty_predictions_are_an_error(metric, labels):
    with pytest.raises(ValueError, match="no predictions"):
        metric({}, labels)


@pytest.mark.parametrize(
    "metric, predicted, labels",
    [
        (vqa_score, {99: "yes"}, VQA_LABELS),
        (gqa_accuracy, {"z": "x"}, {"a": {"x": 1.0}}),
        (nlvr2_accuracy, {"z": 1}, {"a": 1}),
    ],
)
def test_unlabelled_prediction_is_an_error(metric, predicted, labels):
    with pytest.raises(KeyError, match="no label"):
        metric(predicted, labels)


@pytest.mark.parametrize("count, expected", [(0, 0.0), (1, 1 / 3), (2, 2 / 3), (3, 1.0), (7, 1.0)])
def test_soft_score_min_count_over_three(count, expected):
    humans = ["yes"] * count + ["no"] * (10 - count)
    assert vqa_soft_score_from_humans("yes", humans) == pytest.approx(expected)


def leave_one_out_by_hand(answer, humans):
    """The official evaluation literally: every 9-of-10 subset, min(matches / 3, 1), averaged."""
    subsets = list(itertools.combinations(range(len(humans)), len(humans) - 1))
    return sum(min(sum(humans[i] == answer for i in s) / 3, 1) for s in subsets) / len(subsets)


def test_soft_score_leave_one_out_two_of_ten_is_0_6():
    humans = ["yes", "yes"] + ["no"] * 8
    # Leaving out one of the 2 "yes": 1 match -> 1/3 (2 subsets); leaving out a "no": 2 -> 2/3 (8 subsets).
    by_hand = (2 * (1 / 3) + 8 * (2 / 3)) / 10
    assert by_hand == pytest.approx(0.6)
    assert vqa_soft_score_from_humans("yes", humans, leave_one_out=True) == pytest.approx(0.6)


@pytest.mark.parametrize("count", range(11))
def test_soft_score_leave_one_out_matches_enumeration(count):
    humans = ["2"] * count + [f"other{i}" for i in range(10 - count)]
    expected = leave_one_out_by_hand("2", humans)
    assert vqa_soft_score_from_humans("2", humans, leave_one_out=True) == pytest.approx(expected)


def test_soft_score_normalize_and_errors():
    assert vqa_soft_score_from_humans("two", ["2", "two", "the 2"]) == pytest.approx(1 / 3)  # exact strings
    assert vqa_soft_score_from_humans("Two", ["2", "two", "the 2"], normalize=True) == 1.0
    with pytest.raises(ValueError, match="no human answers"):
        vqa_soft_score_from_humans("yes", [])
    with pytest.raises(ValueError, match="at least 2"):
        vqa_soft_score_from_humans("yes", ["yes"], leave_one_out=True)


# --- predictions ---


@pytest.mark.parametrize("as_array", [torch.tensor, np.array])
def test_predictions_from_scores(as_array):
    label2ans = ["yes", "no", "2"]
    scores = as_array([[0.1, 0.5, 0.2], [3.0, -1.0, 3.0], [-2.0, -3.0, -1.0]])  # row 1 ties: first max wins
    predicted = predictions_from_scores(scores, label2ans, as_array([11, 12, 13]))
    assert predicted == {11: "no", 12: "yes", 13: "2"}
    assert all(type(qid) is int for qid in predicted)


def test_predictions_from_scores_bf16_and_string_ids():
    scores = torch.tensor([[0.0, 1.0], [2.0, 1.0]], dtype=torch.bfloat16)
    assert predictions_from_scores(scores, ["a", "b"], ["q1", "q2"]) == {"q1": "b", "q2": "a"}


def test_predictions_from_scores_shape_errors():
    with pytest.raises(ValueError, match="columns"):
        predictions_from_scores(torch.zeros(2, 4), ["a", "b", "c"], [1, 2])
    with pytest.raises(ValueError, match="rows"):
        predictions_from_scores(torch.zeros(3, 3), ["a", "b", "c"], [1, 2])
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        predictions_from_scores(torch.zeros(3), ["a", "b", "c"], [1, 2, 3])
    assert predictions_from_scores(torch.zeros(0, 3), ["a", "b", "c"], []) == {}


def test_nlvr2_predictions_from_logits():
    logits = torch.tensor([[0.2, 0.9], [1.0, -1.0], [0.0, 0.0]])
    assert nlvr2_predictions_from_logits(logits, ["x-0", "x-1", "x-2"]) == {"x-0": 1, "x-1": 0, "x-2": 0}
    with pytest.raises(ValueError, match="columns"):
        nlvr2_predictions_from_logits(torch.zeros(2, 3), ["a", "b"])


def test_accumulator_streams_batches_like_one_call():
    torch.manual_seed(0)
    label2ans = ["yes", "no", "2", "3"]
    qids = list(range(10))
    scores = torch.randn(10, 4)
    labels = {q: {label2ans[q % 4]: 1.0, label2ans[(q + 1) % 4]: 0.3} for q in qids}
    acc = Accumulator("vqa", label2ans=label2ans, labels=labels)
    for start in range(0, 10, 3):  # batches 3, 3, 3, 1
        acc.add(torch.tensor(qids[start : start + 3]), scores[start : start + 3])
    acc.add(torch.tensor([0]), scores[:1])  # a repeated sample (DistributedSampler padding) counts once
    whole = predictions_from_scores(scores, label2ans, qids)
    assert acc.predictions == whole
    assert acc.result() == pytest.approx(vqa_score(whole, labels))


def test_accumulator_gqa_nlvr2_and_errors(tmp_path):
    acc = Accumulator("gqa", label2ans=["left", "right"], labels={"q1": {"left": 1.0}, "q2": {"left": 1.0}})
    acc.add(["q1", "q2"], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert acc.result() == 0.5
    nlvr2 = Accumulator("nlvr2", labels={"a": 1, "b": 1})
    nlvr2.add(["a", "b"], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert nlvr2.result() == 0.5
    nlvr2.write_submission(tmp_path / "nlvr2.csv")
    assert (tmp_path / "nlvr2.csv").read_text() == "a,True\nb,False\n"
    with pytest.raises(ValueError, match="no labels"):
        Accumulator("vqa", label2ans=["a"]).result()
    with pytest.raises(ValueError, match="no predictions"):
        Accumulator("vqa", label2ans=["a"], labels={1: {}}).result()
    with pytest.raises(ValueError, match="unknown task"):
        Accumulator("vqa2")
    with pytest.raises(ValueError, match="label2ans"):
        Accumulator("gqa")


# --- submission files ---


def test_vqa_submission_format_and_round_trip(tmp_path):
    path = tmp_path / "sub" / "vqa.json"
    predictions = {262148000: "yes", 7: "2"}
    write_vqa_submission(path, predictions)
    rows = json.loads(path.read_text())
    assert rows == [{"question_id": 262148000, "answer": "yes"}, {"question_id": 7, "answer": "2"}]
    assert all(type(row["question_id"]) is int for row in rows)
    assert read_vqa_submission(path) == predictions
    write_vqa_submission(path, {"12": "no"})  # string ids from a JSON file still come out as int
    assert json.loads(path.read_text()) == [{"question_id": 12, "answer": "no"}]


def test_gqa_submission_format_and_round_trip(tmp_path):
    path = tmp_path / "gqa.json"
    predictions = {"201307251": "left", "20968451": "no"}
    write_gqa_submission(path, predictions)
    rows = json.loads(path.read_text())
    assert rows == [{"questionId": "201307251", "prediction": "left"}, {"questionId": "20968451", "prediction": "no"}]
    write_gqa_submission(path, {5: "yes"})  # an int id is written as a string
    assert json.loads(path.read_text()) == [{"questionId": "5", "prediction": "yes"}]
    write_gqa_submission(path, predictions)
    assert read_gqa_submission(path) == predictions


def test_nlvr2_submission_format_and_round_trip(tmp_path):
    path = tmp_path / "nlvr2.csv"
    predictions = {"test1-0-1-0": 1, "test1-0-1-1": 0, "test1-1-0-2": 1}
    write_nlvr2_submission(path, predictions)
    assert path.read_text() == "test1-0-1-0,True\ntest1-0-1-1,False\ntest1-1-0-2,True\n"
    assert read_nlvr2_submission(path) == predictions
    with pytest.raises(ValueError, match="0 or 1"):
        write_nlvr2_submission(path, {"x": 2})
    assert read_nlvr2_submission(path) == predictions  # the refused write left the file alone
    path.write_text("x,maybe\n")
    with pytest.raises(ValueError, match="identifier,True|False"):
        read_nlvr2_submission(path)


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "vqa.json"
    write_vqa_submission(path, {1: "yes"})
    old = path.read_text()

    def broken_dump(obj, f, *args, **kwargs):
        f.write("[{")  # a partial write must never reach the real file
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_vqa_submission(path, {1: "no", 2: "3"})
    with pytest.raises(OSError, match="disk full"):
        write_gqa_submission(tmp_path / "gqa.json", {"1": "no"})
    assert path.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqa.json"]  # no temporary files left behind
    assert evaluate.json.dump is broken_dump  # the writer really went through the patched json.dump
