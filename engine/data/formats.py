"""Readers (and the writers the synthetic data set and the tests need) of the formats LXMERT's public data
comes in, exactly as the authors' code (airsplay/lxmert) reads them.

- Region features: TSV, no header, 10 tab-separated fields a row (TSV_FIELDS); img_h, img_w, num_boxes are
  decimal ints, the rest base64 of raw little-endian numpy buffers (TSV_DTYPES). `read_tsv` streams one
  row at a time: a 24 GB file is never in memory. Rows are split on tabs by hand rather than with the csv
  module: a row is exactly one line (so the row number in an error is the 1-based line number), fields are
  never quoted, and csv's field size limit (131072 characters, which the features field exceeds 2000-fold)
  never applies.
- Pre-training JSON: a list of {img_id, sentf: {source: [sentences]}, labelf: {source: [{answer: score}]}}
  with labelf[src][i] the label of sentf[src][i] (a source may have no labels: COCO captions). The files
  reach a gigabyte, so `iter_json_array` streams the top-level list record by record.
- Fine-tuning JSON (VQA, GQA, NLVR2) and the answer tables are small: read whole, validated record by record
  (`parse_vqa` and its siblings validate one record, for a converter that skips bad ones).
- JSON is UTF-8, as json.dump writes it; a leading byte-order mark (Windows editors) is accepted and dropped.

Every malformed input raises DataError (a ValueError) naming the file, the row or record, and the problem; a
byte that is not UTF-8 is named by record, byte offset and line. Readers of the big formats take
on_error="skip": a bad row or record is counted in a ReadStats and skipped.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import numpy as np

OnError = Literal["raise", "skip"]

TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
TSV_DTYPES = {
    "objects_id": np.dtype("<i8"),
    "objects_conf": np.dtype("<f4"),
    "attrs_id": np.dtype("<i8"),
    "attrs_conf": np.dtype("<f4"),
    "boxes": np.dtype("<f4"),
    "features": np.dtype("<f4"),
}
FEAT_DIM = 2048  # bottom-up-attention pool5 features
NUM_OBJECT_LABELS = 1600  # Visual Genome object classes of the detector
NUM_ATTR_LABELS = 400  # and its attribute classes
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image
MAX_KEPT_ERRORS = 20  # messages a ReadStats keeps in skip mode (all are counted)


class DataError(ValueError):
    """Malformed input: `path`, `where` ("row 17", "record 3") and the `problem`, all in the message."""

    def __init__(self, path: str | Path, where: str, problem: str) -> None:
        self.path, self.where, self.problem = str(path), where, problem
        super().__init__(f"{path}, {where}: {problem}")


@dataclass
class ReadStats:
    """What a streaming reader saw: good rows/records, bad ones skipped (on_error="skip"), first messages."""

    good: int = 0
    bad: int = 0
    errors: list[str] = field(default_factory=list)

    def add_error(self, error: DataError) -> None:
        self.bad += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(str(error))


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


# ------------------------------------------------------------------------------------ region features


@dataclass(eq=False)
class RegionRecord:
    """One image's detections as the TSV holds them (N = num_boxes regions, D = feature dim).

    Arrays decoded by `read_tsv` are read-only views of the decoded bytes. `row` (1-based line) and
    `end_offset` (byte offset just after the row) say where it came from; writers ignore them.
    """

    img_id: str
    img_h: int
    img_w: int
    objects_id: np.ndarray  # int64 [N] detector class ids
    objects_conf: np.ndarray  # float32 [N]
    attrs_id: np.ndarray  # int64 [N]
    attrs_conf: np.ndarray  # float32 [N]
    num_boxes: int
    boxes: np.ndarray  # float32 [N, 4] pixel x1, y1, x2, y2
    features: np.ndarray  # float32 [N, D]
    row: int = 0
    end_offset: int = 0


def _b64_array(path: Path, row: int, name: str, text: bytes) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DataError(path, f"row {row}", f"field {name} is not valid base64 (truncated row?): {e}") from None
    dtype = TSV_DTYPES[name]
    if len(raw) % dtype.itemsize:
        raise DataError(
            path,
            f"row {row}",
            f"field {name} decodes to {len(raw)} bytes: buffer size must be a multiple of element size "
            f"({dtype.itemsize} bytes of {dtype.name}) (truncated row?)",
        )
    return np.frombuffer(raw, dtype=dtype)


def _int_field(path: Path, row: int, name: str, text: bytes, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DataError(path, f"row {row}", f"field {name} is not an integer: {text[:40]!r}") from None
    if value < minimum:
        raise DataError(path, f"row {row}", f"field {name} is {value}, must be >= {minimum}")
    return value


def parse_tsv_row(
    path: Path,
    row: int,
    line: bytes,
    feat_dim: int = FEAT_DIM,
    num_object_labels: int | None = NUM_OBJECT_LABELS,
    num_attr_labels: int | None = NUM_ATTR_LABELS,
) -> RegionRecord:
    """Decode and validate one TSV line (without its newline); DataError names `path` and `row`."""
    where = f"row {row}"
    fields = line.split(b"\t")
    if len(fields) != len(TSV_FIELDS):
        raise DataError(
            path, where, f"expected {len(TSV_FIELDS)} tab-separated fields, found {len(fields)} (truncated row?)"
        )
    try:
        img_id = fields[0].decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(path, where, f"img_id is not UTF-8: {fields[0][:40]!r}") from None
    if not img_id:
        raise DataError(path, where, "empty img_id")
    img_h = _int_field(path, row, "img_h", fields[1], 1)
    img_w = _int_field(path, row, "img_w", fields[2], 1)
    num_boxes = _int_field(path, row, "num_boxes", fields[7], 1)
    arrays = {name: _b64_array(path, row, name, fields[TSV_FIELDS.index(name)]) for name in TSV_DTYPES}

    for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf"):
        if arrays[name].size != num_boxes:
            raise DataError(path, where, f"num_boxes is {num_boxes} but {name} holds {arrays[name].size} values")
    if arrays["boxes"].size != 4 * num_boxes:
        problem = f"num_boxes is {num_boxes} but boxes hold {arrays['boxes'].size} values, not {4 * num_boxes}"
        raise DataError(path, where, problem)
    features = arrays["features"]
    if features.size % feat_dim:
        problem = f"features hold {features.size} values, not a multiple of the feature dim {feat_dim}"
        raise DataError(path, where, problem)
    if features.size // feat_dim != num_boxes:
        problem = f"num_boxes is {num_boxes} but features hold {features.size // feat_dim} rows of {feat_dim}"
        raise DataError(path, where, problem)

    for name, limit in (("objects_id", num_object_labels), ("attrs_id", num_attr_labels)):
        ids = arrays[name]
        bad = (ids < 0) if limit is None else ((ids < 0) | (ids >= limit))
        if bad.any():
            i = int(np.argmax(bad))
            bound = "non-negative" if limit is None else f"in [0, {limit})"
            raise DataError(path, where, f"{name}[{i}] is {ids[i]}, must be {bound}")
    for name in ("objects_conf", "attrs_conf", "boxes", "features"):
        finite = np.isfinite(arrays[name])
        if not finite.all():
            raise DataError(path, where, f"{name} holds {int(finite.size - finite.sum())} NaN or infinite values")
    for name in ("objects_conf", "attrs_conf"):
        conf = arrays[name]
        if ((conf < 0) | (conf > 1)).any():
            i = int(np.argmax((conf < 0) | (conf > 1)))
            raise DataError(path, where, f"{name}[{i}] is {conf[i]}, outside [0, 1]")

    boxes = arrays["boxes"].reshape(num_boxes, 4)
    x1, y1, x2, y2 = boxes.T
    t = BOX_TOLERANCE
    bad = (x2 < x1) | (y2 < y1) | (x1 < -t) | (y1 < -t) | (x2 > img_w + t) | (y2 > img_h + t)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            path,
            where,
            f"box {i} (x1, y1, x2, y2) = {boxes[i].tolist()} is inverted or outside the {img_w}x{img_h} image "
            f"(by more than {t:g} pixel)",
        )
    return RegionRecord(
        img_id=img_id,
        img_h=img_h,
        img_w=img_w,
        objects_id=arrays["objects_id"],
        objects_conf=arrays["objects_conf"],
        attrs_id=arrays["attrs_id"],
        attrs_conf=arrays["attrs_conf"],
        num_boxes=num_boxes,
        boxes=boxes,
        features=features.reshape(num_boxes, feat_dim),
        row=row,
    )


def read_tsv(
    path: str | Path,
    *,
    feat_dim: int = FEAT_DIM,
    num_object_labels: int | None = NUM_OBJECT_LABELS,
    num_attr_labels: int | None = NUM_ATTR_LABELS,
    on_error: OnError = "raise",
    stats: ReadStats | None = None,
    start_offset: int = 0,
    start_row: int = 1,
) -> Iterator[RegionRecord]:
    """Stream the RegionRecords of a feature TSV, one row in memory at a time.

    on_error="skip" counts bad rows in `stats` and goes on; blank lines are ignored, as csv does.
    `start_offset` / `start_row` resume at a row boundary a previous record's `end_offset` / `row + 1` gave.
    """
    _check_on_error(on_error)
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    offset, row = start_offset, start_row
    with open(path, "rb") as f:
        f.seek(start_offset)
        for line in f:
            offset += len(line)
            this_row, row = row, row + 1
            body = line.rstrip(b"\r\n")
            if not body:
                continue
            try:
                record = parse_tsv_row(path, this_row, body, feat_dim, num_object_labels, num_attr_labels)
            except DataError as e:
                if on_error == "raise":
                    raise
                stats.add_error(e)
                continue
            record.end_offset = offset
            stats.good += 1
            yield record


def _b64(array: np.ndarray, dtype: np.dtype) -> bytes:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes())


def format_tsv_row(record: RegionRecord) -> bytes:
    """One TSV line (with its newline) in the authors' format; arrays are cast to the format's dtypes."""
    fields = [
        record.img_id.encode("utf-8"),
        str(int(record.img_h)).encode(),
        str(int(record.img_w)).encode(),
        _b64(record.objects_id, TSV_DTYPES["objects_id"]),
        _b64(record.objects_conf, TSV_DTYPES["objects_conf"]),
        _b64(record.attrs_id, TSV_DTYPES["attrs_id"]),
        _b64(record.attrs_conf, TSV_DTYPES["attrs_conf"]),
        str(int(record.num_boxes)).encode(),
        _b64(record.boxes, TSV_DTYPES["boxes"]),
        _b64(record.features, TSV_DTYPES["features"]),
    ]
    return b"\t".join(fields) + b"\n"


class TsvWriter:
    """Appends RegionRecords to a feature TSV, one line each (a context manager)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows = 0
        self._file = open(self.path, "wb")

    def write(self, record: RegionRecord) -> None:
        self._file.write(format_tsv_row(record))
        self.rows += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def write_tsv(path: str | Path, records: Iterable[RegionRecord]) -> int:
    """Write `records` (streamed) as a feature TSV; returns the number of rows."""
    with TsvWriter(path) as writer:
        for record in records:
            writer.write(record)
        return writer.rows


