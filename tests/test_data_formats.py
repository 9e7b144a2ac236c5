"""The public-format readers (engine/data/formats.py) and the synthetic data set (engine/data/synthetic.py).

Tiny feature dims (16) and a few dozen images: the whole file runs in seconds.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from engine.data import formats, synthetic
from engine.data.formats import DataError, ReadStats, RegionRecord
from lxmert.answers import normalize_answer

D = 16  # feature dim of these tests


def make_record(img_id: str, n: int, rng: np.random.Generator, h: int = 100, w: int = 200, d: int = D) -> RegionRecord:
    """A valid record of n regions: boxes inside the (h, w) image, ids and confidences in range."""
    corner = rng.uniform(0, 0.5, (n, 2))
    boxes = (np.concatenate([corner, corner + rng.uniform(0, 0.5, (n, 2))], 1) * [w, h, w, h]).astype(np.float32)
    return RegionRecord(
        img_id=img_id,
        img_h=h,
        img_w=w,
        objects_id=rng.integers(0, 1600, n),
        objects_conf=rng.random(n).astype(np.float32),
        attrs_id=rng.integers(0, 400, n),
        attrs_conf=rng.random(n).astype(np.float32),
        num_boxes=n,
        boxes=boxes,
        features=rng.standard_normal((n, d)).astype(np.float32),
    )


def assert_same_record(a: RegionRecord, b: RegionRecord) -> None:
    assert (a.img_id, a.img_h, a.img_w, a.num_boxes) == (b.img_id, b.img_h, b.img_w, b.num_boxes)
    for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def _fields(record: RegionRecord) -> list[bytes]:
    return formats.format_tsv_row(record).rstrip(b"\n").split(b"\t")


def _b64(array: np.ndarray, dtype: str) -> bytes:
    return base64.b64encode(np.asarray(array, dtype=dtype).tobytes())


# ---------------------------------------------------------------------------------------------- TSV


def test_tsv_round_trip_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = [make_record(f"img{i}", n, rng) for i, n in enumerate([36, 1, 10, 40])]
    path = tmp_path / "f.tsv"
    assert formats.write_tsv(path, iter(records)) == 4
    back = list(formats.read_tsv(path, feat_dim=D))
    assert len(back) == 4
    for i, (a, b) in enumerate(zip(records, back)):
        assert_same_record(a, b)
        assert b.row == i + 1
    assert back[-1].end_offset == path.stat().st_size
    # the fields are the authors' raw little-endian buffers
    fields = path.read_bytes().split(b"\n")[0].split(b"\t")
    assert len(fields) == 10 and fields[0] == b"img0" and fields[7] == b"36"
    decoded = np.frombuffer(base64.b64decode(fields[9]), "<f4").reshape(36, D)
    assert np.array_equal(decoded, records[0].features)


def test_tsv_resume_offset_blank_lines_and_crlf(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    records = [make_record(f"img{i}", 3, rng) for i in range(4)]
    rows = [formats.format_tsv_row(r) for r in records]
    path = tmp_path / "f.tsv"
    path.write_bytes(rows[0] + b"\n" + rows[1].replace(b"\n", b"\r\n") + rows[2] + rows[3])
    back = list(formats.read_tsv(path, feat_dim=D))
    assert [r.img_id for r in back] == ["img0", "img1", "img2", "img3"]
    assert [r.row for r in back] == [1, 3, 4, 5]  # the blank line is line 2
    rest = list(formats.read_tsv(path, feat_dim=D, start_offset=back[1].end_offset, start_row=back[1].row + 1))
    assert [r.img_id for r in rest] == ["img2", "img3"] and rest[0].row == 4


def _bad_rows() -> dict[str, tuple[object, str]]:
    """name -> (function of the good fields -> bad line, a phrase the error must contain)."""

    def replace(index: int, value: bytes):
        return lambda f: b"\t".join(f[:index] + [value] + f[index + 1 :])

    def with_boxes(fix):
        def make(f):
            boxes = np.frombuffer(base64.b64decode(f[8]), "<f4").reshape(-1, 4).copy()
            fix(boxes)
            return b"\t".join(f[:8] + [_b64(boxes, "<f4")] + f[9:])

        return make

    def with_features(fix):
        def make(f):
            feats = np.frombuffer(base64.b64decode(f[9]), "<f4").copy()
            return b"\t".join(f[:9] + [_b64(fix(feats), "<f4")])

        return make

    def nan(x):
        x[5] = np.nan
        return x

    def inf(x):
        x[0] = -np.inf
        return x

    def outside(b):
        b[1, 2] = 200 + 5  # x2 beyond the 200-pixel width

    def inverted(b):
        b[0, 0], b[0, 2] = 50, 40

    def above(b):
        b[2, 1] = -3

    return {
        "truncated row": (lambda f: b"\t".join(f)[: -len(f[9]) // 2 - 1], "truncated row?"),
        "element size": (replace(9, base64.b64encode(b"123456")), "buffer size must be a multiple of element size"),
        "bad base64": (replace(9, b"!!!!AAAA"), "not valid base64"),
        "field count": (lambda f: b"\t".join(f[:5] + f[6:]), "expected 10 tab-separated fields, found 9"),
        "feature dim": (with_features(lambda x: x[:-3]), f"not a multiple of the feature dim {D}"),
        "feature rows": (with_features(lambda x: x[:-D]), "num_boxes is 4 but features hold 3 rows"),
        "num_boxes": (replace(7, b"5"), "num_boxes is 5 but objects_id holds 4 values"),
        "boxes size": (replace(8, _b64(np.zeros(12), "<f4")), "boxes hold 12 values"),
        "nan features": (with_features(nan), "features holds 1 NaN or infinite"),
        "inf features": (with_features(inf), "NaN or infinite"),
        "box outside": (with_boxes(outside), "box 1"),
        "box inverted": (with_boxes(inverted), "box 0"),
        "box above": (with_boxes(above), "outside the 200x100 image"),
        "img_h": (replace(1, b"abc"), "img_h is not an integer"),
        "img_w zero": (replace(2, b"0"), "img_w is 0"),
        "object id": (replace(3, _b64([1, 2, 1600, 3], "<i8")), "objects_id[2] is 1600"),
        "attr id": (replace(5, _b64([1, -1, 2, 3], "<i8")), "attrs_id[1] is -1"),
        "confidence": (replace(4, _b64([0.5, 1.5, 0.1, 0.2], "<f4")), "objects_conf[1] is 1.5"),
    }


BAD_ROWS = _bad_rows()


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_tsv_bad_row_names_file_row_and_problem(tmp_path: Path, case: str) -> None:
    make_bad, phrase = BAD_ROWS[case]
    rng = np.random.default_rng(2)
    good = formats.format_tsv_row(make_record("good", 4, rng))
    bad = make_bad(_fields(make_record("bad", 4, rng)))  # type: ignore[operator]
    path = tmp_path / "bad.tsv"
    path.write_bytes(good + bad + b"\n" + good)
    with pytest.raises(DataError) as info:
        list(formats.read_tsv(path, feat_dim=D))
    message = str(info.value)
    assert str(path) in message and "row 2:" in message and phrase in message, message
    assert isinstance(info.value, ValueError) and info.value.where == "row 2"

    stats = ReadStats()
    kept = list(formats.read_tsv(path, feat_dim=D, on_error="skip", stats=stats))
    assert [r.row for r in kept] == [1, 3] and stats.good == 2 and stats.bad == 1
    assert "row 2:" in stats.errors[0]


def test_tsv_box_tolerance_and_skip_counts(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rec = make_record("edge", 2, rng)
    rec.boxes[0] = [-0.9, -0.5, 200.9, 100.5]  # within 1 pixel of the image: accepted
    rows = [formats.format_tsv_row(rec)]
    for i in range(6):  # alternate bad and good rows
        rows.append(b"garbage\trow\n" if i % 2 == 0 else formats.format_tsv_row(make_record(f"g{i}", 3, rng)))
    path = tmp_path / "mixed.tsv"
    path.write_bytes(b"".join(rows))
    stats = ReadStats()
    kept = list(formats.read_tsv(path, feat_dim=D, on_error="skip", stats=stats))
    assert [r.img_id for r in kept] == ["edge", "g1", "g3", "g5"]
    assert (stats.good, stats.bad, len(stats.errors)) == (4, 3, 3)
    with pytest.raises(ValueError, match="on_error"):
        list(formats.read_tsv(path, on_error="ignore"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- JSON


@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
def test_iter_json_array_streams_like_json_load(tmp_path: Path, chunk: int) -> None:
    value = [{"a": [1, 2.5, "x\u00e9\u4e2d"], "b": None}, 3, "s", [], {"nested": {"k": [True, False]}}, 12345]
    path = tmp_path / "a.json"
    path.write_text(" \n" + json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [v for _, v in formats.iter_json_array(path, chunk_chars=chunk)] == value
    path.write_text("[]")
    assert list(formats.iter_json_array(path, chunk_chars=chunk)) == []


@pytest.mark.parametrize(
    "text, where",
    [
        ('[{"a": 1}, {"a": 2', "record 1"),
        ('[{"a": 1} {"a": 2}]', "record 1"),
        ('{"a": 1}', "start of file"),
        ('[{"a": 1}, ', "record 1"),
        ('[{"a": 1}] x', "after record 0"),
        ('[{"a": 1}, {"a": tru}]', "record 1"),
    ],
)
def test_iter_json_array_errors(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(f"{path}, {where}")):
        list(formats.iter_json_array(path, chunk_chars=4))


def _pretrain_records() -> list[dict]:
    return [
        {
            "img_id": "a",
            "sentf": {"mscoco": ["a dog.", "two cats."], "vqa": ["what is it?"]},
            "labelf": {"vqa": [{"dog": 1.0, "cat": 0.3}]},
        },
        {"img_id": "b", "sentf": {"vg": ["a red car"]}, "labelf": {}},
        {"img_id": "c", "sentf": {"gqa": ["is it red?", "is it blue?"]}, "labelf": {"gqa": [{"yes": 1}, {"no": 1.0}]}},
    ]


def test_pretrain_entries_in_authors_order(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    with formats.JsonArrayWriter(path) as w:
        for r in _pretrain_records():
            w.write(r)
    entries = list(formats.read_pretrain_entries(path))
    assert [(e.img_id, e.source, e.sentence, e.label, e.record, e.sent_index) for e in entries] == [
        ("a", "mscoco", "a dog.", None, 0, 0),
        ("a", "mscoco", "two cats.", None, 0, 1),
        ("a", "vqa", "what is it?", {"dog": 1.0, "cat": 0.3}, 0, 0),
        ("b", "vg", "a red car", None, 1, 0),
        ("c", "gqa", "is it red?", {"yes": 1}, 2, 0),
        ("c", "gqa", "is it blue?", {"no": 1.0}, 2, 1),
    ]
    assert [r.index for r in formats.read_pretrain(path, start_record=1)] == [1, 2]


@pytest.mark.parametrize(
    "record, phrase",
    [
        (
            {"img_id": "x", "sentf": {"vqa": ["q1", "q2"]}, "labelf": {"vqa": [{"a": 1}]}},
            "has 1 labels for 2 sentences",
        ),
        ({"img_id": "x", "sentf": {"vqa": ["q1"]}, "labelf": {"gqa": [{"a": 1}]}}, "which sentf lacks"),
        ({"img_id": "", "sentf": {}}, "img_id must be a non-empty string"),
        ({"img_id": "x", "sentf": {"vqa": "q1"}}, "must be a list of strings"),
        ({"img_id": "x", "sentf": {"vqa": ["q"]}, "labelf": {"vqa": [{"a": "high"}]}}, "not a finite number"),
        ({"img_id": "x", "sentf": {"vqa": ["q"]}, "labelf": {"vqa": [["a"]]}}, "a label must be a dict"),
        (["not", "a", "dict"], "expected an object"),
    ],
)
def test_pretrain_bad_records(tmp_path: Path, record: object, phrase: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([_pretrain_records()[1], record, _pretrain_records()[0]]))
    with pytest.raises(DataError) as info:
        list(formats.read_pretrain_entries(path))
    assert f"{path}, record 1" in str(info.value) and phrase in str(info.value)
    stats = ReadStats()
    assert [e.img_id for e in formats.read_pretrain_entries(path, on_error="skip", stats=stats)] == ["b", "a", "a", "a"]
    assert (stats.good, stats.bad) == (2, 1)


def _write(path: Path, value: object) -> Path:
    path.write_text(json.dumps(value))
    return path


def test_task_readers_and_their_errors(tmp_path: Path) -> None:
    vqa = [
        {
            "answer_type": "other",
            "img_id": "i1",
            "label": {"red": 1.0},
            "question_id": 7,
            "question_type": "what color is the",
            "sent": "what color is the dog?",
        },
        {"img_id": "i2", "question_id": 8, "sent": "test question without label"},
    ]
    got = formats.read_vqa(_write(tmp_path / "vqa.json", vqa))
    assert got[0] == formats.VqaQuestion(7, "i1", "what color is the dog?", {"red": 1.0}, "other", "what color is the")
    assert got[1].label is None and got[1].answer_type is None
    gqa = [{"img_id": "2354786", "label": {"yes": 1.0}, "question_id": "02930152", "sent": "is the sky dark?"}]
    assert formats.read_gqa(_write(tmp_path / "gqa.json", gqa))[0].question_id == "02930152"
    nlvr2 = [
        {
            "identifier": "dev-850-0-0",
            "img0": "dev-850-0-img0",
            "img1": "dev-850-0-img1",
            "label": 1,
            "sent": "there are two dogs.",
            "uid": "nlvr2_dev_0",
        }
    ]
    assert formats.read_nlvr2(_write(tmp_path / "nlvr2.json", nlvr2))[0].label == 1

    cases = [
        (formats.read_vqa, [{**vqa[0], "question_id": "7"}], "question_id must be int"),
        (formats.read_vqa, [vqa[0], {**vqa[0]}], "question_id 7 appears twice (records 0 and 1)"),
        (formats.read_vqa, [{**vqa[0], "label": {"red": None}}], "not a finite number"),
        (formats.read_gqa, [{**gqa[0], "question_id": 5}], "question_id must be str"),
        (formats.read_gqa, [{"img_id": "x", "label": {}, "question_id": "1"}], "missing key 'sent'"),
        (formats.read_nlvr2, [{**nlvr2[0], "label": 2}], "label must be 0 or 1"),
        (formats.read_nlvr2, [{**nlvr2[0], "label": True}], "label must be int"),
        (formats.read_nlvr2, {"not": "a list"}, "expected a JSON list"),
    ]
    for reader, data, phrase in cases:
        path = _write(tmp_path / "bad.json", data)
        with pytest.raises(DataError, match=re.escape(phrase)) as info:
            reader(path)
        assert str(path) in str(info.value)
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"b": ]')
    with pytest.raises(DataError, match="line 2 column"):
        formats.read_vqa(tmp_path / "broken.json")


def test_answer_tables(tmp_path: Path) -> None:
    entries = [  # keys besides ans and dsets are ignored
        {"ans": "yes", "dsets": ["vqa", "gqa"]},
        {"ans": "2", "dsets": ["vqa"]},
        {"ans": "dog", "dsets": ["gqa", "visual7w"]},
        {"ans": "gray", "dsets": ["vqa"], "extra": 3},
    ]
    path = _write(tmp_path / "all_ans.json", entries)
    table = formats.read_answer_table(path)
    assert table.answers == ["yes", "2", "dog", "gray"] and table.dsets[0] == ("vqa", "gqa")
    assert formats.read_answer_table(path, dsets=["gqa"]).answers == ["yes", "dog"]
    assert formats.answer_table_json(formats.read_answer_table(path))[1] == {"ans": "2", "dsets": ["vqa"]}
    # the authors' conversion: normalise, drop answers outside the table; a moved answer overwrites
    label = {"Two": 0.6, "the Dog.": 1.0, "cat": 0.9, "Grey": 0.3, "gray": 0.9}
    assert table.convert_label(label) == {1: 0.6, 2: 1.0, 3: 0.3}
    assert normalize_answer("the Dog.") == "dog"
    two, gray = table.index["2"], table.index["gray"]
    assert table.convert_label({"two": 0.5, "2": 1.0}) == {two: 0.5} == table.convert_label({"2": 1.0, "two": 0.5})
    assert table.convert_label({"Grey": 0.2, "gray": 0.9}) == {gray: 0.2}
    with pytest.raises(DataError, match="listed twice"):
        formats.read_answer_table(_write(tmp_path / "dup.json", entries + [{"ans": "yes"}]))
    with pytest.raises(DataError, match="missing key 'ans'"):
        formats.read_answer_table(_write(tmp_path / "noans.json", [{"answer": "yes"}]))

    a2l, l2a = _write(tmp_path / "a2l.json", {"yes": 0, "no": 1}), _write(tmp_path / "l2a.json", ["yes", "no"])
    assert formats.read_answer_vocab(a2l, l2a) == ["yes", "no"]
    with pytest.raises(DataError, match="label 0"):
        formats.read_answer_vocab(a2l, _write(tmp_path / "swapped.json", ["no", "yes"]))
    with pytest.raises(DataError, match="exactly 0 .. 1"):
        formats.read_ans2label(_write(tmp_path / "gap.json", {"yes": 0, "no": 2}))
    with pytest.raises(DataError, match="appears twice"):
        formats.read_label2ans(_write(tmp_path / "dup2.json", ["yes", "yes"]))


# ----------------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, 60, feat_dim=D, seed=3)
    return out


def _digest(root: Path) -> dict[str, str]:
    files = [p for p in sorted(root.rglob("*")) if p.is_file()]
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_synthetic_files_deterministic_and_readable(synth: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synthetic.generate(again, 60, feat_dim=D, seed=3)
    assert _digest(again) == _digest(synth)
    other = tmp_path / "other"
    synthetic.generate(other, 60, feat_dim=D, seed=4)
    assert _digest(other)["mscoco_imgfeat/train2014_obj36.tsv"] != _digest(synth)["mscoco_imgfeat/train2014_obj36.tsv"]

    summary = json.loads((synth / "synthetic.json").read_text())
    assert summary["splits"]["train"]["images"] == 54 and summary["splits"]["minival"]["images"] == 6
    train = list(formats.read_tsv(synth / "mscoco_imgfeat/train2014_obj36.tsv", feat_dim=D))  # validates every row
    assert len(train) == 54 and all(r.num_boxes == 36 for r in train)
    assert all(np.all(np.diff(r.objects_conf) <= 0) for r in train)  # confidence-ordered, as a detector writes
    vqa = formats.read_vqa(synth / "vqa/train.json")
    assert len(vqa) == summary["splits"]["train"]["vqa"]
    labels = formats.read_answer_vocab(synth / "vqa/trainval_ans2label.json", synth / "vqa/trainval_label2ans.json")
    table = formats.read_answer_table(synth / "lxmert/all_ans.json")
    assert all(normalize_answer(a) == a for a in table.answers) and set(labels) <= set(table.answers)
    assert all(set(q.label) <= set(labels) for q in vqa if q.label)
    assert len(formats.read_gqa(synth / "gqa/testdev.json")) == summary["splits"]["minival"]["gqa"]
    assert len(formats.read_nlvr2(synth / "nlvr2/valid.json")) == summary["splits"]["minival"]["nlvr2"]
    entries = list(formats.read_pretrain_entries(synth / "lxmert/mscoco_train.json"))
    assert {e.source for e in entries} == {"mscoco", "vg", "vqa", "gqa"}
    assert all((e.label is None) == (e.source in ("mscoco", "vg")) for e in entries)


def test_synthetic_features_recover_object_classes(synth: Path) -> None:
    """Learnable by construction: class means of the train regions classify minival regions (> 90%)."""
    train = list(formats.read_tsv(synth / "mscoco_imgfeat/train2014_obj36.tsv", feat_dim=D))
    val = list(formats.read_tsv(synth / "mscoco_imgfeat/val2014_obj36.tsv", feat_dim=D))
    feats, ids = np.concatenate([r.features for r in train]), np.concatenate([r.objects_id for r in train])
    classes = np.unique(ids)
    means = np.stack([feats[ids == c].mean(0) for c in classes])
    vfeats, vids = np.concatenate([r.features for r in val]), np.concatenate([r.objects_id for r in val])
    predicted = classes[((vfeats[:, None] - means[None]) ** 2).sum(-1).argmin(1)]
    assert (predicted == vids).mean() > 0.9


def _scene_counts(record: RegionRecord) -> dict[str, tuple[int, set[str]]]:
    """object name -> (regions, colours) over the thing regions of an image."""
    out: dict[str, tuple[int, set[str]]] = {}
    for obj, attr in zip(record.objects_id, record.attrs_id):
        if obj < len(synthetic.OBJECTS):
            n, colors = out.get(synthetic.OBJECTS[obj], (0, set()))
            out[synthetic.OBJECTS[obj]] = (n + 1, colors | {synthetic.ATTRIBUTE_NAMES[attr]})
    return out


def test_synthetic_sentences_agree_with_the_regions(synth: Path) -> None:
    records = {r.img_id: r for r in formats.read_tsv(synth / "mscoco_imgfeat/train2014_obj36.tsv", feat_dim=D)}
    singular = {synthetic.plural(o): o for o in synthetic.OBJECTS} | {o: o for o in synthetic.OBJECTS}
    words = {"a": 1, "two": 2, "three": 3}
    checked = 0
    for e in formats.read_pretrain_entries(synth / "lxmert/mscoco_train.json"):
        scene = _scene_counts(records[e.img_id])
        if e.source in ("mscoco", "vg"):  # every "<count> <colour> <noun>" phrase is true of the image
            for count, color, noun in re.findall(r"\b(a|two|three) (\w+) (\w+)", e.sentence):
                if color in synthetic.COLORS:
                    assert scene[singular[noun]] == (words[count], {color}), (e.sentence, scene)
                    checked += 1
            continue
        answer = max(e.label, key=e.label.get)  # type: ignore[union-attr, arg-type]
        if m := re.fullmatch(r"what color (?:is|are) the (\w+)\?", e.sentence):
            assert scene[singular[m[1]]][1] == {answer}
        elif m := re.fullmatch(r"how many (\w+) are there\?", e.sentence):
            assert scene[singular[m[1]]][0] == int(answer)
        elif m := re.fullmatch(r"is there a (\w+) in the picture\?", e.sentence):
            assert answer == ("yes" if m[1] in scene else "no")
        elif m := re.fullmatch(r"(?:is|are) the (\w+) (\w+)\?", e.sentence):
            assert answer == ("yes" if scene[singular[m[1]]][1] == {m[2]} else "no")
        elif m := re.fullmatch(r"what is (\w+)\?", e.sentence):
            assert [o for o, (_, c) in scene.items() if m[1] in c] == [answer]
        elif m := re.fullmatch(r"how many (\w+) things are there\?", e.sentence):
            assert sum(n for n, c in scene.values() if m[1] in c) == int(answer)
        else:
            raise AssertionError(f"unexpected question {e.sentence!r}")
        checked += 1
    assert checked > 500

    for ex in formats.read_nlvr2(synth / "nlvr2/train.json"):
        left, right = _scene_counts(records[ex.img0]), _scene_counts(records[ex.img1])
        if m := re.fullmatch(r"there are (\d+) (\w+) in total\.", ex.sent):
            noun = singular[m[2]]
            truth = left.get(noun, (0,))[0] + right.get(noun, (0,))[0] == int(m[1])
        elif m := re.fullmatch(r"both images contain a (\w+)\.", ex.sent):
            truth = m[1] in left and m[1] in right
        else:
            m = re.fullmatch(r"the left image has (a|two|three) (\w+) (\w+)\.", ex.sent)
            assert m, ex.sent
            truth = left[singular[m[3]]][1] == {m[2]}
        assert ex.label == int(truth), ex


def test_synthetic_words_are_single_wordpieces(synth: Path) -> None:
    from lxmert.tokenizer import UNK_ID, LxmertTokenizer

    tokenizer = LxmertTokenizer()
    entries = formats.read_pretrain_entries(synth / "lxmert/mscoco_train.json")
    words = {w for e in entries for w in re.findall(r"\w+", e.sentence)}
    words |= {w for ex in formats.read_nlvr2(synth / "nlvr2/train.json") for w in re.findall(r"\w+", ex.sent)}
    for word in sorted(words):
        pieces = tokenizer.tokenize(word)
        assert len(pieces) == 1 and tokenizer.convert_tokens_to_ids(pieces) != [UNK_ID], (word, pieces)


def test_synthetic_cli(tmp_path: Path) -> None:
    synthetic.main([str(tmp_path / "cli"), "--images", "6", "--feat-dim", "8", "--seed", "1"])
    assert len(list(formats.read_tsv(tmp_path / "cli/mscoco_imgfeat/val2014_obj36.tsv", feat_dim=8))) == 1


def authors_label_loop(label: dict[str, float], used: set[str]) -> dict[str, float]:
    """airsplay/lxmert src/pretrain/lxmert_data.py, LXMERTDataset.__init__, transcribed (convert_ans is
    normalize_answer, `used` the answer table's membership)."""
    label = dict(label)
    for ans in list(label.keys()):
        new_ans = normalize_answer(ans)
        if new_ans in used:
            if ans != new_ans:
                label[new_ans] = label.pop(ans)
        else:
            label.pop(ans)
    return label


def test_answer_merging_is_the_authors_on_random_labels(tmp_path: Path) -> None:
    answers = ["2", "3", "gray", "dog", "yes", "no"]
    spellings = [
        "2",
        "two",
        "Two",
        "3",
        "three",
        "gray",
        "Grey",
        "grey",
        "gray.",
        "dog",
        "the dog",
        "a Dog.",
        "yes",
        "Yes",
        "no",
        "cat",
    ]
    table = formats.read_answer_table(_write(tmp_path / "all_ans.json", [{"ans": a} for a in answers]))
    rng = np.random.default_rng(15)
    for _ in range(500):
        keys = rng.choice(spellings, size=rng.integers(1, 7), replace=False)
        label = {str(k): float(rng.integers(1, 10)) / 10 for k in keys}
        expected = authors_label_loop(label, set(answers))
        got = table.convert_label(label)
        assert got == {table.index[a]: s for a, s in expected.items()}, label
        assert list(got) == [table.index[a] for a in expected], label  # and in the authors' order


# --------------------------------------------------------------------------------------- text encodings


@pytest.mark.parametrize("chunk", [1, 2, 5, 1 << 20])
def test_json_readers_accept_a_byte_order_mark(tmp_path: Path, chunk: int) -> None:
    value = [{"img_id": "caf\u00e9", "sentf": {"vg": ["\u4e2d a dog"]}}, {"img_id": "b", "sentf": {}}]
    path = tmp_path / "marked.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(value, ensure_ascii=False).encode("utf-8"))
    assert [v for _, v in formats.iter_json_array(path, chunk_chars=chunk)] == value
    vqa = tmp_path / "vqa.json"
    vqa.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"img_id": "i", "question_id": 1, "sent": "q?"}]).encode())
    assert formats.read_vqa(vqa)[0].question_id == 1
    (tmp_path / "ans.json").write_bytes(b"\xef\xbb\xbf" + b'[{"ans": "yes"}]')
    assert formats.read_answer_table(tmp_path / "ans.json").answers == ["yes"]


