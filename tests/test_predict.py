"""lxmert-predict (engine/predict.py) on tiny fine-tuned models of the synthetic data, CPU fp32.

The scores are the model's own sigmoid (VQA) / softmax (NLVR2) of its logits, computed here on the same question
and image one at a time (the tokenizer's per-sentence encode, the regions as the store or the TSV holds them);
the whole-store mode writes the submission file fine-tuning's evaluation wrote for the same model, byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_
from test_cli_errors import one_line_error
from test_engine_finetune import D, build_data, config

import lxmert
from engine.data.formats import read_tsv
from engine.data.store import RegionStore
from engine.data.tasks import TaskStore, task_batch, to_torch
from engine.evaluate import read_nlvr2_submission, read_vqa_submission
from engine.finetune import FineTuner
from engine.predict import main
from lxmert.tokenizer import LxmertTokenizer

QUESTIONS = ["what color is the dog?", "how many cups are there in the room?", "is there a bear?"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_data(tmp_path_factory.mktemp("predict"), images=40)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A few steps of VQA and NLVR2 fine-tuning: their output directories (best/, the submission); and each best
    model with random weights (a few steps answer every question alike), as "<task>_model", with the
    submission `lxmert-finetune --evaluate-only` writes for it in "<task>_eval"."""
    root, out = tmp_path_factory.mktemp("runs"), {}
    for task, model_class in (("vqa", lxmert.LxmertForQuestionAnswering), ("nlvr2", lxmert.LxmertForNLVR2)):
        FineTuner(config(data, task, root / task, "train.max_steps=2", "train.batch_size=16")).train()
        torch.manual_seed(3)
        model = randomize_(model_class.from_pretrained(root / task / "best"))
        if task == "nlvr2":  # true for half the statements: the pooled vectors share a large common part
            store = TaskStore(data["nlvr2_valid"])
            inputs = to_torch(task_batch(store, RegionStore(data["feats"]), range(len(store))))
            with torch.no_grad():
                logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
                margin = (logits[:, 1] - logits[:, 0]).sort().values
                model.answer_head.fc2.bias[1] -= margin[len(margin) // 2 - 1 : len(margin) // 2 + 1].mean()
        varied = model.save_pretrained(root / f"{task}_model")
        for name in ("task.json", "answers.json"):
            if (root / task / "best" / name).is_file():
                shutil.copy(root / task / "best" / name, varied / name)
        cfg = config(data, task, root / f"{task}_eval", f"train.init_from={varied}", "train.batch_size=16")
        FineTuner(cfg, evaluate_only=True).evaluate_only()
        out |= {task: root / task, f"{task}_model": varied, f"{task}_eval": root / f"{task}_eval/evaluate"}
    return out


def predict(capsys, *argv: str) -> list[dict]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def reference_logits(model, features: np.ndarray, boxes: np.ndarray, num_boxes, questions=QUESTIONS) -> torch.Tensor:
    """The model's head, one question at a time: features [R, D] or [2, R, D] (NLVR2) and boxes as stored."""
    tokenizer = LxmertTokenizer()
    feats = torch.from_numpy(np.array(features, np.float32))[None]
    pos = torch.from_numpy(np.array(boxes, np.float32))[None]
    regions = feats.shape[-2]
    mask = (torch.arange(regions) < torch.as_tensor(np.asarray(num_boxes, np.int64))[..., None]).long()[None]
    rows = []
    with torch.no_grad():
        for question in questions:
            ids = torch.tensor([tokenizer.encode(question)])
            out = model(ids, feats, pos, torch.ones_like(ids), mask)
            rows.append(out.logits[0] if isinstance(model, lxmert.LxmertForNLVR2) else out.question_answering_score[0])
    return torch.stack(rows)


def check_answers(rows: list[dict], probs: torch.Tensor, answers: list[str], k: int) -> None:
    """Each row's answers: the k most probable of the reference, best first, with the reference's scores."""
    assert len(rows) == len(probs)
    for row, p in zip(rows, probs):
        assert len(row["answers"]) == k and all(set(a) == {"answer", "score"} for a in row["answers"])
        scores = [a["score"] for a in row["answers"]]
        assert scores == sorted(scores, reverse=True)
        expected = [answers[j] for j in p.argsort(descending=True, stable=True)[:k].tolist()]
        assert [a["answer"] for a in row["answers"]] == expected
        for a in row["answers"]:
            assert a["score"] == pytest.approx(float(p[answers.index(a["answer"])]), abs=1e-5)


def test_the_fine_tuning_export_says_what_its_head_means(data, runs):
    vqa, nlvr2 = runs["vqa"] / "best", runs["nlvr2"] / "best"
    for best in (vqa, nlvr2):
        assert (best / "model.safetensors").is_file() and (best / "model_config.json").is_file()
    assert json.loads((vqa / "task.json").read_text()) == {"task": "vqa"}
    assert json.loads((vqa / "answers.json").read_text()) == TaskStore(data["vqa_train"]).answers
    assert json.loads((nlvr2 / "task.json").read_text()) == {"task": "nlvr2"}
    assert not (nlvr2 / "answers.json").exists()


def test_vqa_scores_are_the_sigmoid_of_the_models_logits(data, runs, capsys):
    best = runs["vqa_model"]
    regions = RegionStore(data["feats"])
    img_id = regions.img_ids[3]
    args = ["--model", str(best), "--features", str(data["feats"]), "--image", img_id, "--top-k", "4"]
    rows = predict(capsys, *args, *(a for q in QUESTIONS for a in ("--question", q)))
    assert [set(r) for r in rows] == [{"question", "img_id", "answers"}] * len(QUESTIONS)
    assert [r["question"] for r in rows] == QUESTIONS and {r["img_id"] for r in rows} == {img_id}
    model = lxmert.LxmertForQuestionAnswering.from_pretrained(best)
    r = regions.get(regions.index_of(img_id))
    probs = reference_logits(model, r.features, r.boxes, r.num_boxes).sigmoid()
    check_answers(rows, probs, json.loads((best / "answers.json").read_text()), 4)
    # batches of one question give the same answers
    again = predict(capsys, *args, "--batch-size", "1", *(a for q in QUESTIONS for a in ("--question", q)))
    for a, b in zip(rows, again):
        assert [x["answer"] for x in a["answers"]] == [x["answer"] for x in b["answers"]]
        assert [x["score"] for x in a["answers"]] == pytest.approx([x["score"] for x in b["answers"]], abs=1e-6)


def test_a_feature_tsv_row_is_read_as_the_converter_reads_it(data, runs, capsys):
    best = runs["vqa_model"]
    tsv = data["syn"] / "mscoco_imgfeat/val2014_obj36.tsv"
    record = list(read_tsv(tsv, feat_dim=D))[2]
    rows = predict(
        capsys, "--model", str(best), "--features", str(tsv), "--image", record.img_id, "--question", QUESTIONS[0]
    )
    n = min(record.num_boxes, 36)
    features, boxes = np.zeros((36, D), np.float32), np.zeros((36, 4), np.float32)
    features[:n] = record.features[:n]
    boxes[:n] = np.clip(record.boxes[:n] / [record.img_w, record.img_h, record.img_w, record.img_h], 0, 1)
    model = lxmert.LxmertForQuestionAnswering.from_pretrained(best)
    probs = reference_logits(model, features, boxes, n, QUESTIONS[:1]).sigmoid()
    check_answers(rows, probs, json.loads((best / "answers.json").read_text()), 5)
    # the text form: the question, then an answer and its score a line
    assert main(["--model", str(best), "--features", str(tsv), "--image", record.img_id, "--question", "why?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"why?  ({record.img_id})" and len(lines) == 6
    assert all(0 <= float(line.split()[-1]) <= 1 for line in lines[1:])


def test_nlvr2_is_true_or_false_with_the_softmax(data, runs, capsys):
    best = runs["nlvr2_model"]
    regions = RegionStore(data["feats"])
    pair = [regions.img_ids[0], regions.img_ids[5]]
    rows = predict(
        capsys,
        *("--model", str(best), "--features", str(data["feats"]), "--image", pair[0], "--image", pair[1]),
        *(a for q in QUESTIONS for a in ("--question", q)),
    )
    assert all(r["img_ids"] == pair for r in rows)
    model = lxmert.LxmertForNLVR2.from_pretrained(best)
    r = regions.gather([regions.index_of(i) for i in pair])
    probs = reference_logits(model, r.features, r.boxes, r.num_boxes).softmax(-1)
    check_answers(rows, probs, ["false", "true"], 2)
    assert all(sum(a["score"] for a in row["answers"]) == pytest.approx(1.0) for row in rows)


@pytest.mark.parametrize(
    "task, store, submission",
    [("vqa", "vqa_minival", "vqa_submission.json"), ("nlvr2", "nlvr2_valid", "nlvr2_submission.csv")],
)
def test_a_whole_store_gives_the_evaluations_submission(data, runs, capsys, tmp_path, task, store, submission):
    out = tmp_path / "sub" / submission
    argv = ["--task-store", str(data[store]), "--out", str(out), "--batch-size", "16"]
    for model, evaluated in ((runs[f"{task}_model"], runs[f"{task}_eval"]), (runs[task] / "best", runs[task])):
        assert main(["--model", str(model), *argv]) == 0
        assert str(out) in capsys.readouterr().out
        assert out.read_bytes() == (evaluated / submission).read_bytes()
    if task == "nlvr2":
        assert set(read_nlvr2_submission(runs["nlvr2_eval"] / submission).values()) == {0, 1}  # not all alike
        return
    assert len(set(read_vqa_submission(runs["vqa_eval"] / submission).values())) > 3
    # --json too: a row per question, its best answer the submission's
    rows = predict(capsys, "--model", str(runs[f"{task}_model"]), *argv, "--top-k", "2")
    written = json.loads(out.read_text())
    assert [r["question_id"] for r in rows] == [w["question_id"] for w in written]
    assert [r["answers"][0]["answer"] for r in rows] == [w["answer"] for w in written]


def test_a_model_without_answers_json_takes_answers(data, runs, capsys, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "model_config.json"):
        shutil.copy(runs["vqa"] / "best" / name, bare / name)
    img_id = RegionStore(data["feats"]).img_ids[1]
    argv = ["--features", str(data["feats"]), "--image", img_id, "--question", QUESTIONS[1]]
    expected = predict(capsys, "--model", str(runs["vqa"] / "best"), *argv)
    assert main(["--model", str(bare), *argv]) == 2
    one_line_error(capsys, "has no answers.json", "--answers")
    label2ans = data["syn"] / "vqa/trainval_label2ans.json"
    assert predict(capsys, "--model", str(bare), "--answers", str(label2ans), *argv) == expected


def test_mistakes_are_one_line(data, runs, capsys, tmp_path):
    vqa = str(runs["vqa"] / "best")
    feats, tsv = str(data["feats"]), str(data["syn"] / "mscoco_imgfeat/val2014_obj36.tsv")
    backbone = tmp_path / "backbone"
    config = lxmert.LxmertConfig.from_dict(json.loads((runs["vqa"] / "best/model_config.json").read_text()))
    lxmert.LxmertModel(config).save_pretrained(backbone)
    pretraining = tmp_path / "pretraining"
    lxmert.LxmertForPreTraining(config).save_pretrained(pretraining)
    ask = ["--question", "what?"]
    cases = [
        (["--model", vqa, "--features", feats, "--image", "COCO_nowhere", *ask], "'COCO_nowhere' is not in the region"),
        (["--model", vqa, "--features", tsv, "--image", "COCO_nowhere", *ask], "'COCO_nowhere' is not in the feature"),
        (["--model", str(backbone), "--features", feats, "--image", "x", *ask], "has no QA head"),
        (["--model", str(pretraining), "--features", feats, "--image", "x", *ask], "is a pre-training checkpoint"),
        (["--model", str(tmp_path / "nothing"), "--features", feats, "--image", "x", *ask], "does not exist"),
        (["--model", vqa, "--features", feats, "--image", "a", "--image", "b", *ask], "one --image"),
        (
            ["--model", vqa, "--task-store", str(data["nlvr2_valid"]), "--out", "x.csv"],
            "is a 'nlvr2' store, but the model's task is vqa",
        ),
        (["--model", vqa, "--features", feats, "--image", "x"], "give --features, --image and --question"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = one_line_error(capsys, expected)
        assert err.startswith("lxmert-predict: error: ")
