"""`lxmert-attention` (engine/attention_pictures.py).

The pictures are checked for what they show, not only for existing: the arrays matplotlib was given (the heat
maps' images, each word's box collection, found by their gids) must be the model's own probabilities
(output_attentions of the exported model, run here on the same sample), on the colour scales the docstring
gives, and the PNG's pixel at a heat-map cell's centre must be the scale's colour at that probability. The SVG
must carry the gids. Bad inputs: one line naming the file or record, exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from conftest import build_pretrain_stores, randomize_

import lxmert
from engine import attention_pictures as pictures

FEAT_DIM = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic text store and feature store, and a randomly weighted pre-training model exported from them."""
    root = tmp_path_factory.mktemp("pictures")
    text, feats = build_pretrain_stores(root, feat_dim=FEAT_DIM)
    torch.manual_seed(50)
    config = lxmert.LxmertConfig(
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=23,
        l_layers=2,
        r_layers=1,
        x_layers=2,
        visual_feat_dim=FEAT_DIM,
        num_qa_labels=5,
        attn_backend="sdpa",
    )
    model = randomize_(lxmert.LxmertForPreTraining(config)).eval()
    from engine.checkpoint import export_model

    export_model(model.state_dict(), config, root / "model")
    return dict(root=root, text=text, feats=feats, checkpoint=root / "model", backbone=model.lxmert)


def run_command(argv: list[str]) -> int:
    return pictures.main([str(a) for a in argv])


@pytest.fixture
def drawn(monkeypatch) -> list:
    """The matplotlib Figures the command draws, as it draws them (pictures.draw spied on)."""
    figures = []

    def spy(*args, **kwargs):
        figures.append(draw(*args, **kwargs))
        return figures[-1]

    draw = pictures.draw
    monkeypatch.setattr(pictures, "draw", spy)
    return figures


def images(figure) -> dict[str, list]:
    """{gid: [AxesImage, ...]} of every image drawn."""
    out: dict[str, list] = {}
    for ax in figure.axes:
        for image in ax.get_images():
            out.setdefault(image.get_gid(), []).append(image)
    return out


def cross_weights(figure) -> np.ndarray:
    """[tokens, regions]: the array of each word's box collection (gid "cross:i"), in token order."""
    found = {c.get_gid(): c for ax in figure.axes for c in ax.collections if str(c.get_gid()).startswith("cross:")}
    return np.stack([np.asarray(found[f"cross:{i}"].get_array()) for i in range(len(found))])


def texts(figure) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in figure.findobj(Text)]


def svg_ids(path: Path) -> set[str]:
    return {e.get("id") for e in ElementTree.parse(path).getroot().iter() if e.get("id")}


def model_attentions(backbone, ids: np.ndarray, feats: np.ndarray, boxes: np.ndarray):
    with torch.no_grad():
        return backbone(
            input_ids=torch.tensor(ids)[None],
            visual_feats=torch.tensor(feats)[None],
            visual_pos=torch.tensor(boxes)[None],
            output_attentions=True,
        )


def store_sample(world, index: int):
    from engine.data.store import RegionStore, TextStore

    text, regions = TextStore(world["text"]), RegionStore(world["feats"])
    entry = text.get(index)
    r = regions.get(entry.image_index)
    n = int(r.num_boxes)
    return entry.token_ids.astype(np.int64), np.array(r.features[:n], np.float32), np.array(r.boxes[:n], np.float32)


@pytest.mark.parametrize("layer, cross_layer, head", [(None, None, None), (0, 0, 1)], ids=["defaults", "layer0_head1"])
def test_the_drawn_weights_are_the_models_probabilities(world, tmp_path, drawn, layer, cross_layer, head):
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
    (figure,) = drawn
    maps = images(figure)
    (language_image,), (regions_image,) = maps["language"], maps["regions"]
    assert np.array_equal(language_image.get_array(), language)  # exactly the model's float32 probabilities
    assert np.array_equal(regions_image.get_array(), regions)
    assert np.array_equal(cross_weights(figure), cross)
    assert language.shape[0] == cross.shape[0] and cross.shape[1] == regions.shape[0]
    for image, probs in ((language_image, language), (regions_image, regions)):  # one scale a map: 0 to its largest
        assert image.norm.vmin == 0 and image.norm.vmax == pytest.approx(float(probs.max()))
    collections = {c.get_gid(): c for ax in figure.axes for c in ax.collections}
    for i, row in enumerate(cross):  # a word's boxes: clear at its smallest weight, BOX_ALPHA at its largest
        shades = collections[f"cross:{i}"]
        assert (shades.norm.vmin, shades.norm.vmax) == pytest.approx((row.min(), row.max()))
        alphas = shades.get_facecolors()[:, 3]
        assert alphas == pytest.approx(pictures.BOX_ALPHA * (row - row.min()) / (row.max() - row.min()), abs=1e-2)

    # the files: the SVG carries the gids, and the PNG's pixel at each language cell's centre is its colour
    assert {"language", "regions", *(f"cross:{i}" for i in range(len(cross)))} <= svg_ids(out.with_suffix(".svg"))
    from matplotlib.image import imread

    pixels = imread(out.with_suffix(".png"))  # float RGBA in [0, 1], row 0 at the top
    assert pixels.shape[:2] == tuple(round(v * pictures.PNG_DPI) for v in figure.get_size_inches()[::-1])
    ax = language_image.axes
    for i in range(language.shape[0]):
        for j in range(language.shape[1]):
            x, y = ax.transData.transform((j, i))  # the cell's centre, in the figure's pixels from the bottom left
            expected = language_image.cmap(language_image.norm(language[i, j]))[:3]
            assert pixels[pixels.shape[0] - 1 - int(y), int(x), :3] == pytest.approx(expected, abs=2.5 / 255)


