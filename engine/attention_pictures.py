"""`lxmert-attention`: the LXMERT paper's attention pictures of one sample, drawn from a checkpoint's probabilities.

    lxmert-attention runs/main/pretrain --text-store runs/main/stores/text_minival --index 7 \
        --object-names runs/main/data/synthetic.json --out docs/attention
    lxmert-attention CKPT --sentence "what is the man holding?" --tsv val2014_obj36.tsv \
        --img-id COCO_val2014_000000000042 --picture 42.png --layer 8 --cross-layer 4 --head 3

CKPT is a model directory (ours: model.safetensors + model_config.json, as every run exports; or transformers') or
a weights file with its config beside it (lxmert-convert's rules: engine/convert_checkpoint.py). Only the
backbone is used, so pre-training, VQA/GQA and NLVR2 checkpoints all work. The sample is
- a sentence of a store: --text-store (a pre-training text store, or a VQA / GQA task store) and --index, with its
  image from the feature store it indexes (--features, by default the one it was built from), or
- a sentence (--sentence, tokenised with the BERT vocabulary, --vocab) and one row of a feature TSV in the
  authors' format (--tsv, and --img-id or --row; the first row by default), boxes normalised as the store
  converter does, the first 36 regions kept.
The model runs once in eval mode with output_attentions=True (eager's probabilities, lxmert/attention.py), on the
sentence unpadded and on the image's real regions only. One matplotlib figure, PREFIX.svg and PREFIX.png (--out,
--format):
1. language self-attention of --layer (default the last language layer) as a heat map: a row per query word
   piece, a column per key, colour = probability on one scale per map (its colour bar gives 0 and the largest);
2. regions' self-attention of --region-layer (default the last object-relationship layer), the same way, a
   region labelled by its index and, with --object-names, its detected attribute and class;
3. cross-modality attention of --cross-layer (default the last cross layer): a panel per word piece showing the
   image (--picture, any format Pillow reads: drawn on it; else its canvas, the image's aspect ratio) with every
   region's box shaded by that word's probability on it, from clear (the word's smallest) to dark (its largest),
   the --top strongest outlined and labelled, and the strongest named under the panel with its probability.
--head picks one head for all three (default: the mean over the heads). Layers and heads count from 0, as the
output tuples do (language_attentions[layer][0, head]). What is drawn is what matplotlib is given, so the figure
can be checked against the model: the heat maps are AxesImages with gid "language" and "regions" whose arrays are
the [queries, keys] probabilities (float32; colour scale 0 to the map's largest), and word i's boxes one
PatchCollection with gid "cross:i" whose array is its weights over the regions, in region order (the colour scale
its smallest to its largest). The SVG carries these gids as element ids.

Bad inputs (a missing or unreadable checkpoint, store, row, picture or name file; an index, layer or head out of
range; features of another width than the model's) print one line naming the file or record, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.plots import save_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NUM_REGIONS = 36  # regions an image keeps, as the store converter does
HEAT_CMAP = "Blues"  # the heat maps: white (0) to dark blue (the map's largest)
BOX_COLOR = "#d62728"
BOX_ALPHA = 0.6  # a box's opacity at its word's largest weight (0 at the smallest)
CROSS_COLUMNS = 5  # word panels a row
MAX_PICTURE = 480  # pixels a side of the picture drawn under the boxes
PNG_DPI = 100


class AttentionPictureError(ValueError):
    """A bad input of the command: the message names the file, record or option."""


# --------------------------------------------------------------------------------------------- model


def load_backbone(checkpoint: str | Path) -> tuple[torch.nn.Module, Path]:
    """The LxmertModel of a checkpoint (the backbone of any of our models), eager attention, eval mode; and the
    weights file it was read from."""
    from engine.convert_checkpoint import ConvertError, find_config, model_config, weights_file
    from lxmert.convert import detect_layout, load_into, read_state_dict, to_ours
    from lxmert.modeling import LxmertModel

    try:
        weights = weights_file(Path(checkpoint))
        raw = read_state_dict(weights)
        layout = detect_layout(raw)
        ours = to_ours(raw, layout)
        config = model_config(ours, layout, find_config(weights, None), None)
    except ConvertError as error:
        raise AttentionPictureError(str(error)) from None
    except (KeyError, ValueError, OSError) as error:
        raise AttentionPictureError(f"{checkpoint}: {error}") from None
    if any(key.startswith("lxmert.") for key in ours):
        ours = {k[len("lxmert.") :]: v for k, v in ours.items() if k.startswith("lxmert.")}
    # eager: output_attentions takes its path anyway, and a flash checkpoint must not need flash-attn here
    model = LxmertModel(dataclasses.replace(config, attn_backend="eager"))
    try:
        load_into(model, ours, layout="ours")
    except (KeyError, ValueError) as error:
        raise AttentionPictureError(f"{weights}: {error}") from None
    return model.eval(), weights


# -------------------------------------------------------------------------------------------- sample


@dataclass
class Sample:
    """One sentence and one image's real regions, as the model takes them (batch of one, nothing padded)."""

    tokens: list[str]  # word pieces, [CLS] .. [SEP]
    input_ids: np.ndarray  # [L] int64
    features: np.ndarray  # [R, D] float32
    boxes: np.ndarray  # [R, 4] float32 (x1, y1, x2, y2) / (w, h, w, h)
    obj_ids: np.ndarray  # [R] detected class ids (-1: none)
    attr_ids: np.ndarray  # [R]
    img_hw: tuple[int, int]
    img_id: str
    where: str  # "text_minival[7], image ID" / "file.tsv, row 3 (ID)": names the sample on the figure


