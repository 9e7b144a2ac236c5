"""`lxmert-download GROUP... [--out DIR] [--mirror URL]`: the authors' public files, as airsplay/lxmert's README
lists them, in their data/ layout under --out (default data/; the pre-trained model in snap/pretrained/ beside it,
as in their repository).

    lxmert-download --list                         # the groups, their files and sizes (no network)
    lxmert-download vqa model                      # VQA's JSONs, the COCO features, model_LXRT.pth

Each file is downloaded into `<name>.part` beside its final path and renamed into place only when complete and
checked: the size where one is published (the bytes of a GitHub file), its git blob id where its repository
publishes one, and otherwise the server's Content-Length. A rerun resumes a `.part` with an HTTP Range request
(a 206 appends; a 200 starts the file over). A zip is unzipped into its folder through a temporary folder (each
file renamed into place, `.<zip>.done` written last), then deleted, as the authors' commands do. NLVR2's JSONs are
not on the authors' server: their README builds them from lil-lab/nlvr's files (their git submodule), which are
fetched into that layout (data/nlvr2/nlvr/nlvr2/data/) and rewritten as data/nlvr2/train.json and valid.json in the
authors' format. A finished file is never fetched again: a rerun of a finished group says so and exits 0. A failed
download (an HTTP error, a refused or lost connection, a size or checksum mismatch) is one line on stderr, exit
status 2, with the `.part` kept for the rerun (one that fails its checksum is removed). HTTP is the standard
library's (urllib.request); `--mirror URL` fetches every file from URL + its relative path (`--list` shows them:
the data/ layout's, and model_LXRT.pth at the root), http(s):// or file://.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from tqdm import tqdm

from engine.atomic import fsync_dir, write_text_atomic
from engine.logs import configure_logging

try:
    import fcntl
except ImportError:  # not on Windows: there two concurrent runs into one folder are not caught
    fcntl = None  # type: ignore[assignment]

PROG = "lxmert-download"
logger = logging.getLogger(__name__)
UNC = "https://nlp.cs.unc.edu/data/"
UNC_DATA = UNC + "lxmert_data/"
# the answer tables are in the authors' repository, and NLVR2's statements in lil-lab/nlvr at the commit of their
# submodule: pinned commits, so that the git blob ids below stay what the files are
AUTHORS_REPO = "https://raw.githubusercontent.com/airsplay/lxmert/0db1182b9030da3ce41f17717cc628e1cd0a95d5/data/"
NLVR_REPO = "https://raw.githubusercontent.com/lil-lab/nlvr/3afe9e57355ab49fb92a0dc231436e583d67d125/"
CHUNK = 1 << 20
TIMEOUT = 60  # seconds without a byte before a download counts as lost
USER_AGENT = "lxmert-download/0.1 (Python urllib)"


@dataclass(frozen=True)
class Remote:
    """One of the authors' files."""

    url: str  # where the authors publish it
    path: str  # its relative path on a --mirror, and under --out unless `dest` says otherwise
    stated: str = ""  # its size as the authors' README states it, "" where it states none
    size: int | None = None  # exact bytes, where published
    git_blob: str | None = None  # the git blob id its repository's tree publishes
    dest: str | None = None  # its path relative to --out, where not `path`

    @property
    def zipped(self) -> bool:
        return self.path.endswith(".zip")


@dataclass(frozen=True)
class Nlvr2Split:
    """data/nlvr2/<split>.json in the authors' format, made from lil-lab/nlvr's file of the split."""

    source: str  # relative to --out
    dest: str
    split: str


def _unc(path: str, stated: str = "") -> Remote:
    return Remote(UNC_DATA + path, path, stated)


def _github(base: str, path: str, size: int | None, blob: str, under: str = "") -> Remote:
    return Remote(base + path, under + path, size=size, git_blob=blob)


