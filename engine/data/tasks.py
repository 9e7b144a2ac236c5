"""Fine-tuning question stores (VQA, GQA, NLVR2): one per task and split, built and read like the stores of
engine/data/store.py (memory-mapped .npy arrays, meta.json written last, atomic rename, verified), with
image indices into a region store.

    python -m engine.data.convert --task vqa --questions vqa/train.json vqa/nominival.json \
        --features data/feats_train --ans2label vqa/trainval_ans2label.json --out data/vqa_train

Task store (m questions or statements, L = max_length 20):
    meta.json         format "lxmert-task-store", version, task, n_examples, max_length, answers (the task's
                      label2ans, label order; [] for NLVR2), the feature store it indexes (n_images, sha256 of
                      its img_ids), the vocabulary's and ans2label's sha256, inputs, stats. Written last.
    token_ids.npy     [m, L] int16, [CLS] wordpieces [SEP], padded with [PAD]=0
    lengths.npy       [m] uint8, tokens incl. [CLS] and [SEP]
  VQA / GQA:
    image_index.npy   [m] int32, row in the region store
    labelled.npy      [m] uint8, 1 = the question has a label dict (0 in test splits)
    label_offsets.npy [m + 1] int64: question i's soft labels are label_ids/label_scores[offsets[i]:offsets[i+1]]
    label_ids.npy     [k] int16, labels of the task's ans2label (3129 VQA, 1842 GQA answers)
    label_scores.npy  [k] float32
    question_ids.npy  [m] int64 (VQA: ints) | question_ids.json (GQA: strings)
  NLVR2:
    image_index0.npy, image_index1.npy  [m] int32, rows of img0 and img1 in the region store
    label.npy         [m] int8, 0 / 1, -1 = unlabelled (test)
    identifiers.json  the m identifiers

Soft labels are the authors' VQA/GQA targets: the question's {answer: score} mapped through ans2label,
answers not in it dropped (their `if ans in self.ans2label`) and counted in stats.answers_dropped; a label
dict whose answers are all dropped leaves an empty range and a zero target, as theirs does.
A record whose img_id (NLVR2: img0 or img1) the region store lacks is an error naming the file, record and
img_id; skip_missing_images=True drops and counts it.

Reading: TaskStore(path) (memory-mapped; `gather` returns TaskExamples) and `task_batch(store, regions,
indices)`, the model's keyword arrays as numpy (dynamic padding to the batch's longest sentence; soft-score
matrix [B, answers] for VQA/GQA, pairs of images for NLVR2); `to_torch` turns them into tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.data import store as _store
from engine.data.convert import INT16_MAX, _existing, _identity, _vocab_sha256
from engine.data.formats import MAX_KEPT_ERRORS, DataError, read_ans2label, read_gqa, read_nlvr2, read_vqa
from engine.data.store import (
    FORMAT_VERSION, TASK_FORMAT, ArraySpec, RegionStore, StoreBuilder, StoreError, _Store, region_mask,
    sha256_strings,
)  # fmt: skip
from lxmert.tokenizer import MAX_SEQ_LENGTH, LxmertTokenizer

TASKS = ("vqa", "gqa", "nlvr2")
QA_TASKS = ("vqa", "gqa")
CHUNK_EXAMPLES = 65536
_READERS = {"vqa": read_vqa, "gqa": read_gqa, "nlvr2": read_nlvr2}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


# ------------------------------------------------------------------------------------------ conversion


@dataclass
class TaskStats:
    examples: int = 0  # questions (statements) in the store
    labelled: int = 0  # with a label (VQA/GQA: a label dict, NLVR2: 0 or 1)
    unlabelled: int = 0  # without (test splits)
    label_entries: int = 0  # soft labels kept
    answers_dropped: int = 0  # label answers not in ans2label (dropped, as the authors' dataset does)
    missing_image_records: int = 0  # records dropped because the region store lacks an image (skip mode)
    errors: list[str] = field(default_factory=list)  # the first dropped records' messages
    resumed_at: int = 0  # examples a previous, interrupted run had converted


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _specs(task: str, max_length: int) -> dict[str, ArraySpec]:
    specs = {"token_ids": ArraySpec("<i2", (max_length,)), "lengths": ArraySpec("|u1")}
    if task == "nlvr2":
        specs |= {
            "image_index0": ArraySpec("<i4"), "image_index1": ArraySpec("<i4"), "label": ArraySpec("|i1"),
            "identifiers": ArraySpec("|u1", header=False),  # build state: one a line; identifiers.json at the end
        }  # fmt: skip
    else:
        specs |= {
            "image_index": ArraySpec("<i4"), "labelled": ArraySpec("|u1"), "label_offsets": ArraySpec("<i8"),
            "label_ids": ArraySpec("<i2"), "label_scores": ArraySpec("<f4"),
        }  # fmt: skip
        if task == "vqa":
            specs["question_ids"] = ArraySpec("<i8")
        else:
            specs["question_ids"] = ArraySpec("|u1", header=False)  # build state; question_ids.json at the end
    return specs


def _keys_so_far(builder: StoreBuilder, task: str) -> list[Any]:
    """The question ids / identifiers already in a resumed build (their uniqueness spans all input files)."""
    name = "identifiers" if task == "nlvr2" else "question_ids"
    raw = builder.raw_path(name).read_bytes()
    if task == "vqa":
        return np.frombuffer(raw[_store.HEADER_BYTES :], "<i8")[: builder.rows(name)].tolist()
    return raw[: builder.rows(name)].decode("utf-8").splitlines()


def convert_task(
    task: str,
    json_paths: Sequence[str | Path],
    features_store: str | Path,
    ans2label_path: str | Path | None,
    out: str | Path,
    *,
    vocab_path: str | Path | None = None,
    max_length: int = MAX_SEQ_LENGTH,
    skip_missing_images: bool = False,
    overwrite: bool = False,
    chunk_examples: int = CHUNK_EXAMPLES,
    progress: bool = False,
) -> TaskStats:
    """The authors' fine-tuning JSON files of one split (in order) -> a task store at `out` over `features_store`.

    `ans2label_path` (trainval_ans2label.json) is required for VQA/GQA and ignored (may be None) for NLVR2.
    Resumable and atomic like every store (engine/data/store.py)."""
    _check_task(task)
    paths = _existing(json_paths)
    out = Path(out)
    regions = RegionStore(features_store)
    answers: list[str] = []
    ans2label: dict[str, int] = {}
    if task in QA_TASKS:
        if ans2label_path is None:
            raise ValueError(f"{task} needs its ans2label file (trainval_ans2label.json)")
        ans2label = read_ans2label(ans2label_path)
        if len(ans2label) > INT16_MAX + 1:
            raise ValueError(f"label ids are stored as int16: {len(ans2label)} answers do not fit")
        answers = [""] * len(ans2label)
        for answer, label in ans2label.items():
            answers[label] = answer
    if max_length > 255:
        raise ValueError("lengths are stored as uint8: max_length must be <= 255")
    tokenizer = LxmertTokenizer(vocab_path, max_length)
    if tokenizer.vocab_size > INT16_MAX + 1:
        raise ValueError(f"token ids are stored as int16: a vocabulary of {tokenizer.vocab_size} does not fit")

    features_info = {
        "path": str(features_store), "n_images": len(regions), "img_ids_sha256": sha256_strings(regions.img_ids),
    }  # fmt: skip
    config = {
        "task": task, "inputs": [_identity(p) for p in paths], "features": features_info,
        "answers_sha256": sha256_strings(answers), "vocab_sha256": _vocab_sha256(tokenizer.vocab_path),
        "max_length": max_length, "skip_missing_images": skip_missing_images, "chunk_examples": chunk_examples,
    }  # fmt: skip
    builder = StoreBuilder(out, TASK_FORMAT, config, _specs(task, max_length), overwrite)
    stats = TaskStats(**builder.state["stats"]) if builder.resumed else TaskStats()
    stats.resumed_at = stats.examples
    position = builder.position or {"file": 0, "record": 0}
    bar = tqdm(desc=out.name, unit=" records", initial=stats.examples, disable=not progress, file=sys.stderr)
    try:
        if task in QA_TASKS and builder.rows("label_offsets") == 0:
            builder.append("label_offsets", np.zeros(1, np.int64))
        key_name = "identifier" if task == "nlvr2" else "question_id"
        seen = {key: None for key in _keys_so_far(builder, task)}
        pending: list[tuple[Any, ...]] = []

        def commit(pos: dict[str, int]) -> None:
            if pending:
                token_ids, mask = tokenizer.batch_encode([p[0] for p in pending], pad_to=max_length)
                builder.append("token_ids", token_ids.astype(np.int16))
                builder.append("lengths", mask.sum(axis=1).astype(np.uint8))
                if task == "nlvr2":
                    builder.append("image_index0", np.array([p[1] for p in pending], np.int32))
                    builder.append("image_index1", np.array([p[2] for p in pending], np.int32))
                    builder.append("label", np.array([p[3] for p in pending], np.int8))
                    text = "".join(p[4] + "\n" for p in pending).encode("utf-8")
                    builder.append("identifiers", np.frombuffer(text, np.uint8))
                else:
                    builder.append("image_index", np.array([p[1] for p in pending], np.int32))
                    builder.append("labelled", np.array([p[2] for p in pending], np.uint8))
                    counts = np.array([len(p[3]) for p in pending], np.int64)
                    builder.append("label_offsets", builder.rows("label_ids") + np.cumsum(counts))
                    flat = [item for p in pending for item in p[3]]
                    builder.append("label_ids", np.array([a for a, _ in flat], np.int16).reshape(-1))
                    builder.append("label_scores", np.array([s for _, s in flat], np.float32).reshape(-1))
                    if task == "vqa":
                        builder.append("question_ids", np.array([p[4] for p in pending], np.int64))
                    else:
                        text = "".join(p[4] + "\n" for p in pending).encode("utf-8")
                        builder.append("question_ids", np.frombuffer(text, np.uint8))
                pending.clear()
            saved = dataclasses.asdict(stats)
            del saved["resumed_at"]
            builder.commit(pos, {"stats": saved})

        def image(path: Path, index: int, img_id: str, what: str) -> int | None:
            try:
                return regions.index_of(img_id)
            except KeyError:
                error = DataError(
                    path, f"record {index}",
                    f"{what} {img_id!r} is not in the feature store {features_store} ({len(regions)} images); "
                    "convert its features too, or pass --skip-missing-images to drop such records",
                )  # fmt: skip
                if not skip_missing_images:
                    raise error from None
                if len(stats.errors) < MAX_KEPT_ERRORS:
                    stats.errors.append(str(error))
                return None

        for file_index in range(position["file"], len(paths)):
            path = paths[file_index]
            records = _READERS[task](path)
            start = position["record"] if file_index == position["file"] else 0
            for index in range(start, len(records)):
                rec = records[index]
                bar.update()
                key = getattr(rec, key_name)
                if key in seen:
                    raise DataError(path, f"record {index}", f"{key_name} {key!r} appears in an earlier record or file")
                seen[key] = None
                if task == "nlvr2":
                    i0 = image(path, index, rec.img0, "img0")
                    i1 = None if i0 is None else image(path, index, rec.img1, "img1")
                    if i1 is None:
                        stats.missing_image_records += 1
                        continue
                    has_label = rec.label is not None
                    pending.append((rec.sent, i0, i1, rec.label if has_label else -1, rec.identifier))
                else:
                    i = image(path, index, rec.img_id, "img_id")
                    if i is None:
                        stats.missing_image_records += 1
                        continue
                    label, has_label = rec.label or {}, rec.label is not None
                    kept = [(ans2label[a], s) for a, s in label.items() if a in ans2label]  # the authors' filter
                    stats.answers_dropped += len(label) - len(kept)
                    stats.label_entries += len(kept)
                    pending.append((rec.sent, i, has_label, kept, rec.question_id))
                stats.examples += 1
                stats.labelled += has_label
                stats.unlabelled += not has_label
                if len(pending) >= chunk_examples:
                    commit({"file": file_index, "record": index + 1})
            commit({"file": file_index + 1, "record": 0})

        meta = {
            "format": TASK_FORMAT, "version": FORMAT_VERSION, "task": task, "n_examples": stats.examples,
            "max_length": max_length, "answers": answers, "features": features_info,
            "answers_sha256": config["answers_sha256"], "vocab_sha256": config["vocab_sha256"],
            "ans2label": None if task == "nlvr2" else str(ans2label_path),
            "inputs": [str(p) for p in paths], "stats": dataclasses.asdict(stats),
        }  # fmt: skip
        json_files: dict[str, Any] = {}
        drop: list[str] = []
        if task != "vqa":
            name = "identifiers" if task == "nlvr2" else "question_ids"
            raw = builder.raw_path(name).read_bytes()[: builder.rows(name)]
            json_files[f"{name}.json"] = raw.decode("utf-8").splitlines()
            drop.append(name)
        builder.finish(meta, json_files, drop=drop)
        return stats
    finally:
        bar.close()
        builder.close()


# --------------------------------------------------------------------------------------------- reading


@dataclass
class TaskExamples:
    """A batch of task examples, in the store's dtypes."""

    indices: np.ndarray  # [B] int64, store rows
    token_ids: np.ndarray  # [B, L] int16, padded with 0
    lengths: np.ndarray  # [B] uint8
    image_index: np.ndarray  # [B] int32 (VQA/GQA) or [B, 2] int32 (NLVR2: img0, img1)
    labelled: np.ndarray  # [B] bool
    label_offsets: np.ndarray | None = None  # VQA/GQA: [B + 1] int64, row b's soft labels are [off[b], off[b+1])
    label_ids: np.ndarray | None = None  # VQA/GQA: [K] int16
    label_scores: np.ndarray | None = None  # VQA/GQA: [K] float32
    label: np.ndarray | None = None  # NLVR2: [B] int8, -1 = unlabelled

    def soft_scores(self, num_answers: int) -> np.ndarray:
        """VQA/GQA: the authors' target, a dense [B, num_answers] float32 matrix of soft scores."""
        if self.label_offsets is None or self.label_ids is None or self.label_scores is None:
            raise ValueError("soft scores are for VQA/GQA examples")
        target = np.zeros((len(self.indices), num_answers), np.float32)
        rows = np.repeat(np.arange(len(self.indices)), np.diff(self.label_offsets))
        target[rows, self.label_ids.astype(np.int64)] = self.label_scores
        return target


