"""Memory-mapped stores of region features and tokenised text, and the resumable, atomic builder behind them.

Why: the authors' loader decoded every TSV into RAM (about 70 GB for pre-training) and each DataLoader worker
got a copy. A store is a directory of fixed-shape .npy files opened with mmap: no decoding, no copy, shared by
every worker through the page cache, and readable by DALI's fn.readers.numpy (standard .npy headers, C order,
little-endian, data 64-byte aligned; one big file per array, so a sample is a roi_start/roi_end slice).

Region store (one per split; n images, R = 36 regions, D = feature dim):
    meta.json       format "lxmert-region-store", version, n_images, num_regions, feat_dim, dtypes, per-array
                    shape + crc32, the inputs and the conversion stats. Written last: no meta.json, no store.
    img_ids.json    list of n img_ids in row order (the TSVs' order); RegionStore.index_of builds the dict.
    features.npy    [n, R, D] float16 (default) or float32 (--fp32)
    boxes.npy       [n, R, 4] float32, (x1/w, y1/h, x2/w, y2/h), clipped to [0, 1]
    obj_ids.npy     [n, R] int16 (the detector's 1600 classes), padding -1
    obj_conf.npy    [n, R] float16 / float32, padding 0
    attr_ids.npy    [n, R] int16 (400 classes), padding -1
    attr_conf.npy   [n, R] float16 / float32, padding 0
    num_boxes.npy   [n] int16, real regions (<= R)
    img_hw.npy      [n, 2] int32, (img_h, img_w) in pixels
  Fewer than R boxes: the rest of the row is padding (zero features and boxes, ids -1, conf 0), num_boxes says
  how many are real (region_mask gives the visual mask; -1 ids and 0 confidences drop padding out of the
  object/attribute losses). More than R: the first R are kept as the detector wrote them (bottom-up
  attention's obj36 files hold exactly 36; its adaptive 10-100 files list boxes in proposal order, highest
  scores first), and the count is recorded in the stats.
  float16 holds features to 3 significant digits (pool5 features are ReLU outputs well inside its range; a
  value beyond 65504 is an error asking for --fp32) and halves the store: COCO train2014 is 12 GB.

Text store (one per split; m sentences, L = max_length 20):
    meta.json       format "lxmert-text-store", sources (source_id -> name), max_length, the vocabulary's
                    sha256, the feature store it indexes (n_images, sha256 of its img_ids), stats.
    answers.json    the answer table the label ids index (normalised answers, table order)
    token_ids.npy   [m, L] int16: [CLS] wordpieces [SEP], padded with [PAD]=0. The BERT vocabulary has 30522
                    entries, below int16's 32767, so ids fit; the converter checks it.
    lengths.npy     [m] uint8, tokens incl. [CLS] and [SEP] (<= L)
    image_index.npy [m] int32, row in the region store
    source_id.npy   [m] uint8, index into meta["sources"]
    sent_index.npy  [m] int32, position in sentf[source] (the authors' uid is img_id_source_index)
    label_offsets.npy [m + 1] int64: sentence i's labels are label_ids/label_scores[offsets[i]:offsets[i+1]]
    label_ids.npy   [k] int16, rows of the answer table (9500 < 32767)
    label_scores.npy [k] float32
  Padded fixed-width token rows (40 bytes a sentence, 367 MB for the 9.18M pre-training pairs) instead of
  ragged ones: a gather is one fancy index and a DALI sample a fixed shape. Labels are ragged (most sentences
  have none); an empty range means no QA label (the authors' ans = -1).

Building (StoreBuilder): arrays grow in `<out>.partial/` as .npy files whose 128-byte header is written at
the end; every chunk is flushed, fsynced and recorded with its row counts and crc32s in progress.json
(replaced atomically), together with the converter's input position. A rerun with the same inputs and options
truncates each file to the last recorded chunk and continues from that position. `finish` writes the headers,
re-reads every array and checks shape, dtype and each chunk's crc32, writes the JSON files and meta.json (which
names the build: meta["build"] is its config), and installs the store: deletes the build state, renames the
directory to `<out>`. An existing store there is replaced only with overwrite=True, and only by a verified one.
A kill anywhere is resumed by the same command: before meta.json, from the last chunk; after it (a sealed
partial), only the install is left, and the conversion is not redone; in the middle of replacing an existing
store (moved aside to `<out>.partial.old`), the swap is finished, or undone when the rerun is another build.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.atomic import fsync_dir, kill_point, remove_temp_files, write_atomic

REGION_FORMAT = "lxmert-region-store"
TEXT_FORMAT = "lxmert-text-store"
TASK_FORMAT = "lxmert-task-store"  # fine-tuning questions (engine/data/tasks.py)
FORMAT_VERSION = 1
NUM_REGIONS = 36
HEADER_BYTES = 128  # .npy header reserved at the front of every array file (a multiple of 64)
META = "meta.json"
PROGRESS = "progress.json"
_CRC_BLOCK = 1 << 26  # bytes hashed at a time when verifying


class StoreError(RuntimeError):
    """A store that is missing, incomplete, of another format or version, or fails verification."""


# ------------------------------------------------------------------------------------- .npy plumbing


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of exactly HEADER_BYTES bytes, as numpy would write it (padded with spaces)."""
    dtype = np.dtype(dtype)
    text = f"{{'descr': {np.lib.format.dtype_to_descr(dtype)!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    room = HEADER_BYTES - 10 - 1  # magic (6) + version (2) + length (2); a newline ends the header
    if len(text) > room:
        raise ValueError(f"a .npy header for shape {shape} does not fit in {HEADER_BYTES} bytes")
    text = text.ljust(room) + "\n"
    return b"\x93NUMPY\x01\x00" + (len(text)).to_bytes(2, "little") + text.encode("latin1")