def _tokenizer(vocab: str | None):
    from lxmert.tokenizer import LxmertTokenizer

    try:
        return LxmertTokenizer(vocab)
    except (FileNotFoundError, ValueError) as error:
        raise AttentionPictureError(str(error)) from None


def sample_from_store(
    text_store: str | Path, index: int, features: str | Path | None, vocab: str | None, vocab_size: int
) -> Sample:
    """Sentence `index` of a text store or a VQA / GQA task store, and its image from the feature store."""
    from engine.data.store import META, RegionStore, StoreError, TextStore
    from engine.data.tasks import TaskStore

    path = Path(text_store)
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or error
        raise AttentionPictureError(f"{path} is not a store: {META} {reason}") from None
    kinds = {"lxmert-text-store": TextStore, "lxmert-task-store": TaskStore}
    if meta.get("format") not in kinds:
        raise AttentionPictureError(f"{path}: a {meta.get('format')!r} store, not a text or task store")
    try:
        store = kinds[meta["format"]](path)
        if getattr(store, "task", None) == "nlvr2":
            raise AttentionPictureError(
                f"{path}: an NLVR2 store pairs two images with a sentence; use a text, VQA or GQA store"
            )
        feature_path = Path(features) if features is not None else store.built_from()
        regions = RegionStore(feature_path)
        store.check_features(regions)
    except StoreError as error:
        raise AttentionPictureError(str(error)) from None
    if not 0 <= index < len(store):
        raise AttentionPictureError(
            f"{path}: --index {index} is out of range ({len(store)} sentences, 0-{len(store) - 1})"
        )
    a = store.arrays
    ids = a["token_ids"][index, : int(a["lengths"][index])].astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise AttentionPictureError(
            f"{path}: sentence {index} holds token ids {ids.tolist()} outside the model's vocabulary [0, {vocab_size})"
        )
    image = int(a["image_index"][index])
    r = regions.get(image)
    n = int(r.num_boxes)
    return Sample(
        tokens=_tokenizer(vocab).convert_ids_to_tokens(ids),
        input_ids=ids,
        features=np.array(r.features[:n], np.float32),
        boxes=np.array(r.boxes[:n], np.float32),
        obj_ids=np.array(r.obj_ids[:n], np.int64),
        attr_ids=np.array(r.attr_ids[:n], np.int64),
        img_hw=(int(r.img_hw[0]), int(r.img_hw[1])),
        img_id=regions.img_ids[image],
        where=f"{path.name}[{index}], image {regions.img_ids[image]}",
    )


