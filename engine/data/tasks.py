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
img_id; skip_missing_images=True drops and counts it. A record that fails validation, or repeats the
question_id / identifier of an earlier record or file, is an error naming both; skip_bad_rows=True
(--skip-bad-rows) drops and counts it (stats.bad_records, the first messages in stats.errors).

Reading: TaskStore(path) (memory-mapped; `gather` returns TaskExamples) and `task_arrays(store, regions,
indices)`, the model's keyword arrays as numpy in compact dtypes (dynamic padding to the batch's longest sentence;
soft-score matrix [B, answers] for VQA/GQA, pairs of images for NLVR2), what engine.data.loaders.TaskLoader
turns into TaskBatches; `task_batch` gives them widened and `to_torch` as tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.atomic import file_sha256
from engine.data.build import (
    INT16_MAX,
    SentenceConversion,
    append_labels,
    features_info,
    input_identity,
)
from engine.data.formats import (
    MAX_KEPT_ERRORS,
    DataError,
    parse_gqa,
    parse_nlvr2,
    parse_vqa,
    read_ans2label,
    read_json_list,
)
from engine.data.store import (
    FORMAT_VERSION,
    HEADER_BYTES,
    TASK_FORMAT,
    ArraySpec,
    Regions,
    RegionStore,
    SentenceStore,
    StoreBuilder,
    StoreError,
    region_mask,
    sha256_strings,
)

if TYPE_CHECKING:  # the tokenizer imports torch (the lxmert package): loaded when a conversion starts
    from lxmert.tokenizer import LxmertTokenizer

TASKS = ("vqa", "gqa", "nlvr2")
QA_TASKS = ("vqa", "gqa")
CHUNK_EXAMPLES = 65536
_PARSERS = {"vqa": parse_vqa, "gqa": parse_gqa, "nlvr2": parse_nlvr2}


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
    bad_records: int = 0  # malformed or repeated records dropped (skip_bad_rows)
    errors: list[str] = field(default_factory=list)  # the first dropped records' messages
    resumed_at: int = 0  # examples a previous, interrupted run had converted


def _specs(task: str) -> dict[str, ArraySpec]:
    """The arrays besides token_ids and lengths."""
    if task == "nlvr2":
        return {
            "image_index0": ArraySpec("<i4"),
            "image_index1": ArraySpec("<i4"),
            "label": ArraySpec("|i1"),
            "identifiers": ArraySpec("|u1", header=False),  # build state: one a line; identifiers.json at the end
        }
    specs = {
        "image_index": ArraySpec("<i4"),
        "labelled": ArraySpec("|u1"),
        "label_offsets": ArraySpec("<i8"),
        "label_ids": ArraySpec("<i2"),
        "label_scores": ArraySpec("<f4"),
    }
    if task == "vqa":
        specs["question_ids"] = ArraySpec("<i8")
    else:
        specs["question_ids"] = ArraySpec("|u1", header=False)  # build state; question_ids.json at the end
    return specs


def _lines(rows: list[tuple[Any, ...]], column: int) -> np.ndarray:
    return np.frombuffer("".join(r[column] + "\n" for r in rows).encode("utf-8"), np.uint8)


