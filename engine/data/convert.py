"""Convert the public data into stores (layout and build protocol: engine/data/store.py).

    python -m engine.data.convert --tsv train2014_obj36.tsv val2014_obj36.tsv --out data/feats_train
    python -m engine.data.convert --text mscoco_train.json vgnococo.json --features data/feats_train \
        --answers all_ans.json --out data/text_train

One streaming pass each, bounded memory (one chunk of rows: 512 images, or 65536 sentences, at a time):
region features are decoded, padded or cut to 36 regions, boxes normalised, and appended chunk by chunk;
sentences are tokenised in batches with LxmertTokenizer and their labels mapped onto the answer table as the
authors' pre-training data does. A crash or ^C is resumed by rerunning the same command; the output appears
only when complete and verified. Rerunning a finished conversion says it is already converted and exits 0 when
the inputs (resolved paths, sizes, modification times) and options are those meta.json records; otherwise an
existing store is replaced only with --overwrite. Bad input stops with the file and row/record
(formats.DataError), or with --skip-bad-rows is skipped and counted. A sentence whose img_id the feature store
lacks is an error naming the text file, record and img_id (the authors silently drop them); --skip-missing-images
counts and drops them.
--skip-bad-rows works the same way for the task files of --task (a record that fails validation, or repeats an
earlier question_id / identifier). Text files may start with a UTF-8 byte-order mark; a byte that is not UTF-8
stops with the file, the record and the byte offset and line. An input that is a directory, not a file, is an
error; so is a conversion left with nothing to store (an empty TSV or JSON list, every row skipped as bad or
every record's image missing): a store of no rows is never what was meant, and no partial build is left behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from engine.atomic import file_sha256, kill_point
from engine.data.build import (
    INT16_MAX,
    SentenceConversion,
    append_labels,
    existing_inputs,
    features_info,
    input_identity,
    nothing_to_store,
)
from engine.data.formats import (
    FEAT_DIM,
    MAX_KEPT_ERRORS,
    NUM_ATTR_LABELS,
    NUM_OBJECT_LABELS,
    AnswerTable,
    DataError,
    ReadStats,
    RegionRecord,
    read_answer_table,
    read_pretrain,
    read_tsv,
)
from engine.data.store import (
    FORMAT_VERSION,
    NUM_REGIONS,
    REGION_FORMAT,
    TEXT_FORMAT,
    AlreadyConverted,
    ArraySpec,
    Regions,
    StoreBuilder,
    StoreError,
    sha256_strings,
)
from engine.data.tasks import convert_task

if TYPE_CHECKING:  # the tokenizer imports torch (the lxmert package): only text and task conversions load it
    from lxmert.tokenizer import LxmertTokenizer

FP16_MAX = 65504.0
CHUNK_IMAGES = 512  # about 75 MB of float16 features at 36 x 2048
CHUNK_SENTENCES = 65536


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
            ("features", rec.features[:n], 0),
            ("boxes", boxes, 0),
            ("obj_ids", rec.objects_id[:n], -1),
            ("obj_conf", rec.objects_conf[:n], 0),
            ("attr_ids", rec.attrs_id[:n], -1),
            ("attr_conf", rec.attrs_conf[:n], 0),
        ):
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


def regions_of(records: Sequence[RegionRecord], num_regions: int = NUM_REGIONS, fp32: bool = True) -> Regions:
    """TSV records as a region store holds them ([N, R, ...]: boxes normalised, padded or cut to `num_regions`),
    without a store; float32 features unless fp32=False (the default store's float16)."""
    feat_dim = records[0].features.shape[1] if records else 0
    chunk = _RegionChunk(len(records), num_regions, feat_dim, "<f4" if fp32 else "<f2")
    for rec in records:
        chunk.add(rec)
    return Regions(**chunk.arrays)


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
    paths = existing_inputs(tsv_paths, "TSV file")
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
        feat_dim=feat_dim,
        fp32=fp32,
        num_regions=num_regions,
        num_object_labels=num_object_labels,
        num_attr_labels=num_attr_labels,
        skip_bad_rows=skip_bad_rows,
        chunk_images=chunk_images,
    )
    builder = StoreBuilder(
        out, REGION_FORMAT, {"inputs": [input_identity(p) for p in paths], **options}, specs, overwrite
    )
    if builder.complete is not None:  # a previous run was killed after sealing the store: only the install is left
        builder.install()
        stats = FeatureStats(**builder.complete["stats"])
        stats.resumed_at = stats.images
        return stats
    position = builder.position or {"file": 0, "offset": 0, "row": 1}
    sizes = [p.stat().st_size for p in paths]
    bar = tqdm(
        total=sum(sizes),
        initial=sum(sizes[: position["file"]]) + position["offset"],
        unit="B",
        unit_scale=True,
        desc=Path(out).name,
        disable=not progress,
        file=sys.stderr,
    )
    try:
        stats = FeatureStats(**builder.state["stats"]) if builder.resumed else FeatureStats()
        stats.resumed_at = stats.images
        ids_so_far = builder.raw_path("img_ids").read_bytes().decode("utf-8").splitlines()
        seen = {img_id: row for row, img_id in enumerate(ids_so_far)}
        chunk = _RegionChunk(chunk_images, num_regions, feat_dim, float_dtype)
        bad_before = stats.bad_rows  # bad rows of the files before the current one

        def saved() -> dict[str, Any]:  # the stats as progress.json and meta.json keep them
            state = dataclasses.asdict(stats)
            del state["resumed_at"]
            return state

        def commit(pos: dict[str, int], read: ReadStats) -> None:
            chunk.flush_into(builder)
            stats.bad_rows = bad_before + read.bad
            if read.errors:
                stats.errors = (stats.errors + read.errors)[:MAX_KEPT_ERRORS]
                read.errors.clear()
            builder.commit(pos, {"stats": saved()})

        for file_index in range(position["file"], len(paths)):
            path = paths[file_index]
            resume_here = file_index == position["file"]
            read = ReadStats()
            start_offset = position["offset"] if resume_here else 0
            for rec in read_tsv(
                path,
                feat_dim=feat_dim,
                num_object_labels=num_object_labels,
                num_attr_labels=num_attr_labels,
                on_error="skip" if skip_bad_rows else "raise",
                stats=read,
                start_offset=start_offset,
                start_row=position["row"] if resume_here else 1,
            ):
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
                kill_point("convert.row")
                if chunk.n == chunk_images:
                    commit({"file": file_index, "offset": rec.end_offset, "row": rec.row + 1}, read)
            bar.update(sizes[file_index] - start_offset)
            commit({"file": file_index + 1, "offset": 0, "row": 1}, read)  # the file is done
            bad_before = stats.bad_rows

        ids = builder.raw_path("img_ids").read_bytes().decode("utf-8").splitlines()
        if not ids:
            builder.discard()
            rows = f"all {stats.bad_rows} rows are bad (skipped)" if stats.bad_rows else "no rows (an empty file?)"
            raise nothing_to_store(paths, f"{rows}: no images to store", stats.errors)
        meta = {
            "format": REGION_FORMAT,
            "version": FORMAT_VERSION,
            "n_images": len(ids),
            **options,
            "float_dtype": float_dtype,
            "inputs": [str(p) for p in paths],
            "stats": saved(),
        }
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