# ------------------------------------------------------------------------------------- streaming JSON

_JSON_CHUNK = 1 << 20  # bytes read at a time
_WHITESPACE = " \t\n\r"


def _not_utf8(error: UnicodeDecodeError) -> str:
    bad = error.object[error.start : error.end]
    return f"not valid UTF-8 ({error.reason}: {bad!r}); is the file in another encoding?"


class _Utf8Reader:
    """The text of a binary file, a block at a time, without a leading byte-order mark. At a byte that is not
    UTF-8 the text stops: the valid text before it comes first, then "" with `bad` = (where, problem)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.decoder = f, codecs.getincrementaldecoder("utf-8")()
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            f.seek(0)
        self.offset, self.lines = f.tell(), 0  # bytes decoded so far (the mark included), newlines among them
        self.bad: tuple[str, str] | None = None

    def read(self, size: int) -> str:
        while self.bad is None:
            raw = self.f.read(size)
            pending = self.decoder.getstate()[0]  # the start of a character the last block cut
            try:
                text = self.decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:  # e.object is pending + raw
                valid = e.object[: e.start]
                at, line = self.offset - len(pending) + e.start, 1 + self.lines + valid.count(b"\n")
                self.bad = f"byte {at} (line {line})", _not_utf8(e)
                return valid.decode("utf-8")
            self.offset, self.lines = self.offset + len(raw), self.lines + raw.count(b"\n")
            if text or not raw:
                return text
        return ""


def iter_json_array(path: str | Path, chunk_chars: int = _JSON_CHUNK) -> Iterator[tuple[int, Any]]:
    """(index, value) for each element of the top-level JSON list in `path`, holding one element at a time.

    A syntax error raises DataError naming the element's index ("record 12"); a byte that is not UTF-8, the
    element and the byte's offset and line. `chunk_chars` is how many bytes are read at a time.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        reader = _Utf8Reader(f)
        buf, pos, eof, index = "", 0, False, 0

        def fill(min_more: int = chunk_chars) -> bool:
            """Append at least a chunk (or min_more) to the buffer, dropping what was consumed."""
            nonlocal buf, pos, eof
            if eof:
                return False
            more = reader.read(max(chunk_chars, min_more))
            if not more and reader.bad is not None:
                where, problem = reader.bad
                raise DataError(path, f"record {index}, {where}", problem)
            buf, pos = buf[pos:] + more, 0
            eof = not more
            return bool(more)

        def next_char() -> str:
            """The next non-whitespace character (not consumed), or '' at the end of the file."""
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in _WHITESPACE:
                    pos += 1
                if pos < len(buf) or not fill():
                    return buf[pos] if pos < len(buf) else ""

        if next_char() != "[":
            raise DataError(path, "start of file", "expected a JSON list of records")
        pos += 1
        while True:
            c = next_char()
            if c == "]":
                pos += 1
                if next_char() != "":
                    raise DataError(path, f"after record {index - 1}", "unexpected data after the closing ']'")
                return
            if index > 0:
                if c != ",":
                    raise DataError(path, f"record {index}", f"expected ',' or ']' between records, found {c!r}")
                pos += 1
                c = next_char()
            if c == "":
                raise DataError(path, f"record {index}", "file ends inside the list (truncated file?)")
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or eof:  # a value touching the buffer's end may go on
                        break
                except json.JSONDecodeError as e:
                    if eof:
                        raise DataError(path, f"record {index}", f"invalid JSON (truncated file?): {e.msg}") from None
                fill(min_more=len(buf))  # grow geometrically so a huge record costs O(size) re-parses
            pos = end
            yield index, value
            index += 1