@pytest.mark.parametrize("chunk", [1, 3, 64, 1 << 20])
def test_a_byte_that_is_not_utf8_names_record_offset_and_line(tmp_path: Path, chunk: int) -> None:
    records = [{"img_id": "a", "sentf": {"vg": ["caf\u00e9"]}}, {"img_id": "b", "sentf": {"vg": ["x"]}}, {"c": 3}]
    text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    data = text.encode("utf-8")
    at = data.index(b'"x"') + 1
    path = tmp_path / "latin1.json"
    path.write_bytes(data[:at] + b"\xe9" + data[at + 1 :])  # a Latin-1 e-acute in record 1, on line 3
    with pytest.raises(DataError) as info:
        list(formats.iter_json_array(path, chunk_chars=chunk))
    assert str(info.value) == (
        f"{path}, record 1, byte {at} (line 3): not valid UTF-8 (invalid continuation byte: "
        "b'\\xe9'); is the file in another encoding?"
    )
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # the offset counts the mark
    with pytest.raises(DataError, match=rf"{path}, record 1, byte {at + 3} \(line 3\): not valid UTF-8"):
        list(formats.iter_json_array(path, chunk_chars=chunk))
    path.write_bytes(data[:-3] + b"\xc3")  # the file ends inside a character
    end = len(data) - 3
    with pytest.raises(DataError, match=rf"record 2, byte {end} \(line 4\): not valid UTF-8 \(unexpected end"):
        list(formats.iter_json_array(path, chunk_chars=chunk))
    gqa = tmp_path / "gqa.json"
    raw = b'[{"img_id": "i",\n "question_id": "\xff"}]'
    gqa.write_bytes(raw)
    at = raw.index(b"\xff")
    with pytest.raises(DataError, match=rf"{gqa}, byte {at} \(line 2\): not valid UTF-8 \(invalid start byte"):
        formats.read_gqa(gqa)