class TextConversion(SentenceConversion):
    """Pre-training JSON files -> a text store (the authors' sentf / labelf records; see convert_text)."""

    format = TEXT_FORMAT

    def __init__(
        self,
        json_paths: Sequence[str | Path],
        features: str | Path,
        out: str | Path,
        *,
        answers: str | Path | AnswerTable | None,
        vocab_path: str | Path | None,
        max_length: int | None,
        skip_bad_rows: bool,
        skip_missing_images: bool,
        overwrite: bool,
        chunk_sentences: int,
        progress: bool,
    ) -> None:
        super().__init__(
            json_paths,
            features,
            out,
            vocab_path=vocab_path,
            max_length=max_length,
            chunk=chunk_sentences,
            overwrite=overwrite,
            progress=progress,
        )
        self.table = read_answer_table(answers) if isinstance(answers, (str, Path)) else answers
        if self.table is not None and len(self.table) > INT16_MAX + 1:
            raise ValueError(f"label ids are stored as int16: the answer table's {len(self.table)} answers do not fit")
        self.answers_list = list(self.table.answers) if self.table is not None else []
        self.skip_bad_rows, self.skip_missing_images = skip_bad_rows, skip_missing_images
        self.index = {img_id: i for i, img_id in enumerate(self.regions.img_ids)}
        self.info = features_info(self.regions, features)

    def specs(self) -> dict[str, ArraySpec]:
        return {
            "image_index": ArraySpec("<i4"),
            "source_id": ArraySpec("|u1"),
            "sent_index": ArraySpec("<i4"),
            "label_offsets": ArraySpec("<i8"),
            "label_ids": ArraySpec("<i2"),
            "label_scores": ArraySpec("<f4"),
        }

    def config(self, tokenizer: LxmertTokenizer) -> dict[str, Any]:
        return {
            "inputs": [input_identity(p) for p in self.paths],
            "features": self.info,
            "answers_sha256": sha256_strings(self.answers_list),
            "vocab_sha256": file_sha256(tokenizer.vocab_path),
            "max_length": self.max_length,
            "skip_bad_rows": self.skip_bad_rows,
            "skip_missing_images": self.skip_missing_images,
            "chunk_sentences": self.chunk,
        }

    def restore(self, state: Any) -> None:
        state = state or {"stats": {}, "sources": []}
        self.stats = TextStats(**state["stats"])
        self.stats.resumed_at = self.stats.sentences
        self.sources: list[str] = state["sources"]
        self.bad_before = self.stats.bad_records
        self.read = ReadStats()

    @property
    def records_done(self) -> int:
        return self.stats.records

    def start(self, builder: StoreBuilder) -> None:
        if builder.rows("label_offsets") == 0:
            builder.append("label_offsets", np.zeros(1, np.int64))

    def records(self, path: Path, start: int) -> Iterator[tuple[int, Any]]:
        self.read = ReadStats()
        on_error = "skip" if self.skip_bad_rows else "raise"
        for rec in read_pretrain(path, on_error=on_error, stats=self.read, start_record=start):
            yield rec.index, rec

    def take(self, path: Path, index: int, rec: Any) -> None:
        stats = self.stats
        stats.records += 1
        image = self.index.get(rec.img_id)
        if image is None:
            if not self.skip_missing_images:
                raise DataError(
                    path,
                    f"record {index}",
                    f"img_id {rec.img_id!r} is not in the feature store {self.features} ({len(self.regions)} images); "
                    "convert its features too, or pass --skip-missing-images to drop such sentences",
                )
            stats.missing_image_records += 1
            stats.missing_image_sentences += sum(len(s) for s in rec.sentf.values())
            return
        if rec.labelf and self.table is None:
            raise DataError(
                path,
                f"record {index}",
                "has QA labels (labelf) but no answer table was given: pass answers=all_ans.json (--answers)",
            )
        for entry in rec.entries():
            if entry.source not in self.sources:
                if len(self.sources) == 256:
                    raise DataError(path, f"record {index}", "more than 256 sources (source ids are uint8)")
                self.sources.append(entry.source)
            labels: dict[int, float] = {}
            if entry.label is not None:
                assert self.table is not None
                labels = self.table.convert_label(entry.label)
                stats.answers_dropped += len(entry.label) - len(labels)
            stats.labelled += bool(labels)
            stats.sentences += 1
            self.pending.append((entry.sentence, image, self.sources.index(entry.source), entry.sent_index, labels))

    def append_rows(self, builder: StoreBuilder, rows: list[tuple[Any, ...]]) -> None:
        builder.append("image_index", np.array([r[1] for r in rows], np.int32))
        builder.append("source_id", np.array([r[2] for r in rows], np.uint8))
        builder.append("sent_index", np.array([r[3] for r in rows], np.int32))
        append_labels(builder, (r[4].items() for r in rows))

    def before_commit(self) -> None:
        self.stats.bad_records = self.bad_before + self.read.bad
        if self.read.errors:
            self.stats.errors = (self.stats.errors + self.read.errors)[:MAX_KEPT_ERRORS]
            self.read.errors.clear()

    def end_of_file(self) -> None:
        self.bad_before = self.stats.bad_records

    def state(self) -> Any:
        return {"stats": self.stats_state(self.stats), "sources": self.sources}

    def meta(self, tokenizer: LxmertTokenizer) -> dict[str, Any]:
        return {
            "format": TEXT_FORMAT,
            "version": FORMAT_VERSION,
            "n_sentences": self.stats.sentences,
            "sources": self.sources,
            "max_length": self.max_length,
            "features": self.info,
            "answers_sha256": sha256_strings(self.answers_list),
            "vocab_sha256": file_sha256(tokenizer.vocab_path),
            "inputs": [str(p) for p in self.paths],
            "stats": self.stats_state(self.stats),
        }

    def json_files(self, builder: StoreBuilder) -> dict[str, Any]:
        return {"answers.json": self.answers_list}


