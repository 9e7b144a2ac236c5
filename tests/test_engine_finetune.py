"""Fine-tuning (engine/finetune.py) on the synthetic data: a tiny model (hidden 32) on 16-d features, CPU fp32.

VQA from scratch must beat chance on the synthetic minival; NLVR2's loss must fall; init_from a pre-training
export copies the backbone exactly and the QA head's rows by answer string; submissions have the authors'
formats; a missing store or a wrong task is a clear error.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import lxmert
from engine.checkpoint import write_state_dict
from engine.config import load_config
from engine.data import convert, synthetic
from engine.data.tasks import TaskStore, convert_task
from engine.evaluate import read_gqa_submission, read_nlvr2_submission, read_vqa_submission
from engine.finetune import FineTuneError, FineTuner, main
from lxmert.answers import normalize_answer
from lxmert.convert import read_state_dict

D = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_data(tmp_path_factory.mktemp("finetune"))


def build_data(root: Path, images: int = 200) -> dict[str, Path]:
    syn = root / "syn"
    synthetic.generate(
        syn, images, feat_dim=D, seed=5, captions_per_image=1, questions_per_image=4, minival_fraction=0.2
    )
    feats = root / "feats"
    convert.convert_features(
        [syn / "mscoco_imgfeat/train2014_obj36.tsv", syn / "mscoco_imgfeat/val2014_obj36.tsv"],
        feats,
        feat_dim=D,
        progress=False,
    )
    out = {"syn": syn, "feats": feats}
    for task, split, name in (
        ("vqa", "train", "train"),
        ("vqa", "minival", "minival"),
        ("gqa", "train", "train"),
        ("gqa", "testdev", "testdev"),
        ("nlvr2", "train", "train"),
        ("nlvr2", "valid", "valid"),
    ):
        a2l = syn / task / "trainval_ans2label.json" if task != "nlvr2" else None
        convert_task(task, [syn / task / f"{split}.json"], feats, a2l, root / f"{task}_{name}")
        out[f"{task}_{name}"] = root / f"{task}_{name}"
    return out


TINY = [
    "model.hidden_size=32",
    "model.num_attention_heads=2",
    "model.intermediate_size=64",
    "model.l_layers=1",
    "model.r_layers=1",
    "model.x_layers=1",
    f"model.visual_feat_dim={D}",
    "model.attn_backend=sdpa",
    f"model.num_object_labels={len(synthetic.OBJECT_NAMES)}",
    f"model.num_attr_labels={len(synthetic.ATTRIBUTE_NAMES)}",
    f"model.num_qa_labels={len(synthetic.ANSWERS)}",
]


def config(data, task: str, out: Path, *extra: str, eval_split: str | None = None):
    eval_split = eval_split or {"vqa": "minival", "gqa": "testdev", "nlvr2": "valid"}[task]
    overrides = [
        *TINY,
        f"data.train.text={data[f'{task}_train']}",
        f"data.train.features={data['feats']}",
        f"data.eval.text={data[f'{task}_{eval_split}']}",
        f"data.eval.features={data['feats']}",
        "data.num_workers=0",
        "data.seed=1",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "optim.warmup_ratio=0.1",
        "optim.grad_clip=5.0",
        "train.batch_size=32",
        "train.epochs=4",
        "train.log_every=5",
        f"train.task={task}",
        f"train.output_dir={out}",
        "train.seed=0",
        *extra,
    ]
    return load_config(None, overrides)


def no_eval(cfg):
    cfg.data.eval.text = cfg.data.eval.features = ""  # an override cannot set an empty string
    return cfg


def test_vqa_from_scratch_learns_and_writes_outputs(data, tmp_path):
    tuner = FineTuner(config(data, "vqa", tmp_path, "train.epochs=6", "train.batch_size=16"))
    summary = tuner.train()
    store = TaskStore(data["vqa_minival"])
    # chance: the best constant answer's mean soft score on minival
    totals: dict[int, float] = {}
    for i in range(len(store)):
        for k, s in (store.labels_of(i) or {}).items():
            totals[k] = totals.get(k, 0.0) + s
    chance = max(totals.values()) / len(store)
    metric = summary.task["best_metric"]
    # The tiny model learns the question-type prior (yes/no, colour, count answers) within this budget, about
    # 1.8x the constant-answer chance; grounding answers in the image needs many more steps than a unit test has.
    assert summary.task["first_loss"] > 5 * summary.task["last_loss"], summary
    assert metric > 1.5 * chance, (metric, chance, summary.task["eval"])
    assert len(summary.task["eval"]) == 6 and summary.steps == 6 * tuner.steps_per_epoch
    # outputs: the best model, the submission (every minival question once), the log
    model = read_state_dict(tmp_path / "best/model.safetensors")
    assert model["answer_head.fc2.weight"].shape[0] == len(synthetic.ANSWERS)
    sub = json.loads((tmp_path / "vqa_submission.json").read_text())
    assert all(set(row) == {"question_id", "answer"} and isinstance(row["question_id"], int) for row in sub)
    assert sorted(r["question_id"] for r in sub) == sorted(int(q) for q in store.question_ids)
    assert all(r["answer"] in synthetic.ANSWERS for r in sub)
    predicted = read_vqa_submission(tmp_path / "vqa_submission.json")
    labels = {
        int(store.question_ids[i]): {store.answers[k]: s for k, s in store.labels_of(i).items()}
        for i in range(len(store))
    }
    score = sum(labels[q].get(a, 0.0) for q, a in predicted.items()) / len(predicted)
    assert score == pytest.approx(metric)  # the submission is the best epoch's predictions
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert (tmp_path / "config.yaml").is_file()


def test_training_is_deterministic(data, tmp_path):
    a = FineTuner(no_eval(config(data, "vqa", tmp_path / "a", "train.max_steps=4", "train.log_every=1")))
    b = FineTuner(no_eval(config(data, "vqa", tmp_path / "b", "train.max_steps=4", "train.log_every=1")))
    assert (a.epoch_order(0) == b.epoch_order(0)).all() and not (a.epoch_order(0) == a.epoch_order(1)).all()
    a.train(), b.train()
    assert len(a.history) == 4 and [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert (a.output_dir / "best/model.safetensors").is_file()  # no eval split: the last model is kept


def test_nlvr2_runs_and_its_loss_falls(data, tmp_path):
    tuner = FineTuner(config(data, "nlvr2", tmp_path, "train.batch_size=16", "train.epochs=3", "train.log_every=1"))
    summary = tuner.train()
    losses = [r["loss"] for r in tuner.history]
    k = max(len(losses) // 4, 1)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k, losses
    assert summary.task["best_metric"] is not None and 0 <= summary.task["best_metric"] <= 1
    rows = list(csv.reader((tmp_path / "nlvr2_submission.csv").read_text().splitlines()))
    store = TaskStore(data["nlvr2_valid"])
    assert [r[0] for r in rows] == list(store.identifiers) and {r[1] for r in rows} <= {"True", "False"}
    assert set(read_nlvr2_submission(tmp_path / "nlvr2_submission.csv")) == set(store.identifiers)


def test_gqa_submission_format(data, tmp_path):
    FineTuner(config(data, "gqa", tmp_path, "train.max_steps=3")).train()
    sub = json.loads((tmp_path / "gqa_submission.json").read_text())
    store = TaskStore(data["gqa_testdev"])
    assert all(set(r) == {"questionId", "prediction"} and isinstance(r["questionId"], str) for r in sub)
    assert sorted(read_gqa_submission(tmp_path / "gqa_submission.json")) == sorted(store.question_ids)


def pretrained_export(tmp_path: Path, table: list[str]) -> Path:
    """A tiny pre-training model whose QA head scores `table`, written as our safetensors export."""
    overrides = load_config(None, [*TINY, f"model.num_qa_labels={len(table)}"]).model
    torch.manual_seed(7)
    model = lxmert.LxmertForPreTraining(overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # not the fine-tuning model's own init
    path = tmp_path / "pretrain" / "model.safetensors"
    write_state_dict(model.state_dict(), path)
    return path


def test_init_from_copies_backbone_and_head_rows_by_answer(data, tmp_path):
    # a pre-training table in another order, missing some task answers and holding extra ones
    task_answers = TaskStore(data["vqa_train"]).answers
    table = ["zebra", *reversed(task_answers[5:]), "kite"]
    path = pretrained_export(tmp_path, table)
    (path.parent / "answers.json").write_text(json.dumps(table))  # found beside the checkpoint
    tuner = FineTuner(config(data, "vqa", tmp_path / "run", f"train.init_from={path}"))
    state = read_state_dict(path)
    model = tuner.model.state_dict()
    for k, v in state.items():
        if k.startswith("lxmert."):
            assert torch.equal(model[k], v), k
    for name in ("fc1.weight", "fc1.bias", "norm.weight", "norm.bias"):
        assert torch.equal(model[f"answer_head.{name}"], state[f"answer_head.{name}"])
    index = {a: i for i, a in enumerate(table)}
    for row, answer in enumerate(task_answers):
        src = index.get(normalize_answer(answer))
        for name in ("fc2.weight", "fc2.bias"):
            got = model[f"answer_head.{name}"][row]
            expected = torch.zeros_like(got) if src is None else state[f"answer_head.{name}"][src]
            assert torch.equal(got, expected), (answer, name)
    assert tuner.init_report["answers_found"] == len(task_answers) - 5
    assert tuner.init_report["answers_missing"] == 5


def test_init_from_answer_table_options(data, tmp_path):
    table = list(synthetic.ANSWERS)
    path = pretrained_export(tmp_path, table)
    cfg = config(data, "gqa", tmp_path / "run", f"train.init_from={path.parent}")  # a directory works too
    with pytest.raises(FineTuneError, match="answer table was not found"):
        FineTuner(cfg)
    # the authors' all_ans.json, given explicitly
    tuner = FineTuner(cfg, answer_table=str(data["syn"] / "lxmert/all_ans.json"))
    assert tuner.init_report["answers_missing"] == 0
    # NLVR2 takes the backbone only
    tuner = FineTuner(config(data, "nlvr2", tmp_path / "nlvr2", f"train.init_from={path}"))
    state = read_state_dict(path)
    model = tuner.model.state_dict()
    assert all(torch.equal(model[k], v) for k, v in state.items() if k.startswith("lxmert."))


def test_init_from_a_mismatched_model_is_a_clear_error(data, tmp_path):
    path = pretrained_export(tmp_path, list(synthetic.ANSWERS))
    with pytest.raises(FineTuneError, match="does not fit model"):
        FineTuner(
            config(
                data,
                "vqa",
                tmp_path / "run",
                f"train.init_from={path}",
                "model.hidden_size=64",
                "model.intermediate_size=128",
            )
        )
    with pytest.raises(FineTuneError, match="does not exist"):
        FineTuner(config(data, "vqa", tmp_path / "run", f"train.init_from={tmp_path / 'nope.safetensors'}"))


def test_invalid_configs_are_clear_errors(data, tmp_path, capsys):
    with pytest.raises(FineTuneError, match="task store .*does not exist"):
        FineTuner(config(data, "vqa", tmp_path, f"data.train.text={tmp_path / 'missing'}"))
    with pytest.raises(FineTuneError, match="is a 'nlvr2' store but train.task is 'vqa'"):
        FineTuner(config(data, "vqa", tmp_path, f"data.train.text={data['nlvr2_train']}"))
    with pytest.raises(FineTuneError, match="train.task must be one of"):
        FineTuner(config(data, "vqa", tmp_path, "train.task=pretrain"))
    cfg = config(data, "vqa", tmp_path)
    cfg.data.train.text = ""
    with pytest.raises(FineTuneError, match="must name a task store"):
        FineTuner(cfg)
    with pytest.raises(FineTuneError, match="visual_feat_dim"):
        FineTuner(config(data, "vqa", tmp_path, "model.visual_feat_dim=20"))
    assert main(["train.task=vqa", f"data.train.text={tmp_path / 'missing'}", "data.train.features=x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train.taks=vqa"]) == 2
    assert "did you mean 'task'" in capsys.readouterr().err


def test_cli_runs_and_reports(data, tmp_path, capsys):
    overrides = [f"{o}" for o in config_overrides(data, "nlvr2", tmp_path)] + ["train.max_steps=2"]
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "train loss" in out and "samples/s" in out and "nlvr2_submission.csv" in out


def config_overrides(data, task, out):
    return [
        *TINY,
        f"data.train.text={data[f'{task}_train']}",
        f"data.train.features={data['feats']}",
        f"data.eval.text={data[f'{task}_valid']}",
        f"data.eval.features={data['feats']}",
        "train.batch_size=8",
        f"train.task={task}",
        f"train.output_dir={out}",
        "optim.lr=1e-3",
        "data.num_workers=0",
    ]


def test_answer_table_from_the_pretraining_runs_config(data, tmp_path):
    """engine.train writes config.yaml and the export into output_dir: the table is its text store's answers.json."""
    table = list(reversed(synthetic.ANSWERS))
    path = pretrained_export(tmp_path, table)
    text_store = tmp_path / "text_store"
    text_store.mkdir()
    (text_store / "answers.json").write_text(json.dumps(table))
    (path.parent / "config.yaml").write_text(f"data:\n  train:\n    text: {text_store}\n")
    tuner = FineTuner(config(data, "vqa", tmp_path / "run", f"train.init_from={path}"))
    assert tuner.init_report["answer_table"] == str(text_store / "answers.json")
    assert tuner.init_report["answers_missing"] == 0
    state = read_state_dict(path)
    row = table.index("yes")
    assert torch.equal(
        tuner.model.answer_head.fc2.weight[list(synthetic.ANSWERS).index("yes")], state["answer_head.fc2.weight"][row]
    )


