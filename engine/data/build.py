"""Building a sentence store (a pre-training text store, a fine-tuning task store): the one skeleton both share.

    stats = TextConversion(paths, features, out, ...).run()        # engine/data/convert.py
    stats = TaskConversion(task, paths, features, out, ...).run()  # engine/data/tasks.py

One streaming pass over the input files in order, in chunks: a subclass reads a file's records from a position
(`records`), turns each into rows (`take`, appending to `pending`: the sentence first, then its columns) and
writes a chunk's columns (`append_rows`); the skeleton tokenises each chunk's sentences in one batch, commits the
chunk with the input position and the subclass's state (so that a rerun resumes after it: StoreBuilder in
engine/data/store.py), and finishes the store with the subclass's meta and JSON files. A rerun that finds the
store sealed by a killed run only installs it (its meta.json stands in for the state: the same "stats", and the
text store's "sources"). Inputs that leave no sentence to store are an error (DataError), and the partial build
is deleted.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from engine.atomic import kill_point
from engine.data.formats import DataError
from engine.data.store import ArraySpec, RegionStore, StoreBuilder, sha256_strings

if TYPE_CHECKING:  # imported where used: the lxmert package imports torch, which a --tsv conversion never needs
    from lxmert.tokenizer import LxmertTokenizer

INT16_MAX = 32767


def input_identity(path: Path) -> dict[str, Any]:
    """What makes a resumed build trust an input: its resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def existing_inputs(paths: Sequence[str | Path], kind: str = "JSON file") -> list[Path]:
    """The input paths, each checked to be a file (`kind` names what it should be, for the error)."""
    out = [Path(p) for p in paths]
    for p in out:
        if p.is_dir():
            raise IsADirectoryError(f"input {p} is a directory, not a {kind}")
        if not p.is_file():
            raise FileNotFoundError(f"input {p} not found")
    if not out:
        raise ValueError("no input files given")
    return out


def nothing_to_store(paths: Sequence[Path], problem: str, errors: Sequence[str] = ()) -> DataError:
    """The error of a conversion whose inputs left no row to store (with the first skipped row's message)."""
    where = "the whole file" if len(paths) == 1 else f"all {len(paths)} files"
    first = f"; the first skipped: {errors[0]}" if errors else ""
    return DataError(", ".join(map(str, paths)), where, f"{problem}: nothing to convert{first}")


def features_info(regions: RegionStore, path: str | Path) -> dict[str, Any]:
    """How a sentence store names the region store its image indices point into."""
    return {"path": str(path), "n_images": len(regions), "img_ids_sha256": sha256_strings(regions.img_ids)}


def append_labels(builder: StoreBuilder, labels: Iterable[Iterable[tuple[int, float]]]) -> None:
    """One chunk's ragged labels, (label id, score) pairs per row: offsets continue the store's."""
    labels = [list(row) for row in labels]
    counts = np.array([len(row) for row in labels], np.int64)
    builder.append("label_offsets", builder.rows("label_ids") + np.cumsum(counts))
    flat = [item for row in labels for item in row]
    builder.append("label_ids", np.array([a for a, _ in flat], np.int16).reshape(-1))
    builder.append("label_scores", np.array([s for _, s in flat], np.float32).reshape(-1))