class JsonArrayWriter:
    """Writes a JSON list one element at a time (bounded memory), a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.count = 0
        self._file = open(self.path, "w", encoding="utf-8")
        self._file.write("[")

    def write(self, value: Any) -> None:
        self._file.write(("\n" if self.count == 0 else ",\n") + json.dumps(value))
        self.count += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.write("\n]\n")
            self._file.close()

    def __enter__(self) -> JsonArrayWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def write_json(path: str | Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def _load_json(path: str | Path) -> Any:
    raw = Path(path).read_bytes()
    mark = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[mark:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = mark + e.start
        line = 1 + raw[:at].count(b"\n")
        raise DataError(path, f"byte {at} (line {line})", _not_utf8(e)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}") from None


# ---------------------------------------------------------------------------------- pre-training JSON


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_label(path: Path, where: str, label: Any) -> dict[str, float]:
    if not isinstance(label, dict):
        raise DataError(path, where, f"a label must be a dict answer -> score, got {type(label).__name__}")
    for answer, score in label.items():
        if not _is_number(score):
            raise DataError(path, where, f"the score of answer {answer!r} is {score!r}, not a finite number")
    return label


@dataclass(frozen=True)
class PretrainEntry:
    """One (image, sentence) pair of the pre-training data; label is None where the source has no labels."""

    img_id: str
    source: str
    sentence: str
    label: dict[str, float] | None
    record: int  # index of the image record in its file
    sent_index: int  # index of the sentence in sentf[source] (the authors' uid is img_id_source_index)


@dataclass(frozen=True)
class PretrainRecord:
    """One image record of a pre-training JSON file, validated."""

    index: int
    img_id: str
    sentf: dict[str, list[str]]
    labelf: dict[str, list[dict[str, float]]]

    def entries(self) -> Iterator[PretrainEntry]:
        """The flat entries in the authors' order: sources as the file lists them, then sentences."""
        for source, sentences in self.sentf.items():
            labels = self.labelf.get(source)
            for i, sentence in enumerate(sentences):
                yield PretrainEntry(self.img_id, source, sentence, None if labels is None else labels[i], self.index, i)