def _crc_file(path: Path, start: int, stop: int, crc: int = 0) -> int:
    """crc32 of bytes [start, stop) of a file, continuing `crc`."""
    with open(path, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0:
            block = f.read(min(left, _CRC_BLOCK))
            if not block:
                raise StoreError(f"{path}: ends {left} bytes early")
            crc = zlib.crc32(block, crc)
            left -= len(block)
    return crc


def sha256_strings(strings: Iterable[str]) -> str:
    """A fingerprint of a list of strings (the img_ids a text store indexes)."""
    h = hashlib.sha256()
    for s in strings:
        h.update(s.encode("utf-8") + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class ArraySpec:
    """One growing array: dtype and the shape of a row. header=False: a plain byte file (row = one byte)."""

    dtype: str
    row_shape: tuple[int, ...] = ()
    header: bool = True

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.row_shape, dtype=np.int64))

    @property
    def suffix(self) -> str:
        return ".npy" if self.header else ""


class _GrowingFile:
    """An array file appended to row by row; `rows` counts what has been appended."""

    def __init__(self, path: Path, spec: ArraySpec, rows: int) -> None:
        self.path, self.spec, self.rows = path, spec, rows
        self.data_start = HEADER_BYTES if spec.header else 0
        size = self.data_start + rows * spec.row_bytes
        mode = "r+b" if path.exists() else "w+b"
        self.file = open(path, mode)
        self.file.truncate(size)  # drops whatever an interrupted chunk left behind
        self.file.seek(size)
        self.chunk_crc = 0

    def append(self, array: np.ndarray) -> None:
        spec = self.spec
        array = np.ascontiguousarray(array, dtype=spec.dtype)
        if array.shape[1:] != spec.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {array.shape[1:]}, expected {spec.row_shape}")
        data = array.reshape(-1).view(np.uint8)  # bytes, also of a chunk of no rows
        self.file.write(data)
        self.chunk_crc = zlib.crc32(data, self.chunk_crc)
        self.rows += array.shape[0]

    def sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def finalize(self) -> None:
        if self.spec.header:
            self.file.seek(0)
            self.file.write(npy_header(np.dtype(self.spec.dtype), (self.rows, *self.spec.row_shape)))
        self.sync()
        self.file.close()

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------------------ builder