def convert_text(
    json_paths: Sequence[str | Path],
    features: str | Path,
    out: str | Path,
    *,
    answers: str | Path | AnswerTable | None = None,
    vocab_path: str | Path | None = None,
    max_length: int | None = None,
    skip_bad_rows: bool = False,
    skip_missing_images: bool = False,
    overwrite: bool = False,
    chunk_sentences: int = CHUNK_SENTENCES,
    progress: bool = True,
) -> TextStats:
    """Pre-training JSON files -> a text store at `out` whose image_index rows point into the `features` store.

    `answers` (all_ans.json or a table) is needed as soon as a sentence has a QA label; max_length None is the
    tokenizer's (lxmert.tokenizer.MAX_SEQ_LENGTH, 20).
    """
    return TextConversion(
        json_paths,
        features,
        out,
        answers=answers,
        vocab_path=vocab_path,
        max_length=max_length,
        skip_bad_rows=skip_bad_rows,
        skip_missing_images=skip_missing_images,
        overwrite=overwrite,
        chunk_sentences=chunk_sentences,
        progress=progress,
    ).run()


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
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count malformed rows / records (every mode)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    features = parser.add_argument_group("--tsv mode")
    features.add_argument("--fp32", action="store_true", help="float32 features and confidences (default float16)")
    features.add_argument("--feat-dim", type=int, default=FEAT_DIM, help="region feature size (default %(default)s)")
    features.add_argument("--num-regions", type=int, default=NUM_REGIONS, help="regions an image (default %(default)s)")
    features.add_argument("--chunk-images", type=int, default=CHUNK_IMAGES, help="images a chunk (default %(default)s)")
    text = parser.add_argument_group("--text mode")
    text.add_argument("--features", help="the region store the sentences' images are in")
    text.add_argument("--answers", help="the QA answer table (all_ans.json)")
    text.add_argument("--vocab", help="BERT uncased vocab.txt (default: the copy shipped in lxmert/vocab)")
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
            if not args.features or not args.questions:
                parser.error("--task needs --questions (its JSON files) and --features (the region store)")
            if args.task != "nlvr2" and not args.ans2label:
                parser.error(f"--task {args.task} needs --ans2label (trainval_ans2label.json)")
            stats: Any = convert_task(
                args.task,
                args.questions,
                args.features,
                args.ans2label,
                args.out,
                vocab_path=args.vocab,
                skip_bad_rows=args.skip_bad_rows,
                skip_missing_images=args.skip_missing_images,
                overwrite=args.overwrite,
                progress=not args.quiet,
            )
        elif args.tsv:
            stats = convert_features(
                args.tsv,
                args.out,
                feat_dim=args.feat_dim,
                fp32=args.fp32,
                num_regions=args.num_regions,
                skip_bad_rows=args.skip_bad_rows,
                overwrite=args.overwrite,
                chunk_images=args.chunk_images,
                progress=not args.quiet,
            )
        else:
            if not args.features:
                parser.error("--text needs --features (the region store of its images)")
            stats = convert_text(
                args.text,
                args.features,
                args.out,
                answers=args.answers,
                vocab_path=args.vocab,
                skip_bad_rows=args.skip_bad_rows,
                skip_missing_images=args.skip_missing_images,
                overwrite=args.overwrite,
                chunk_sentences=args.chunk_sentences,
                progress=not args.quiet,
            )
    except AlreadyConverted:  # the same inputs (paths, sizes, modification times) and options
        print(f"{args.out}: already converted from these inputs and options; nothing to do")
        return 0
    except (DataError, StoreError, FileExistsError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # the input's or the user's: as every other command line of the engine
    summary = {k: v for k, v in dataclasses.asdict(stats).items() if k != "errors"}
    print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    for message in stats.errors:
        print(f"  skipped: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