def test_the_legend_names_layers_head_and_word_pieces(world, tmp_path, drawn):
    from lxmert.tokenizer import LxmertTokenizer

    out = tmp_path / "fig"
    assert (
        run_command(
            [
                world["checkpoint"],
                "--text-store",
                world["text"],
                "--index",
                2,
                "--out",
                out,
                "--head",
                0,
                "--format",
                "svg",
            ]
        )
        == 0
    )
    assert not out.with_suffix(".png").exists() and out.with_suffix(".svg").is_file()
    (figure,) = drawn
    ids, _, _ = store_sample(world, 2)
    pieces = LxmertTokenizer().convert_ids_to_tokens(ids)
    language_axes = images(figure)["language"][0].axes
    assert [t.get_text() for t in language_axes.get_yticklabels()] == pieces  # a row per query word piece
    assert [t.get_text() for t in language_axes.get_xticklabels()] == pieces
    joined = "\n".join(texts(figure))
    assert "layer 1 of 0-1, head 0 of 0-1" in joined  # the language map: the last layer by default
    assert "cross-modality layer 1 of 0-1, head 0 of 0-1" in joined
    assert "object-relationship layer 0 of 0-0, head 0 of 0-1" in joined


def test_a_sentence_and_a_tsv_row_on_a_picture(world, tmp_path, drawn):
    from engine.data.formats import read_tsv
    from lxmert.tokenizer import LxmertTokenizer

    tsv = world["root"] / "syn/mscoco_imgfeat/val2014_obj36.tsv"
    record = list(read_tsv(tsv, feat_dim=FEAT_DIM, num_object_labels=None, num_attr_labels=None))[2]
    picture = tmp_path / "image.png"
    gradient = np.zeros((record.img_h // 4, record.img_w // 4, 3), np.uint8)
    gradient[..., 0] = np.linspace(0, 255, gradient.shape[1], dtype=np.uint8)[None, :]
    from matplotlib.image import imsave

    imsave(picture, gradient)
    out = tmp_path / "fig"
    sentence = "what color is the dog?"
    assert (
        run_command(
            [
                world["checkpoint"],
                "--sentence",
                sentence,
                "--tsv",
                tsv,
                "--img-id",
                record.img_id,
                "--picture",
                picture,
                "--object-names",
                world["root"] / "syn/synthetic.json",
                "--out",
                out,
            ]
        )
        == 0
    )
    ids = np.array(LxmertTokenizer().encode(sentence), np.int64)
    boxes = record.boxes[:36].astype(np.float32) / np.array([record.img_w, record.img_h] * 2, np.float32)
    got = model_attentions(world["backbone"], ids, record.features[:36].astype(np.float32), boxes.clip(0, 1))
    (figure,) = drawn
    assert np.array_equal(cross_weights(figure), got.cross_encoder_attentions[-1][0].mean(0).numpy())
    under = images(figure)["picture"]  # the picture under every word's boxes
    assert len(under) == len(ids) and all(np.array_equal(image.get_array(), gradient) for image in under)
    from engine.data.synthetic import ATTRIBUTE_NAMES, OBJECT_NAMES

    pairs = enumerate(zip(record.attrs_id, record.objects_id))
    names = [f"r{j} {ATTRIBUTE_NAMES[a]} {OBJECT_NAMES[o]}" for j, (a, o) in pairs]
    regions_axes = images(figure)["regions"][0].axes
    assert [t.get_text() for t in regions_axes.get_yticklabels()] == names  # every region named, in order


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
    assert f"{not_a_picture}: not a picture Pillow can read" in bad(
        capsys, [ckpt, "--text-store", text, "--picture", not_a_picture, *out]
    )
    names = tmp_path / "names.json"
    names.write_text("{")
    assert f"{names}: not JSON" in bad(capsys, [ckpt, "--text-store", text, "--object-names", names, *out])
    assert not list(tmp_path.glob("never*"))