PRETRAIN_STATED = "about 700 MB, the four pre-training JSONs together"
ALL_ANS = _github(AUTHORS_REPO, "lxmert/all_ans.json", 986576, "e72bcc377c5fcdd9f15451bcd23a2ed51ddd9004")
COCO = (
    _unc("mscoco_imgfeat/train2014_obj36.zip", "17 GB"),
    _unc("mscoco_imgfeat/val2014_obj36.zip", "8 GB"),
)
VG_STATED = "30 GB, with gqa_testdev_obj36.zip"
VG = _unc("vg_gqa_imgfeat/vg_gqa_obj36.zip", VG_STATED)
NLVR_RAW = (  # where the authors' submodule puts them, data/nlvr2/nlvr/
    # train.json's size is not known here: only its blob id (the tree lists it)
    _github(NLVR_REPO, "nlvr2/data/train.json", None, "affca2ee36563123e069f92e7c391000952e257c", "nlvr2/nlvr/"),
    _github(NLVR_REPO, "nlvr2/data/dev.json", 3762423, "aac21163e5b59aea2bd5f05254848d7522729bec", "nlvr2/nlvr/"),
)

GROUPS: dict[str, tuple[Remote | Nlvr2Split, ...]] = {
    "pretrain": (
        *(_unc(f"lxmert/{n}.json", PRETRAIN_STATED) for n in ("mscoco_train", "mscoco_nominival", "vgnococo")),
        _unc("lxmert/mscoco_minival.json", PRETRAIN_STATED),
        ALL_ANS,
    ),
    "coco-features": COCO,
    "vg-features": (VG,),
    "vqa": (
        *(_unc(f"vqa/{n}.json") for n in ("train", "nominival", "minival")),
        _github(AUTHORS_REPO, "vqa/trainval_ans2label.json", 64332, "1523c1df426473f29b436e8fd8d73380defa4c06"),
        ALL_ANS,
        *COCO,
    ),
    "gqa": (
        *(_unc(f"gqa/{n}.json") for n in ("train", "valid", "testdev")),
        _github(AUTHORS_REPO, "gqa/trainval_ans2label.json", 37898, "be5cb0e8af0920b9281b3654a944638dc1f80496"),
        ALL_ANS,
        VG,
        _unc("vg_gqa_imgfeat/gqa_testdev_obj36.zip", VG_STATED.replace("gqa_testdev", "vg_gqa")),
    ),
    "nlvr2": (
        *NLVR_RAW,
        Nlvr2Split(NLVR_RAW[0].path, "nlvr2/train.json", "train"),
        Nlvr2Split(NLVR_RAW[1].path, "nlvr2/valid.json", "valid"),
        _unc("nlvr2_imgfeat/train_obj36.zip", "21 GB"),
        _unc("nlvr2_imgfeat/valid_obj36.zip", "1.6 GB"),
    ),
    "model": (
        Remote(UNC + "model_LXRT.pth", "model_LXRT.pth", "870 MB", dest="../snap/pretrained/model_LXRT.pth"),
        ALL_ANS,  # the row order of its QA head
    ),
}
ABOUT = {
    "pretrain": "the pre-training JSONs and their answer table",
    "coco-features": "Faster R-CNN features of MS COCO train2014 and val2014 (36 boxes an image)",
    "vg-features": "Faster R-CNN features of the Visual Genome images (36 boxes an image)",
    "vqa": "VQA v2 in the authors' splits, its answer table, and the COCO features",
    "gqa": "GQA balanced, its answer table, the Visual Genome features and GQA testdev's",
    "nlvr2": "NLVR2 statements (from lil-lab/nlvr) and their features",
    "model": "the pre-trained LXMERT, model_LXRT.pth, and its QA head's answer table",
}


class DownloadError(Exception):
    def __init__(self, where: str | Path, what: str) -> None:
        super().__init__(f"{where}: {' '.join(what.split())}")


# ---------------------------------------------------------------------------------------------------- where


