r"""`lxmert-predict`: a fine-tuned model's answers, with their probabilities, to questions about images.

    lxmert-predict --model runs/main/vqa/best --features runs/main/data/mscoco_imgfeat/val2014_obj36.tsv \
        --image COCO_val2014_000000000001 --question "what color are the chairs in the room?" [--top-k 5] [--json]
    lxmert-predict --model runs/nlvr2/best --features data/stores/feats_nlvr2 --image IMG0 --image IMG1 \
        --question "both images contain a bowl."
    lxmert-predict --model runs/main/vqa/best --task-store runs/main/stores/vqa_minival --out submission.json

The model (--model) is a fine-tuned model directory as fine-tuning exports it (best/: model.safetensors,
model_config.json, task.json, answers.json) or its weights file, loaded with from_pretrained. Its head says what
it is: VQA / GQA (a score per answer; its probability is the sigmoid, as the BCE loss trained it) or NLVR2 (two
logits, false and true; the softmax). The answer strings are answers.json beside the weights, --answers for a
model without one (a JSON list in label order: trainval_label2ans.json), or in the whole-store mode the store's.
A pre-training checkpoint or a bare backbone has no fine-tuned head: an error.

Questions (--image, --question; each repeatable): every question is asked about the one image (VQA / GQA), or
every statement about the one pair of images (NLVR2: two --image). The regions come from --features: a feature
TSV in the authors' format (read until the images are found; only their rows are decoded, checked, and
normalised as the store converter does, 36 regions at most, features in float32) or a region store. A question
is tokenised as the task stores are (lxmert.tokenizer: [CLS] pieces [SEP], 20 tokens at most).

A whole task store (--task-store: a converted VQA, GQA or NLVR2 split, its images from --features or else from
the region store it was built from) is predicted as `lxmert-finetune --evaluate-only` predicts it (the same
loader and argmax): --out gets its submission file, byte for byte on the CPU with the same batch size (the
recipes' 32; a GPU predicts in bf16, the recipes evaluate in their precision).

Output: each question with its --top-k answers and their probabilities, best first (ties in label order, as the
submission's argmax takes them); --json prints a JSON list instead, an object per question: "question"
and "img_id" ("img_ids" for NLVR2), or "question_id" for a store, and "answers": [{"answer", "score"}]. Batches
of --batch-size questions; bf16 autocast on a GPU, fp32 on the CPU. A mistake (a missing file, an unknown
img_id, a model without a fine-tuned head, a store of another task) is one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.formats import DataError, RegionRecord, parse_tsv_row, read_label2ans
from engine.data.store import Regions, RegionStore, StoreError
from engine.data.tasks import TaskStore, to_torch, visual_arrays
from engine.launch import error_line
from engine.tasks.finetune import ANSWERS_FILE, FINETUNE_TASKS, TASK_FILE

PROG = "lxmert-predict"
NLVR2_ANSWERS = ["false", "true"]  # the NLVR2 head's columns (1 is True, as the submission writes it)


class PredictError(ValueError):
    """A bad input of the command: the message names the file, image or option."""


# ------------------------------------------------------------------------------------------------- model


def checkpoint_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a checkpoint in our layout; a safetensors file is read without its tensors."""
    from lxmert.convert import read_state_dict, to_ours

    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as f:
                state = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
        else:
            state = read_state_dict(weights)
        return {k: tuple(v.shape) for k, v in to_ours(state).items()}
    except (KeyError, ValueError, OSError) as error:
        raise PredictError(f"{weights}: {error}") from None
    except Exception as error:  # safetensors' own error type for a damaged file
        raise PredictError(f"{weights}: cannot read it ({type(error).__name__}: {error})") from None


def _read_answers(path: Path, what: str) -> list[str]:
    try:
        return read_label2ans(path)
    except (DataError, OSError) as error:
        raise PredictError(f"{what} {error}") from None