def _meta_of(path: Path) -> dict[str, Any] | None:
    try:
        with open(path / META, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_store(path: Path) -> bool:
    return (_meta_of(path) or {}).get("format") in (REGION_FORMAT, TEXT_FORMAT, TASK_FORMAT)


def _build_of(path: Path) -> Any:
    """The config of the build that wrote the store (or sealed partial) at `path`; None if there is none."""
    return (_meta_of(path) or {}).get("build")


class StoreExistsError(FileExistsError):
    """The output already holds something and overwrite was not asked for."""


class AlreadyConverted(StoreExistsError):
    """The output is the store this very build makes: its meta.json records the same build config (every input's
    resolved path, size and modification time, and every option). The converter's command line says so and
    exits 0; a changed input or option is a StoreExistsError asking for --overwrite."""


class StoreBuilder:
    """Builds a store directory chunk by chunk in `<out>.partial/`; resumable, verified, renamed when complete.

    `config` identifies the build (inputs with sizes and mtimes, options): a partial build is resumed only
    when its config is equal, else it is discarded. The caller appends rows to the arrays, then `commit`s a
    chunk with its input `position` and `state` (both JSON values it gets back on resume), and at the end
    calls `finish` with the meta and small JSON files. When a previous run of the same build was killed after
    sealing the store, `complete` is its meta.json: the caller skips the conversion and calls `install`.
    """

    def __init__(
        self,
        out: str | Path,
        kind: str,
        config: Mapping[str, Any],
        arrays: Mapping[str, ArraySpec],
        overwrite: bool = False,
    ) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.replaced = self.out.with_name(self.out.name + ".partial.old")  # the store being replaced, briefly
        self.kind, self.specs, self.overwrite = kind, dict(arrays), overwrite
        self.config = json.loads(json.dumps({"kind": kind, "version": FORMAT_VERSION, **config}))
        self.chunks: list[dict[str, Any]] = []
        self.position: Any = None
        self.state: Any = None
        self.files: dict[str, _GrowingFile] = {}
        self.complete: dict[str, Any] | None = self._read_sealed()
        self._recover_swap()
        if self.out.exists():
            if not _is_store(self.out):  # never delete what we did not write
                raise StoreExistsError(f"{self.out} already exists and is not a store: refusing to replace it")
            if not overwrite:
                if _build_of(self.out) == self.config:
                    raise AlreadyConverted(
                        f"{self.out} already exists (converted from these very inputs and options): nothing to do"
                    )
                raise StoreExistsError(
                    f"{self.out} already exists (from other inputs or options); pass "
                    "overwrite=True (--overwrite) to replace it"
                )
        if self.complete is not None:
            remove_temp_files(self.partial)
            return

        progress = self._read_progress()
        if progress is not None and progress["config"] == self.config and self._holds(progress["chunks"]):
            self.chunks, self.position, self.state = progress["chunks"], progress["position"], progress["state"]
            remove_temp_files(self.partial)  # of writes a kill cut short
        elif self.partial.exists():
            self._discard()
        self.partial.mkdir(parents=True, exist_ok=True)
        committed = self.chunks[-1]["rows"] if self.chunks else {name: 0 for name in self.specs}
        self.files = {
            name: _GrowingFile(self.partial / (name + spec.suffix), spec, committed[name])
            for name, spec in self.specs.items()
        }
        if not self.chunks:
            self._write_progress()

    @property
    def resumed(self) -> bool:
        """Whether this build continues an interrupted one."""
        return bool(self.chunks)

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            with open(self.partial / PROGRESS, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def _read_sealed(self) -> dict[str, Any] | None:
        """The meta.json of a partial that a previous run of this build sealed (then killed before the rename)."""
        return _meta_of(self.partial) if _build_of(self.partial) == self.config else None

    def _holds(self, chunks: list[dict[str, Any]]) -> bool:
        """Whether every array file still holds the rows progress.json records (nobody deleted or cut one)."""
        if not chunks:
            return True
        for name, spec in self.specs.items():
            path = self.partial / (name + spec.suffix)
            size = (HEADER_BYTES if spec.header else 0) + chunks[-1]["rows"][name] * spec.row_bytes
            if not path.is_file() or path.stat().st_size < size:
                return False
        return True

    def _recover_swap(self) -> None:
        """Finish or undo the replacement of an existing store that a kill interrupted (see `install`)."""
        if not self.replaced.exists():
            return
        if _is_store(self.out):  # the new store is in place: the old one was still to be deleted
            shutil.rmtree(self.replaced)
        elif not self.out.exists() and self.complete is None and _is_store(self.replaced):
            os.rename(self.replaced, self.out)  # the sealed partial is not this build's: put the old store back
            fsync_dir(self.out.parent)

    def _discard(self) -> None:
        """Delete the partial build, its records first: a kill midway leaves nothing that looks resumable."""
        for name in (PROGRESS, META):
            (self.partial / name).unlink(missing_ok=True)
        shutil.rmtree(self.partial)

    def _write_progress(self) -> None:
        progress = {"config": self.config, "chunks": self.chunks, "position": self.position, "state": self.state}
        write_atomic(self.partial / PROGRESS, lambda f: json.dump(progress, f))

    def rows(self, name: str) -> int:
        return self.files[name].rows

    def append(self, name: str, array: np.ndarray) -> None:
        self.files[name].append(array)
        kill_point("store.append")

    def commit(self, position: Any, state: Any) -> None:
        """Make everything appended so far durable and record it: a rerun resumes after this point."""
        for f in self.files.values():
            f.sync()
        kill_point("store.commit")
        chunk = {
            "rows": {name: f.rows for name, f in self.files.items()},
            "crc32": {name: f.chunk_crc for name, f in self.files.items()},
        }
        self.chunks.append(chunk)
        self.position, self.state = position, state
        self._write_progress()
        for f in self.files.values():
            f.chunk_crc = 0

    def raw_path(self, name: str) -> Path:
        """Where a growing array lives (to read back state, e.g. the img_ids so far)."""
        return self.files[name].path

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def discard(self) -> None:
        """Give the build up (nothing in it is worth resuming): close and delete the partial directory."""
        self.close()
        if self.partial.exists():
            self._discard()

    def _verify(self) -> dict[str, dict[str, Any]]:
        """Re-read every array: shape and dtype through numpy, and each chunk's crc32; returns per-array info."""
        info = {}
        for name, spec in self.specs.items():
            path, rows = self.files[name].path, self.files[name].rows
            if spec.header:
                array = np.load(path, mmap_mode="r")
                expected = (rows, *spec.row_shape)
                if array.shape != expected or array.dtype != np.dtype(spec.dtype):
                    got = f"{array.dtype}{array.shape}"
                    raise StoreError(f"{path}: reads back as {got}, expected {spec.dtype}{expected}")
                del array
            data_start = HEADER_BYTES if spec.header else 0
            size = data_start + rows * spec.row_bytes
            if os.path.getsize(path) != size:
                raise StoreError(f"{path}: {os.path.getsize(path)} bytes, expected {size}")
            crc_all, done = 0, 0
            with open(path, "rb") as f:
                f.seek(data_start)
                for k, chunk in enumerate(self.chunks):
                    stop = chunk["rows"][name]
                    crc, left = 0, (stop - done) * spec.row_bytes
                    while left > 0:
                        block = f.read(min(left, _CRC_BLOCK))
                        crc, crc_all, left = zlib.crc32(block, crc), zlib.crc32(block, crc_all), left - len(block)
                    if crc != chunk["crc32"][name]:
                        raise StoreError(f"{path}: rows {done}..{stop} (chunk {k}) differ from what was written")
                    done = stop
            info[name] = {"dtype": spec.dtype, "shape": [rows, *spec.row_shape], "crc32": crc_all}
        return info

    def finish(self, meta: Mapping[str, Any], json_files: Mapping[str, Any], drop: Sequence[str] = ()) -> Path:
        """Finalise headers, verify, write `json_files` and meta.json (the seal), then `install`; returns `out`.

        `drop` names growing arrays that were build state only (deleted by the install)."""
        committed = self.chunks[-1]["rows"] if self.chunks else {name: 0 for name in self.specs}
        if any(f.rows != committed[name] for name, f in self.files.items()):
            raise RuntimeError("finish() with rows appended after the last commit()")
        for f in self.files.values():
            f.finalize()
            kill_point("finish.header")
        try:
            arrays = self._verify()
        except StoreError:
            self._discard()  # resuming would only reproduce the bad bytes: start over next time
            raise
        for name in drop:
            del arrays[name]
        for filename, value in json_files.items():
            write_atomic(self.partial / filename, lambda f, value=value: json.dump(value, f))
        sealed = {**meta, "arrays": arrays, "build": self.config}
        write_atomic(self.partial / META, lambda f: json.dump(sealed, f))
        self.complete = sealed
        kill_point("finish.sealed")
        return self.install()

    def install(self) -> Path:
        """Move a sealed partial into place: delete its build state, replace an existing store, rename it `out`.

        Each step can be killed and redone: a rerun of the build finds the sealed partial (or the swap half
        done, see _recover_swap) and calls this again."""
        if self.complete is None:
            raise RuntimeError("install() before finish() sealed the store")
        self.close()
        for name, spec in self.specs.items():
            if name not in self.complete["arrays"]:
                (self.partial / (name + spec.suffix)).unlink(missing_ok=True)
        (self.partial / PROGRESS).unlink(missing_ok=True)
        fsync_dir(self.partial)
        kill_point("install.cleaned")
        if self.out.exists():  # overwrite was asked for (checked in __init__): swap, then drop the old one
            os.rename(self.out, self.replaced)
            kill_point("install.swapped")
        os.rename(self.partial, self.out)
        fsync_dir(self.out.parent)
        kill_point("install.renamed")
        if self.replaced.exists():
            shutil.rmtree(self.replaced)
        return self.out


# ------------------------------------------------------------------------------------------ readers


class Store:
    """A complete store directory opened read-only: meta, and each array memory-mapped (no copy)."""

    format = ""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            if (self.path / PROGRESS).exists() or self.path.name.endswith(".partial"):
                raise StoreError(f"{self.path} is an unfinished conversion (no {META}); rerun the converter")
            if self.path.with_name(self.path.name + ".partial").exists():
                raise StoreError(f"{self.path} does not exist yet: its conversion is unfinished; rerun the converter")
            raise StoreError(f"{self.path} is not a store: {META} not found")
        with open(meta_path, encoding="utf-8") as f:
            self.meta: dict[str, Any] = json.load(f)
        if self.meta.get("format") != self.format or self.meta.get("version") != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: format {self.meta.get('format')!r} version {self.meta.get('version')!r}, "
                f"expected {self.format!r} version {FORMAT_VERSION}"
            )
        self.arrays: dict[str, np.ndarray] = {}  # plain ndarray views of read-only maps: indexing copies nothing extra
        for name, info in self.meta["arrays"].items():
            array = self._map(name, info)
            if list(array.shape) != info["shape"] or array.dtype != np.dtype(info["dtype"]):
                got, expected = f"{array.dtype}{array.shape}", f"{info['dtype']}{info['shape']}"
                raise StoreError(f"{self.path / name}.npy: {got}, meta says {expected}")
            self.arrays[name] = array.view(np.ndarray)

    def _map(self, name: str, info: dict[str, Any]) -> np.ndarray:
        """One array memory-mapped; a file missing or cut short (a copy that did not finish, a full disk) is a
        StoreError naming the file with its expected and actual bytes, not numpy's "mmap length is greater
        than file size"."""
        path = self.path / f"{name}.npy"
        data_bytes = math.prod(info["shape"]) * np.dtype(info["dtype"]).itemsize
        if not path.is_file():
            raise StoreError(
                f"{path} is missing ({META} lists it: {HEADER_BYTES + data_bytes} bytes); copy or "
                "convert the store again"
            )
        actual = path.stat().st_size
        try:
            with open(path, "rb") as f:
                if np.lib.format.read_magic(f) == (1, 0):
                    np.lib.format.read_array_header_1_0(f)
                else:
                    np.lib.format.read_array_header_2_0(f)
                header = f.tell()
        except (ValueError, OSError, EOFError):
            header = HEADER_BYTES  # what the builder writes; the size check below names the file
        if actual < header + data_bytes:
            raise StoreError(
                f"{path} is cut short: {actual} bytes, expected {header + data_bytes} "
                f"({np.dtype(info['dtype']).name} {tuple(info['shape'])} after a {header}-byte header); "
                "copy or convert the store again"
            )
        try:
            return np.load(path, mmap_mode="r")
        except (ValueError, OSError) as error:  # a damaged header
            raise StoreError(f"{path}: not readable as a .npy array ({error})") from None

    def __reduce__(self) -> tuple[type, tuple[Path]]:
        """Pickle as the path: a DataLoader worker reopens the maps instead of receiving a copy of the data."""
        return type(self), (self.path,)

    def array_path(self, name: str) -> Path:
        """The .npy file of an array (for DALI's numpy reader: files=[...], roi_start/roi_end per sample)."""
        return self.path / f"{name}.npy"

    def verify(self) -> None:
        """Recompute every array's crc32 against meta.json (reads the whole store)."""
        for name, info in self.meta["arrays"].items():
            path = self.array_path(name)
            if _crc_file(path, HEADER_BYTES, os.path.getsize(path)) != info["crc32"]:
                raise StoreError(f"{path}: contents differ from the checksum written at conversion")


@dataclass
class Regions:
    """Region arrays of one image ([R, ...]) or a batch ([B, R, ...]), as the store keeps them."""

    features: np.ndarray  # [.., R, D] float16 / float32
    boxes: np.ndarray  # [.., R, 4] float32 in [0, 1]
    obj_ids: np.ndarray  # [.., R] int16, -1 = padding
    obj_conf: np.ndarray  # [.., R]
    attr_ids: np.ndarray  # [.., R] int16, -1 = padding
    attr_conf: np.ndarray  # [.., R]
    num_boxes: np.ndarray  # [..] int16
    img_hw: np.ndarray  # [.., 2] int32


REGION_ARRAYS = ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf", "num_boxes", "img_hw")
REGION_LABELS = ("boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf")  # per region, besides the features


def region_mask(num_boxes: np.ndarray, num_regions: int = NUM_REGIONS) -> np.ndarray:
    """bool [.., R]: True for real regions, False for padding."""
    return np.arange(num_regions) < np.asarray(num_boxes)[..., None]


class RegionStore(Store):
    """A region-feature store (layout in this file's header), memory-mapped."""

    format = REGION_FORMAT

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        with open(self.path / "img_ids.json", encoding="utf-8") as f:
            self.img_ids: list[str] = json.load(f)
        if len(self.img_ids) != self.meta["n_images"]:
            n = self.meta["n_images"]
            raise StoreError(f"{self.path}: img_ids.json lists {len(self.img_ids)} images, meta says {n}")
        self._index: dict[str, int] | None = None
        self.num_regions: int = self.meta["num_regions"]
        self.feat_dim: int = self.meta["feat_dim"]

    def __len__(self) -> int:
        return len(self.img_ids)

    def index_of(self, img_id: str) -> int:
        """The row of `img_id`; KeyError naming the store if absent."""
        if self._index is None:
            self._index = {img_id: i for i, img_id in enumerate(self.img_ids)}
        try:
            return self._index[img_id]
        except KeyError:
            raise KeyError(f"img_id {img_id!r} is not in the region store {self.path} ({len(self)} images)") from None

    def get(self, i: int) -> Regions:
        """Image i's arrays: views of the memory map, no copy."""
        if not 0 <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        return Regions(**{name: self.arrays[name][i] for name in REGION_ARRAYS})

    def gather(self, indices: Sequence[int] | np.ndarray) -> Regions:
        """The arrays of images `indices` stacked ([B, ...]), copied out of the map in one fancy index each."""
        idx = np.asarray(indices, dtype=np.int64)
        return Regions(**{name: self.arrays[name][idx] for name in REGION_ARRAYS})


@dataclass
class TextEntry:
    """One sentence of a text store."""

    token_ids: np.ndarray  # [length] int16, [CLS] .. [SEP]
    image_index: int
    source: str
    sent_index: int
    labels: dict[int, float]  # answer-table id -> score; empty = no QA label


@dataclass
class Sentences:
    """A batch of sentences; labels ragged: batch row b owns label_ids[label_offsets[b]:label_offsets[b + 1]]."""

    token_ids: np.ndarray  # [B, L] int16, padded with 0
    lengths: np.ndarray  # [B] uint8
    image_index: np.ndarray  # [B] int32
    source_id: np.ndarray  # [B] uint8
    sent_index: np.ndarray  # [B] int32
    label_offsets: np.ndarray  # [B + 1] int64
    label_ids: np.ndarray  # [K] int16
    label_scores: np.ndarray  # [K] float32


class SentenceStore(Store):
    """A store of tokenised sentences (text and task stores) whose image indices point into a region store;
    soft labels, where it has them, ragged: row i owns label_ids/label_scores[label_offsets[i]:[i + 1]]."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.max_length: int = self.meta["max_length"]
        self._checked: set[tuple[int, str]] = set()

    def __len__(self) -> int:
        return int(self.arrays["lengths"].shape[0])

    def check_features(self, regions: RegionStore) -> None:
        """Raise unless `regions` is the feature store this store's image indices point into (checked once a
        region store)."""
        key = (len(regions), str(regions.path))
        if key in self._checked:
            return
        expected = self.meta["features"]
        if len(regions) != expected["n_images"] or sha256_strings(regions.img_ids) != expected["img_ids_sha256"]:
            raise StoreError(
                f"{self.path} indexes a feature store of {expected['n_images']} images "
                f"(built from {expected['path']}), not {regions.path} ({len(regions)} images)"
            )
        self._checked.add(key)

    def built_from(self) -> Path:
        """The feature store this store was built from: the path it recorded, else a sibling of that name (a work
        dir moved, or named relative to another directory)."""
        recorded = Path(self.meta["features"]["path"])
        sibling = self.path.parent / recorded.name
        return sibling if not recorded.exists() and sibling.exists() else recorded

    def soft_labels(self, i: int) -> dict[int, float]:
        """Row i's labels, {label id: score} (empty: none)."""
        offsets = self.arrays["label_offsets"]
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        ids, scores = self.arrays["label_ids"][lo:hi], self.arrays["label_scores"][lo:hi]
        return {int(a): float(s) for a, s in zip(ids, scores)}

    def gather_labels(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ragged labels of rows `idx` in batch order: (offsets [B + 1], label ids [K], label scores [K])."""
        a = self.arrays
        lo, hi = a["label_offsets"][idx], a["label_offsets"][idx + 1]
        counts = hi - lo
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        rows = np.repeat(lo - offsets[:-1], counts) + np.arange(offsets[-1])  # label rows, batch order
        return offsets, a["label_ids"][rows], a["label_scores"][rows]


class TextStore(SentenceStore):
    """A tokenised-text store (layout in this file's header), memory-mapped."""

    format = TEXT_FORMAT

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        with open(self.path / "answers.json", encoding="utf-8") as f:
            self.answers: list[str] = json.load(f)
        self.sources: list[str] = self.meta["sources"]

    def labels_of(self, i: int) -> dict[int, float]:
        return self.soft_labels(i)

    def get(self, i: int) -> TextEntry:
        if not 0 <= i < len(self):
            raise IndexError(f"sentence {i} out of range for {len(self)} sentences")
        a = self.arrays
        return TextEntry(
            token_ids=a["token_ids"][i, : int(a["lengths"][i])],
            image_index=int(a["image_index"][i]),
            source=self.sources[int(a["source_id"][i])],
            sent_index=int(a["sent_index"][i]),
            labels=self.labels_of(i),
        )

    def gather(self, indices: Sequence[int] | np.ndarray) -> Sentences:
        a = self.arrays
        idx = np.asarray(indices, dtype=np.int64)
        offsets, label_ids, label_scores = self.gather_labels(idx)
        return Sentences(
            token_ids=a["token_ids"][idx],
            lengths=a["lengths"][idx],
            image_index=a["image_index"][idx],
            source_id=a["source_id"][idx],
            sent_index=a["sent_index"][idx],
            label_offsets=offsets,
            label_ids=label_ids,
            label_scores=label_scores,
        )