def under(out: Path, rel: str) -> Path:
    return Path(os.path.normpath(out / rel))


def final_path(item: Remote | Nlvr2Split, out: Path) -> Path:
    return under(out, item.dest if isinstance(item, Nlvr2Split) else (item.dest or item.path))


def source_url(remote: Remote, mirror: str | None) -> str:
    return mirror + remote.path if mirror else remote.url


def done_marker(zip_path: Path) -> Path:
    return zip_path.with_name(f".{zip_path.name}.done")


def is_done(item: Remote | Nlvr2Split, out: Path) -> bool:
    final = final_path(item, out)
    if isinstance(item, Remote) and item.zipped:
        marker = done_marker(final)
        if not marker.is_file():
            return False
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        return all((final.parent / n).is_file() and (final.parent / n).stat().st_size == s for n, s in files.items())
    if final.is_file() and isinstance(item, Remote) and item.size is not None:
        if final.stat().st_size != item.size:
            raise DownloadError(
                final, f"holds {final.stat().st_size} bytes, not the {item.size} published: remove it to download again"
            )
    return final.is_file()


# ------------------------------------------------------------------------------------------------- fetching


def describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        return describe(error.reason) if isinstance(error.reason, BaseException) else str(error.reason)
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError):
        return f"no answer in {TIMEOUT} s"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host ({error.strerror})"
    if isinstance(error, http.client.IncompleteRead):
        return "the connection closed early"
    return str(error) or type(error).__name__


def request(url: str, offset: int) -> Any:
    """The server's response to a GET of `url` from byte `offset`; a 416 (the range is past the end) is returned,
    every other HTTP error raised."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            return error
        raise DownloadError(url, f"HTTP {error.code} {error.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError
        raise DownloadError(url, describe(error)) from None


def content_range(url: str, header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a Content-Range header: `bytes A-B/N` or `bytes */N` (None where unknown)."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if m is None:
        raise DownloadError(url, f"bad Content-Range {header!r} in a partial response")
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def git_blob_id(path: Path) -> str:
    """The id git gives the file's bytes (SHA-1 of `blob <size>\\0` and the bytes)."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def lock(f: IO[bytes], part: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise DownloadError(part, "another lxmert-download is writing it") from None


def download(remote: Remote, url: str, final: Path) -> None:
    """`url` into `final` through `final`.part: resumed from the part's bytes, checked, renamed into place."""
    part = final.with_name(final.name + ".part")
    final.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    response = request(url, offset)
    total: int | None
    with response:
        status = response.status or 200  # a file:// URL has no status
        if status == 416:  # the part already holds every byte (stopped before the rename) or more
            total = content_range(url, response.headers.get("Content-Range"))[1]
            if total != offset:
                logger.info(f"{part}: {offset} bytes, which do not fit the server's {total}: starting over")
                part.unlink()
                return download(remote, url, final)
        elif status == 206 and offset:
            start, total = content_range(url, response.headers.get("Content-Range"))
            if start != offset:
                raise DownloadError(url, f"asked for the bytes from {offset}, sent from {start}")
            logger.info(f"resuming {url} at byte {offset}")
        elif status == 200:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if offset:
                logger.info(f"{url}: the server ignored the range request: starting over")
                offset = 0
        else:
            raise DownloadError(url, f"unexpected HTTP {status}")
        if remote.size is not None and total is not None and total != remote.size:
            raise DownloadError(url, f"size mismatch: the server has {total} bytes, {remote.size} published")
        free = shutil.disk_usage(final.parent).free
        if total is not None and total - offset > free:
            raise DownloadError(final, f"needs {total - offset} more bytes, {free} free")
        with open(part, "ab") as f:
            lock(f, part)
            if status == 200:
                f.truncate(0)
            elif f.tell() != offset:
                raise DownloadError(part, "changed while the request was made: another lxmert-download?")
            if status != 416:
                receive(response, f, url, part, offset, total)
            f.flush()
            os.fsync(f.fileno())
    got = part.stat().st_size
    if total is not None and got != total:
        raise DownloadError(url, f"the connection closed after {got} of {total} bytes; {part.name} kept for a rerun")
    if remote.size is not None and got != remote.size:
        if got > remote.size:
            part.unlink()
        raise DownloadError(url, f"size mismatch: got {got} bytes, {remote.size} published")
    if remote.git_blob is not None and (blob := git_blob_id(part)) != remote.git_blob:
        part.unlink()
        raise DownloadError(
            url, f"checksum mismatch: git blob {blob}, {remote.git_blob} published; removed the download"
        )
    os.replace(part, final)
    fsync_dir(final.parent)


