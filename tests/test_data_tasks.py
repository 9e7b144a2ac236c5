"""Fine-tuning task stores (engine/data/tasks.py): VQA / GQA / NLVR2 round trips on the synthetic data set,
soft labels through ans2label, missing images, unlabelled splits, atomicity, batches the models accept.

Tiny feature dims (8) and a few dozen images.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lxmert
from engine.data import convert, formats, synthetic, tasks
from engine.data.formats import DataError
from engine.data.store import RegionStore, StoreBuilder, StoreError, StoreExistsError
from engine.data.tasks import TaskStore, convert_task, task_batch, to_torch
from lxmert.tokenizer import LxmertTokenizer

D = 8
FILES = {  # task -> (train file, minival file)
    "vqa": ("vqa/train.json", "vqa/minival.json"),
    "gqa": ("gqa/train.json", "gqa/testdev.json"),
    "nlvr2": ("nlvr2/train.json", "nlvr2/valid.json"),
}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, 40, feat_dim=D, seed=3, captions_per_image=1, questions_per_image=4)
    return out


@pytest.fixture(scope="module")
def feats(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A region store of all images, and one of the train images only."""
    root = tmp_path_factory.mktemp("feats")
    tsv = synth / "mscoco_imgfeat"
    convert.convert_features(
        [tsv / "train2014_obj36.tsv", tsv / "val2014_obj36.tsv"], root / "all", feat_dim=D, progress=False
    )
    convert.convert_features([tsv / "train2014_obj36.tsv"], root / "train", feat_dim=D, progress=False)
    return {"all": root / "all", "train": root / "train"}


