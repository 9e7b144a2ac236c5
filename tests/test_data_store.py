"""The region-feature and text stores (engine/data/store.py) and their converter (engine/data/convert.py):
exact round trips, the padding policy, bad input, resume after a crash, atomicity, verification.

Tiny feature dims (16), a few dozen images and small chunks, so that resume crosses several chunks.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.data import convert, formats, synthetic
from engine.data.formats import DataError, RegionRecord
from engine.data.store import (
    HEADER_BYTES,
    RegionStore,
    StoreBuilder,
    StoreError,
    StoreExistsError,
    TextStore,
    _GrowingFile,
    npy_header,
    region_mask,
)
from lxmert.tokenizer import LxmertTokenizer

D = 16
CHUNK = 8  # images a chunk: the 54 + 6 synthetic images make 8 chunks
ARRAYS = ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf", "num_boxes", "img_hw")


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, 60, feat_dim=D, seed=5, captions_per_image=3, questions_per_image=2)
    return out


def tsvs(synth: Path) -> list[Path]:
    return [synth / "mscoco_imgfeat/train2014_obj36.tsv", synth / "mscoco_imgfeat/val2014_obj36.tsv"]


def texts(synth: Path) -> list[Path]:
    return [synth / "lxmert/mscoco_train.json", synth / "lxmert/mscoco_minival.json"]


def features(synth: Path, out: Path, **kwargs) -> convert.FeatureStats:
    paths = kwargs.pop("paths", tsvs(synth))
    return convert.convert_features(paths, out, **(dict(feat_dim=D, chunk_images=CHUNK, progress=False) | kwargs))


def text(synth: Path, feats: Path, out: Path, **kwargs) -> convert.TextStats:
    options = dict(answers=synth / "lxmert/all_ans.json", chunk_sentences=100, progress=False) | kwargs
    return convert.convert_text(texts(synth), feats, out, **options)


@pytest.fixture(scope="module")
def stores(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Clean conversions: fp32 and fp16 region stores, and a text store over the fp16 one."""
    root = tmp_path_factory.mktemp("stores")
    features(synth, root / "fp32", fp32=True)
    features(synth, root / "fp16")
    text(synth, root / "fp16", root / "text")
    return {"fp32": root / "fp32", "fp16": root / "fp16", "text": root / "text"}


def source_records(synth: Path) -> list[RegionRecord]:
    return [r for path in tsvs(synth) for r in formats.read_tsv(path, feat_dim=D)]


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def normalised(record: RegionRecord) -> np.ndarray:
    boxes = record.boxes.astype(np.float32)
    boxes[:, (0, 2)] /= record.img_w
    boxes[:, (1, 3)] /= record.img_h
    return boxes


# ------------------------------------------------------------------------------------------- regions


def test_region_store_round_trip_exact_fp32(synth: Path, stores: dict[str, Path]) -> None:
    records = source_records(synth)
    store = RegionStore(stores["fp32"])
    assert len(store) == 60 and store.img_ids == [r.img_id for r in records]
    assert (store.num_regions, store.feat_dim) == (36, D)
    order = np.random.default_rng(0).permutation(60)
    batch = store.gather(order)
    for row, i in enumerate(order):
        r = records[i]
        assert store.index_of(r.img_id) == i
        assert np.array_equal(batch.features[row], r.features) and batch.features.dtype == np.float32
        assert np.array_equal(batch.boxes[row], normalised(r))
        assert np.array_equal(batch.obj_ids[row], r.objects_id) and np.array_equal(batch.attr_ids[row], r.attrs_id)
        assert np.array_equal(batch.obj_conf[row], r.objects_conf)
        assert np.array_equal(batch.attr_conf[row], r.attrs_conf)
        assert batch.num_boxes[row] == 36 and tuple(batch.img_hw[row]) == (r.img_h, r.img_w)
    assert batch.boxes.min() >= 0 and batch.boxes.max() <= 1
    one = store.get(7)
    assert not one.features.flags.owndata and np.array_equal(one.features, records[7].features)  # a view, no copy
    assert len(pickle.dumps(store)) < 1000  # workers reopen the maps rather than receive the data
    assert np.array_equal(pickle.loads(pickle.dumps(store)).get(7).features, one.features)
    with pytest.raises(KeyError, match="not in the region store"):
        store.index_of("COCO_nope")
    store.verify()


