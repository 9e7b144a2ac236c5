"""A small, learnable data set written in exactly the authors' public formats (engine/data/formats.py).

    python -m engine.data.synthetic OUT_DIR --images 400 --feat-dim 64 --seed 0

Each image is a scene of 2-3 object classes ("things"), each with a count (1-3) and one colour; the other
regions (36 in all) are background classes with a texture. A region's feature is its class prototype, plus
half its attribute's prototype, plus Gaussian noise: object/attribute prediction and feature regression can
be learnt from the features alone. Every sentence is about the image's things: captions name them with counts
and colours ("a photo of a red dog and two blue cars."), questions are answered from them ("what color is
the dog?" -> red, "how many cars are there?" -> 2, "is there a cat in the picture?" -> no), so masked words,
image-sentence matching and QA are learnable too. Every word is one BERT uncased wordpiece.

Layout (the authors' data/ directory; all tasks draw their images from the two feature TSVs):
    lxmert/mscoco_train.json, lxmert/mscoco_minival.json   pre-training: sources mscoco, vg, vqa, gqa
    lxmert/all_ans.json                                       the QA answer table [{"ans", "dsets"}]
    mscoco_imgfeat/train2014_obj36.tsv, val2014_obj36.tsv     region features (train / minival images)
    vqa/train.json, vqa/minival.json, vqa/trainval_ans2label.json, vqa/trainval_label2ans.json
    gqa/train.json, gqa/testdev.json, gqa/trainval_ans2label.json, gqa/trainval_label2ans.json
    nlvr2/train.json, nlvr2/valid.json                        statements about consecutive image pairs
    synthetic.json                                            the world: class and attribute names, sizes

places=True (--places) sets every image at a place (PLACES) that its features and background show and that
every sentence names.

Deterministic: the world comes from the seed, each image from (seed, split, index), so the output is
byte-identical for a seed and any image can be regenerated alone. Writing streams image by image (bounded
memory): from a few hundred images in a second to millions of sentences for benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.data.formats import AnswerTable, JsonArrayWriter, RegionRecord, TsvWriter, answer_table_json, write_json

OBJECTS = (
    "dog",
    "cat",
    "car",
    "bus",
    "horse",
    "bird",
    "boat",
    "chair",
    "table",
    "cup",
    "ball",
    "bike",
    "plate",
    "phone",
    "book",
    "clock",
    "bag",
    "hat",
    "shirt",
    "train",
    "truck",
    "cow",
    "bench",
    "bottle",
    "bowl",
    "lamp",
    "cake",
    "apple",
    "banana",
    "bear",
    "elephant",
)
BACKGROUND = (
    "tree",
    "door",
    "window",
    "wall",
    "sky",
    "ground",
    "floor",
    "grass",
    "road",
    "water",
    "building",
    "fence",
    "cloud",
    "pole",
    "sand",
    "snow",
    "street",
    "field",
)
COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange", "pink", "purple", "gray")
TEXTURES = ("wooden", "metal", "plastic", "striped", "dark", "bright", "wet", "shiny")
_PLURALS = {"bus": "buses", "bench": "benches"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
NUMBERS = tuple(str(n) for n in range(10))  # counting answers (up to 3 things x 3), distractors included
# With places=True (off by default: the original world, byte for byte) every image is at one of three places,
# which shows in all of it: each region's feature gets the place's prototype (PLACE_WEIGHT), the background
# regions are of the place's three classes (each class one texture per image), and every sentence names it:
# captions ("... at the beach."), region descriptions ("a red dog at the beach") and questions ("what color is
# the dog at the beach?"). A masked region then has a context that predicts it (object, attribute and feature
# losses fall further), and image-sentence matching a few-valued cue in every pair that a small model learns
# within a CPU-minutes run (engine/main.py has the measurements). PLACES_VERSION names this world in
# synthetic.json (version 1 named the place only in captions and in one region description, "the beach").
PLACES_VERSION = 2
PLACES = (
    ("beach", "at", ("sand", "water", "sky")),
    ("city", "in", ("street", "building", "pole")),
    ("room", "in", ("floor", "wall", "window")),
)  # (name, preposition, background classes)

OBJECT_NAMES = OBJECTS + BACKGROUND  # object id = index here
ATTRIBUTE_NAMES = COLORS + TEXTURES  # attribute id = index here
ANSWERS = ("yes", "no", *NUMBERS, *COLORS, *OBJECTS)  # the answer table, already normalised
ATTR_WEIGHT = 0.5  # the attribute prototype's share of a region feature
PLACE_WEIGHT = 1.0  # the place prototype's share (places=True)
MAX_THINGS, MAX_COUNT = 3, 3
_WORLD_KEY = 7919  # seeds the prototypes, apart from every (split, image) key
SPLITS = ("train", "minival")


def plural(noun: str) -> str:
    return _PLURALS.get(noun, noun + "s")


@dataclass(frozen=True)
class Thing:
    """count regions of object class `obj` (an index into OBJECTS), all of colour `color` (into COLORS)."""

    obj: int
    count: int
    color: int

    @property
    def noun(self) -> str:
        return OBJECTS[self.obj]

    def phrase(self) -> str:
        """'a red dog', 'two blue cars'."""
        noun = self.noun if self.count == 1 else plural(self.noun)
        return f"{COUNT_WORDS[self.count]} {COLORS[self.color]} {noun}"


@dataclass(frozen=True)
class Scene:
    img_id: str
    things: tuple[Thing, ...]
    record: RegionRecord
    place: int | None = None  # an index into PLACES (World(places=True)), else None

    def where(self) -> str:
        """'at the beach' (places=True), else ''."""
        if self.place is None:
            return ""
        name, preposition, _ = PLACES[self.place]
        return f"{preposition} the {name}"


@dataclass(frozen=True)
class Question:
    sent: str
    label: dict[str, float]
    answer_type: str
    question_type: str


class World:
    """The class and attribute prototypes every region feature is drawn around."""

    def __init__(self, seed: int, feat_dim: int, noise: float = 0.5, places: bool = False) -> None:
        rng = np.random.default_rng([seed, _WORLD_KEY])
        self.seed, self.feat_dim, self.noise, self.places = seed, feat_dim, noise, places
        self.obj_protos = rng.standard_normal((len(OBJECT_NAMES), feat_dim)).astype(np.float32)
        self.attr_protos = rng.standard_normal((len(ATTRIBUTE_NAMES), feat_dim)).astype(np.float32)
        if places:  # drawn last: the other prototypes are those of the original world
            self.place_protos = rng.standard_normal((len(PLACES), feat_dim)).astype(np.float32)

    def features(
        self, obj_ids: np.ndarray, attr_ids: np.ndarray, rng: np.random.Generator, place: int | None = None
    ) -> np.ndarray:
        noise = rng.standard_normal((len(obj_ids), self.feat_dim), dtype=np.float32) * np.float32(self.noise)
        out = self.obj_protos[obj_ids] + np.float32(ATTR_WEIGHT) * self.attr_protos[attr_ids] + noise
        if place is not None:
            out += np.float32(PLACE_WEIGHT) * self.place_protos[place]
        return out

    def scene(self, img_id: str, rng: np.random.Generator, regions: int = 36) -> Scene:
        """An image: its things and its detections (confidence-ordered, as a detector writes them)."""
        if regions < MAX_THINGS * MAX_COUNT:
            raise ValueError(f"regions must be >= {MAX_THINGS * MAX_COUNT} (the most thing regions a scene has)")
        img_h, img_w = (int(x) for x in rng.integers(240, 641, size=2))
        kinds = rng.choice(len(OBJECTS), size=int(rng.integers(2, MAX_THINGS + 1)), replace=False)
        things = tuple(
            Thing(int(k), int(rng.integers(1, MAX_COUNT + 1)), int(rng.integers(len(COLORS)))) for k in kinds
        )
        thing_obj = [t.obj for t in things for _ in range(t.count)]
        thing_attr = [t.color for t in things for _ in range(t.count)]
        n_back = regions - len(thing_obj)
        place = None
        if self.places:  # the place's background classes, one texture each
            place = int(rng.integers(len(PLACES)))
            classes = np.array([BACKGROUND.index(name) for name in PLACES[place][2]])
            textures = rng.integers(len(TEXTURES), size=len(classes))
            which = rng.integers(len(classes), size=n_back)
            back_obj, back_attr = list(classes[which]), list(textures[which])
        else:  # every background region of any class and texture (the draws of the original world)
            back_obj = list(rng.integers(len(BACKGROUND), size=n_back))
            back_attr = list(rng.integers(len(TEXTURES), size=n_back))
        obj_ids = np.array(thing_obj + [len(OBJECTS) + int(o) for o in back_obj], np.int64)
        attr_ids = np.array(thing_attr + [len(COLORS) + int(a) for a in back_attr], np.int64)
        obj_conf = np.concatenate([rng.uniform(0.6, 1.0, len(thing_obj)), rng.uniform(0.1, 0.6, n_back)])
        order = np.argsort(-obj_conf, kind="stable")
        obj_ids, attr_ids, obj_conf = obj_ids[order], attr_ids[order], obj_conf[order].astype(np.float32)
        attr_conf = rng.uniform(0.2, 1.0, regions).astype(np.float32)

        size = np.array([img_w, img_h, img_w, img_h], np.float64)
        corner = rng.uniform(0.0, 0.7, (regions, 2))
        extent = rng.uniform(0.1, 1.0, (regions, 2)) * (1.0 - corner)
        boxes = (np.concatenate([corner, corner + extent], axis=1) * size).astype(np.float32)
        np.minimum(boxes, size.astype(np.float32), out=boxes)  # float32 rounding must not leave the image

        record = RegionRecord(
            img_id=img_id,
            img_h=img_h,
            img_w=img_w,
            objects_id=obj_ids,
            objects_conf=obj_conf,
            attrs_id=attr_ids,
            attrs_conf=attr_conf,
            num_boxes=regions,
            boxes=boxes,
            features=self.features(obj_ids, attr_ids, rng, place),
        )
        return Scene(img_id, things, record, place)


# ---------------------------------------------------------------------------------------------- text


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


_CAPTIONS = ("a photo of {}.", "an image with {}.", "this picture shows {}.", "{} in the picture.", "we can see {}.")


def captions(scene: Scene, rng: np.random.Generator, n: int) -> list[str]:
    """COCO-style captions naming all the things, or all but one, in a random order (and the place, if any)."""
    out = []
    for _ in range(n):
        things = list(scene.things)
        rng.shuffle(things)  # type: ignore[arg-type]
        if len(things) > 1 and rng.random() < 0.3:
            things = things[:-1]
        out.append(_CAPTIONS[int(rng.integers(len(_CAPTIONS)))].format(_at(_join([t.phrase() for t in things]), scene)))
    return out


def region_phrases(scene: Scene) -> list[str]:
    """Visual Genome-style region descriptions, one a thing (with the place, if any: "a red dog at the beach")."""
    return [_at(t.phrase(), scene) for t in scene.things]


def _at(text: str, scene: Scene) -> str:
    """text with the scene's place appended (places=True), before a final '?': every sentence names it."""
    if scene.place is None:
        return text
    mark = "?" if text.endswith("?") else ""
    return f"{text.removesuffix(mark)} {scene.where()}{mark}"


