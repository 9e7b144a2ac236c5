"""LxmertTokenizer against the known BERT ids, transformers' BertTokenizerFast and the authors' truncation."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lxmert.tokenizer import (
    CLS_ID,
    MASK_ID,
    MAX_SEQ_LENGTH,
    PAD_ID,
    SEP_ID,
    SHIPPED_VOCAB,
    VOCAB_SIZE,
    LxmertTokenizer,
    find_vocab,
)

VOCAB = find_vocab()  # the copy shipped in the package

BERT_UNCASED_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"  # google-research/bert's
LONG_SENTENCE = "What is the man on the left side of the picture, near the red car, holding in his right hand?"
SENTENCES = [
    "Who is holding the umbrella?",
    "What color is the cat's collar?",
    "Is the man wearing a hat?",
    "HOW MANY PEOPLE ARE IN THE PICTURE?",
    "A dog, a cat; and (maybe) a bird!",
    "Café crème brûlée à la mode",
    "Ångström naïve résumé Zürich",
    "There are 3 apples and 12.5 oranges on the 2nd table.",
    "The year 1999 vs. 2024: what's different?",
    "e-mail me at someone@example.com",
    "unbelievably overcomplicated antidisestablishmentarianism",
    "他在北京吃饭 and then went home",
    "日本語のテキスト",
    "",
    "   ",
    "\t\n  padded on both sides  \n",
    "a",
    "?",
    "...!!!???",
    "Don't stop—keep going…",
    "emoji 😀 in text",
    "[MASK] is on the table",
    "x" * 101,  # longer than max_input_chars_per_word: one [UNK]
    "supercalifragilisticexpialidocious " * 3,
    "The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly "
    "and a sphinx of black quartz judges my vow.",
    " ".join(["word"] * 40),
    "tokenization of unaffordable pneumonoultramicroscopicsilicovolcanoconiosis sentences " * 2,
    LONG_SENTENCE,
    "Mixed CASE WiTh Accents ÉÈÊ and ümlaut",
    "tabs\tand\nnewlines\r\nmixed",
]


@pytest.fixture(scope="module")
def tokenizer() -> LxmertTokenizer:
    return LxmertTokenizer()


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    # vocab=, not vocab_file=: in transformers 5 vocab_file= is ignored and a 5-token vocabulary is built.
    ref = transformers.BertTokenizerFast(vocab=str(VOCAB), do_lower_case=True)
    assert len(ref) == VOCAB_SIZE
    return ref


def test_known_ids(tokenizer: LxmertTokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.vocab_path == VOCAB
    assert tokenizer.encode("Who is holding the umbrella?") == [101, 2040, 2003, 3173, 1996, 12977, 1029, 102]
    assert tokenizer.convert_tokens_to_ids(["the", "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [
        1996,
        0,
        100,
        101,
        102,
        103,
    ]
    assert tokenizer.tokenize("Who is holding the umbrella?") == ["who", "is", "holding", "the", "umbrella", "?"]


def test_parity_with_bert_tokenizer_fast(tokenizer: LxmertTokenizer, reference) -> None:
    for sentence in SENTENCES:
        pieces = reference.encode(sentence.strip(), add_special_tokens=False)
        expected = reference.encode(sentence, truncation=True, max_length=MAX_SEQ_LENGTH)
        # BertTokenizerFast's truncation is the authors' one: pieces cut to max_length - 2, then specials.
        assert expected == [CLS_ID, *pieces[: MAX_SEQ_LENGTH - 2], SEP_ID], sentence
        assert tokenizer.encode(sentence) == expected, sentence
        assert tokenizer.tokenize(sentence) == reference.tokenize(sentence), sentence


def test_truncation(tokenizer: LxmertTokenizer) -> None:
    assert len(tokenizer.tokenize(LONG_SENTENCE)) > MAX_SEQ_LENGTH
    ids = tokenizer.encode(LONG_SENTENCE)
    assert len(ids) == MAX_SEQ_LENGTH and ids[0] == CLS_ID and ids[-1] == SEP_ID
    assert all(len(tokenizer.encode(s)) <= MAX_SEQ_LENGTH for s in SENTENCES)
    assert tokenizer.encode("") == tokenizer.encode("   ") == [CLS_ID, SEP_ID]
    short = LxmertTokenizer(max_length=5)
    assert short.encode("Who is holding the umbrella?") == [101, 2040, 2003, 3173, 102]


def test_batch_encode(tokenizer: LxmertTokenizer) -> None:
    input_ids, attention_mask = tokenizer.batch_encode(SENTENCES)
    rows = [tokenizer.encode(s) for s in SENTENCES]
    width = max(len(r) for r in rows)
    assert width == MAX_SEQ_LENGTH
    assert input_ids.dtype == attention_mask.dtype == np.int64
    assert input_ids.shape == attention_mask.shape == (len(SENTENCES), width)
    for row, ids, mask in zip(rows, input_ids, attention_mask):
        assert ids[: len(row)].tolist() == row
        assert (ids[len(row) :] == PAD_ID).all()
        assert mask.tolist() == [1] * len(row) + [0] * (width - len(row))

    short_ids, short_mask = tokenizer.batch_encode(["Who is holding the umbrella?", "a"])
    assert short_ids.tolist() == [[101, 2040, 2003, 3173, 1996, 12977, 1029, 102], [101, 1037, 102, 0, 0, 0, 0, 0]]
    assert short_mask.sum(axis=1).tolist() == [8, 3]

    padded_ids, padded_mask = tokenizer.batch_encode(["a"], pad_to=32)
    assert padded_ids.shape == padded_mask.shape == (1, 32)
    assert padded_ids[0, :3].tolist() == [101, 1037, 102] and padded_mask.sum() == 3
    with pytest.raises(ValueError, match="pad_to"):
        tokenizer.batch_encode(["Who is holding the umbrella?"], pad_to=4)
    assert tokenizer.batch_encode([])[0].shape == (0, 0)


def test_decode_and_conversions(tokenizer: LxmertTokenizer) -> None:
    input_ids, _ = tokenizer.batch_encode(["Who is holding the umbrella?"], pad_to=12)
    assert tokenizer.decode(input_ids[0]) == "who is holding the umbrella?"
    assert tokenizer.convert_ids_to_tokens([101, 1996, 102]) == ["[CLS]", "the", "[SEP]"]
    assert tokenizer.convert_tokens_to_ids(["not-a-wordpiece"]) == [100]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.convert_ids_to_tokens([VOCAB_SIZE])


def _move_cls_to_5(lines: list[str]) -> list[str]:
    lines = list(lines)
    lines[5], lines[CLS_ID] = lines[CLS_ID], lines[5]
    return lines


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda lines: lines[:5], "has 5 entries, expected 30522"),
        (_move_cls_to_5, r"\[CLS\] is id 5, expected 101"),
        (lambda lines: [*lines[:101], "[PAD]", *lines[102:]], "appears twice"),
    ],
    ids=["five-entries", "cls-moved", "duplicate"],
)
def test_bad_vocabularies_are_refused(tmp_path, corrupt, message: str) -> None:
    lines = VOCAB.read_text(encoding="utf-8").split("\n")[:-1]
    path = tmp_path / "bad_vocab.txt"
    path.write_text("\n".join(corrupt(lines)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        LxmertTokenizer(path)
    assert "bad_vocab.txt" in str(error.value)


def test_the_shipped_vocabulary_is_bert_uncased_with_its_licence_note() -> None:
    assert VOCAB == SHIPPED_VOCAB and VOCAB.is_file()
    assert hashlib.sha256(VOCAB.read_bytes()).hexdigest() == BERT_UNCASED_SHA256
    tokens = VOCAB.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(tokens) == VOCAB_SIZE and tokens[1996] == "the" and tokens[MASK_ID] == "[MASK]"
    notice = (VOCAB.parent / "NOTICE").read_text()
    assert "google-research/bert" in notice and "Apache License, Version 2.0" in notice


def test_missing_vocabulary(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="vocab_path"):
        LxmertTokenizer(tmp_path / "nowhere.txt")
