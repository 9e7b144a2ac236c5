"""BERT uncased WordPiece for LXMERT's text side, offline, through the `tokenizers` library.

The vocabulary is a BERT uncased vocab.txt: an explicit path, else the copy shipped in this package
(lxmert/vocab/bert-base-uncased-vocab.txt, Google's, Apache 2.0: NOTICE beside it; never the HF hub). Anything
that is not exactly that vocabulary (30522 entries, [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103) is
refused: a wrong vocabulary would silently train a model against the wrong embedding rows.

`encode` is the authors' convert_sents_to_features: pieces of sentence.strip() cut to max_length - 2, then
[CLS] pieces [SEP], no padding. `batch_encode` is the fast path (Rust, multithreaded) and must equal it
row for row: the library's truncation reserves room for the two specials before cutting.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 100, 101, 102, 103
VOCAB_SIZE = 30522
MAX_SEQ_LENGTH = 20
SPECIAL_IDS = {"[PAD]": PAD_ID, "[UNK]": UNK_ID, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": MASK_ID}

SHIPPED_VOCAB = Path(__file__).parent / "vocab" / "bert-base-uncased-vocab.txt"  # package data (pyproject.toml)


def find_vocab(vocab_path: str | Path | None = None) -> Path:
    """The vocab.txt to use: `vocab_path` if given, else the copy shipped in this package."""
    path = SHIPPED_VOCAB if vocab_path is None else Path(vocab_path)
    if not path.is_file():
        where = "the shipped copy is missing: reinstall lxmert-engine" if vocab_path is None else "check vocab_path"
        raise FileNotFoundError(f"BERT vocabulary {path} not found; {where} (--vocab)")
    return path


def _load_vocab(path: Path) -> dict[str, int]:
    """token -> line number, as BERT's load_vocab reads it, after checking it is BERT uncased's vocabulary."""
    with open(path, encoding="utf-8") as f:
        tokens = f.read().split("\n")
    if tokens[-1] == "":  # the newline ending the last line
        tokens.pop()
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise ValueError(f"{path}: token {token!r} appears twice (lines {vocab[token] + 1} and {index + 1})")
        vocab[token] = index
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path}: has {len(vocab)} entries, expected {VOCAB_SIZE}")
    for token, expected in SPECIAL_IDS.items():
        if vocab.get(token) != expected:
            found = "missing" if token not in vocab else f"id {vocab[token]}"
            raise ValueError(f"{path}: {token} is {found}, expected {expected}")
    return vocab


class LxmertTokenizer:
    """BERT uncased WordPiece with the authors' [CLS] pieces [SEP] framing and truncation."""

    def __init__(self, vocab_path: str | Path | None = None, max_length: int = MAX_SEQ_LENGTH) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.vocab_path = find_vocab(vocab_path)
        self.max_length = max_length
        vocab = _load_vocab(self.vocab_path)
        self.vocab_size = len(vocab)

        tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )  # strip_accents=None: follows lowercase, as in the original BERT
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.post_processor = processors.BertProcessing(("[SEP]", SEP_ID), ("[CLS]", CLS_ID))
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        tokenizer.add_special_tokens(list(SPECIAL_IDS))  # kept whole in text, skipped by decode
        self._tokenizer = tokenizer
        # A second copy carries the truncation so that tokenize() still sees every piece.
        self._truncating = Tokenizer.from_str(tokenizer.to_str())
        self._truncating.enable_truncation(max_length)

    def tokenize(self, sentence: str) -> list[str]:
        """All wordpieces of `sentence`, no specials, no truncation."""
        return self._tokenizer.encode(sentence, add_special_tokens=False).tokens

    def encode(self, sentence: str) -> list[int]:
        """[CLS] + wordpieces of sentence.strip() cut to max_length - 2 + [SEP]; no padding."""
        pieces = self._tokenizer.encode(sentence.strip(), add_special_tokens=False).ids
        return [CLS_ID, *pieces[: self.max_length - 2], SEP_ID]

    def batch_encode(self, sentences: Sequence[str], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """input_ids and attention_mask, int64 [N, L]; L = the longest row, or `pad_to`; padding is PAD_ID, mask 0."""
        encodings = self._truncating.encode_batch([s.strip() for s in sentences])
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        longest = int(lengths.max(initial=0))
        width = longest if pad_to is None else pad_to
        if width < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest encoded sentence ({longest} ids)")
        input_ids = np.full((len(encodings), width), PAD_ID, dtype=np.int64)
        for row, encoding in zip(input_ids, encodings):
            row[: len(encoding.ids)] = encoding.ids
        attention_mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
        return input_ids, attention_mask

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, specials (padding included) skipped, wordpieces joined."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Vocabulary ids; a token outside the vocabulary maps to UNK_ID."""
        ids = (self._tokenizer.token_to_id(t) for t in tokens)
        return [UNK_ID if i is None else i for i in ids]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary tokens; an id outside [0, vocab_size) is an error."""
        tokens = []
        for i in ids:
            token = self._tokenizer.id_to_token(int(i))
            if token is None:
                raise ValueError(f"id {i} is outside the vocabulary [0, {self.vocab_size})")
            tokens.append(token)
        return tokens