class TaskConversion(SentenceConversion):
    """The authors' fine-tuning JSON files of one split -> a task store (see convert_task)."""

    format = TASK_FORMAT

    def __init__(
        self,
        task: str,
        json_paths: Sequence[str | Path],
        features_store: str | Path,
        ans2label_path: str | Path | None,
        out: str | Path,
        *,
        vocab_path: str | Path | None,
        max_length: int | None,
        skip_bad_rows: bool,
        skip_missing_images: bool,
        overwrite: bool,
        chunk_examples: int,
        progress: bool,
    ) -> None:
        _check_task(task)
        super().__init__(
            json_paths,
            features_store,
            out,
            vocab_path=vocab_path,
            max_length=max_length,
            chunk=chunk_examples,
            overwrite=overwrite,
            progress=progress,
        )
        self.task, self.ans2label_path = task, ans2label_path
        self.skip_bad_rows, self.skip_missing_images = skip_bad_rows, skip_missing_images
        self.answers: list[str] = []
        self.ans2label: dict[str, int] = {}
        if task in QA_TASKS:
            if ans2label_path is None:
                raise ValueError(f"{task} needs its ans2label file (trainval_ans2label.json)")
            self.ans2label = read_ans2label(ans2label_path)
            if len(self.ans2label) > INT16_MAX + 1:
                raise ValueError(f"label ids are stored as int16: {len(self.ans2label)} answers do not fit")
            self.answers = [""] * len(self.ans2label)
            for answer, label in self.ans2label.items():
                self.answers[label] = answer
        self.info = features_info(self.regions, features_store)
        self.key_name = "identifier" if task == "nlvr2" else "question_id"
        self.keys = "identifiers" if task == "nlvr2" else "question_ids"
        self.drop = () if task == "vqa" else (self.keys,)

    def specs(self) -> dict[str, ArraySpec]:
        return _specs(self.task)

    def config(self, tokenizer: LxmertTokenizer) -> dict[str, Any]:
        return {
            "task": self.task,
            "inputs": [input_identity(p) for p in self.paths],
            "features": self.info,
            "answers_sha256": sha256_strings(self.answers),
            "vocab_sha256": file_sha256(tokenizer.vocab_path),
            "max_length": self.max_length,
            "skip_bad_rows": self.skip_bad_rows,
            "skip_missing_images": self.skip_missing_images,
            "chunk_examples": self.chunk,
        }

    def restore(self, state: Any) -> None:
        self.stats = TaskStats(**state["stats"]) if state is not None else TaskStats()
        self.stats.resumed_at = self.stats.examples

    @property
    def records_done(self) -> int:
        return self.stats.examples

    def start(self, builder: StoreBuilder) -> None:
        if self.task in QA_TASKS and builder.rows("label_offsets") == 0:
            builder.append("label_offsets", np.zeros(1, np.int64))
        # the question ids / identifiers already in a resumed build: their uniqueness spans all input files
        raw = builder.raw_path(self.keys).read_bytes()
        if self.task == "vqa":
            keys = np.frombuffer(raw[HEADER_BYTES:], "<i8")[: builder.rows(self.keys)].tolist()
        else:
            keys = raw[: builder.rows(self.keys)].decode("utf-8").splitlines()
        self.seen = dict.fromkeys(keys)

    def records(self, path: Path, start: int) -> Iterator[tuple[int, Any]]:
        records, parse = read_json_list(path), _PARSERS[self.task]
        for index in range(start, len(records)):
            try:
                record = parse(path, index, records[index])
            except DataError as error:
                self._drop_bad(error)
                continue
            yield index, record

    def _drop_bad(self, error: DataError) -> None:
        """Raise a bad record's error, or (skip_bad_rows) count it and keep its message."""
        if not self.skip_bad_rows:
            raise error
        self.stats.bad_records += 1
        if len(self.stats.errors) < MAX_KEPT_ERRORS:
            self.stats.errors.append(str(error))

    def _image(self, path: Path, index: int, img_id: str, what: str) -> int | None:
        try:
            return self.regions.index_of(img_id)
        except KeyError:
            error = DataError(
                path,
                f"record {index}",
                f"{what} {img_id!r} is not in the feature store {self.features} ({len(self.regions)} images); "
                "convert its features too, or pass --skip-missing-images to drop such records",
            )
            if not self.skip_missing_images:
                raise error from None
            if len(self.stats.errors) < MAX_KEPT_ERRORS:
                self.stats.errors.append(str(error))
            return None

    def take(self, path: Path, index: int, rec: Any) -> None:
        stats = self.stats
        key = getattr(rec, self.key_name)
        if key in self.seen:
            problem = f"{self.key_name} {key!r} appears in an earlier record or file"
            self._drop_bad(DataError(path, f"record {index}", problem))
            return
        self.seen[key] = None
        if self.task == "nlvr2":
            i0 = self._image(path, index, rec.img0, "img0")
            i1 = None if i0 is None else self._image(path, index, rec.img1, "img1")
            if i1 is None:
                stats.missing_image_records += 1
                return
            has_label = rec.label is not None
            self.pending.append((rec.sent, i0, i1, rec.label if has_label else -1, rec.identifier))
        else:
            i = self._image(path, index, rec.img_id, "img_id")
            if i is None:
                stats.missing_image_records += 1
                return
            label, has_label = rec.label or {}, rec.label is not None
            kept = [(self.ans2label[a], s) for a, s in label.items() if a in self.ans2label]  # the authors' filter
            stats.answers_dropped += len(label) - len(kept)
            stats.label_entries += len(kept)
            self.pending.append((rec.sent, i, has_label, kept, rec.question_id))
        stats.examples += 1
        stats.labelled += has_label
        stats.unlabelled += not has_label

    def append_rows(self, builder: StoreBuilder, rows: list[tuple[Any, ...]]) -> None:
        if self.task == "nlvr2":
            builder.append("image_index0", np.array([r[1] for r in rows], np.int32))
            builder.append("image_index1", np.array([r[2] for r in rows], np.int32))
            builder.append("label", np.array([r[3] for r in rows], np.int8))
            builder.append("identifiers", _lines(rows, 4))
            return
        builder.append("image_index", np.array([r[1] for r in rows], np.int32))
        builder.append("labelled", np.array([r[2] for r in rows], np.uint8))
        append_labels(builder, (r[3] for r in rows))
        if self.task == "vqa":
            builder.append("question_ids", np.array([r[4] for r in rows], np.int64))
        else:
            builder.append("question_ids", _lines(rows, 4))

    def state(self) -> Any:
        return {"stats": self.stats_state(self.stats)}

    def meta(self, tokenizer: LxmertTokenizer) -> dict[str, Any]:
        return {
            "format": TASK_FORMAT,
            "version": FORMAT_VERSION,
            "task": self.task,
            "n_examples": self.stats.examples,
            "max_length": self.max_length,
            "answers": self.answers,
            "features": self.info,
            "answers_sha256": sha256_strings(self.answers),
            "vocab_sha256": file_sha256(tokenizer.vocab_path),
            "ans2label": None if self.task == "nlvr2" else str(self.ans2label_path),
            "inputs": [str(p) for p in self.paths],
            "stats": self.stats_state(self.stats),
        }

    def json_files(self, builder: StoreBuilder) -> dict[str, Any]:
        if self.task == "vqa":
            return {}
        raw = builder.raw_path(self.keys).read_bytes()[: builder.rows(self.keys)]
        return {f"{self.keys}.json": raw.decode("utf-8").splitlines()}