def _soft(answer: str, distractor: str | None, rng: np.random.Generator) -> dict[str, float]:
    """A VQA-like soft label: the answer at 1.0, sometimes a wrong one at 0.3 (annotator disagreement)."""
    if distractor is not None and distractor != answer and rng.random() < 0.25:
        return {answer: 1.0, distractor: 0.3}
    return {answer: 1.0}


def questions(scene: Scene, rng: np.random.Generator, n: int, style: str = "vqa") -> list[Question]:
    """Questions answered by the scene: colour, count, existence, 'what is <colour>?' (GQA style: verify)."""
    out = []
    present = {t.obj for t in scene.things}
    for _ in range(n):
        thing = scene.things[int(rng.integers(len(scene.things)))]
        kind = int(rng.integers(4))
        other_color = COLORS[int(rng.integers(len(COLORS)))]
        verb = "is" if thing.count == 1 else "are"
        subject = f"{verb} the {thing.noun if thing.count == 1 else plural(thing.noun)}"  # "are the cars"
        if kind == 0:
            label = _soft(COLORS[thing.color], other_color, rng)
            q = Question(f"what color {subject}?", label, "other", f"what color {verb} the")
        elif kind == 1:
            wrong = str(thing.count + (1 if rng.random() < 0.5 else -1))
            label = _soft(str(thing.count), wrong, rng)
            q = Question(f"how many {plural(thing.noun)} are there?", label, "number", "how many")
        elif kind == 2:
            absent = [o for o in range(len(OBJECTS)) if o not in present]
            obj = thing.obj if rng.random() < 0.5 else int(rng.choice(absent))
            label = {"yes" if obj in present else "no": 1.0}
            q = Question(f"is there a {OBJECTS[obj]} in the picture?", label, "yes/no", "is there a")
        elif style == "gqa":
            color = thing.color if rng.random() < 0.5 else int(rng.integers(len(COLORS)))
            label = {"yes" if color == thing.color else "no": 1.0}
            q = Question(f"{subject} {COLORS[color]}?", label, "yes/no", f"{verb} the")
        else:
            same_color = [t for t in scene.things if t.color == thing.color]
            if len(same_color) == 1:
                label = _soft(thing.noun, OBJECTS[int(rng.integers(len(OBJECTS)))], rng)
                q = Question(f"what is {COLORS[thing.color]}?", label, "other", "what is")
            else:  # "what is red?" would be ambiguous
                label = {str(sum(t.count for t in same_color)): 1.0}
                q = Question(f"how many {COLORS[thing.color]} things are there?", label, "number", "how many")
        out.append(dataclasses.replace(q, sent=_at(q.sent, scene)))
    return out


