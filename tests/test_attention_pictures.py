"""`lxmert-attention` (engine/attention_pictures.py) and the figure it is drawn on (engine/figure.py).

The pictures are checked for what they show, not only for existing: every heat-map cell and box in the SVG carries
the probability it was drawn from, which must be the model's own (output_attentions of the exported model, run
here on the same sample), a cell's colour must be the colour scale at that probability, and the PNG's pixel at
each cell's centre must be that colour. Bad inputs: one line naming the file or record, exit status 2.
"""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch

import lxmert
from engine import attention_pictures as pictures
from engine.figure import FONT, Figure, Picture, decode_png, encode_png, text_bitmap

from conftest import build_pretrain_stores, randomize_

FEAT_DIM = 16
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic text store and feature store, and a randomly weighted pre-training model exported from them."""
    root = tmp_path_factory.mktemp("pictures")
    text, feats = build_pretrain_stores(root, feat_dim=FEAT_DIM)
    torch.manual_seed(50)
    config = lxmert.LxmertConfig(hidden_size=16, num_attention_heads=2, intermediate_size=23, l_layers=2, r_layers=1,
                                 x_layers=2, visual_feat_dim=FEAT_DIM, num_qa_labels=5, attn_backend="sdpa")  # fmt: skip
    model = randomize_(lxmert.LxmertForPreTraining(config)).eval()
    from engine.checkpoint import export_model

    export_model(model.state_dict(), config, root / "model")
    return dict(root=root, text=text, feats=feats, checkpoint=root / "model", backbone=model.lxmert)


def run_command(argv: list[str]) -> int:
    return pictures.main([str(a) for a in argv])


def svg_rects(path: Path, kind: str, map_name: str) -> list[ElementTree.Element]:
    root = ElementTree.parse(path).getroot()
    return [r for r in root.iter(f"{SVG}rect") if r.get("class") == kind and r.get("data-map") == map_name]


def as_matrix(rects, row_key: str, col_key: str) -> np.ndarray:
    rows = 1 + max(int(r.get(row_key)) for r in rects)
    cols = 1 + max(int(r.get(col_key)) for r in rects)
    out = np.full((rows, cols), np.nan, np.float32)
    for r in rects:
        out[int(r.get(row_key)), int(r.get(col_key))] = np.float32(float(r.get("data-weight")))
    assert not np.isnan(out).any(), "a cell is missing"
    return out


def model_attentions(backbone, ids: np.ndarray, feats: np.ndarray, boxes: np.ndarray):
    with torch.no_grad():
        return backbone(input_ids=torch.tensor(ids)[None], visual_feats=torch.tensor(feats)[None],
                        visual_pos=torch.tensor(boxes)[None], output_attentions=True)  # fmt: skip


def store_sample(world, index: int):
    from engine.data.store import RegionStore, TextStore

    text, regions = TextStore(world["text"]), RegionStore(world["feats"])
    entry = text.get(index)
    r = regions.get(entry.image_index)
    n = int(r.num_boxes)
    return entry.token_ids.astype(np.int64), np.array(r.features[:n], np.float32), np.array(r.boxes[:n], np.float32)


@pytest.mark.parametrize("layer, cross_layer, head", [(None, None, None), (0, 0, 1)], ids=["defaults", "layer0_head1"])
def test_the_drawn_weights_are_the_models_probabilities(world, tmp_path, layer, cross_layer, head):
    out = tmp_path / "fig"
    argv = [world["checkpoint"], "--text-store", world["text"], "--index", 4, "--out", out]
    for option, value in (("--layer", layer), ("--cross-layer", cross_layer), ("--head", head)):
        if value is not None:
            argv += [option, value]
    assert run_command(argv) == 0
    got = model_attentions(world["backbone"], *store_sample(world, 4))

    def pick(stream, index):
        probs = getattr(got, stream)[index][0]
        return (probs.mean(0) if head is None else probs[head]).numpy()

    language = pick("language_attentions", -1 if layer is None else layer)
    cross = pick("cross_encoder_attentions", -1 if cross_layer is None else cross_layer)
    regions = pick("vision_attentions", -1)
    drawn_language = as_matrix(svg_rects(out.with_suffix(".svg"), "cell", "language"), "data-query", "data-key")
    drawn_regions = as_matrix(svg_rects(out.with_suffix(".svg"), "cell", "regions"), "data-query", "data-key")
    drawn_cross = as_matrix(svg_rects(out.with_suffix(".svg"), "box", "cross"), "data-token", "data-region")
    assert np.array_equal(drawn_language, language)  # float32 written with 9 digits: exact
    assert np.array_equal(drawn_regions, regions)
    assert np.array_equal(drawn_cross, cross)
    assert language.shape[0] == cross.shape[0] and cross.shape[1] == regions.shape[0]

    # a cell's colour is the scale at its probability (over the map's largest), and so is the PNG's pixel there
    cells = svg_rects(out.with_suffix(".svg"), "cell", "language")
    vmax = float(language.max())
    pixels = decode_png(out.with_suffix(".png").read_bytes())
    for cell in cells:
        weight = float(cell.get("data-weight"))
        assert cell.get("fill") == pictures.heat_color(weight / vmax)
        x = (float(cell.get("x")) + float(cell.get("width")) / 2) * 2
        y = (float(cell.get("y")) + float(cell.get("height")) / 2) * 2
        expected = [int(cell.get("fill")[i: i + 2], 16) for i in (1, 3, 5)]
        assert pixels[int(y), int(x)].tolist() == expected
    # a box's shade runs from clear (the word's smallest weight) to 0.6 (its largest)
    for box in svg_rects(out.with_suffix(".svg"), "box", "cross"):
        row = cross[int(box.get("data-token"))]
        shade = 0.6 * (float(box.get("data-weight")) - row.min()) / (row.max() - row.min())
        assert float(box.get("fill-opacity", "1")) == pytest.approx(shade, abs=1e-4)


def test_the_legend_names_layers_head_and_word_pieces(world, tmp_path):
    from lxmert.tokenizer import LxmertTokenizer

    out = tmp_path / "fig"
    assert run_command([world["checkpoint"], "--text-store", world["text"], "--index", 2, "--out", out,
                        "--head", 0, "--format", "svg"]) == 0  # fmt: skip
    assert not out.with_suffix(".png").exists()
    texts = [t.text for t in ElementTree.parse(out.with_suffix(".svg")).getroot().iter(f"{SVG}text")]
    ids, _, _ = store_sample(world, 2)
    for piece in LxmertTokenizer().convert_ids_to_tokens(ids):
        assert piece in texts
    joined = "\n".join(texts)
    assert "layer 1 of 0-1, head 0 of 0-1" in joined  # the language map: the last layer by default
    assert "cross-modality layer 1 of 0-1, head 0 of 0-1" in joined
    assert "object-relationship layer 0 of 0-0, head 0 of 0-1" in joined


def test_a_sentence_and_a_tsv_row_on_a_picture(world, tmp_path):
    from engine.data.formats import read_tsv
    from lxmert.tokenizer import LxmertTokenizer

    tsv = world["root"] / "syn/mscoco_imgfeat/val2014_obj36.tsv"
    record = list(read_tsv(tsv, feat_dim=FEAT_DIM, num_object_labels=None, num_attr_labels=None))[2]
    picture = tmp_path / "image.png"
    gradient = np.zeros((record.img_h // 4, record.img_w // 4, 3), np.uint8)
    gradient[..., 0] = np.linspace(0, 255, gradient.shape[1], dtype=np.uint8)[None, :]
    picture.write_bytes(encode_png(gradient))
    out = tmp_path / "fig"
    sentence = "what color is the dog?"
    assert run_command([world["checkpoint"], "--sentence", sentence, "--tsv", tsv, "--img-id", record.img_id,
                        "--picture", picture, "--object-names", world["root"] / "syn/synthetic.json",
                        "--out", out]) == 0  # fmt: skip
    ids = np.array(LxmertTokenizer().encode(sentence), np.int64)
    boxes = record.boxes[:36].astype(np.float32) / np.array([record.img_w, record.img_h] * 2, np.float32)
    got = model_attentions(world["backbone"], ids, record.features[:36].astype(np.float32), boxes.clip(0, 1))
    drawn = as_matrix(svg_rects(out.with_suffix(".svg"), "box", "cross"), "data-token", "data-region")
    assert np.array_equal(drawn, got.cross_encoder_attentions[-1][0].mean(0).numpy())
    root = ElementTree.parse(out.with_suffix(".svg")).getroot()
    (image,) = list(root.iter(f"{SVG}image"))  # embedded once, used by every word's panel
    assert base64.b64decode(image.get("href").split(",", 1)[1]) == picture.read_bytes()
    assert len(list(root.iter(f"{SVG}use"))) == len(ids)
    texts = "\n".join(t.text for t in root.iter(f"{SVG}text"))
    from engine.data.synthetic import ATTRIBUTE_NAMES, OBJECT_NAMES

    pairs = enumerate(zip(record.attrs_id, record.objects_id))
    names = [f"r{j} {ATTRIBUTE_NAMES[a]} {OBJECT_NAMES[o]}" for j, (a, o) in pairs]
    assert all(name in texts for name in names)  # every region named, in the regions' heat map


# ------------------------------------------------------------------------------------------ bad inputs


def bad(capsys, argv) -> str:
    assert run_command(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lxmert-attention: error: "), err
    return err


def test_bad_inputs_are_one_line_naming_the_file_or_record(world, tmp_path, capsys):
    ckpt, text = world["checkpoint"], world["text"]
    tsv = world["root"] / "syn/mscoco_imgfeat/val2014_obj36.tsv"
    out = ["--out", tmp_path / "never"]
    assert f"{tmp_path / 'none'} does not exist" in bad(capsys, [tmp_path / "none", "--text-store", text, *out])
    message = bad(capsys, [ckpt, "--text-store", world["feats"], *out])
    assert f"{world['feats']}: a 'lxmert-region-store' store, not a text or task store" in message
    assert "not a store" in bad(capsys, [ckpt, "--text-store", tmp_path, *out])
    assert "--index 9999 is out of range" in bad(capsys, [ckpt, "--text-store", text, "--index", 9999, *out])
    message = bad(capsys, [ckpt, "--text-store", text, "--layer", 2, *out])
    assert "--layer 2: the model has 2 language layers (0-1)" in message
    assert "--head 2: the model has 2 heads (0-1)" in bad(capsys, [ckpt, "--text-store", text, "--head", 2, *out])
    message = bad(capsys, [ckpt, "--sentence", "a dog", "--tsv", tsv, "--img-id", "nope", *out])
    assert f"{tsv}: no row with img_id 'nope'" in message
    assert f"{tsv}: no row 99" in bad(capsys, [ckpt, "--sentence", "a dog", "--tsv", tsv, "--row", 99, *out])
    assert "--sentence needs --tsv" in bad(capsys, [ckpt, "--sentence", "a dog", *out])
    assert "give a sample" in bad(capsys, [ckpt, *out])

    truncated = tmp_path / "cut.tsv"
    lines = tsv.read_bytes().splitlines(keepends=True)
    truncated.write_bytes(lines[0] + lines[1][: len(lines[1]) // 2] + b"\n")
    message = bad(capsys, [ckpt, "--sentence", "a dog", "--tsv", truncated, "--row", 2, *out])
    assert f"{truncated}, row 2:" in message
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    state = {k: v for k, v in world["backbone"].state_dict().items()}
    config = lxmert.LxmertConfig.from_dict({**world["backbone"].config.to_dict(), "visual_feat_dim": 8})
    from engine.checkpoint import export_model

    state["visual_embeddings.feat_proj.weight"] = state["visual_embeddings.feat_proj.weight"][:, :8].clone()
    export_model(state, config, narrow)
    assert f"{tsv}, row 1:" in bad(capsys, [narrow, "--sentence", "a dog", "--tsv", tsv, *out])  # 16-d features

    not_a_picture = tmp_path / "picture.png"
    not_a_picture.write_bytes(b"hello")
    assert f"{not_a_picture}: not a PNG, JPEG, GIF or WebP picture" in bad(
        capsys, [ckpt, "--text-store", text, "--picture", not_a_picture, *out])
    names = tmp_path / "names.json"
    names.write_text("{")
    assert f"{names}: not JSON" in bad(capsys, [ckpt, "--text-store", text, "--object-names", names, *out])
    assert not list(tmp_path.glob("never*"))


# ---------------------------------------------------------------------------------------------- figure


def png_with_filters(pixels: np.ndarray, color_type: int, filters: list[int]) -> bytes:
    """A PNG of uint8 pixels [H, W, C] whose row y uses filters[y % len(filters)] (PNG's five filters)."""
    height, width, channels = pixels.shape
    bpp, rows, previous = channels, [], np.zeros(width * channels, np.int64)
    for y in range(height):
        line, kind = pixels[y].reshape(-1).astype(np.int64), filters[y % len(filters)]
        left = np.concatenate([np.zeros(bpp, np.int64), line[:-bpp]])
        upper_left = np.concatenate([np.zeros(bpp, np.int64), previous[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(line)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = previous
        elif kind == 3:
            pred = (left + previous) // 2
        else:
            p = left + previous - upper_left
            pa, pb, pc = abs(p - left), abs(p - previous), abs(p - upper_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, previous, upper_left))
        rows.append(bytes([kind]) + ((line - pred) & 255).astype(np.uint8).tobytes())
        previous = line

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))  # fmt: skip


@pytest.mark.parametrize("color_type, channels", [(2, 3), (6, 4), (0, 1)], ids=["rgb", "rgba", "grey"])
def test_png_decoding_undoes_every_filter(color_type, channels):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (11, 7, channels), dtype=np.uint8)
    decoded = decode_png(png_with_filters(pixels, color_type, [0, 1, 2, 3, 4]))
    expected = np.repeat(pixels, 3, axis=2) if channels == 1 else pixels
    assert np.array_equal(decoded, expected)
    assert np.array_equal(decode_png(encode_png(pixels[..., :3] if channels >= 3 else expected)),
                          pixels[..., :3] if channels >= 3 else expected)  # fmt: skip