def sample_from_tsv(
    sentence: str, tsv: str | Path, img_id: str | None, row: int | None, vocab: str | None, feat_dim: int
) -> Sample:
    """`sentence` tokenised as the authors do, and one row of a feature TSV (by img_id, by line number, else the
    first); only that row is decoded (a COCO TSV is gigabytes), and checked as the store converter checks it."""
    from engine.data.formats import DataError, parse_tsv_row

    if not sentence.strip():
        raise AttentionPictureError("--sentence is empty")
    path = Path(tsv)
    if not path.is_file():
        raise AttentionPictureError(f"{path}: no such feature TSV")
    key = None if img_id is None else img_id.encode("utf-8") + b"\t"
    record = None
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                body = line.rstrip(b"\r\n")
                if body and (body.startswith(key) if key is not None else row in (None, number)):
                    record = parse_tsv_row(path, number, body, feat_dim, num_object_labels=None, num_attr_labels=None)
                    break
                if key is None and row is not None and number >= row:
                    break
    except DataError as error:
        raise AttentionPictureError(str(error)) from None
    if record is None:
        wanted = f"no row with img_id {img_id!r}" if img_id is not None else f"no row {row} (blank or past the end)"
        raise AttentionPictureError(f"{path}: {wanted}")
    tokenizer = _tokenizer(vocab)
    ids = np.array(tokenizer.encode(sentence), np.int64)
    n = min(record.num_boxes, NUM_REGIONS)
    boxes = record.boxes[:n].astype(np.float32)  # the store converter's normalisation
    boxes[:, (0, 2)] /= record.img_w
    boxes[:, (1, 3)] /= record.img_h
    np.clip(boxes, 0.0, 1.0, out=boxes)
    return Sample(
        tokens=tokenizer.convert_ids_to_tokens(ids),
        input_ids=ids,
        features=record.features[:n].astype(np.float32),
        boxes=boxes,
        obj_ids=record.objects_id[:n].astype(np.int64),
        attr_ids=record.attrs_id[:n].astype(np.int64),
        img_hw=(record.img_h, record.img_w),
        img_id=record.img_id,
        where=f"{path.name}, row {record.row} ({record.img_id})",
    )


def read_names(path: str | Path) -> tuple[list[str], list[str]]:
    """(object names, attribute names) from a JSON file (a list of object names, or an object with
    "object_names" and maybe "attribute_names", as the synthetic set's synthetic.json) or a text file of one
    object class a line (bottom-up attention's objects_vocab.txt: the first of comma-separated synonyms)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise AttentionPictureError(f"{path}: cannot read the names ({reason})") from None
    if path.suffix == ".json":
        try:
            value = json.loads(text)
        except ValueError as error:
            raise AttentionPictureError(f"{path}: not JSON ({error})") from None
        if isinstance(value, dict):
            objects, attributes = value.get("object_names"), value.get("attribute_names", [])
        else:
            objects, attributes = value, []
        if not isinstance(objects, list) or not all(isinstance(n, str) for n in objects + list(attributes or [])):
            raise AttentionPictureError(f'{path}: expected a list of names or an object with "object_names"')
        return objects, list(attributes or [])
    return [line.split(",")[0].strip() for line in text.splitlines() if line.strip()], []


def region_labels(sample: Sample, objects: list[str], attributes: list[str]) -> list[str]:
    """'r3 red dog' per region (index, then the detected attribute and class where names are known)."""
    labels = []
    for j, (obj, attr) in enumerate(zip(sample.obj_ids.tolist(), sample.attr_ids.tolist())):
        words = []
        if attributes and 0 <= attr < len(attributes):
            words.append(attributes[attr])
        if objects:
            words.append(objects[obj] if 0 <= obj < len(objects) else f"#{obj}")
        labels.append(" ".join([f"r{j}", *words]))
    return labels


# ---------------------------------------------------------------------------------------- attentions


@dataclass
class Maps:
    """The three maps drawn, [queries, keys] probabilities, and what they are."""

    language: np.ndarray  # [L, L]
    cross: np.ndarray  # [L, R] language over regions
    regions: np.ndarray | None  # [R, R]; None for a model without object-relationship layers
    language_layer: str
    cross_layer: str
    region_layer: str
    head: str


def _pick(name: str, option: str, value: int | None, count: int) -> int:
    if count == 0:
        return -1
    index = count - 1 if value is None else value
    if not -count <= index < count:
        raise AttentionPictureError(f"{option} {value}: the model has {count} {name} layers (0-{count - 1})")
    return index % count


def attention_maps(
    model: torch.nn.Module,
    sample: Sample,
    layer: int | None = None,
    cross_layer: int | None = None,
    region_layer: int | None = None,
    head: int | None = None,
) -> Maps:
    """The model's probabilities for the sample: one layer of each stream, one head or (head=None) their mean."""
    config = model.config
    if sample.features.shape[1] != config.visual_feat_dim:
        raise AttentionPictureError(
            f"{sample.where}: {sample.features.shape[1]}-d region features, the model takes {config.visual_feat_dim}-d"
        )
    heads = config.num_attention_heads
    if head is not None and not 0 <= head < heads:
        raise AttentionPictureError(f"--head {head}: the model has {heads} heads (0-{heads - 1})")
    lang_i = _pick("language", "--layer", layer, config.l_layers)
    cross_i = _pick("cross-modality", "--cross-layer", cross_layer, config.x_layers)
    region_i = _pick("object-relationship", "--region-layer", region_layer, config.r_layers)
    if lang_i < 0 or cross_i < 0:
        raise AttentionPictureError("the model has no language or no cross-modality layers: nothing to draw")
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(sample.input_ids)[None],
            visual_feats=torch.from_numpy(sample.features)[None],
            visual_pos=torch.from_numpy(sample.boxes)[None],
            output_attentions=True,
        )

    def one(probs: torch.Tensor) -> np.ndarray:  # [1, heads, Q, K] -> [Q, K]
        chosen = probs[0].mean(0) if head is None else probs[0, head]
        return chosen.float().numpy()

    def named(index: int, count: int) -> str:
        return f"layer {index} of 0-{count - 1}"

    return Maps(
        language=one(out.language_attentions[lang_i]),
        cross=one(out.cross_encoder_attentions[cross_i]),
        regions=one(out.vision_attentions[region_i]) if region_i >= 0 else None,
        language_layer=named(lang_i, config.l_layers),
        cross_layer=named(cross_i, config.x_layers),
        region_layer=named(region_i, config.r_layers) if region_i >= 0 else "no layers",
        head=f"mean of {heads} heads" if head is None else f"head {head} of 0-{heads - 1}",
    )