def _count(scene: Scene, obj: int) -> int:
    return sum(t.count for t in scene.things if t.obj == obj)


def nlvr2_statements(left: Scene, right: Scene, rng: np.random.Generator, n: int = 2) -> list[tuple[str, int]]:
    """(statement, 0/1) about a pair of scenes, true about half the time."""
    out = []
    for _ in range(n):
        kind = int(rng.integers(3))
        thing = (left.things + right.things)[int(rng.integers(len(left.things) + len(right.things)))]
        if kind == 0:
            total = _count(left, thing.obj) + _count(right, thing.obj)
            claim = total if rng.random() < 0.5 else total + int(rng.choice([-1, 1]))
            out.append((f"there are {claim} {plural(thing.noun)} in total.", int(claim == total)))
        elif kind == 1:
            obj = thing.obj if rng.random() < 0.7 else int(rng.integers(len(OBJECTS)))
            both = _count(left, obj) > 0 and _count(right, obj) > 0
            out.append((f"both images contain a {OBJECTS[obj]}.", int(both)))
        else:
            t = left.things[int(rng.integers(len(left.things)))]
            color = t.color if rng.random() < 0.5 else int(rng.integers(len(COLORS)))
            shown = Thing(t.obj, t.count, color)
            out.append((f"the left image has {shown.phrase()}.", int(color == t.color)))
    return out