@dataclass
class Predictor:
    """A fine-tuned model and what its outputs mean."""

    model: torch.nn.Module
    kind: str  # "qa" (VQA / GQA) or "nlvr2"
    task: str | None  # task.json's, where the model has one
    answers: list[str] | None  # the label -> answer list (NLVR2: false, true); None: not known yet
    device: torch.device
    batch_size: int = 32
    source: str = ""

    @classmethod
    def load(
        cls, path: str | Path, answers: str | Path | None = None, batch_size: int = 32, device: str | None = None
    ) -> Predictor:
        """The model of a fine-tuned model directory or weights file (module docstring)."""
        from engine.convert_checkpoint import ConvertError, weights_file
        from lxmert.finetune import LxmertForNLVR2, LxmertForQuestionAnswering
        from lxmert.pretrained import PRETRAINING_HEADS

        try:
            weights = weights_file(Path(path))
        except ConvertError as error:
            raise PredictError(f"--model {error}") from None
        shapes = checkpoint_shapes(weights)
        if any(k.startswith(PRETRAINING_HEADS) for k in shapes):
            raise PredictError(
                f"{path} is a pre-training checkpoint, without a fine-tuned VQA, GQA or NLVR2 head: "
                "fine-tune it (lxmert-finetune) and predict with its best/ model"
            )
        fc1, fc2 = shapes.get("answer_head.fc1.weight"), shapes.get("answer_head.fc2.weight")
        if fc1 is None or fc2 is None:
            raise PredictError(f"{path} has no QA head (answer_head.*): give a fine-tuned VQA, GQA or NLVR2 model")
        kind = "nlvr2" if fc1[0] == fc1[1] else "qa"  # NLVR2's head reads both images' pooled vectors: 2H -> 2H
        task = None
        task_file = weights.parent / TASK_FILE
        if task_file.is_file():
            try:
                task = json.loads(task_file.read_text(encoding="utf-8"))["task"]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise PredictError(f"{task_file}: not a task file ({error})") from None
            if task not in FINETUNE_TASKS or (task == "nlvr2") != (kind == "nlvr2"):
                raise PredictError(f"{task_file} says task {task!r}, but the weights hold a {kind} head")
        table = None
        if kind == "nlvr2":
            table = list(NLVR2_ANSWERS)
        elif answers is not None:
            table = _read_answers(Path(answers), "--answers")
        elif (weights.parent / ANSWERS_FILE).is_file():
            table = _read_answers(weights.parent / ANSWERS_FILE, "")
        if table is not None and len(table) != fc2[0]:
            raise PredictError(f"the answer list has {len(table)} answers, the model's head {fc2[0]}")
        model_class = LxmertForNLVR2 if kind == "nlvr2" else LxmertForQuestionAnswering
        try:
            model = model_class.from_pretrained(weights)
        except (ValueError, OSError) as error:
            raise PredictError(str(error)) from None
        head = model.answer_head
        if tuple(head.fc1.weight.shape) != fc1 or tuple(head.fc2.weight.shape) != fc2:
            raise PredictError(f"{path}: the QA head's shapes do not fit its model_config.json")
        target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(model.to(target), kind, task, table, target, batch_size, str(path))

    # ---------------------------------------------------------------------------------------- the forward

    def logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's outputs [B, answers] for a batch of the model's keywords: float32, on the CPU."""
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        scores = out.logits if self.kind == "nlvr2" else out.question_answering_score
        return scores.float().cpu()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """VQA / GQA: each answer's sigmoid (the heads are trained with BCE); NLVR2: the softmax of false, true."""
        return logits.softmax(-1) if self.kind == "nlvr2" else logits.sigmoid()

    def top(self, logits: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Each row's k best answers with their probabilities, best first; equal logits in label order."""
        assert self.answers is not None
        probs = self.probabilities(logits)
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
        return [
            [{"answer": self.answers[j], "score": float(probs[i, j])} for j in row]
            for i, row in enumerate(order.tolist())
        ]

    # ---------------------------------------------------------------------------------------- the inputs

    def ask(self, regions: Regions, questions: Sequence[str]) -> torch.Tensor:
        """Logits [Q, answers] of each question about the image of `regions` (NLVR2: the pair, [2, R, ...])."""
        from lxmert.tokenizer import LxmertTokenizer

        tokenizer = LxmertTokenizer()
        visual = visual_arrays(regions, (1, 2) if self.kind == "nlvr2" else (1,))
        out = []
        for start in range(0, len(questions), self.batch_size):
            chunk = questions[start : start + self.batch_size]
            input_ids, attention_mask = tokenizer.batch_encode(chunk)
            arrays = {k: np.repeat(v, len(chunk), axis=0) for k, v in visual.items()}
            out.append(self.logits(to_torch({"input_ids": input_ids, "attention_mask": attention_mask, **arrays})))
        return torch.cat(out)

    def check_store(self, store: TaskStore) -> None:
        """A store of this model's task; the answers, when the model brings none, are the store's."""
        if (store.task == "nlvr2") != (self.kind == "nlvr2") or (self.task is not None and self.task != store.task):
            model = self.task or ("nlvr2" if self.kind == "nlvr2" else "vqa or gqa")
            raise PredictError(f"--task-store {store.path} is a {store.task!r} store, but the model's task is {model}")
        if self.kind == "nlvr2":
            return
        if self.answers is None:
            rows = self.model.answer_head.fc2.out_features
            if store.num_answers != rows:
                raise PredictError(
                    f"--task-store {store.path} has {store.num_answers} answers, the model's head {rows}"
                )
            self.answers = list(store.answers)
        elif self.answers != store.answers:
            raise PredictError(
                f"--task-store {store.path} lists other answers (or another order) than the model's answer list"
            )

    def predict_store(self, store: TaskStore, regions: RegionStore, top_k: int = 0) -> tuple[Any, list[dict]]:
        """The store predicted as fine-tuning's evaluation predicts it: (its Accumulator, whose write_submission
        writes the submission; with top_k, a {"question_id", "answers"} row per question)."""
        from engine.data.loaders import EvalOrder, TaskLoader
        from engine.evaluate import Accumulator

        self.check_store(store)
        unpadding = self.model.config.attn_backend == "flash"  # found on the host by the loader
        order = EvalOrder(len(store), self.batch_size)
        loader = TaskLoader(store, regions, order, self.device, labels=False, unpadding=unpadding)
        acc = Accumulator(store.task, label2ans=None if store.task == "nlvr2" else self.answers)
        ids, rows = store.question_ids, []
        loader.set_epoch(0)
        for batch in loader:
            logits = self.logits(batch.model_inputs())
            keys = [int(ids[i]) if store.task == "vqa" else ids[i] for i in batch.indices]
            acc.add(keys, logits)
            if top_k:
                rows += [{"question_id": key, "answers": a} for key, a in zip(keys, self.top(logits, top_k))]
        return acc, rows


# ------------------------------------------------------------------------------------------------ images


def tsv_records(path: Path, img_ids: Sequence[str], feat_dim: int) -> list[RegionRecord]:
    """The rows of `img_ids` in a feature TSV, in that order: the file is read until all are found, and only
    their rows are decoded and checked."""
    wanted, found, rows = set(img_ids), {}, 0
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                key, tab, _ = line.partition(b"\t")
                rows += bool(tab)
                img_id = key.decode("utf-8", "replace")
                if tab and img_id in wanted and img_id not in found:
                    body = line.rstrip(b"\r\n")
                    found[img_id] = parse_tsv_row(path, number, body, feat_dim, None, None)
                    if len(found) == len(wanted):
                        break
    except DataError as error:
        raise PredictError(str(error)) from None
    except OSError as error:
        raise PredictError(f"--features {path}: {error.strerror or error}") from None
    missing = [i for i in img_ids if i not in found]
    if missing:
        raise PredictError(f"img_id {missing[0]!r} is not in the feature TSV {path} ({rows} rows)")
    return [found[i] for i in img_ids]


def image_regions(features: str | Path, img_ids: Sequence[str], feat_dim: int) -> Regions:
    """The regions of `img_ids` ([N, R, ...]) from a feature TSV or a region store."""
    from engine.data.convert import regions_of

    path = Path(features)
    if path.is_file():
        return regions_of(tsv_records(path, img_ids, feat_dim))
    regions = open_regions(path)
    if regions.feat_dim != feat_dim:
        raise PredictError(f"--features {path} holds {regions.feat_dim}-d features, the model reads {feat_dim}-d")
    try:
        return regions.gather([regions.index_of(i) for i in img_ids])
    except KeyError as error:
        raise PredictError(error.args[0]) from None


def open_regions(path: Path) -> RegionStore:
    if not path.exists():
        raise PredictError(f"--features {path} does not exist (a feature TSV or a region store)")
    try:
        return RegionStore(path)
    except (StoreError, OSError, ValueError) as error:
        raise PredictError(f"--features {path} is not a feature TSV or a region store: {error}") from None


def open_task_store(path: str | Path, features: str | Path | None) -> tuple[TaskStore, RegionStore]:
    try:
        store = TaskStore(path)
    except (StoreError, OSError, ValueError, KeyError) as error:
        raise PredictError(f"--task-store {path} is not a task store: {error}") from None
    regions = open_regions(Path(features) if features is not None else store.built_from())
    try:
        store.check_features(regions)
    except StoreError as error:
        raise PredictError(str(error)) from None
    return store, regions


# --------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    title, examples, *_, output = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=title.replace("`lxmert-predict`: a", "A") + "\n\n" + examples,
        epilog=output.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a fine-tuned model directory (best/) or its weights file")
    parser.add_argument("--features", help="a feature TSV (authors' format) or a region store directory")
    parser.add_argument("--image", action="append", default=[], help="an img_id of --features (NLVR2: two)")
    parser.add_argument("--question", action="append", default=[], help="a question (NLVR2: a statement)")
    parser.add_argument("--task-store", help="predict a whole converted VQA / GQA / NLVR2 split instead")
    parser.add_argument("--out", help="with --task-store: the submission file to write")
    parser.add_argument("--top-k", type=int, default=5, help="answers shown per question (default 5)")
    parser.add_argument("--json", action="store_true", help="print a JSON list, an object per question")
    parser.add_argument("--batch-size", type=int, default=32, help="questions a forward pass (default 32)")
    parser.add_argument("--answers", help="the label -> answer JSON list, for a model without answers.json")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.top_k < 1 or args.batch_size < 1:
        raise PredictError("--top-k and --batch-size must be at least 1")
    if args.task_store is not None:
        if args.image or args.question:
            raise PredictError("--task-store predicts the store's own questions: drop --image and --question")
        if args.out is None and not args.json:
            raise PredictError("--task-store needs --out FILE (the submission) or --json")
        predictor = Predictor.load(args.model, args.answers, args.batch_size)
        store, regions = open_task_store(args.task_store, args.features)
        acc, rows = predictor.predict_store(store, regions, args.top_k if args.json else 0)
        if args.out is not None:
            out = Path(args.out)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                acc.write_submission(out)
            except OSError as error:
                raise PredictError(f"cannot write --out {out}: {error.strerror or error}") from None
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(
                f"wrote {args.out}: {store.task} predictions for the {len(acc.predictions)} questions of {store.path}"
            )
        return 0
    if args.out is not None:
        raise PredictError("--out is for --task-store; questions print their answers (--json for JSON)")
    if args.features is None or not args.image or not args.question:
        raise PredictError("give --features, --image and --question (or --task-store DIR)")
    if any(not q.strip() for q in args.question):
        raise PredictError("--question is empty")
    predictor = Predictor.load(args.model, args.answers, args.batch_size)
    if predictor.answers is None:
        raise PredictError(
            f"{args.model} has no {ANSWERS_FILE} (the label -> answer list): pass --answers (trainval_label2ans.json)"
        )
    images = 2 if predictor.kind == "nlvr2" else 1
    if len(args.image) != images:
        what = "an NLVR2 model reads a pair of images: two --image" if images == 2 else "one --image"
        raise PredictError(f"{len(args.image)} --image given; {what}")
    regions = image_regions(args.features, args.image, predictor.model.config.visual_feat_dim)
    answers = predictor.top(predictor.ask(regions, args.question), args.top_k)
    key = {"img_ids": list(args.image)} if images == 2 else {"img_id": args.image[0]}
    rows = [{"question": q, **key, "answers": a} for q, a in zip(args.question, answers)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(a["answer"]) for row in rows for a in row["answers"])
    for row in rows:
        print(f"{row['question']}  ({', '.join(args.image)})")
        for a in row["answers"]:
            print(f"  {a['answer']:<{width}}  {a['score']:.4f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except PredictError as error:
        return error_line(PROG, error)


if __name__ == "__main__":
    sys.exit(main())