def test_png_errors_name_the_file():
    good = encode_png(np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="x.png: not a PNG file"):
        decode_png(b"GIF89a", "x.png")
    with pytest.raises(ValueError, match="x.png: chunk .* is cut short"):
        decode_png(good[:45], "x.png")
    with pytest.raises(ValueError, match="x.png: no IDAT chunk"):
        decode_png(good[:33], "x.png")


def test_the_font_covers_printable_ascii_and_the_raster_follows_the_layout():
    assert all(chr(c) in FONT for c in range(32, 127))
    assert text_bitmap("ab", 2).shape == (18, 24)
    fig = Figure(40, 20)
    fig.rect(5, 5, 10, 10, fill="#ff0000")
    fig.rect(20, 5, 10, 10, fill="#0000ff", opacity=0.5)
    picture = Picture(Path("p.png"), b"", "image/png", 2, 1, np.array([[[0, 255, 0], [255, 255, 255]]], np.uint8))
    fig.picture(picture, 30, 0, 10, 5)
    pixels = fig.raster(scale=2)
    assert pixels.shape == (40, 80, 3)
    assert pixels[20, 20].tolist() == [255, 0, 0] and pixels[20, 50].tolist() == [128, 128, 255]
    assert pixels[2, 62].tolist() == [0, 255, 0] and pixels[2, 78].tolist() == [255, 255, 255]
    assert "<use " in fig.svg() and fig.svg().count("<image ") == 1