def receive(response: Any, f: IO[bytes], url: str, part: Path, offset: int, total: int | None) -> None:
    with tqdm(
        total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name[:-5], disable=None
    ) as bar:
        read = getattr(response, "read1", response.read)  # what has arrived, not a full chunk: a kill loses little
        while True:
            try:
                chunk = read(CHUNK)
            except (OSError, http.client.HTTPException) as error:
                f.flush()
                got = f.tell()
                raise DownloadError(
                    url,
                    f"{describe(error)} after {got} of {total if total is not None else '?'} bytes; "
                    f"{part.name} kept for a rerun",
                ) from None
            if not chunk:
                return
            f.write(chunk)
            bar.update(len(chunk))


# ------------------------------------------------------------------------------------------------ unzipping


def member_name(name: str, folder: str, zip_path: Path) -> str | None:
    """Where a member goes inside the zip's folder: the authors' zips hold `x.tsv` or `<folder>/x.tsv`."""
    parts = PurePosixPath(name).parts
    if not parts or parts[0] == "__MACOSX":
        return None
    if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
        raise DownloadError(zip_path, f"member {name!r} would land outside its folder")
    if len(parts) > 1 and parts[0] == folder:
        parts = parts[1:]
    return "/".join(parts)


def unzip(zip_path: Path) -> None:
    """Every member into the zip's folder through a temporary folder, `.<zip>.done` last, then the zip removed."""
    folder = zip_path.parent
    tmp = folder / f".{zip_path.name}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with zipfile.ZipFile(zip_path) as z:
            members = []
            for info in z.infolist():
                name = None if info.is_dir() else member_name(info.filename, folder.name, zip_path)
                if name:
                    members.append((info, name))
            size = sum(info.file_size for info, _ in members)
            free = shutil.disk_usage(folder).free
            if size > free:
                raise DownloadError(zip_path, f"unzipping needs {size} bytes, {free} free")
            with tqdm(
                total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"unzip {zip_path.name}", disable=None
            ) as bar:
                for info, name in members:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(tmp / name, "wb") as dst:
                        while chunk := src.read(CHUNK):
                            dst.write(chunk)
                            bar.update(len(chunk))
                        dst.flush()
                        os.fsync(dst.fileno())
        for _, name in members:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, folder / name)
        fsync_dir(folder)
        files = {name: info.file_size for info, name in members}
        write_text_atomic(done_marker(zip_path), json.dumps({"zip": zip_path.name, "files": files}, indent=1) + "\n")
        zip_path.unlink()
        logger.info(f"unzipped {zip_path}: {', '.join(files) or 'nothing'}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise DownloadError(zip_path, f"cannot unzip ({error}); remove it to download it again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- NLVR2


def nlvr2_split(item: Nlvr2Split, out: Path) -> None:
    """lil-lab's JSON lines as the authors' list: identifier, img0 / img1 (the pair's images), label 0 / 1, sent,
    uid nlvr2_<split>_<line>."""
    source = under(out, item.source)
    records = []
    with open(source, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                datum = json.loads(line)
                identifier, label, sentence = datum["identifier"], datum["label"], datum["sentence"]
            except (ValueError, KeyError, TypeError) as error:
                raise DownloadError(source, f"line {i + 1}: not an NLVR2 statement ({error!r})") from None
            if label not in ("True", "False") or not isinstance(identifier, str) or identifier.count("-") < 1:
                raise DownloadError(source, f"line {i + 1}: label {label!r}, identifier {identifier!r}")
            stem = identifier.rsplit("-", 1)[0]
            records.append(
                {
                    "identifier": identifier,
                    "img0": f"{stem}-img0",
                    "img1": f"{stem}-img1",
                    "label": int(label == "True"),
                    "sent": sentence,
                    "uid": f"nlvr2_{item.split}_{i}",
                }
            )
    dest = final_path(item, out)
    write_text_atomic(dest, json.dumps(records, sort_keys=True, indent=4))
    logger.info(f"wrote {dest}: {len(records)} statements from {source}")


# ----------------------------------------------------------------------------------------------------- CLI


def fetch(item: Remote | Nlvr2Split, out: Path, mirror: str | None) -> None:
    final = final_path(item, out)
    if isinstance(item, Nlvr2Split):
        return nlvr2_split(item, out)
    if not (item.zipped and final.is_file()):  # a zip already in place was checked before its rename
        url = source_url(item, mirror)
        logger.info(f"downloading {url} -> {final}")
        download(item, url, final)
    if item.zipped:
        unzip(final)


def size_text(item: Remote | Nlvr2Split) -> str:
    if isinstance(item, Nlvr2Split):
        return f"made from {item.source}"
    if item.size is not None:
        return f"{item.size} bytes, git blob {item.git_blob}"
    if item.git_blob:
        return f"size not published here, git blob {item.git_blob}"
    return (item.stated or "size not published") + ("; unzipped into its folder" if item.zipped else "")


def listing(out: Path, mirror: str | None) -> str:
    lines = []
    for group, items in GROUPS.items():
        lines.append(f"{group}: {ABOUT[group]}")
        for item in items:
            where = "" if isinstance(item, Nlvr2Split) else f" <- {source_url(item, mirror)}"
            lines.append(f"  {final_path(item, out)}{where} ({size_text(item)})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog="groups: " + "; ".join(f"{g}: {a}" for g, a in ABOUT.items()) + ". Exit status 0 done, 2 an error.",
    )
    parser.add_argument("groups", nargs="*", metavar="GROUP", help=", ".join(GROUPS))
    parser.add_argument(
        "--out", default="data", help="the data/ folder (default: data; the model goes to snap/pretrained/ beside it)"
    )
    parser.add_argument("--mirror", metavar="URL", help="a base URL holding the same relative paths (see --list)")
    parser.add_argument("--list", action="store_true", help="print the groups, their files and sizes, and exit")
    args = parser.parse_args(argv)
    if not args.groups and not args.list:
        parser.error("name a GROUP (or --list)")
    unknown = [g for g in args.groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group {unknown[0]!r} (choose from {', '.join(GROUPS)})")
    if args.mirror and not args.mirror.endswith("/"):
        args.mirror += "/"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(rank=0)  # the progress lines (one process); the groups' lines and errors are its output
    out = Path(args.out)
    if args.list:
        print(listing(out, args.mirror))
        return 0
    try:
        for group in dict.fromkeys(args.groups):
            fetched = 0
            for item in GROUPS[group]:
                if is_done(item, out):  # a file of an earlier group too
                    continue
                fetch(item, out, args.mirror)
                fetched += 1
            print(f"{group}: {'done' if fetched else 'already downloaded'} ({len(GROUPS[group])} files)", flush=True)
    except DownloadError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2
    except OSError as error:  # the disk's side: an unwritable --out, a full disk
        where = getattr(error, "filename", None) or out
        print(f"{PROG}: error: {where}: {error.strerror or error}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (^C); a rerun resumes", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
