"""Answer strings: the authors' normalisation, and a fine-tuning head started from the pre-trained QA head.

The pre-training QA head scores a joint table of 9500 answers; a VQA (3129) or GQA (1842) head starts
from it by answer string: each task answer, once normalised, takes the row of the same answer in the
table, and an answer the table lacks gets a zero row (the authors' load_lxmert_qa).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

_REPLACE = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


def normalize_answer(answer: str) -> str:
    """Lower-case, strip a trailing '.', drop a leading a/an/the, number words to digits, grey -> gray."""
    if not answer:
        return ""
    answer = answer.lower()
    if answer[-1] == ".":
        answer = answer[:-1].strip()
    for article in ("a ", "an ", "the "):
        if answer.startswith(article):
            answer = answer[len(article) :].strip()
    return _REPLACE.get(answer, answer)


def answer_rows(task_answers: Sequence[str], table_answers: Sequence[str]) -> list[int | None]:
    """For each task answer, once normalised, its row in the pre-training table (stored normalised), or None."""
    index = {a: i for i, a in enumerate(table_answers)}
    return [index.get(normalize_answer(a)) for a in task_answers]


def init_answer_head(
    head: torch.nn.Module,
    pretrained_head: Mapping[str, torch.Tensor],
    table_answers: Sequence[str],
    task_answers: Sequence[str],
) -> tuple[int, int]:
    """Copy a pre-trained QA head into a fine-tuning AnswerHead of len(task_answers) labels.

    pretrained_head holds the AnswerHead parameters (fc1.*, norm.*, fc2.*) of the pre-training model. The
    hidden layers are copied whole; output rows by answer string. Returns (answers found, answers not found).
    """
    if head.fc2.out_features != len(task_answers):
        raise ValueError(f"the head has {head.fc2.out_features} outputs for {len(task_answers)} task answers")
    if pretrained_head["fc2.weight"].shape[0] != len(table_answers):
        raise ValueError(
            f"the pre-trained QA head has {pretrained_head['fc2.weight'].shape[0]} outputs "
            f"but the answer table lists {len(table_answers)} answers"
        )
    rows = answer_rows(task_answers, table_answers)
    with torch.no_grad():
        for name in ("fc1.weight", "fc1.bias", "norm.weight", "norm.bias"):
            head.get_parameter(name).copy_(pretrained_head[name])
        found = torch.tensor([r is not None for r in rows])
        source = torch.tensor([r if r is not None else 0 for r in rows])
        for name in ("fc2.weight", "fc2.bias"):
            value = pretrained_head[name].to(head.get_parameter(name)).index_select(0, source)
            mask = found.view(-1, *([1] * (value.dim() - 1))).to(value.device)
            head.get_parameter(name).copy_(torch.where(mask, value, torch.zeros_like(value)))
    n_found = int(found.sum())
    return n_found, len(rows) - n_found