def test_the_vqa_recipe_runs_with_overrides(data, tmp_path, capsys):
    """configs/vqa.yaml as shipped, pointed at the synthetic stores and shrunk, from scratch."""
    overrides = [
        *TINY,
        f"data.train.text={data['vqa_train']}",
        f"data.train.features={data['feats']}",
        f"data.eval.text={data['vqa_minival']}",
        f"data.eval.features={data['feats']}",
        "data.num_workers=0",
        "train.max_steps=2",
        f"train.output_dir={tmp_path}",
    ]
    assert main(["--config", "configs/vqa.yaml", "--from-scratch", *overrides]) == 0
    assert (tmp_path / "vqa_submission.json").is_file() and (tmp_path / "best/model.safetensors").is_file()
    # an init_from that is not there is a clear error
    assert main(["--config", "configs/vqa.yaml", *overrides, f"train.init_from={tmp_path / 'no_such_run'}"]) == 2
    assert "train.init_from" in capsys.readouterr().err


def test_a_killed_run_resumes_with_the_uninterrupted_losses(data, tmp_path, monkeypatch):
    """Dropout on; checkpoints every 2 steps; killed in step 5 after its backward; resumed from step 4: the
    remaining losses, the evaluation and the best model are the uninterrupted run's, bit for bit (CPU fp32)."""
    extra = ("train.max_steps=6", "train.log_every=1", "train.save_every=2", "train.batch_size=16")
    whole = FineTuner(config(data, "vqa", tmp_path / "whole", *extra))
    expected = whole.train()

    killed = FineTuner(config(data, "vqa", tmp_path / "killed", *extra))
    step = killed.train_step.optimizer_step

    def dies_in_step_5():
        if killed.step == 4:
            raise KeyboardInterrupt
        return step()

    killed.train_step.optimizer_step = dies_in_step_5
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert (tmp_path / "killed/checkpoints/latest").read_text().strip() == "step_00000004"

    resumed = FineTuner(config(data, "vqa", tmp_path / "killed", *extra))
    assert resumed.step == 4 and resumed.init_report["step"] == 4
    summary = resumed.train()
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[4:]]
    assert summary.task["eval"] == expected.task["eval"] and summary.task["best_metric"] == expected.task["best_metric"]
    a = read_state_dict(tmp_path / "whole/best/model.safetensors")
    b = read_state_dict(tmp_path / "killed/best/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary.steps_this_run == 2 and summary.steps == 6
    # a finished run resumed again has nothing left to do and keeps its results
    again = FineTuner(config(data, "vqa", tmp_path / "killed", *extra)).train()
    assert again.steps_this_run == 0 and again.task["best_metric"] == expected.task["best_metric"]


def test_evaluate_only_reproduces_the_best_epochs_metric_and_submission(data, tmp_path, capsys):
    trained = FineTuner(config(data, "vqa", tmp_path / "run", "train.epochs=2", "train.batch_size=16")).train()
    assert trained.task["best_metric"] is not None
    # from the exported best model
    cfg = config(data, "vqa", tmp_path / "eval", f"train.init_from={trained.task['model']}")
    result = FineTuner(cfg, evaluate_only=True).evaluate_only()
    assert result["value"] == pytest.approx(trained.task["best_metric"]) and result["weights"]["fine_tuned"] is True
    assert read_vqa_submission(result["submission"]) == read_vqa_submission(trained.task["submission"])
    assert json.loads((tmp_path / "eval/evaluate/result.json").read_text())["value"] == result["value"]
    # from the run's latest checkpoint (the last epoch's weights), through the CLI
    overrides = [
        *TINY,
        f"data.train.text={data['vqa_train']}",
        f"data.train.features={data['feats']}",
        f"data.eval.text={data['vqa_minival']}",
        f"data.eval.features={data['feats']}",
        "data.num_workers=0",
        "train.task=vqa",
        "train.batch_size=16",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    assert main(["--evaluate-only", *overrides]) == 0
    last_epoch = trained.task["eval"][-1]["metric"]
    out = json.loads((tmp_path / "run/evaluate/result.json").read_text())
    assert out["value"] == pytest.approx(last_epoch) and "resumed_from" in out["weights"]
    assert (tmp_path / "run/vqa_submission.json").is_file()  # the training's submission is left alone
    # nothing to evaluate with is a clear error
    assert main(["--evaluate-only", *overrides[:-1], f"train.output_dir={tmp_path / 'empty'}"]) == 2
    assert "evaluate-only needs weights" in capsys.readouterr().err


# The sizes of a pre-trained model that is neither the recipe's nor TINY: fine-tuning must take them from it.
OTHER = dict(
    hidden_size=48,
    num_attention_heads=3,
    intermediate_size=40,
    l_layers=2,
    r_layers=1,
    x_layers=2,
    visual_feat_dim=D,
    num_object_labels=len(synthetic.OBJECT_NAMES),
    num_attr_labels=len(synthetic.ATTRIBUTE_NAMES),
    num_qa_labels=len(synthetic.ANSWERS),
)


def other_export(tmp_path: Path) -> Path:
    """Our export (model.safetensors + model_config.json, engine.checkpoint.export_model) of an OTHER model."""
    from engine.checkpoint import export_model

    torch.manual_seed(11)
    model_config = lxmert.LxmertConfig(**OTHER)
    model = lxmert.LxmertForPreTraining(model_config)
    path = export_model(model.state_dict(), model_config, tmp_path / "pretrain")
    (path.parent / "answers.json").write_text(json.dumps(list(synthetic.ANSWERS)))
    return path


def store_overrides(data, task: str, out: Path) -> list[str]:
    eval_split = {"vqa": "minival", "gqa": "testdev", "nlvr2": "valid"}[task]
    return [
        f"data.train.text={data[f'{task}_train']}",
        f"data.train.features={data['feats']}",
        f"data.eval.text={data[f'{task}_{eval_split}']}",
        f"data.eval.features={data['feats']}",
        "data.num_workers=0",
        f"train.task={task}",
        f"train.output_dir={out}",
        "train.batch_size=16",
        "train.max_steps=2",
        "optim.lr=1e-3",
    ]


def test_init_from_takes_the_architecture_from_the_checkpoints_config(data, tmp_path, capsys):
    path = other_export(tmp_path)
    # no model.* override at all: every size comes from model_config.json, the backbone loads exactly
    tuner = FineTuner(load_config(None, [*store_overrides(data, "vqa", tmp_path / "run"), f"train.init_from={path}"]))
    for name, value in OTHER.items():
        assert getattr(tuner.config.model, name) == value, name
    assert set(tuner.adopted) == set(OTHER)  # every one differs from the defaults
    state = read_state_dict(path)
    model = tuner.model.state_dict()
    assert all(torch.equal(model[k], v) for k, v in state.items() if k.startswith("lxmert."))
    tuner.train()
    saved = load_config(tmp_path / "run/config.yaml").model  # the run records the sizes it trained
    assert (saved.hidden_size, saved.num_attention_heads, saved.l_layers) == (48, 3, 2)
    # an override that agrees is fine; one that contradicts is an error naming both values, before anything runs
    FineTuner(
        load_config(
            None,
            [*store_overrides(data, "nlvr2", tmp_path / "agree"), f"train.init_from={path}", "model.hidden_size=48"],
        )
    )
    with pytest.raises(
        FineTuneError,
        match=r"model.intermediate_size is 99 but the checkpoint's .*model_config.json "
        r"says 40",
    ):
        FineTuner(
            load_config(
                None,
                [
                    *store_overrides(data, "vqa", tmp_path / "clash"),
                    f"train.init_from={path}",
                    "model.intermediate_size=99",
                ],
            )
        )
    assert not (tmp_path / "clash").exists()
    # through the CLI: exit 2 and one line
    assert (
        main(
            [
                *store_overrides(data, "vqa", tmp_path / "clash"),
                f"train.init_from={path}",
                "model.num_attention_heads=4",
                "model.hidden_size=48",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.num_attention_heads is 4 but" in err and "says 3" in err


def test_init_from_a_transformers_directory_takes_its_config_json(data, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lxmert.convert import to_hf_state_dict

    hf = transformers.LxmertForPreTraining(transformers.LxmertConfig(**OTHER))
    hf.load_state_dict(to_hf_state_dict(read_state_dict(other_export(tmp_path))))
    hf.save_pretrained(tmp_path / "hf")
    tuner = FineTuner(
        load_config(None, [*store_overrides(data, "nlvr2", tmp_path / "run"), f"train.init_from={tmp_path / 'hf'}"])
    )
    assert (tuner.config.model.hidden_size, tuner.config.model.num_attention_heads) == (48, 3)


def test_evaluate_only_needs_no_training_store(data, tmp_path, capsys):
    trained = FineTuner(config(data, "vqa", tmp_path / "run", "train.max_steps=3", "train.batch_size=16")).train()
    overrides = [
        *TINY,
        f"data.eval.text={data['vqa_minival']}",
        f"data.eval.features={data['feats']}",
        f"data.train.text={tmp_path / 'not_here'}",
        f"data.train.features={tmp_path / 'not_here_either'}",
        "data.num_workers=0",
        "train.task=vqa",
        f"train.output_dir={tmp_path / 'eval'}",
        f"train.init_from={trained.task['model']}",
    ]
    assert main(["--evaluate-only", *overrides]) == 0
    result = json.loads((tmp_path / "eval/evaluate/result.json").read_text())
    assert result["value"] == pytest.approx(trained.task["best_metric"])
    assert read_vqa_submission(result["submission"]) == read_vqa_submission(trained.task["submission"])


RECORD_FIELDS = {
    "step",
    "epoch",
    "loss",
    "lr",
    "grad_norm",
    "loss_scale",
    "skipped",
    "samples_per_s",
    "tokens_per_s",
    "tflops",
    "mfu",
    "data_wait_share",
    "peak_memory_gib",
    "threads",
    "step_time_s",
    "eta_s",
}


def test_fine_tuning_logs_what_pre_training_logs_and_workers_change_nothing(data, tmp_path):
    """One loop: every train record carries the throughput fields of pre-training's; batches come through the
    loader interface, so data.num_workers=2 gives the same losses and weights as building them inline."""
    extra = ("train.max_steps=4", "train.log_every=1", "train.batch_size=16")
    inline = FineTuner(config(data, "vqa", tmp_path / "inline", *extra))
    inline.train()
    assert inline.loader.workers.dataloader.num_workers == 0
    workers = FineTuner(config(data, "vqa", tmp_path / "workers", *extra, "data.num_workers=2"))
    assert workers.loader.workers.dataloader.num_workers == 2
    workers.train()
    assert [r["loss"] for r in workers.history] == [r["loss"] for r in inline.history]
    a, b = (
        read_state_dict(tmp_path / "inline/best/model.safetensors"),
        read_state_dict(tmp_path / "workers/best/model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    for record in inline.history:
        assert RECORD_FIELDS <= set(record), RECORD_FIELDS - set(record)
        assert record["tflops"] > 0 and record["tokens_per_s"] > record["samples_per_s"] > 0
        assert record["mfu"] is None and 0 <= record["data_wait_share"] <= 1  # the CPU: no known peak