def validate_pretrain_record(path: Path, index: int, value: Any) -> PretrainRecord:
    where = f"record {index}"
    if not isinstance(value, dict):
        raise DataError(path, where, f"expected an object {{img_id, sentf, labelf}}, got {type(value).__name__}")
    img_id = value.get("img_id")
    if not isinstance(img_id, str) or not img_id:
        raise DataError(path, where, f"img_id must be a non-empty string, got {img_id!r}")
    sentf = value.get("sentf")
    if not isinstance(sentf, dict):
        raise DataError(path, where, f"sentf must be an object source -> sentences (img_id {img_id!r})")
    for source, sentences in sentf.items():
        if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
            raise DataError(path, where, f"sentf[{source!r}] must be a list of strings (img_id {img_id!r})")
    labelf = value.get("labelf", {})
    if not isinstance(labelf, dict):
        raise DataError(path, where, f"labelf must be an object source -> labels (img_id {img_id!r})")
    for source, labels in labelf.items():
        if source not in sentf:
            raise DataError(path, where, f"labelf has source {source!r}, which sentf lacks (img_id {img_id!r})")
        if not isinstance(labels, list) or len(labels) != len(sentf[source]):
            n = len(labels) if isinstance(labels, list) else type(labels).__name__
            raise DataError(
                path, where, f"labelf[{source!r}] has {n} labels for {len(sentf[source])} sentences (img_id {img_id!r})"
            )
        for i, label in enumerate(labels):
            _check_label(path, f"{where}, labelf[{source!r}][{i}]", label)
    return PretrainRecord(index, img_id, sentf, labelf)