class TaskStore(_Store):
    """A fine-tuning task store (layout in this file's header), memory-mapped."""

    format = TASK_FORMAT

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.task: str = self.meta["task"]
        self.answers: list[str] = self.meta["answers"]  # label2ans; [] for NLVR2
        self.max_length: int = self.meta["max_length"]
        self._identifiers: list[str] | None = None
        self._checked: set[tuple[int, str]] = set()

    def __len__(self) -> int:
        return int(self.arrays["lengths"].shape[0])

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def _json(self, name: str) -> list[str]:
        if self._identifiers is None:
            with open(self.path / name, encoding="utf-8") as f:
                self._identifiers = json.load(f)
            if len(self._identifiers) != len(self):
                raise StoreError(f"{self.path / name}: {len(self._identifiers)} entries for {len(self)} examples")
        return self._identifiers

    @property
    def question_ids(self) -> np.ndarray | list[str]:
        """VQA: int64 [m] (memory-mapped); GQA: the question id strings; NLVR2: the identifiers."""
        if self.task == "vqa":
            return self.arrays["question_ids"]
        return self._json("identifiers.json" if self.task == "nlvr2" else "question_ids.json")

    @property
    def identifiers(self) -> list[str]:
        """NLVR2's identifiers (the same as question_ids)."""
        if self.task != "nlvr2":
            raise AttributeError("identifiers are NLVR2's; VQA/GQA have question_ids")
        return self._json("identifiers.json")

    def check_features(self, regions: RegionStore) -> None:
        """Raise unless `regions` is the feature store this task store's image indices point into."""
        key = (len(regions), str(regions.path))
        if key in self._checked:
            return
        expected = self.meta["features"]
        if len(regions) != expected["n_images"] or sha256_strings(regions.img_ids) != expected["img_ids_sha256"]:
            raise StoreError(
                f"{self.path} indexes a feature store of {expected['n_images']} images "
                f"(built from {expected['path']}), not {regions.path} ({len(regions)} images)"
            )
        self._checked.add(key)

    def labels_of(self, i: int) -> dict[int, float] | int | None:
        """VQA/GQA: {label: score} (None when unlabelled); NLVR2: 0 / 1 (None when unlabelled)."""
        a = self.arrays
        if self.task == "nlvr2":
            label = int(a["label"][i])
            return None if label < 0 else label
        if not a["labelled"][i]:
            return None
        lo, hi = int(a["label_offsets"][i]), int(a["label_offsets"][i + 1])
        return {int(k): float(s) for k, s in zip(a["label_ids"][lo:hi], a["label_scores"][lo:hi])}

    def gather(self, indices: Sequence[int] | np.ndarray) -> TaskExamples:
        a = self.arrays
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for {len(self)} examples")
        common = dict(indices=idx, token_ids=a["token_ids"][idx], lengths=a["lengths"][idx])
        if self.task == "nlvr2":
            label = a["label"][idx]
            image_index = np.stack([a["image_index0"][idx], a["image_index1"][idx]], axis=1)
            return TaskExamples(**common, image_index=image_index, labelled=label >= 0, label=label)
        lo, hi = a["label_offsets"][idx], a["label_offsets"][idx + 1]
        counts = hi - lo
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        rows = np.repeat(lo - offsets[:-1], counts) + np.arange(offsets[-1])
        return TaskExamples(
            **common, image_index=a["image_index"][idx], labelled=a["labelled"][idx].astype(bool),
            label_offsets=offsets, label_ids=a["label_ids"][rows], label_scores=a["label_scores"][rows],
        )  # fmt: skip