def test_region_store_fp16(synth: Path, stores: dict[str, Path]) -> None:
    records = source_records(synth)
    store = RegionStore(stores["fp16"])
    batch = store.gather(np.arange(60))
    source = np.stack([r.features for r in records])
    assert batch.features.dtype == np.float16 and batch.obj_conf.dtype == np.float16
    assert np.array_equal(batch.features, source.astype(np.float16))  # exactly float16 rounding
    np.testing.assert_allclose(batch.features.astype(np.float32), source, rtol=1e-3, atol=1e-4)
    assert np.array_equal(batch.boxes, RegionStore(stores["fp32"]).gather(np.arange(60)).boxes)  # boxes stay fp32
    assert store.meta["float_dtype"] == "<f2" and store.meta["stats"]["images"] == 60


def test_npy_files_are_standard(stores: dict[str, Path]) -> None:
    """numpy reads every array with or without mmap; data starts at a 64-byte aligned offset (DALI's reader)."""
    store = RegionStore(stores["fp16"])
    for name in ARRAYS:
        path = store.array_path(name)
        with open(path, "rb") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            assert f.tell() == HEADER_BYTES and HEADER_BYTES % 64 == 0 and not fortran
        loaded = np.load(path)
        assert loaded.shape == shape and np.array_equal(loaded, store.arrays[name])
        assert dtype.byteorder in "<|=" and (dtype.byteorder != "=" or np.little_endian)


def test_header_is_numpys(stores: dict[str, Path]) -> None:
    import io

    for dtype, shape in (("<f2", (400, 36, 2048)), ("<i2", (9_180_000, 20)), ("|u1", (0,)), ("<f4", (10**11, 36, 4))):
        expected = io.BytesIO()
        np.lib.format.write_array_header_1_0(expected, {"descr": dtype, "fortran_order": False, "shape": shape})
        assert npy_header(np.dtype(dtype), shape) == expected.getvalue()


def _odd_records(rng: np.random.Generator) -> list[RegionRecord]:
    from test_data_formats import make_record

    return [make_record(img_id, n, rng) for img_id, n in (("few", 10), ("many", 40), ("exact", 36), ("one", 1))]


def test_fewer_and_more_than_36_boxes(tmp_path: Path) -> None:
    records = _odd_records(np.random.default_rng(1))
    formats.write_tsv(tmp_path / "odd.tsv", records)
    stats = convert.convert_features([tmp_path / "odd.tsv"], tmp_path / "store", feat_dim=D, fp32=True, progress=False)
    assert (stats.images, stats.padded, stats.truncated) == (4, 2, 1)
    store = RegionStore(tmp_path / "store")
    b = store.gather([0, 1, 2, 3])
    assert b.num_boxes.tolist() == [10, 36, 36, 1]
    mask = region_mask(b.num_boxes)
    assert mask.shape == (4, 36) and mask.sum(1).tolist() == [10, 36, 36, 1]
    few = records[0]
    assert np.array_equal(b.features[0, :10], few.features) and not b.features[0, 10:].any()
    assert not b.boxes[0, 10:].any() and (b.obj_ids[0, 10:] == -1).all() and (b.attr_ids[0, 10:] == -1).all()
    assert not b.obj_conf[0, 10:].any() and not b.attr_conf[0, 10:].any()
    many = records[1]  # the first 36 regions, as the detector wrote them
    assert np.array_equal(b.features[1], many.features[:36]) and np.array_equal(b.obj_ids[1], many.objects_id[:36])
    assert np.array_equal(b.boxes[1], normalised(many)[:36])