def convert_task(
    task: str,
    json_paths: Sequence[str | Path],
    features_store: str | Path,
    ans2label_path: str | Path | None,
    out: str | Path,
    *,
    vocab_path: str | Path | None = None,
    max_length: int | None = None,
    skip_bad_rows: bool = False,
    skip_missing_images: bool = False,
    overwrite: bool = False,
    chunk_examples: int = CHUNK_EXAMPLES,
    progress: bool = False,
) -> TaskStats:
    """The authors' fine-tuning JSON files of one split (in order) -> a task store at `out` over `features_store`.

    `ans2label_path` (trainval_ans2label.json) is required for VQA/GQA and ignored (may be None) for NLVR2;
    max_length None is the tokenizer's (20). Resumable and atomic like every store (engine/data/store.py)."""
    return TaskConversion(
        task,
        json_paths,
        features_store,
        ans2label_path,
        out,
        vocab_path=vocab_path,
        max_length=max_length,
        skip_bad_rows=skip_bad_rows,
        skip_missing_images=skip_missing_images,
        overwrite=overwrite,
        chunk_examples=chunk_examples,
        progress=progress,
    ).run()


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


class TaskStore(SentenceStore):
    """A fine-tuning task store (layout in this file's header), memory-mapped."""

    format = TASK_FORMAT

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.task: str = self.meta["task"]
        self.answers: list[str] = self.meta["answers"]  # label2ans; [] for NLVR2
        self._identifiers: list[str] | None = None

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

    def labels_of(self, i: int) -> dict[int, float] | int | None:
        """VQA/GQA: {label: score} (None when unlabelled); NLVR2: 0 / 1 (None when unlabelled)."""
        a = self.arrays
        if self.task == "nlvr2":
            label = int(a["label"][i])
            return None if label < 0 else label
        if not a["labelled"][i]:
            return None
        return self.soft_labels(i)

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
        offsets, label_ids, label_scores = self.gather_labels(idx)
        return TaskExamples(
            **common,
            image_index=a["image_index"][idx],
            labelled=a["labelled"][idx].astype(bool),
            label_offsets=offsets,
            label_ids=label_ids,
            label_scores=label_scores,
        )