def task_batch(store: TaskStore, regions: RegionStore, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """The keyword arrays of LxmertForQuestionAnswering / LxmertForNLVR2 for store rows `indices`, as numpy.

    input_ids, attention_mask int64 [B, L] (L = the batch's longest sentence); visual_feats float32
    [B, R, D] (NLVR2 [B, 2, R, D]); visual_pos float32 [B, R, 4] ([B, 2, R, 4]); visual_attention_mask
    int64 only when some region is padding; labels: VQA/GQA float32 [B, answers] soft scores, NLVR2 int64
    [B] -- left out when an example of the batch is unlabelled (test splits)."""
    store.check_features(regions)
    ex = store.gather(indices)
    width = int(ex.lengths.max(initial=0))
    input_ids = ex.token_ids[:, :width].astype(np.int64)
    attention_mask = (np.arange(width) < ex.lengths[:, None]).astype(np.int64)
    flat = ex.image_index.reshape(-1)
    r = regions.gather(flat)
    shape = ex.image_index.shape
    batch: dict[str, np.ndarray] = {
        "input_ids": input_ids, "attention_mask": attention_mask,
        "visual_feats": r.features.astype(np.float32).reshape(*shape, *r.features.shape[1:]),
        "visual_pos": r.boxes.astype(np.float32).reshape(*shape, *r.boxes.shape[1:]),
    }  # fmt: skip
    if (r.num_boxes < regions.num_regions).any():
        batch["visual_attention_mask"] = region_mask(r.num_boxes, regions.num_regions).astype(np.int64).reshape(
            *shape, regions.num_regions
        )
    if ex.labelled.all():
        if store.task == "nlvr2":
            assert ex.label is not None
            batch["labels"] = ex.label.astype(np.int64)
        else:
            batch["labels"] = ex.soft_scores(store.num_answers)
    return batch


def to_torch(batch: Mapping[str, np.ndarray], device: Any = None) -> dict[str, Any]:
    """task_batch's arrays as tensors (integers int64, floating point float32), on `device` if given."""
    import torch

    out = {}
    for name, array in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(array))
        t = t.float() if t.is_floating_point() else t.long()
        out[name] = t if device is None else t.to(device)
    return out