@pytest.fixture(scope="module")
def reduced_ans2label(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic ans2label without 'yes', 'red' and '2' (their labels dropped, the rest renumbered)."""
    answers = [a for a in synthetic.ANSWERS if a not in ("yes", "red", "2")]
    path = tmp_path_factory.mktemp("ans") / "ans2label.json"
    path.write_text(json.dumps({a: i for i, a in enumerate(reversed(answers))}))  # another order than the table
    return path


def paths(synth: Path, task: str) -> list[Path]:
    return [synth / f for f in FILES[task]]


def ans2label_of(synth: Path, task: str) -> Path | None:
    return None if task == "nlvr2" else synth / task / "trainval_ans2label.json"


def build(synth: Path, feats: Path, task: str, out: Path, **kwargs) -> tasks.TaskStats:
    a2l = kwargs.pop("ans2label", ans2label_of(synth, task))
    files = kwargs.pop("paths") if "paths" in kwargs else paths(synth, task)
    return convert_task(task, files, feats, a2l, out, **kwargs)


def read(task: str, path: Path) -> list:
    return {"vqa": formats.read_vqa, "gqa": formats.read_gqa, "nlvr2": formats.read_nlvr2}[task](path)


def same_store(a: Path, b: Path) -> None:
    sa, sb = TaskStore(a), TaskStore(b)
    assert sa.arrays.keys() == sb.arrays.keys()
    for name in sa.arrays:
        np.testing.assert_array_equal(sa.arrays[name], sb.arrays[name], err_msg=name)
    assert sa.answers == sb.answers and list(sa.question_ids) == list(sb.question_ids)


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("task", ["vqa", "gqa"])
def test_qa_round_trip(synth: Path, feats: dict[str, Path], reduced_ans2label: Path, tmp_path: Path, task: str) -> None:
    stats = build(synth, feats["all"], task, tmp_path / "s", ans2label=reduced_ans2label, chunk_examples=7)
    store, regions, tok = TaskStore(tmp_path / "s"), RegionStore(feats["all"]), LxmertTokenizer()
    ans2label = formats.read_ans2label(reduced_ans2label)
    records = [q for p in paths(synth, task) for q in read(task, p)]
    assert store.task == task and len(store) == len(records) == stats.examples == store.meta["n_examples"]
    assert [store.answers[i] for i in ans2label.values()] == list(ans2label)  # label2ans
    assert store.arrays["token_ids"].dtype == np.int16 and store.arrays["label_ids"].dtype == np.int16
    expected_ids = [q.question_id for q in records]
    if task == "vqa":
        assert store.question_ids.dtype == np.int64 and store.question_ids.tolist() == expected_ids
    else:
        assert store.question_ids == expected_ids and all(isinstance(q, str) for q in store.question_ids)
    dropped = 0
    for i, q in enumerate(records):
        n = int(store.arrays["lengths"][i])
        ids = store.arrays["token_ids"][i]
        assert ids[:n].tolist() == tok.encode(q.sent) and not ids[n:].any()
        assert tok.decode(ids[:n]).replace(" ?", "?") == q.sent
        assert regions.img_ids[int(store.arrays["image_index"][i])] == q.img_id
        expected = {ans2label[a]: float(np.float32(s)) for a, s in q.label.items() if a in ans2label}
        assert store.labels_of(i) == expected
        dropped += len(q.label) - len(expected)
    assert dropped == stats.answers_dropped == store.meta["stats"]["answers_dropped"] > 0
    assert stats.labelled == len(records) and stats.unlabelled == 0

    idx = np.array([5, 0, len(store) - 1, 5])
    ex = store.gather(idx)
    dense = ex.soft_scores(store.num_answers)
    for row, i in enumerate(idx):
        want = np.zeros(store.num_answers, np.float32)
        for k, s in store.labels_of(int(i)).items():
            want[k] = s
        np.testing.assert_array_equal(dense[row], want)


def test_nlvr2_pairs(synth: Path, feats: dict[str, Path], tmp_path: Path) -> None:
    stats = build(synth, feats["all"], "nlvr2", tmp_path / "s", chunk_examples=5)
    store, regions, tok = TaskStore(tmp_path / "s"), RegionStore(feats["all"]), LxmertTokenizer()
    records = [x for p in paths(synth, "nlvr2") for x in read("nlvr2", p)]
    assert len(store) == len(records) == stats.examples > 0 and store.answers == []
    assert store.identifiers == store.question_ids == [x.identifier for x in records]
    assert store.arrays["label"].dtype == np.int8
    for i, x in enumerate(records):
        n = int(store.arrays["lengths"][i])
        assert store.arrays["token_ids"][i, :n].tolist() == tok.encode(x.sent)
        assert regions.img_ids[int(store.arrays["image_index0"][i])] == x.img0
        assert regions.img_ids[int(store.arrays["image_index1"][i])] == x.img1
        assert store.labels_of(i) == x.label
    ex = store.gather([2, 1])
    assert ex.image_index.shape == (2, 2) and ex.labelled.all()
    assert [regions.img_ids[j] for j in ex.image_index[0]] == [records[2].img0, records[2].img1]


# ----------------------------------------------------------------------------------- bad and test input


def test_missing_image_is_an_error_naming_file_record_and_img_id(
    synth: Path, feats: dict[str, Path], tmp_path: Path
) -> None:
    minival = synth / "vqa/minival.json"
    first = formats.read_vqa(minival)[0]
    with pytest.raises(DataError) as e:
        build(synth, feats["train"], "vqa", tmp_path / "s")
    assert str(minival) in str(e.value) and "record 0" in str(e.value) and repr(first.img_id) in str(e.value)
    assert not (tmp_path / "s").exists()

    stats = build(synth, feats["train"], "vqa", tmp_path / "s", skip_missing_images=True)
    store = TaskStore(tmp_path / "s")
    n_train, n_val = len(formats.read_vqa(synth / "vqa/train.json")), len(formats.read_vqa(minival))
    assert stats.missing_image_records == n_val and len(store) == n_train == stats.examples
    assert store.meta["stats"]["missing_image_records"] == n_val and stats.errors

    with pytest.raises(DataError, match="img1"):  # the valid pairs' img0 is a val image too: make only img1 miss
        bad = [r | {"img0": "COCO_train2014_000000000000"} for r in json.loads((synth / FILES["nlvr2"][1]).read_text())]
        (tmp_path / "nlvr2.json").write_text(json.dumps(bad))
        build(synth, feats["train"], "nlvr2", tmp_path / "n", paths=[tmp_path / "nlvr2.json"])
    stats = build(synth, feats["train"], "nlvr2", tmp_path / "n", paths=paths(synth, "nlvr2"), skip_missing_images=True)
    assert stats.missing_image_records == len(formats.read_nlvr2(synth / FILES["nlvr2"][1]))


def test_unlabelled_test_split(synth: Path, feats: dict[str, Path], tmp_path: Path) -> None:
    for task in ("vqa", "gqa", "nlvr2"):
        records = json.loads((synth / FILES[task][1]).read_text())
        for r in records:
            del r["label"]
        test = tmp_path / f"{task}_test.json"
        test.write_text(json.dumps(records))
        stats = build(synth, feats["all"], task, tmp_path / task, paths=[test])
        store = TaskStore(tmp_path / task)
        assert stats.unlabelled == len(store) == len(records) > 0 and stats.labelled == 0
        assert all(store.labels_of(i) is None for i in range(len(store)))
        batch = task_batch(store, RegionStore(feats["all"]), np.arange(min(4, len(store))))
        assert "labels" not in batch and batch["input_ids"].shape[0] == min(4, len(store))
        if task == "nlvr2":
            assert (store.arrays["label"] == -1).all()
        else:
            assert not store.arrays["labelled"].any() and store.arrays["label_offsets"][-1] == 0


def test_duplicate_question_id_across_files(synth: Path, feats: dict[str, Path], tmp_path: Path) -> None:
    train = synth / FILES["vqa"][0]
    with pytest.raises(DataError, match="question_id"):
        build(synth, feats["all"], "vqa", tmp_path / "s", paths=[train, train])
    assert not (tmp_path / "s").exists()


def test_qa_task_needs_ans2label(synth: Path, feats: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ans2label"):
        build(synth, feats["all"], "gqa", tmp_path / "s", ans2label=None)
    with pytest.raises(ValueError, match="task"):
        build(synth, feats["all"], "coco", tmp_path / "s", ans2label=None, paths=[])


# ------------------------------------------------------------------------------ atomicity and overwrite


class Crash(Exception):
    pass


@pytest.mark.parametrize("task", ["gqa", "nlvr2", "vqa"])
def test_no_store_after_a_crash_and_resume_is_identical(
    synth: Path, feats: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    build(synth, feats["all"], task, tmp_path / "clean", chunk_examples=6)
    real, calls = StoreBuilder.commit, [0]

    def commit(self: StoreBuilder, position: object, state: object) -> None:
        calls[0] += 1
        if calls[0] > 3:
            raise Crash("simulated crash")
        real(self, position, state)

    with monkeypatch.context() as m:
        m.setattr(StoreBuilder, "commit", commit)
        with pytest.raises(Crash):
            build(synth, feats["all"], task, tmp_path / "s", chunk_examples=6)
    assert not (tmp_path / "s").exists() and (tmp_path / "s.partial").exists()
    with pytest.raises(StoreError, match="unfinished"):
        TaskStore(tmp_path / "s")
    stats = build(synth, feats["all"], task, tmp_path / "s", chunk_examples=6)
    assert stats.resumed_at == 18 and not (tmp_path / "s.partial").exists()
    same_store(tmp_path / "clean", tmp_path / "s")
    TaskStore(tmp_path / "s").verify()


def test_overwrite(synth: Path, feats: dict[str, Path], tmp_path: Path) -> None:
    build(synth, feats["all"], "gqa", tmp_path / "s")
    with pytest.raises(StoreExistsError):
        build(synth, feats["all"], "gqa", tmp_path / "s")
    build(synth, feats["all"], "gqa", tmp_path / "s", paths=paths(synth, "gqa")[:1], overwrite=True)
    assert len(TaskStore(tmp_path / "s")) == len(formats.read_gqa(synth / FILES["gqa"][0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other/file").write_text("mine")
    with pytest.raises(StoreExistsError, match="not a store"):
        build(synth, feats["all"], "gqa", tmp_path / "other", overwrite=True)
    assert (tmp_path / "other/file").read_text() == "mine"


def test_cli(synth: Path, feats: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [
        "--task",
        "gqa",
        "--questions",
        *map(str, paths(synth, "gqa")),
        "--features",
        str(feats["all"]),
        "--ans2label",
        str(synth / "gqa/trainval_ans2label.json"),
        "--out",
        str(tmp_path / "s"),
        "--quiet",
    ]
    assert convert.main(args) == 0 and "examples" in capsys.readouterr().out
    assert TaskStore(tmp_path / "s").task == "gqa"
    capsys.readouterr()
    assert convert.main(args) == 0 and "already converted" in capsys.readouterr().out  # the same inputs: done
    assert convert.main([*args, "--skip-bad-rows"]) == 2  # another option: the store exists
    nl = [
        "--task",
        "nlvr2",
        "--questions",
        str(synth / FILES["nlvr2"][0]),
        "--features",
        str(feats["train"]),
        "--out",
        str(tmp_path / "n"),
        "--quiet",
    ]
    assert convert.main(nl) == 0 and TaskStore(tmp_path / "n").task == "nlvr2"
    with pytest.raises(SystemExit):
        convert.main(["--task", "vqa", "--questions", "x.json", "--features", "f", "--out", str(tmp_path / "v")])


def test_store_checks_its_features(synth: Path, feats: dict[str, Path], tmp_path: Path) -> None:
    build(synth, feats["all"], "vqa", tmp_path / "s")
    with pytest.raises(StoreError, match="feature store"):
        task_batch(TaskStore(tmp_path / "s"), RegionStore(feats["train"]), [0])


# ------------------------------------------------------------------------------------ batches and models


def small_config(num_answers: int) -> lxmert.LxmertConfig:
    return lxmert.LxmertConfig(
        vocab_size=30522,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=24,
        l_layers=1,
        r_layers=1,
        x_layers=1,
        visual_feat_dim=D,
        num_qa_labels=num_answers,
        num_object_labels=5,
        num_attr_labels=5,
    )


@pytest.mark.parametrize("task", ["vqa", "gqa"])
def test_qa_batch_feeds_the_model(synth: Path, feats: dict[str, Path], tmp_path: Path, task: str) -> None:
    build(synth, feats["all"], task, tmp_path / "s")
    store, regions = TaskStore(tmp_path / "s"), RegionStore(feats["all"])
    idx = [3, 0, 7, 1, 11]
    batch = task_batch(store, regions, idx)
    lengths = store.arrays["lengths"][idx]
    b, width = len(idx), int(lengths.max())
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (b, width)
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert batch["visual_feats"].shape == (b, 36, D) and batch["visual_feats"].dtype == np.float32
    assert batch["visual_pos"].shape == (b, 36, 4) and "visual_attention_mask" not in batch
    assert batch["labels"].shape == (b, store.num_answers) and batch["labels"].dtype == np.float32
    image_index = store.arrays["image_index"][idx]
    np.testing.assert_array_equal(batch["visual_feats"], regions.gather(image_index).features.astype(np.float32))
    for row, i in enumerate(idx):
        assert {k: float(v) for k, v in enumerate(batch["labels"][row]) if v} == store.labels_of(i)

    torch.manual_seed(0)
    model = lxmert.LxmertForQuestionAnswering(small_config(store.num_answers)).eval()
    inputs = to_torch(batch)
    assert inputs["input_ids"].dtype == torch.int64 and inputs["labels"].dtype == torch.float32
    with torch.no_grad():
        out = model(**inputs)
    assert out.question_answering_score.shape == (b, store.num_answers) and torch.isfinite(out.loss)


def test_nlvr2_batch_feeds_the_model(synth: Path, feats: dict[str, Path], tmp_path: Path) -> None:
    build(synth, feats["all"], "nlvr2", tmp_path / "s")
    store, regions = TaskStore(tmp_path / "s"), RegionStore(feats["all"])
    idx = [1, 4, 0]
    batch = task_batch(store, regions, idx)
    width = int(store.arrays["lengths"][idx].max())
    assert batch["input_ids"].shape == (3, width)
    assert batch["visual_feats"].shape == (3, 2, 36, D) and batch["visual_pos"].shape == (3, 2, 36, 4)
    assert batch["labels"].shape == (3,) and batch["labels"].tolist() == store.arrays["label"][idx].tolist()
    right = regions.gather(store.arrays["image_index1"][idx]).boxes
    np.testing.assert_array_equal(batch["visual_pos"][:, 1], right)

    torch.manual_seed(0)
    model = lxmert.LxmertForNLVR2(small_config(2)).eval()
    with torch.no_grad():
        out = model(**to_torch(batch))
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)


def test_skip_bad_rows_in_task_mode(
    synth: Path, feats: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--skip-bad-rows drops and counts a malformed record and a repeated question_id (it used to be ignored
    in --task mode); without it, the first bad record stops the conversion with its file and index."""
    records = json.loads((synth / FILES["vqa"][1]).read_text())
    bad = records[:1] + [{**records[1], "sent": 7}] + records[1:] + [records[0]]  # record 1 malformed, last repeats 0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=rf"{path}, record 1: sent must be str"):
        build(synth, feats["all"], "vqa", tmp_path / "s", paths=[path])
    stats = build(synth, feats["all"], "vqa", tmp_path / "s", paths=[path], skip_bad_rows=True)
    assert (stats.examples, stats.bad_records) == (len(records), 2)
    assert "record 1: sent must be str" in stats.errors[0]
    assert f"record {len(bad) - 1}: question_id" in stats.errors[1] and "appears in an earlier" in stats.errors[1]
    store = TaskStore(tmp_path / "s")
    assert list(store.question_ids) == [r["question_id"] for r in records]
    assert store.meta["stats"]["bad_records"] == 2

    args = [
        "--task",
        "vqa",
        "--questions",
        str(path),
        "--features",
        str(feats["all"]),
        "--ans2label",
        str(synth / "vqa/trainval_ans2label.json"),
        "--quiet",
    ]
    assert convert.main([*args, "--out", str(tmp_path / "c1")]) == 2
    assert "record 1: sent must be str" in capsys.readouterr().err
    assert convert.main([*args, "--out", str(tmp_path / "c2"), "--skip-bad-rows"]) == 0
    out, err = capsys.readouterr()
    assert "bad_records 2" in out and err.count("skipped:") == 2
    same_store(tmp_path / "s", tmp_path / "c2")


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_the_task_loader_finds_the_unpadding_on_the_host(synth: Path, feats: dict[str, Path], tmp_path, task) -> None:
    """For attn_backend "flash" (unpadding=True): each TaskBatch carries its masks' Unpadding, NLVR2's for the
    2B (statement, image) rows its model hands the backbone; equal to the one found from the widened masks."""
    import dataclasses

    from engine.data.loaders import EvalOrder, TaskLoader
    from lxmert.attention import Unpadding
    from lxmert.finetune import nlvr2_unpadding

    build(synth, feats["all"], task, tmp_path / task)
    store, regions = TaskStore(tmp_path / task), RegionStore(feats["all"])
    loader = TaskLoader(store, regions, EvalOrder(len(store), 3), labels=False, unpadding=True)
    loader.set_epoch(0)
    for batch in itertools.islice(loader, 3):
        b, length = batch.input_ids.shape
        if task == "nlvr2":
            found = nlvr2_unpadding(batch.attention_mask, batch.visual_attention_mask, batch.visual_feats.shape[2])
            assert found.language.shape == (2 * b, length)
        else:
            found = Unpadding.from_masks(batch.attention_mask, batch.visual_attention_mask, batch.visual_feats.shape[1])
        assert batch.equal(dataclasses.replace(batch, unpadding=found)) and "unpadding" in batch.model_inputs()