def task_arrays(
    store: TaskStore, regions: RegionStore, indices: Sequence[int] | np.ndarray, labels: bool = True
) -> dict[str, np.ndarray]:
    """The keyword arrays of LxmertForQuestionAnswering / LxmertForNLVR2 for store rows `indices`, in the
    stores' compact dtypes (what a loader pins and copies; engine.data.batch.TaskBatch widens them on the device).

    input_ids int16 and attention_mask uint8 [B, L] (L = the batch's longest sentence); visual_feats [B, R, D]
    (NLVR2 [B, 2, R, D]) in the region store's float dtype; visual_pos float32 [B, R, 4] ([B, 2, R, 4]);
    visual_attention_mask uint8, only when some region is padding; labels (unless labels=False): VQA/GQA
    float32 [B, answers] soft scores, NLVR2 int8 [B] -- left out when an example of the batch is unlabelled."""
    store.check_features(regions)
    ex = store.gather(indices)
    width = int(ex.lengths.max(initial=0))
    batch: dict[str, np.ndarray] = {
        "input_ids": np.ascontiguousarray(ex.token_ids[:, :width]),
        "attention_mask": (np.arange(width) < ex.lengths[:, None]).astype(np.uint8),
        **visual_arrays(regions.gather(ex.image_index.reshape(-1)), ex.image_index.shape),
    }
    if labels and ex.labelled.all():
        if store.task == "nlvr2":
            assert ex.label is not None
            batch["labels"] = ex.label
        else:
            batch["labels"] = ex.soft_scores(store.num_answers)
    return batch


def visual_arrays(r: Regions, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The visual keywords of gathered regions ([N, R, ...], N = prod(shape)) shaped [*shape, R, ...]:
    visual_feats, visual_pos and, only when some region is padding, visual_attention_mask (uint8)."""
    num_regions = r.features.shape[1]
    out = {
        "visual_feats": r.features.reshape(*shape, *r.features.shape[1:]),
        "visual_pos": r.boxes.reshape(*shape, *r.boxes.shape[1:]),
    }
    if (r.num_boxes < num_regions).any():
        out["visual_attention_mask"] = (
            region_mask(r.num_boxes, num_regions).astype(np.uint8).reshape(*shape, num_regions)
        )
    return out


def task_batch(store: TaskStore, regions: RegionStore, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
    """task_arrays widened on the host, the dtypes the model computes in: integers int64, floating point float32."""
    return {
        name: a.astype(np.float32 if a.dtype.kind == "f" else np.int64)
        for name, a in task_arrays(store, regions, indices).items()
    }


def to_torch(batch: Mapping[str, np.ndarray], device: Any = None) -> dict[str, Any]:
    """task_batch's arrays as tensors (integers int64, floating point float32), on `device` if given."""
    import torch

    out = {}
    for name, array in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(array))
        t = t.float() if t.is_floating_point() else t.long()
        out[name] = t if device is None else t.to(device)
    return out