# ---------------------------------------------------------------------------------------------- files


def img_id_of(split: str, index: int) -> str:
    return f"COCO_{'train' if split == 'train' else 'val'}2014_{index:012d}"


def split_sizes(images: int, minival_fraction: float) -> dict[str, int]:
    minival = min(max(1, round(images * minival_fraction)), images - 1) if images > 1 else 0
    return {"train": images - minival, "minival": minival}


def iter_scenes(world: World, split: str, count: int, regions: int = 36) -> Iterator[tuple[Scene, np.random.Generator]]:
    """The scenes of a split in order, each with its own generator (positioned after the scene's draws)."""
    for i in range(count):
        rng = np.random.default_rng([world.seed, SPLITS.index(split), i])
        yield world.scene(img_id_of(split, i), rng, regions), rng


def generate(
    out_dir: str | Path,
    images: int,
    *,
    feat_dim: int = 2048,
    seed: int = 0,
    regions: int = 36,
    minival_fraction: float = 0.1,
    captions_per_image: int = 5,
    questions_per_image: int = 4,
    noise: float = 0.5,
    places: bool = False,
) -> dict[str, Any]:
    """Write the data set into `out_dir` (layout in this file's header); returns what synthetic.json holds.

    places=True: every image at one of PLACES (see there); False keeps the original world, byte for byte."""
    if images < 2:
        raise ValueError("need at least 2 images (one for minival)")
    out = Path(out_dir)
    for sub in ("lxmert", "mscoco_imgfeat", "vqa", "gqa", "nlvr2"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    world = World(seed, feat_dim, noise, places)
    sizes = split_sizes(images, minival_fraction)
    names = {
        "train": ("mscoco_train", "train2014_obj36", "train", "train", "train"),
        "minival": ("mscoco_minival", "val2014_obj36", "minival", "testdev", "valid"),
    }
    counts: dict[str, dict[str, int]] = {}
    for split_index, (split, n_images) in enumerate(sizes.items()):
        pretrain, tsv, vqa, gqa, nlvr2 = names[split]
        qid_base = split_index * 10**12  # question ids unique across splits, as in the real data
        c = counts[split] = {"images": n_images, "sentences": 0, "vqa": 0, "gqa": 0, "nlvr2": 0}
        with ExitStack() as files:
            tsv_out = files.enter_context(TsvWriter(out / "mscoco_imgfeat" / f"{tsv}.tsv"))
            pre_out = files.enter_context(JsonArrayWriter(out / "lxmert" / f"{pretrain}.json"))
            vqa_out = files.enter_context(JsonArrayWriter(out / "vqa" / f"{vqa}.json"))
            gqa_out = files.enter_context(JsonArrayWriter(out / "gqa" / f"{gqa}.json"))
            nlvr2_out = files.enter_context(JsonArrayWriter(out / "nlvr2" / f"{nlvr2}.json"))
            previous: Scene | None = None
            for i, (scene, rng) in enumerate(iter_scenes(world, split, n_images, regions)):
                tsv_out.write(scene.record)
                caps, vg = captions(scene, rng, captions_per_image), region_phrases(scene)
                vqa_qs = questions(scene, rng, questions_per_image, "vqa")
                gqa_qs = questions(scene, rng, max(1, questions_per_image // 2), "gqa")
                pre_out.write(
                    {
                        "img_id": scene.img_id,
                        "sentf": {
                            "mscoco": caps,
                            "vg": vg,
                            "vqa": [q.sent for q in vqa_qs],
                            "gqa": [q.sent for q in gqa_qs],
                        },
                        "labelf": {"vqa": [q.label for q in vqa_qs], "gqa": [q.label for q in gqa_qs]},
                    }
                )
                c["sentences"] += len(caps) + len(vg) + len(vqa_qs) + len(gqa_qs)
                for k, q in enumerate(vqa_qs):
                    vqa_out.write(
                        {
                            "answer_type": q.answer_type,
                            "img_id": scene.img_id,
                            "label": q.label,
                            "question_id": qid_base + i * 1000 + k,
                            "question_type": q.question_type,
                            "sent": q.sent,
                        }
                    )
                for k, q in enumerate(gqa_qs):
                    gqa_out.write(
                        {
                            "img_id": scene.img_id,
                            "label": q.label,
                            "question_id": str(qid_base + i * 100 + k),
                            "sent": q.sent,
                        }
                    )
                c["vqa"], c["gqa"] = c["vqa"] + len(vqa_qs), c["gqa"] + len(gqa_qs)
                if i % 2 == 1 and previous is not None:
                    for k, (sent, label) in enumerate(nlvr2_statements(previous, scene, rng)):
                        set_id = f"{nlvr2}-{i // 2}-0-{k}"
                        nlvr2_out.write(
                            {
                                "identifier": set_id,
                                "img0": previous.img_id,
                                "img1": scene.img_id,
                                "label": label,
                                "sent": sent,
                                "uid": f"nlvr2_{nlvr2}_{c['nlvr2']}",
                            }
                        )
                        c["nlvr2"] += 1
                previous = scene

    table = AnswerTable(list(ANSWERS), [("vqa", "gqa")] * len(ANSWERS))
    write_json(out / "lxmert" / "all_ans.json", answer_table_json(table))
    for task in ("vqa", "gqa"):
        write_json(out / task / "trainval_ans2label.json", {a: i for i, a in enumerate(ANSWERS)})
        write_json(out / task / "trainval_label2ans.json", list(ANSWERS))
    summary = {
        "seed": seed,
        "feat_dim": feat_dim,
        "regions": regions,
        "noise": noise,
        "attr_weight": ATTR_WEIGHT,
        "object_names": list(OBJECT_NAMES),
        "attribute_names": list(ATTRIBUTE_NAMES),
        "answers": list(ANSWERS),
        "splits": counts,
    }
    if places:  # only then: the original world's synthetic.json stays as it was
        summary["places"], summary["places_version"] = [name for name, _, _ in PLACES], PLACES_VERSION
    write_json(out / "synthetic.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lxmert-synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--images", type=int, default=400, help="images in all (default %(default)s)")
    parser.add_argument("--feat-dim", type=int, default=2048, help="region feature size (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regions", type=int, default=36, help="regions an image (default %(default)s)")
    parser.add_argument("--minival-fraction", type=float, default=0.1)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--questions-per-image", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.5, help="std of the feature noise (default %(default)s)")
    parser.add_argument("--places", action="store_true", help="every image at a place every sentence names (PLACES)")
    args = parser.parse_args(argv)
    summary = generate(
        args.out_dir,
        args.images,
        feat_dim=args.feat_dim,
        seed=args.seed,
        regions=args.regions,
        minival_fraction=args.minival_fraction,
        captions_per_image=args.captions_per_image,
        questions_per_image=args.questions_per_image,
        noise=args.noise,
        places=args.places,
    )
    print(json.dumps({"out_dir": args.out_dir, **summary["splits"]}))


if __name__ == "__main__":
    main()