# ------------------------------------------------------------------------------------------- drawing


def read_picture(path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
    """The image file as uint8 RGB [H, W, 3], shrunk to at most MAX_PICTURE pixels a side (a panel is a few
    hundred pixels wide: a full-size photo would only swell the SVG, where it is embedded once per word), and its
    original (width, height). Any format Pillow reads (matplotlib's own dependency)."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as image:
            size = image.size
            image = image.convert("RGB")
            image.thumbnail((MAX_PICTURE, MAX_PICTURE))
            return np.asarray(image), size
    except FileNotFoundError:
        raise AttentionPictureError(f"{path}: no such picture") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise AttentionPictureError(f"{path}: not a picture Pillow can read ({error})") from None


def _heat_map(ax, probs: np.ndarray, rows: list[str], cols: list[str], name: str, title: str) -> None:
    """A heat map of [queries, keys] probabilities, 0 to the map's largest; the image's gid is `name`."""
    fontsize = 8 if len(cols) <= 24 else 6
    vmax = float(probs.max()) if probs.size and probs.max() > 0 else 1.0
    image = ax.imshow(probs, cmap=HEAT_CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
    image.set_gid(name)
    ax.set_title(title, loc="left", fontsize=10)
    ax.xaxis.tick_top()
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(rows)), rows, fontsize=fontsize)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.figure.colorbar(image, ax=ax, shrink=0.8, label="probability")


def _cross_panel(
    ax,
    token_index: int,
    token: str,
    weights: np.ndarray,
    boxes: np.ndarray,
    labels: list[str],
    picture: np.ndarray | None,
    aspect: float,
    top: int,
) -> None:
    """One word's attention over the regions: each box filled from clear (the word's smallest weight) to dark (its
    largest), over the others (36 boxes overlap: shading from 0 would tint the whole image); the `top` outlined.
    The boxes are one PatchCollection, gid "cross:I", whose array is the word's weights in region order."""
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import LinearSegmentedColormap, Normalize, to_rgba
    from matplotlib.patches import Rectangle

    ax.set_title(token, fontsize=10, fontweight="bold")
    if picture is not None:
        ax.imshow(picture, extent=(0.0, 1.0, 1.0, 0.0), interpolation="bilinear", gid="picture")
    else:
        ax.set_facecolor("#f2f2f2")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(1.0, 0.0)
    ax.set_aspect(aspect)
    ax.set_xticks([])
    ax.set_yticks([])
    lo, hi = (float(weights.min()), float(weights.max())) if weights.size else (0.0, 1.0)
    strongest = np.argsort(weights, kind="stable")[::-1][:top]
    outlined = set(strongest.tolist())
    patches = [Rectangle((x1, y1), x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes.tolist()]
    # one colour, so the order boxes are composited in does not change the picture
    shading = LinearSegmentedColormap.from_list("box", [to_rgba(BOX_COLOR, 0.0), to_rgba(BOX_COLOR, BOX_ALPHA)])
    shades = PatchCollection(
        patches,
        cmap=shading,
        norm=Normalize(lo, hi if hi > lo else lo + 1.0),
        edgecolors=[BOX_COLOR if j in outlined else "none" for j in range(len(patches))],
        linewidths=1.2,
        gid=f"cross:{token_index}",
    )
    shades.set_array(weights)
    ax.add_collection(shades)
    for j in strongest.tolist():
        ax.text(
            boxes[j][0],
            boxes[j][1],
            f"r{j}",
            color=BOX_COLOR,
            fontsize=7,
            va="top",
            ha="left",
            bbox={"facecolor": "white", "alpha": 0.8, "pad": 1.0, "linewidth": 0},
        )
    best = int(strongest[0]) if len(strongest) else 0
    ax.set_xlabel(f"max {labels[best]} {float(weights[best]):.3f}" if weights.size else "no regions", fontsize=8)


def draw(
    sample: Sample, maps: Maps, labels: list[str], picture: np.ndarray | None = None, top: int = 3, checkpoint: str = ""
) -> Figure:
    """The whole figure: the two self-attention heat maps side by side, then a panel per word piece."""
    from matplotlib.figure import Figure

    tokens = sample.tokens
    img_h, img_w = sample.img_hw
    aspect = picture.shape[0] / picture.shape[1] if picture is not None else img_h / img_w
    aspect = min(max(aspect, 0.4), 1.6)
    columns = min(CROSS_COLUMNS, max(1, len(tokens)))
    grid_rows = math.ceil(len(tokens) / columns)
    width = 3.0 * CROSS_COLUMNS
    maps_h, cross_h = 7.0, 0.5 + grid_rows * (width / CROSS_COLUMNS * aspect + 0.7)
    fig = Figure(figsize=(width, maps_h + cross_h), dpi=PNG_DPI, layout="constrained")
    fig.suptitle(
        f"LXMERT attention: {' '.join(tokens)}\ncheckpoint {checkpoint}   sample {sample.where}   {maps.head}",
        fontsize=12,
    )
    top_fig, cross_fig = fig.subfigures(2, 1, height_ratios=(maps_h, cross_h))
    language_ax, regions_ax = top_fig.subplots(1, 2, width_ratios=(1.0, 1.3))
    _heat_map(
        language_ax,
        maps.language,
        tokens,
        tokens,
        "language",
        f"language self-attention\n{maps.language_layer}, {maps.head}",
    )
    if maps.regions is not None:
        _heat_map(
            regions_ax,
            maps.regions,
            labels,
            labels,
            "regions",
            f"regions' self-attention\nobject-relationship {maps.region_layer}, {maps.head}",
        )
    else:
        regions_ax.set_axis_off()
        regions_ax.set_title("regions' self-attention: the model has no object-relationship layers", fontsize=10)
    cross_fig.suptitle(
        f"cross-modality attention, each word over the regions: cross-modality {maps.cross_layer}, "
        f"{maps.head}\na box is shaded by the word's weight on it, from clear (the word's smallest) to "
        f"dark (its largest), the {top} strongest outlined",
        fontsize=10,
    )
    axes = cross_fig.subplots(grid_rows, columns, squeeze=False).ravel()
    for i, token in enumerate(tokens):
        _cross_panel(axes[i], i, token, maps.cross[i], sample.boxes, labels, picture, aspect, top)
    for ax in axes[len(tokens) :]:
        ax.set_axis_off()
    return fig


# ------------------------------------------------------------------------------------------- command


def _head(value: str) -> int | None:
    if value == "mean":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a head index or 'mean', got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lxmert-attention",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="a model directory (model.safetensors + model_config.json) or weights file")
    store = parser.add_argument_group("a sample from a store")
    store.add_argument("--text-store", help="a text store, or a VQA / GQA task store")
    store.add_argument("--index", type=int, default=0, help="the sentence's row in the store (default 0)")
    store.add_argument("--features", help="the feature store it indexes (default: the one it was built from)")
    tsv = parser.add_argument_group("or a sentence and a feature TSV row")
    tsv.add_argument("--sentence", help="the sentence (tokenised with the BERT vocabulary)")
    tsv.add_argument("--tsv", help="a feature TSV in the authors' format")
    which = tsv.add_mutually_exclusive_group()
    which.add_argument("--img-id", help="the row of this img_id")
    which.add_argument("--row", type=int, help="the row on this line (1-based; default the first row)")
    parser.add_argument("--picture", help="the image file (PNG, JPEG or any format Pillow reads)")
    parser.add_argument("--object-names", help="names of the detector's classes (synthetic.json, or objects_vocab.txt)")
    parser.add_argument("--vocab", help="BERT uncased vocab.txt (default: the copy shipped in lxmert/vocab)")
    parser.add_argument("--layer", type=int, help="language layer, from 0 (default: the last)")
    parser.add_argument("--cross-layer", type=int, help="cross-modality layer, from 0 (default: the last)")
    parser.add_argument("--region-layer", type=int, help="object-relationship layer, from 0 (default: the last)")
    parser.add_argument("--head", type=_head, default=None, help="a head, from 0, or 'mean' (default)")
    parser.add_argument("--top", type=int, default=3, help="regions outlined a word (default 3)")
    parser.add_argument("--out", default="attention", help="output prefix: PREFIX.svg, PREFIX.png (default attention)")
    parser.add_argument("--format", nargs="+", choices=("svg", "png"), default=["svg", "png"])
    parser.add_argument("--dpi", type=float, default=PNG_DPI, help=f"the PNG's pixels an inch (default {PNG_DPI})")
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    """Everything but the argument parsing; returns the files written."""
    if (args.text_store is None) == (args.sentence is None):
        raise AttentionPictureError("give a sample: --text-store DIR [--index I], or --sentence TEXT --tsv FILE")
    if args.sentence is not None and args.tsv is None:
        raise AttentionPictureError("--sentence needs --tsv FILE (the image's region features)")
    if args.top < 1 or args.dpi <= 0:
        raise AttentionPictureError("--top must be at least 1 and --dpi positive")
    model, _ = load_backbone(args.checkpoint)
    config = model.config
    if args.text_store is not None:
        sample = sample_from_store(args.text_store, args.index, args.features, args.vocab, config.vocab_size)
    else:
        sample = sample_from_tsv(args.sentence, args.tsv, args.img_id, args.row, args.vocab, config.visual_feat_dim)
    objects, attributes = read_names(args.object_names) if args.object_names else ([], [])
    picture = None
    if args.picture:
        picture, (width, height) = read_picture(args.picture)
        drawn, stored = width / height, sample.img_hw[1] / sample.img_hw[0]
        if abs(drawn / stored - 1) > 0.02:
            print(
                f"lxmert-attention: warning: {args.picture} is {width}x{height}, the features' image "
                f"{sample.img_hw[1]}x{sample.img_hw[0]}: the boxes are drawn stretched to the picture",
                file=sys.stderr,
            )
    maps = attention_maps(model, sample, args.layer, args.cross_layer, args.region_layer, args.head)
    figure = draw(sample, maps, region_labels(sample, objects, attributes), picture, args.top, args.checkpoint)
    written = []
    for fmt in ("svg", "png"):
        if fmt in args.format:
            written.append(save_figure(figure, Path(f"{args.out}.{fmt}"), dpi=args.dpi))
            figure.set_layout_engine("none")  # laid out once: a second format keeps it
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except AttentionPictureError as error:
        print(f"lxmert-attention: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