def read_pretrain(
    path: str | Path, *, on_error: OnError = "raise", stats: ReadStats | None = None, start_record: int = 0
) -> Iterator[PretrainRecord]:
    """Stream the validated image records of a pre-training JSON file, from record `start_record` on."""
    _check_on_error(on_error)
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    for index, value in iter_json_array(path):
        if index < start_record:
            continue
        try:
            record = validate_pretrain_record(path, index, value)
        except DataError as e:
            if on_error == "raise":
                raise
            stats.add_error(e)
            continue
        stats.good += 1
        yield record


def read_pretrain_entries(
    path: str | Path, *, on_error: OnError = "raise", stats: ReadStats | None = None
) -> Iterator[PretrainEntry]:
    """Stream the flat (img_id, source, sentence, label or None) entries of a pre-training JSON file."""
    for record in read_pretrain(path, on_error=on_error, stats=stats):
        yield from record.entries()


# ------------------------------------------------------------------------------------ fine-tuning JSON


@dataclass(frozen=True)
class VqaQuestion:
    question_id: int
    img_id: str
    sent: str
    label: dict[str, float] | None  # None in the test split
    answer_type: str | None = None
    question_type: str | None = None


@dataclass(frozen=True)
class GqaQuestion:
    question_id: str
    img_id: str
    sent: str
    label: dict[str, float] | None