def test_box_within_tolerance_is_clipped(tmp_path: Path) -> None:
    rec = _odd_records(np.random.default_rng(2))[0]
    rec.boxes[0] = [-0.5, -1.0, rec.img_w + 0.5, rec.img_h + 1.0]
    formats.write_tsv(tmp_path / "edge.tsv", [rec])
    convert.convert_features([tmp_path / "edge.tsv"], tmp_path / "store", feat_dim=D, progress=False)
    assert RegionStore(tmp_path / "store").get(0).boxes[0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_bad_rows_stop_with_file_and_row_or_are_skipped(synth: Path, tmp_path: Path) -> None:
    lines = tsvs(synth)[1].read_bytes().splitlines(keepends=True)
    bad = tmp_path / "bad.tsv"
    truncated = lines[1][: len(lines[1]) // 3] + b"\n"
    bad.write_bytes(lines[0] + truncated + lines[2] + lines[0] + lines[3])  # rows 2 (truncated) and 4 (duplicate)
    with pytest.raises(DataError, match=rf"{bad}, row 2: .*truncated row"):
        convert.convert_features([bad], tmp_path / "s1", feat_dim=D, progress=False)
    assert not (tmp_path / "s1").exists()
    stats = convert.convert_features([bad], tmp_path / "s2", feat_dim=D, skip_bad_rows=True, progress=False)
    assert (stats.images, stats.bad_rows) == (3, 2)
    assert "row 2" in stats.errors[0] and "row 4" in stats.errors[1] and "appears again" in stats.errors[1]
    ids = RegionStore(tmp_path / "s2").img_ids
    assert len(ids) == 3 and len(set(ids)) == 3
    assert RegionStore(tmp_path / "s2").meta["stats"]["bad_rows"] == 2

    dup = tmp_path / "dup.tsv"
    dup.write_bytes(lines[0] + lines[1] + lines[0])
    with pytest.raises(DataError, match=rf"{dup}, row 3: img_id .* appears again \(already store row 0\)"):
        convert.convert_features([dup], tmp_path / "s3", feat_dim=D, progress=False)


def test_float16_overflow_asks_for_fp32(tmp_path: Path) -> None:
    rec = _odd_records(np.random.default_rng(3))[0]
    rec.features[3, 2] = 1e5
    formats.write_tsv(tmp_path / "big.tsv", [rec])
    with pytest.raises(DataError, match=r"row 1: .*float16.*--fp32"):
        convert.convert_features([tmp_path / "big.tsv"], tmp_path / "s", feat_dim=D, progress=False)
    convert.convert_features([tmp_path / "big.tsv"], tmp_path / "s", feat_dim=D, fp32=True, progress=False)
    assert RegionStore(tmp_path / "s").get(0).features[3, 2] == 1e5


class Crash(Exception):
    pass


def crash_after(monkeypatch: pytest.MonkeyPatch, commits: int) -> None:
    """Make the builder die on its (commits + 1)-th commit, after that chunk's rows were appended."""
    real, calls = StoreBuilder.commit, [0]

    def commit(self: StoreBuilder, position: object, state: object) -> None:
        calls[0] += 1
        if calls[0] > commits:
            raise Crash("simulated crash")
        real(self, position, state)

    monkeypatch.setattr(StoreBuilder, "commit", commit)


@pytest.mark.parametrize("commits", [0, 3, 7])
def test_feature_conversion_resumes_after_a_crash(
    synth: Path, stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, commits: int
) -> None:
    out = tmp_path / "feats"
    with monkeypatch.context() as m:
        crash_after(m, commits)
        with pytest.raises(Crash):
            features(synth, out)
    partial = tmp_path / "feats.partial"
    assert not out.exists() and partial.is_dir() and not (partial / "meta.json").exists()
    for path in (out, partial):
        with pytest.raises(StoreError):
            RegionStore(path)
    stats = features(synth, out)
    assert stats.resumed_at == min(commits * CHUNK, 54) and stats.images == 60
    assert not partial.exists()
    assert store_bytes(out) == store_bytes(stores["fp16"])  # meta.json too: a resumed build is the same build


def test_changed_input_restarts_the_partial_build(synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "feats"
    with monkeypatch.context() as m:
        crash_after(m, 2)
        with pytest.raises(Crash):
            features(synth, out)
    assert features(synth, out, fp32=True).resumed_at == 0  # other options: not the same build
    assert RegionStore(out).arrays["features"].dtype == np.float32


def test_existing_store_is_never_damaged(synth: Path, stores: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "feats"
    features(synth, out)
    before = store_bytes(out)
    with pytest.raises(StoreExistsError, match="already exists"):
        features(synth, out)
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(tsvs(synth)[1].read_bytes() + b"truncated\trow\n")
    with pytest.raises(DataError, match=r"row 7"):
        features(synth, out, paths=[bad], overwrite=True)
    assert store_bytes(out) == before
    RegionStore(out).verify()
    stats = features(synth, out, paths=[tsvs(synth)[1]], overwrite=True)  # a good rerun replaces it
    assert stats.images == 6 and len(RegionStore(out)) == 6
    assert not any(p.name.startswith("feats.") for p in tmp_path.iterdir())  # no partial, no old copy left


def test_refuses_to_replace_what_is_not_a_store(synth: Path, tmp_path: Path) -> None:
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a store"):
        features(synth, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_verification_catches_bytes_that_differ(synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _GrowingFile.finalize

    def finalize(self: _GrowingFile) -> None:
        real(self)
        if self.path.name == "boxes.npy":  # a bit flips between writing and the rename
            with open(self.path, "r+b") as f:
                f.seek(HEADER_BYTES + 1000)
                byte = f.read(1)
                f.seek(HEADER_BYTES + 1000)
                f.write(bytes([byte[0] ^ 1]))

    monkeypatch.setattr(_GrowingFile, "finalize", finalize)
    with pytest.raises(StoreError, match=r"boxes.npy: rows .* differ from what was written"):
        features(synth, tmp_path / "feats")
    assert not (tmp_path / "feats").exists() and not (tmp_path / "feats.partial").exists()


def test_verify_detects_later_corruption(synth: Path, tmp_path: Path) -> None:
    features(synth, tmp_path / "feats")
    path = tmp_path / "feats/features.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="differ from the checksum"):
        RegionStore(tmp_path / "feats").verify()


# ---------------------------------------------------------------------------------------------- text


def test_text_store_decodes_to_the_tokenised_sentences(synth: Path, stores: dict[str, Path]) -> None:
    store, regions = TextStore(stores["text"]), RegionStore(stores["fp16"])
    store.check_features(regions)
    table = formats.read_answer_table(synth / "lxmert/all_ans.json")
    tokenizer = LxmertTokenizer()
    entries = [e for path in texts(synth) for e in formats.read_pretrain_entries(path)]
    assert len(store) == len(entries) and store.sources == ["mscoco", "vg", "vqa", "gqa"]
    assert store.answers == table.answers and store.arrays["token_ids"].dtype == np.int16
    labelled = 0
    for i, e in enumerate(entries):
        got = store.get(i)
        assert got.token_ids.tolist() == tokenizer.encode(e.sentence), e
        assert regions.img_ids[got.image_index] == e.img_id and (got.source, got.sent_index) == (e.source, e.sent_index)
        expected = table.convert_label(e.label) if e.label is not None else {}
        assert got.labels == {a: float(np.float32(s)) for a, s in expected.items()}  # scores are float32
        labelled += bool(got.labels)
    assert labelled == store.meta["stats"]["labelled"] > 0
    assert (store.arrays["token_ids"][np.arange(20) >= store.arrays["lengths"][:, None]] == 0).all()  # padding

    order = np.random.default_rng(0).permutation(len(store))[:300]
    batch = store.gather(order)
    assert batch.token_ids.shape == (300, 20) and batch.label_offsets[0] == 0
    for b, i in enumerate(order):
        lo, hi = batch.label_offsets[b], batch.label_offsets[b + 1]
        assert dict(zip(batch.label_ids[lo:hi].tolist(), batch.label_scores[lo:hi].tolist())) == store.labels_of(i)
        assert np.array_equal(batch.token_ids[b], store.arrays["token_ids"][i])
    store.verify()
    with pytest.raises(StoreError, match="indexes a feature store of 60 images"):
        store.check_features(RegionStore(_only_minival(synth, stores["fp16"].parent)))


def _only_minival(synth: Path, root: Path) -> Path:
    out = root / "minival_only"
    if not out.exists():
        features(synth, out, paths=[tsvs(synth)[1]])
    return out


def test_missing_image_is_an_error_or_skipped(synth: Path, stores: dict[str, Path]) -> None:
    minival = _only_minival(synth, stores["fp16"].parent)
    out = stores["fp16"].parent / "text_missing"
    with pytest.raises(DataError) as info:
        text(synth, minival, out)
    message = str(info.value)
    assert f"{texts(synth)[0]}, record 0" in message and "COCO_train2014_000000000000" in message
    assert "not in the feature store" in message and not out.exists()
    stats = text(synth, minival, out, skip_missing_images=True)
    assert (stats.missing_image_records, stats.records) == (54, 60)
    assert stats.missing_image_sentences + stats.sentences == len(TextStore(stores["text"]))
    assert len(TextStore(out)) == stats.sentences
    assert set(TextStore(out).arrays["image_index"].tolist()) == set(range(6))


def test_labels_need_an_answer_table(synth: Path, stores: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"record 0: has QA labels .* \(--answers\)"):
        text(synth, stores["fp16"], tmp_path / "t", answers=None)


def test_text_bad_records_skipped_and_counted(synth: Path, stores: dict[str, Path], tmp_path: Path) -> None:
    records = json.loads(texts(synth)[1].read_text())
    records[2]["labelf"]["vqa"] = records[2]["labelf"]["vqa"][:-1]  # misaligned labels
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    options = dict(answers=synth / "lxmert/all_ans.json", progress=False)
    with pytest.raises(DataError, match=rf"{bad}, record 2: labelf\['vqa'\] has 1 labels for 2 sentences"):
        convert.convert_text([bad], stores["fp16"], tmp_path / "t", **options)
    stats = convert.convert_text([bad], stores["fp16"], tmp_path / "t", skip_bad_rows=True, **options)
    assert (stats.records, stats.bad_records) == (5, 1) and "record 2" in stats.errors[0]


def test_text_conversion_resumes_after_a_crash(
    synth: Path, stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "text"
    with monkeypatch.context() as m:
        crash_after(m, 4)
        with pytest.raises(Crash):
            text(synth, stores["fp16"], out)
    assert not out.exists()
    stats = text(synth, stores["fp16"], out)
    assert 0 < stats.resumed_at < stats.sentences == len(TextStore(stores["text"]))
    assert store_bytes(out) == store_bytes(stores["text"])  # meta.json (stats included) too


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_both_modes(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tsv = [str(p) for p in tsvs(synth)]
    feats, out = tmp_path / "feats", tmp_path / "text"
    assert convert.main(["--tsv", *tsv, "--out", str(feats), "--feat-dim", str(D), "--fp32", "--quiet"]) == 0
    assert "images 60" in capsys.readouterr().out
    assert RegionStore(feats).arrays["features"].dtype == np.float32
    answers = str(synth / "lxmert/all_ans.json")
    args = ["--text", *map(str, texts(synth)), "--features", str(feats), "--answers", answers]
    assert convert.main([*args, "--out", str(out), "--quiet"]) == 0
    assert len(TextStore(out)) > 0
    assert convert.main([*args, "--out", str(out), "--quiet"]) == 0  # the same inputs and options: nothing to do
    assert f"{out}: already converted from these inputs and options" in capsys.readouterr().out
    assert convert.main([*args, "--out", str(out), "--skip-bad-rows", "--quiet"]) == 2  # another option
    assert "already exists (from other inputs or options); pass overwrite=True (--overwrite)" in capsys.readouterr().err


def test_dali_numpy_reader_slices_the_store(stores: dict[str, Path]) -> None:
    """DALI's CPU numpy reader reads one image out of the big features.npy with roi_start / roi_end."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def, types

    store = RegionStore(stores["fp16"])
    path, order = str(store.array_path("features")), [5, 0, 59, 17]

    def start(info: Any) -> np.ndarray:  # info: DALI's SampleInfo
        return np.array([order[info.idx_in_epoch % 4], 0, 0], np.int32)

    def end(info: Any) -> np.ndarray:
        return np.array([order[info.idx_in_epoch % 4] + 1, 36, D], np.int32)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipeline() -> Any:
        roi_start = fn.external_source(source=start, batch=False, dtype=types.INT32)
        roi_end = fn.external_source(source=end, batch=False, dtype=types.INT32)
        return fn.readers.numpy(files=[path] * 4, roi_start=roi_start, roi_end=roi_end)

    pipe = pipeline()
    pipe.build()
    (batch,) = pipe.run()
    for k, i in enumerate(order):
        assert np.array_equal(np.array(batch.at(k))[0], store.get(i).features)


# ------------------------------------------------------------------- whole chunks, empty input, kills in finish


def test_rows_that_fill_whole_chunks(synth: Path, stores: dict[str, Path], tmp_path: Path) -> None:
    """54 + 6 images in chunks of 6 and 3: every file ends on a chunk boundary (the end-of-file commit appends
    a chunk of no rows), the case of 512 * k images at the default size."""
    for chunk in (6, 3):
        out = tmp_path / f"c{chunk}"
        assert features(synth, out, chunk_images=chunk).images == 60
        assert all(
            store_bytes(out)[name] == store_bytes(stores["fp16"])[name]
            for name in store_bytes(out)
            if name != "meta.json"
        )


def test_empty_input_is_one_clear_error(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=rf"{empty}, the whole file: no rows \(an empty file\?\): no images"):
        features(synth, tmp_path / "s", paths=[empty])
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()  # nothing left behind
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"garbage\trow\n" + tsvs(synth)[1].read_bytes()[:500] + b"\n")
    with pytest.raises(
        DataError,
        match=r"all 2 rows are bad \(skipped\): no images to store: nothing to convert; "
        r"the first skipped: .*row 1: expected 10",
    ):
        features(synth, tmp_path / "s", paths=[bad], skip_bad_rows=True)
    assert not (tmp_path / "s.partial").exists()
    assert convert.main(["--tsv", str(empty), str(empty), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "all 2 files: no rows" in err, err


def test_text_conversion_with_no_sentence_left_is_an_error(
    synth: Path, stores: dict[str, Path], tmp_path: Path
) -> None:
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match=rf"{empty}, the whole file: no sentences to store \(sentences 0, records 0"):
        convert.convert_text([empty], stores["fp16"], tmp_path / "t", progress=False)
    assert not (tmp_path / "t.partial").exists()
    minival = _only_minival(synth, stores["fp16"].parent)  # none of mscoco_train's images
    with pytest.raises(DataError, match=r"records 54, .*missing_image_records 54, .*: nothing to convert$"):
        convert.convert_text(
            texts(synth)[:1],
            minival,
            tmp_path / "t",
            answers=synth / "lxmert/all_ans.json",
            skip_missing_images=True,
            progress=False,
        )


def test_a_directory_is_not_an_input_file(synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert convert.main(["--tsv", str(tmp_path), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"error: input {tmp_path} is a directory, not a TSV file"
    args = ["--text", str(tmp_path), "--features", str(tmp_path), "--out", str(tmp_path / "t"), "--quiet"]
    assert convert.main(args) == 2
    assert "is a directory, not a JSON file" in capsys.readouterr().err


def test_text_with_a_byte_order_mark_or_a_bad_byte(
    synth: Path, stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = texts(synth)[1].read_bytes()
    marked = tmp_path / "marked.json"
    marked.write_bytes(b"\xef\xbb\xbf" + data)
    args = ["--features", str(stores["fp16"]), "--answers", str(synth / "lxmert/all_ans.json"), "--quiet"]
    assert convert.main(["--text", str(marked), *args, "--out", str(tmp_path / "t")]) == 0
    clean = formats.read_pretrain_entries(texts(synth)[1])
    assert len(TextStore(tmp_path / "t")) == len(list(clean))
    at = data.index(b'"img_id"', data.index(b'"img_id"') + 1)  # inside record 1
    bad = tmp_path / "latin1.json"
    bad.write_bytes(data[:at] + b"\xe9" + data[at:])
    assert convert.main(["--text", str(bad), *args, "--out", str(tmp_path / "u")]) == 2
    err = capsys.readouterr().err
    line = 1 + data[:at].count(b"\n")
    assert err.strip().splitlines() == [
        f"error: {bad}, record 1, byte {at} (line {line}): not valid UTF-8 (invalid continuation byte: b'\\xe9'); "
        "is the file in another encoding?"
    ], err


class KilledInFinish(Exception):
    pass


def _fail_once(monkeypatch: pytest.MonkeyPatch, target: object, name: str, when: Any) -> None:
    """Make target.name raise KilledInFinish the first time when(*args) holds."""
    real, fired = getattr(target, name), [False]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not fired[0] and when(*args):
            fired[0] = True
            raise KilledInFinish(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def _no_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    def read_tsv(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the conversion was redone")

    monkeypatch.setattr(convert, "read_tsv", read_tsv)


@pytest.mark.parametrize("step", ["drop", "progress", "rename"])
def test_a_sealed_partial_is_installed_not_redone(
    synth: Path, stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Killed after meta.json, while the build state is deleted (img_ids, then progress.json) or before the
    rename: the rerun only installs the verified store. (Before, a kill between img_ids and progress.json
    made the rerun fail and delete the partial; after progress.json, it redid the conversion.)"""
    import os

    from engine.data import store as store_module

    out = tmp_path / "feats"
    with monkeypatch.context() as m:
        if step in ("drop", "progress"):
            name = {"drop": "img_ids", "progress": "progress.json"}[step]
            _fail_once(m, Path, "unlink", lambda p, *a: p.name == name)
        else:
            _fail_once(m, store_module.os, "rename", lambda src, dst: Path(src).name == "feats.partial")
        with pytest.raises(KilledInFinish):
            features(synth, out)
    assert (tmp_path / "feats.partial/meta.json").exists() and not out.exists()
    assert os.path.exists(tmp_path / "feats.partial/img_ids") == (step == "drop")
    assert os.path.exists(tmp_path / "feats.partial/progress.json") == (step != "rename")
    with monkeypatch.context() as m:
        _no_reading(m)
        stats = features(synth, out)
    assert stats.images == stats.resumed_at == 60
    assert store_bytes(out) == store_bytes(stores["fp16"]) and sorted(p.name for p in tmp_path.iterdir()) == ["feats"]


def test_an_interrupted_replacement_is_finished_or_undone(
    synth: Path, stores: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.data import store as store_module

    out = tmp_path / "feats"
    features(synth, out, paths=tsvs(synth)[1:])  # the store being replaced: 6 images
    old = store_bytes(out)

    def killed_mid_swap() -> None:
        with monkeypatch.context() as m:
            _fail_once(m, store_module.os, "rename", lambda src, dst: Path(src).name == "feats.partial")
            with pytest.raises(KilledInFinish):
                features(synth, out, overwrite=True)
        assert not out.exists() and (tmp_path / "feats.partial.old").is_dir()

    killed_mid_swap()  # the old store is aside, the new one sealed: the same command finishes the swap
    with monkeypatch.context() as m:
        _no_reading(m)
        features(synth, out, overwrite=True)
    assert store_bytes(out) == store_bytes(stores["fp16"]) and sorted(p.name for p in tmp_path.iterdir()) == ["feats"]

    features(synth, out, paths=tsvs(synth)[1:], overwrite=True)
    killed_mid_swap()  # another build reruns: the old store comes back, and is not replaced without overwrite
    with pytest.raises(StoreExistsError, match="already exists"):
        features(synth, out, fp32=True)
    assert store_bytes(out) == old and not (tmp_path / "feats.partial.old").exists()
    RegionStore(out).verify()


def test_rerun_of_a_finished_conversion_says_so(synth: Path, tmp_path: Path) -> None:
    features(synth, tmp_path / "feats")
    with pytest.raises(StoreExistsError, match=r"already exists \(converted from these very inputs and options\)"):
        features(synth, tmp_path / "feats")
