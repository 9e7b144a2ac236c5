"""Fine-tuning metrics as the authors compute them, predictions from scores, and the submission files.

    predictions = predictions_from_scores(logits_NC, label2ans, question_ids)   # {qid: answer}
    vqa_score(predictions, labels)                # labels: {qid: {answer: soft score}}
    write_vqa_submission("out/test_predict.json", predictions)

The metrics follow the authors' evaluators (airsplay/lxmert src/tasks/*_data.py), which score the questions
that were predicted, not the whole label file:
- VQA (VQAEvaluator.evaluate): sum over predicted questions of label.get(answer, 0), divided by their number.
  The label dicts already hold soft scores; `vqa_soft_score_from_humans` computes such a score from the raw
  human answers: min(#humans that said it / 3, 1), or the official evaluation's average of that over the
  leave-one-out subsets (10 choose 9 for VQA's ten answers).
- GQA (GQAEvaluator.evaluate): 1 when the answer is in the label dict ({answer: 1.0}), else 0; the mean.
- NLVR2 (NLVR2Evaluator.evaluate): 1 when the 0/1 prediction equals the label; the mean.

An empty prediction set is an error, as is a predicted id the labels lack (the authors raise KeyError there).
Answers are compared as given: normalise them (lxmert.answers.normalize_answer) before, where wanted.

Submission files, written atomically (a temporary file in the same directory, fsynced, renamed):
VQA a JSON list of {"question_id": int, "answer": str}; GQA a JSON list of {"questionId": str, "prediction":
str}; NLVR2 CSV lines "identifier,True|False" without a header (the authors' NLVR2Evaluator.dump_result).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.atomic import write_atomic
from lxmert.answers import normalize_answer

Task = Literal["vqa", "gqa", "nlvr2"]


# --- metrics -----------------------------------------------------------------------------------------------


def _check_predicted(predicted: Mapping, labels: Mapping, what: str) -> None:
    if not predicted:
        raise ValueError(f"{what}: no predictions to evaluate")
    missing = [key for key in predicted if key not in labels]
    if missing:
        raise KeyError(f"{what}: {len(missing)} predicted ids have no label, e.g. {missing[:5]!r}")


def vqa_score(predicted_answers: Mapping[Hashable, str], labels: Mapping[Hashable, Mapping[str, float]]) -> float:
    """Mean soft score of the predicted answers: label[qid].get(answer, 0) averaged over the predicted qids."""
    _check_predicted(predicted_answers, labels, "vqa_score")
    total = sum(labels[qid].get(answer, 0.0) for qid, answer in predicted_answers.items())
    return total / len(predicted_answers)


def gqa_accuracy(predicted: Mapping[Hashable, str], labels: Mapping[Hashable, Mapping[str, float]]) -> float:
    """Share of predicted questions whose answer is a key of their label dict."""
    _check_predicted(predicted, labels, "gqa_accuracy")
    return sum(answer in labels[qid] for qid, answer in predicted.items()) / len(predicted)


def nlvr2_accuracy(predicted: Mapping[str, int], labels: Mapping[str, int]) -> float:
    """Share of predicted statements whose 0/1 prediction equals the label."""
    _check_predicted(predicted, labels, "nlvr2_accuracy")
    return sum(int(answer) == int(labels[key]) for key, answer in predicted.items()) / len(predicted)


def vqa_soft_score_from_humans(
    answer: str, human_answers: Sequence[str], leave_one_out: bool = False, normalize: bool = False
) -> float:
    """The VQA soft score of one answer given the human answers.

    leave_one_out=False: min(#humans that gave `answer` / 3, 1), the score the authors' label files store.
    leave_one_out=True: the official VQA evaluation (vqaEval.py): for each human, min(#other humans that gave
    it / 3, 1); the mean over the humans, i.e. over the 10-choose-9 subsets of ten answers. The two differ
    only when 1 to 3 humans gave the answer (2 of 10: 2/3 plain, (2 * 1/3 + 8 * 2/3) / 10 = 0.6 official).
    normalize: pass the answer and the human answers through lxmert.answers.normalize_answer first.
    """
    if not human_answers:
        raise ValueError("vqa_soft_score_from_humans: no human answers")
    if normalize:
        answer = normalize_answer(answer)
        human_answers = [normalize_answer(a) for a in human_answers]
    matches = sum(a == answer for a in human_answers)
    if not leave_one_out:
        return min(matches / 3, 1.0)
    if len(human_answers) < 2:
        raise ValueError("vqa_soft_score_from_humans: leave_one_out needs at least 2 human answers")
    # Leaving out a matching human removes one match; leaving out another keeps all of them.
    left_out_match = min((matches - 1) / 3, 1.0)
    left_out_other = min(matches / 3, 1.0)
    return (matches * left_out_match + (len(human_answers) - matches) * left_out_other) / len(human_answers)


# --- predictions -------------------------------------------------------------------------------------------


def _argmax(scores: Any, n_ids: int, n_classes: int | None, what: str) -> list[int]:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach()
        shape = tuple(scores.shape)
    else:
        scores = np.asarray(scores)
        shape = scores.shape
    if len(shape) != 2:
        raise ValueError(f"{what}: scores must be [N, C], got shape {shape}")
    if shape[0] != n_ids:
        raise ValueError(f"{what}: {shape[0]} score rows for {n_ids} ids")
    if n_classes is not None and shape[1] != n_classes:
        raise ValueError(f"{what}: {shape[1]} score columns for {n_classes} labels")
    if shape[0] == 0:
        return []
    # Ties go to the first maximum in both torch and numpy.
    return scores.argmax(-1).tolist()


def _id_list(ids: Any) -> list:
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        return ids.tolist()
    return list(ids)


def predictions_from_scores(scores: Any, label2ans: Sequence[str], question_ids: Any) -> dict[Hashable, str]:
    """{question id: label2ans[argmax]} for scores [N, C] (tensor or array) and N question ids."""
    ids = _id_list(question_ids)
    labels = _argmax(scores, len(ids), len(label2ans), "predictions_from_scores")
    return {qid: label2ans[label] for qid, label in zip(ids, labels)}


def nlvr2_predictions_from_logits(logits: Any, identifiers: Any) -> dict[Hashable, int]:
    """{identifier: 0 or 1} from the NLVR2 head's logits [N, 2] (column 1 is True)."""
    ids = _id_list(identifiers)
    return dict(zip(ids, _argmax(logits, len(ids), 2, "nlvr2_predictions_from_logits")))


class Accumulator:
    """Streams predictions over evaluation batches, then scores them or writes the submission.

        acc = Accumulator("vqa", label2ans=label2ans, labels=labels)
        for batch in loader: acc.add(batch["question_id"], model(**batch))
        score = acc.result()

    An id added twice keeps its last prediction (DistributedSampler repeats samples to even out ranks).
    labels may be None for a test split: then only the predictions and the submission are available.
    """

    def __init__(self, task: Task, label2ans: Sequence[str] | None = None, labels: Mapping | None = None):
        if task not in ("vqa", "gqa", "nlvr2"):
            raise ValueError(f"Accumulator: unknown task {task!r}, expected vqa, gqa or nlvr2")
        if task != "nlvr2" and label2ans is None:
            raise ValueError(f"Accumulator: the {task} task needs label2ans")
        self.task = task
        self.label2ans = label2ans
        self.labels = labels
        self.predictions: dict[Hashable, Any] = {}

    def add(self, ids: Any, scores: Any) -> None:
        if self.task == "nlvr2":
            self.predictions.update(nlvr2_predictions_from_logits(scores, ids))
        else:
            self.predictions.update(predictions_from_scores(scores, self.label2ans, ids))

    def result(self) -> float:
        if self.labels is None:
            raise ValueError("Accumulator.result: no labels were given (a test split?)")
        metric = {"vqa": vqa_score, "gqa": gqa_accuracy, "nlvr2": nlvr2_accuracy}[self.task]
        return metric(self.predictions, self.labels)

    def write_submission(self, path: str | Path) -> None:
        writer = {"vqa": write_vqa_submission, "gqa": write_gqa_submission, "nlvr2": write_nlvr2_submission}
        writer[self.task](path, self.predictions)


# --- submission files --------------------------------------------------------------------------------------


def write_vqa_submission(path: str | Path, predictions: Mapping[Hashable, str]) -> None:
    """[{"question_id": int, "answer": str}, ...] in the predictions' order."""
    rows = [{"question_id": int(qid), "answer": str(answer)} for qid, answer in predictions.items()]
    write_atomic(path, lambda f: json.dump(rows, f))


def write_gqa_submission(path: str | Path, predictions: Mapping[Hashable, str]) -> None:
    """[{"questionId": str, "prediction": str}, ...] in the predictions' order."""
    rows = [{"questionId": str(qid), "prediction": str(answer)} for qid, answer in predictions.items()]
    write_atomic(path, lambda f: json.dump(rows, f))


def write_nlvr2_submission(path: str | Path, predictions: Mapping[str, int]) -> None:
    """Lines "identifier,True" or "identifier,False" (prediction 1 is True), no header."""
    for answer in predictions.values():
        if int(answer) not in (0, 1):
            raise ValueError(f"write_nlvr2_submission: predictions must be 0 or 1, got {answer!r}")
    text = "".join(f"{key},{'True' if int(answer) == 1 else 'False'}\n" for key, answer in predictions.items())
    write_atomic(path, lambda f: f.write(text), newline="")


def read_vqa_submission(path: str | Path) -> dict[int, str]:
    with open(path) as f:
        return {int(row["question_id"]): row["answer"] for row in json.load(f)}


def read_gqa_submission(path: str | Path) -> dict[str, str]:
    with open(path) as f:
        return {str(row["questionId"]): row["prediction"] for row in json.load(f)}


def read_nlvr2_submission(path: str | Path) -> dict[str, int]:
    predictions = {}
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            identifier, _, answer = line.rpartition(",")
            if not identifier or answer not in ("True", "False"):
                raise ValueError(f"{path}:{line_number}: expected 'identifier,True|False', got {line!r}")
            predictions[identifier] = int(answer == "True")
    return predictions