@dataclass(frozen=True)
class Nlvr2Example:
    identifier: str
    img0: str
    img1: str
    sent: str
    label: int | None
    uid: str | None = None


def read_json_list(path: str | Path) -> list[Any]:
    """A small JSON file that must hold a list (of records); DataError otherwise."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(path, "start of file", f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _get(path: Path, index: int, record: Any, key: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
    where = f"record {index}"
    if not isinstance(record, dict):
        raise DataError(path, where, f"expected an object, got {type(record).__name__}")
    if key not in record:
        if optional:
            return None
        raise DataError(path, where, f"missing key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(path, where, f"{key} must be {names}, got {value!r:.60}")
    return value


def _unique(path: Path, what: str, keys: list[Any]) -> None:
    seen: dict[Any, int] = {}
    for i, key in enumerate(keys):
        if key in seen:
            raise DataError(path, f"record {i}", f"{what} {key!r} appears twice (records {seen[key]} and {i})")
        seen[key] = i


def parse_vqa(path: Path, i: int, r: Any) -> VqaQuestion:
    """Record i of a VQA file, validated: {answer_type, img_id, label, question_id (int), question_type, sent}."""
    label = _get(path, i, r, "label", dict, optional=True)
    return VqaQuestion(
        question_id=_get(path, i, r, "question_id", int),
        img_id=_get(path, i, r, "img_id", str),
        sent=_get(path, i, r, "sent", str),
        label=None if label is None else _check_label(path, f"record {i}", label),
        answer_type=_get(path, i, r, "answer_type", str, optional=True),
        question_type=_get(path, i, r, "question_type", str, optional=True),
    )


def parse_gqa(path: Path, i: int, r: Any) -> GqaQuestion:
    """Record i of a GQA file, validated: {img_id, label, question_id (str), sent}."""
    label = _get(path, i, r, "label", dict, optional=True)
    return GqaQuestion(
        question_id=_get(path, i, r, "question_id", str),
        img_id=_get(path, i, r, "img_id", str),
        sent=_get(path, i, r, "sent", str),
        label=None if label is None else _check_label(path, f"record {i}", label),
    )


def parse_nlvr2(path: Path, i: int, r: Any) -> Nlvr2Example:
    """Record i of an NLVR2 file, validated: {identifier, img0, img1, label (0 or 1), sent, uid}."""
    label = _get(path, i, r, "label", int, optional=True)
    if label not in (None, 0, 1):
        raise DataError(path, f"record {i}", f"label must be 0 or 1, got {label!r}")
    return Nlvr2Example(
        identifier=_get(path, i, r, "identifier", str),
        img0=_get(path, i, r, "img0", str),
        img1=_get(path, i, r, "img1", str),
        sent=_get(path, i, r, "sent", str),
        label=label,
        uid=_get(path, i, r, "uid", str, optional=True),
    )


def read_vqa(path: str | Path) -> list[VqaQuestion]:
    """VQA questions {answer_type, img_id, label, question_id (int), question_type, sent}; no label in test."""
    path = Path(path)
    out = [parse_vqa(path, i, r) for i, r in enumerate(read_json_list(path))]
    _unique(path, "question_id", [q.question_id for q in out])
    return out


def read_gqa(path: str | Path) -> list[GqaQuestion]:
    """GQA questions {img_id, label, question_id (str), sent}; no label in the submission split."""
    path = Path(path)
    out = [parse_gqa(path, i, r) for i, r in enumerate(read_json_list(path))]
    _unique(path, "question_id", [q.question_id for q in out])
    return out


def read_nlvr2(path: str | Path) -> list[Nlvr2Example]:
    """NLVR2 statements {identifier, img0, img1, label (0 or 1), sent, uid}."""
    path = Path(path)
    out = [parse_nlvr2(path, i, r) for i, r in enumerate(read_json_list(path))]
    _unique(path, "identifier", [x.identifier for x in out])
    return out


# -------------------------------------------------------------------------------------- answer tables


@dataclass
class AnswerTable:
    """The pre-training QA answer table (the authors' all_ans.json: [{"ans": str, "dsets": [...]}, ...]).

    Answers are stored normalised; `convert_label` maps a {answer: score} label onto table ids as the
    authors' pre-training data does.
    """

    answers: list[str]
    dsets: list[tuple[str, ...]] = field(default_factory=list)
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {}
        for i, answer in enumerate(self.answers):
            if answer in self.index:
                raise ValueError(f"answer {answer!r} is listed twice (entries {self.index[answer]} and {i})")
            self.index[answer] = i

    def __len__(self) -> int:
        return len(self.answers)

    def convert_label(self, label: Mapping[str, float]) -> dict[int, float]:
        """{table id: score}: each answer normalised (lxmert.answers), answers outside the table dropped.

        The authors' loop (LXMERTDataset.__init__, over list(label.keys())), step for step: in the label's order,
        an answer whose normal form is outside the table is dropped, one already in normal form stays, and any
        other moves onto its normal form, overwriting what is there. So {"two": .5, "2": 1} and {"2": 1,
        "two": .5} both give {"2": .5}, and {"Grey": .2, "gray": .9} gives {"gray": .2}.
        """
        from lxmert.answers import normalize_answer  # here: the lxmert package imports torch, which TSVs never need

        merged = dict(label)
        for answer in list(merged):
            normal = normalize_answer(answer)
            if normal not in self.index:
                merged.pop(answer)
            elif normal != answer:
                merged[normal] = merged.pop(answer)
        return {self.index[a]: float(s) for a, s in merged.items()}


def read_answer_table(path: str | Path, dsets: Iterable[str] | None = None) -> AnswerTable:
    """all_ans.json; with `dsets`, only the answers used by one of those data sets (the authors' filter)."""
    path = Path(path)
    answers, sets = [], []
    wanted = None if dsets is None else set(dsets)
    for i, r in enumerate(read_json_list(path)):
        answer = _get(path, i, r, "ans", str)
        used = tuple(_get(path, i, r, "dsets", list, optional=True) or ())
        if wanted is None or wanted & set(used):
            answers.append(answer)
            sets.append(used)
    try:
        return AnswerTable(answers, sets)
    except ValueError as e:
        raise DataError(path, "answers", str(e)) from None


def answer_table_json(table: AnswerTable) -> list[dict[str, Any]]:
    """The all_ans.json form of a table."""
    dsets = table.dsets or [()] * len(table)
    return [{"ans": a, "dsets": list(d)} for a, d in zip(table.answers, dsets)]


def read_ans2label(path: str | Path) -> dict[str, int]:
    """trainval_ans2label.json: {answer: label}, labels exactly 0 .. n-1."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(path, "start of file", f"expected an object answer -> label, got {type(data).__name__}")
    for answer, label in data.items():
        if not isinstance(label, int) or isinstance(label, bool):
            raise DataError(path, f"answer {answer!r}", f"label must be an int, got {label!r}")
    if sorted(data.values()) != list(range(len(data))):
        raise DataError(path, "labels", f"labels must be exactly 0 .. {len(data) - 1}, each once")
    return data


def read_label2ans(path: str | Path) -> list[str]:
    """trainval_label2ans.json: the answers in label order."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
        raise DataError(path, "start of file", "expected a JSON list of answer strings")
    _unique(path, "answer", data)
    return data


def read_answer_vocab(ans2label_path: str | Path, label2ans_path: str | Path) -> list[str]:
    """A task's answers in label order, after checking its ans2label and label2ans files agree."""
    ans2label, label2ans = read_ans2label(ans2label_path), read_label2ans(label2ans_path)
    if len(ans2label) != len(label2ans):
        problem = f"{len(label2ans)} answers, but {ans2label_path} has {len(ans2label)}"
        raise DataError(label2ans_path, "length", problem)
    for label, answer in enumerate(label2ans):
        if ans2label.get(answer) != label:
            problem = f"answer {answer!r} has label {ans2label.get(answer)} in {ans2label_path}"
            raise DataError(label2ans_path, f"label {label}", problem)
    return label2ans