class SentenceConversion(abc.ABC):
    """Input files -> a sentence store at `out` over the region store `features`; see the module docstring."""

    format = ""
    drop: tuple[str, ...] = ()  # growing arrays that are build state only

    def __init__(
        self,
        paths: Sequence[str | Path],
        features: str | Path,
        out: str | Path,
        *,
        vocab_path: Any,
        max_length: int | None,
        chunk: int,
        overwrite: bool,
        progress: bool,
    ) -> None:
        from lxmert.tokenizer import MAX_SEQ_LENGTH

        self.paths = existing_inputs(paths)
        self.features, self.out = features, Path(out)
        self.regions = RegionStore(features)
        self.max_length = MAX_SEQ_LENGTH if max_length is None else max_length
        self.chunk, self.overwrite, self.progress = chunk, overwrite, progress
        self.vocab_path = vocab_path
        self.pending: list[tuple[Any, ...]] = []

    def tokenizer(self) -> LxmertTokenizer:
        from lxmert.tokenizer import LxmertTokenizer

        if self.max_length > 255:
            raise ValueError("lengths are stored as uint8: max_length must be <= 255")
        tokenizer = LxmertTokenizer(self.vocab_path, self.max_length)
        if tokenizer.vocab_size > INT16_MAX + 1:
            raise ValueError(f"token ids are stored as int16: a vocabulary of {tokenizer.vocab_size} does not fit")
        return tokenizer

    # ------------------------------------------------------------------------------------ what a store adds

    @abc.abstractmethod
    def specs(self) -> dict[str, ArraySpec]:
        """The store's arrays besides token_ids and lengths."""

    @abc.abstractmethod
    def config(self, tokenizer: LxmertTokenizer) -> dict[str, Any]:
        """What identifies the build (a partial build with another config is started over)."""

    @abc.abstractmethod
    def restore(self, state: Any) -> None:
        """Set the stats (and any other state) from a resumed build's state, or afresh when it is None."""

    @abc.abstractmethod
    def records(self, path: Path, start: int) -> Iterator[tuple[int, Any]]:
        """(record index, record) of one input file from record `start` on."""

    @abc.abstractmethod
    def take(self, path: Path, index: int, record: Any) -> None:
        """Turn one record into rows of `pending` (sentence first) and count it in the stats."""

    @abc.abstractmethod
    def append_rows(self, builder: StoreBuilder, rows: list[tuple[Any, ...]]) -> None:
        """Append one chunk's columns (not token_ids and lengths)."""

    @abc.abstractmethod
    def state(self) -> Any:
        """What a resumed build gets back (the stats, without resumed_at)."""

    @abc.abstractmethod
    def meta(self, tokenizer: LxmertTokenizer) -> dict[str, Any]:
        """meta.json, without the arrays (StoreBuilder adds them)."""

    @property
    @abc.abstractmethod
    def records_done(self) -> int:
        """Where the progress bar starts."""

    def start(self, builder: StoreBuilder) -> None:
        """Before the first record (a fresh build's first label offset, for instance)."""

    def end_of_file(self) -> None:
        """After a file's last chunk was committed."""

    def before_commit(self) -> None:
        """Fold what the reader counted into the stats before they are saved."""

    def json_files(self, builder: StoreBuilder) -> dict[str, Any]:
        return {}

    # ----------------------------------------------------------------------------------------- the skeleton

    def stats_state(self, stats: Any) -> dict[str, Any]:
        saved = dataclasses.asdict(stats)
        del saved["resumed_at"]
        return saved

    def run(self) -> Any:
        tokenizer = self.tokenizer()
        specs = {"token_ids": ArraySpec("<i2", (self.max_length,)), "lengths": ArraySpec("|u1"), **self.specs()}
        builder = StoreBuilder(self.out, self.format, self.config(tokenizer), specs, self.overwrite)
        if builder.complete is not None:  # a previous run was killed after sealing the store
            self.restore(builder.complete)
            builder.install()
            return self.stats
        self.restore(builder.state if builder.resumed else None)
        position = builder.position or {"file": 0, "record": 0}
        bar = tqdm(
            desc=self.out.name, unit=" records", initial=self.records_done, disable=not self.progress, file=sys.stderr
        )
        try:
            self.start(builder)
            for file_index in range(position["file"], len(self.paths)):
                path = self.paths[file_index]
                start = position["record"] if file_index == position["file"] else 0
                for index, record in self.records(path, start):
                    bar.update()
                    self.take(path, index, record)
                    kill_point("build.record")
                    if len(self.pending) >= self.chunk:
                        self.commit(builder, tokenizer, {"file": file_index, "record": index + 1})
                self.commit(builder, tokenizer, {"file": file_index + 1, "record": 0})
                self.end_of_file()
            if builder.rows("lengths") == 0:
                builder.discard()
                counts = ", ".join(f"{k} {v}" for k, v in self.stats_state(self.stats).items() if k != "errors")
                raise nothing_to_store(self.paths, f"no sentences to store ({counts})", self.stats.errors)
            builder.finish(self.meta(tokenizer), self.json_files(builder), drop=self.drop)
            return self.stats
        finally:
            bar.close()
            builder.close()

    def commit(self, builder: StoreBuilder, tokenizer: LxmertTokenizer, position: dict[str, int]) -> None:
        if self.pending:
            token_ids, mask = tokenizer.batch_encode([row[0] for row in self.pending], pad_to=self.max_length)
            builder.append("token_ids", token_ids.astype(np.int16))
            builder.append("lengths", mask.sum(axis=1).astype(np.uint8))
            self.append_rows(builder, self.pending)
            self.pending.clear()
        self.before_commit()
        builder.commit(position, self.state())
