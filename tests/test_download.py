"""lxmert-download against a local server (127.0.0.1, Range requests honoured) that holds tiny stand-ins for the
authors' files at their relative paths, through --mirror: the layout and bytes, unzipping, NLVR2's JSONs in the
authors' format, resume after a lost connection, a 200 to a range request, the one-line errors."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import free_port

from engine import download
from engine.download import GROUPS, Nlvr2Split, Remote

REPO = Path(__file__).resolve().parents[1]


class Server:
    """Files by relative path. `drop[path] = n`: the next GET of path sends its headers and n bytes, then closes
    the connection; `trickle[path] = n`: every GET of path sends n bytes every 20 ms; `ignore_range`: every GET
    is a whole-file 200."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.drop, self.trickle, self.ignore_range = files, {}, {}, False
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, wanted = self.path.lstrip("/"), self.headers.get("Range")
                server.requests.append((path, wanted))
                data = server.files.get(path)
                if data is None:
                    self.send_error(404)
                    return
                start, status = 0, 200
                if wanted and not server.ignore_range:
                    start, status = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1]), 206
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = body[: server.drop.pop(path, len(body))]
                piece = server.trickle.get(path, len(body))
                try:
                    for i in range(0, len(body), piece):
                        self.wfile.write(body[i : i + piece])
                        self.wfile.flush()
                        if piece < len(body):
                            time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):  # the client was killed
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def tsv_zip(member: str, text: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, text)
    return buf.getvalue()


def nlvr_lines(split: str) -> bytes:
    rows = [
        {"identifier": f"{split}-10-2-0", "label": "True", "sentence": "Two dogs.", "writer": "1"},
        {"identifier": f"{split}-10-2-1", "label": "False", "sentence": "No dogs.", "writer": "2"},
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def stand_in(path: str) -> bytes:
    """A tiny file for one of the authors' paths: a JSON, a zip of a TSV (with and without the folder in the
    member's name, as the authors' zips differ), lil-lab's JSON lines, a weights file."""
    if path.endswith(".zip"):
        folder, name = path.split("/")
        tsv = name.replace(".zip", ".tsv")
        member = f"{folder}/{tsv}" if name.startswith(("val", "gqa")) else tsv
        return tsv_zip(member, f"img_id\t{name}\n" * 50)
    if path.startswith("nlvr2/nlvr/"):
        return nlvr_lines("dev" if path.endswith("dev.json") else "train")
    if path.endswith(".json"):
        return json.dumps([{"file": path, "pad": "x" * 300}]).encode()
    return bytes(range(256)) * 64  # model_LXRT.pth


def remotes() -> Iterator[Remote]:
    yield from dict.fromkeys(item for items in GROUPS.values() for item in items if isinstance(item, Remote))


@pytest.fixture
def served(monkeypatch) -> Iterator[Server]:
    """The server with a stand-in at every relative path, and the catalogue's published sizes and blob ids
    replaced by the stand-ins' (None stays None: those files are checked by Content-Length alone)."""
    files = {r.path: stand_in(r.path) for r in remotes()}
    fitted = {
        r: dataclasses.replace(
            r,
            size=None if r.size is None else len(files[r.path]),
            git_blob=None if r.git_blob is None else blob_id(files[r.path]),
        )
        for r in remotes()
    }
    groups = {g: tuple(fitted.get(i, i) for i in items) for g, items in GROUPS.items()}
    monkeypatch.setattr(download, "GROUPS", groups)
    server = Server(files)
    yield server
    server.close()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = download.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".part", ".tmp", ".extracting"))]


def test_list_needs_no_network(capsys):
    status, out, _ = run(capsys, "--list", "--out", "d")
    assert status == 0
    assert "d/lxmert/mscoco_train.json <- https://nlp.cs.unc.edu/data/lxmert_data/lxmert/mscoco_train.json" in out
    assert "snap/pretrained/model_LXRT.pth <- https://nlp.cs.unc.edu/data/model_LXRT.pth (870 MB)" in out
    assert "mscoco_imgfeat/train2014_obj36.zip (17 GB; unzipped into its folder)" in out
    assert all(f"{group}: " in out for group in GROUPS)


def test_vqa_in_the_authors_layout_and_a_rerun_is_done(served, tmp_path, capsys):
    out = tmp_path / "data"
    status, stdout, err = run(capsys, "vqa", "--out", out, "--mirror", served.url)
    assert status == 0, err
    for name in ("vqa/train.json", "vqa/nominival.json", "vqa/minival.json", "vqa/trainval_ans2label.json"):
        assert (out / name).read_bytes() == served.files[name]
    assert (out / "lxmert/all_ans.json").read_bytes() == served.files["lxmert/all_ans.json"]
    # both zips' TSVs land in the folder, whether the member's name holds the folder or not; the zips are gone
    for split in ("train2014", "val2014"):
        assert (out / f"mscoco_imgfeat/{split}_obj36.tsv").read_text() == f"img_id\t{split}_obj36.zip\n" * 50
        assert not (out / f"mscoco_imgfeat/{split}_obj36.zip").exists()
    assert sorted(p.name for p in (out / "mscoco_imgfeat").iterdir() if not p.name.startswith(".")) == [
        "train2014_obj36.tsv",
        "val2014_obj36.tsv",
    ]
    assert not leftovers(tmp_path)
    assert stdout.rstrip().endswith("vqa: done (7 files)")

    asked = len(served.requests)
    status, stdout, err = run(capsys, "vqa", "coco-features", "--out", out, "--mirror", served.url)
    assert (status, err) == (0, "")
    assert stdout.splitlines() == ["vqa: already downloaded (7 files)", "coco-features: already downloaded (2 files)"]
    assert len(served.requests) == asked  # nothing asked of the server


def test_model_beside_out_and_nlvr2_in_the_authors_format(served, tmp_path, capsys):
    out = tmp_path / "data"
    status, _, err = run(capsys, "model", "nlvr2", "--out", out, "--mirror", served.url)
    assert status == 0, err
    assert (tmp_path / "snap/pretrained/model_LXRT.pth").read_bytes() == served.files["model_LXRT.pth"]
    raw = out / "nlvr2/nlvr/nlvr2/data/dev.json"
    assert raw.read_bytes() == served.files["nlvr2/nlvr/nlvr2/data/dev.json"]
    valid = json.loads((out / "nlvr2/valid.json").read_text())
    assert valid == [
        {"identifier": "dev-10-2-0", "img0": "dev-10-2-img0", "img1": "dev-10-2-img1", "label": 1, "sent": "Two dogs.",
         "uid": "nlvr2_valid_0"},
        {"identifier": "dev-10-2-1", "img0": "dev-10-2-img0", "img1": "dev-10-2-img1", "label": 0, "sent": "No dogs.",
         "uid": "nlvr2_valid_1"},
    ]  # fmt: skip
    assert json.loads((out / "nlvr2/train.json").read_text())[1]["uid"] == "nlvr2_train_1"
    assert (out / "nlvr2_imgfeat/valid_obj36.tsv").is_file() and (out / "nlvr2_imgfeat/train_obj36.tsv").is_file()
    # the converter reads what was written
    from engine.data.formats import read_nlvr2

    assert [x.img1 for x in read_nlvr2(out / "nlvr2/valid.json")] == ["dev-10-2-img1"] * 2


def test_a_lost_connection_is_one_line_and_the_rerun_resumes_with_range(served, tmp_path, capsys):
    out, path = tmp_path / "data", "model_LXRT.pth"
    final, part = tmp_path / "snap/pretrained/model_LXRT.pth", tmp_path / "snap/pretrained/model_LXRT.pth.part"
    served.drop[path] = 5000
    status, _, err = run(capsys, "model", "--out", out, "--mirror", served.url)
    assert status == 2
    assert err == f"lxmert-download: error: {served.url}{path}: the connection closed after 5000 of 16384 bytes; " + (
        "model_LXRT.pth.part kept for a rerun\n"
    )
    assert not final.exists() and part.read_bytes() == served.files[path][:5000]

    status, stdout, err = run(capsys, "model", "--out", out, "--mirror", served.url)
    assert status == 0, err
    assert (path, "bytes=5000-") in served.requests
    assert f"resuming {served.url}{path} at byte 5000" in stdout
    assert final.read_bytes() == served.files[path] and not part.exists()


def test_a_download_killed_midway_resumes_to_the_same_bytes(served, tmp_path, capsys):
    """SIGKILL while the server trickles model_LXRT.pth (its catalogue entry has no size: the unpatched catalogue
    of the subprocess takes the stand-in), then a rerun asks for the rest."""
    path, part = "model_LXRT.pth", tmp_path / "snap/pretrained/model_LXRT.pth.part"
    served.trickle[path] = 256
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.download", "model", "--out", str(tmp_path / "data"), "--mirror", served.url],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not (part.is_file() and part.stat().st_size >= 2048) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kept = part.stat().st_size
    assert 2048 <= kept < len(served.files[path]) and part.read_bytes() == served.files[path][:kept]
    served.trickle.clear()
    status, _, err = run(capsys, "model", "--out", tmp_path / "data", "--mirror", served.url)
    assert status == 0, err
    assert (path, f"bytes={kept}-") in served.requests
    assert (tmp_path / "snap/pretrained/model_LXRT.pth").read_bytes() == served.files[path] and not part.exists()


def test_a_200_to_a_range_request_starts_over_and_a_complete_part_is_kept(served, tmp_path, capsys):
    out = tmp_path / "data"
    part = out / "vqa/train.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"junk that is not the file")
    served.ignore_range = True
    status, stdout, err = run(capsys, "vqa", "--out", out, "--mirror", served.url)
    assert status == 0, err
    assert "the server ignored the range request: starting over" in stdout
    assert (out / "vqa/train.json").read_bytes() == served.files["vqa/train.json"]

    # a part holding every byte (killed before its rename): the server's 416 ends it, nothing is sent again
    served.ignore_range = False
    part = out / "lxmert/mscoco_train.json.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(served.files["lxmert/mscoco_train.json"])
    status, _, err = run(capsys, "pretrain", "--out", out, "--mirror", served.url)
    assert status == 0, err
    assert (out / "lxmert/mscoco_train.json").read_bytes() == served.files["lxmert/mscoco_train.json"]
    size = len(served.files["lxmert/mscoco_train.json"])
    assert served.requests.count(("lxmert/mscoco_train.json", f"bytes={size}-")) == 1
    assert [p for p, _ in served.requests].count("lxmert/mscoco_train.json") == 1
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("what", ["size", "checksum"])
def test_a_mismatch_is_one_line_and_nothing_at_the_final_path(served, tmp_path, capsys, monkeypatch, what):
    ans = next(r for r in download.GROUPS["pretrain"] if r.path == "lxmert/all_ans.json")  # fitted to the stand-in
    bad = dataclasses.replace(ans, **({"size": 7} if what == "size" else {"git_blob": "0" * 40}))
    monkeypatch.setattr(download, "GROUPS", {"pretrain": (bad,)})
    out = tmp_path / "data"
    status, _, err = run(capsys, "pretrain", "--out", out, "--mirror", served.url)
    assert status == 2 and err.count("\n") == 1
    url = f"{served.url}lxmert/all_ans.json"
    if what == "size":
        n = len(served.files["lxmert/all_ans.json"])
        assert err == f"lxmert-download: error: {url}: size mismatch: the server has {n} bytes, 7 published\n"
    else:
        blob = blob_id(served.files["lxmert/all_ans.json"])
        assert err == (
            f"lxmert-download: error: {url}: checksum mismatch: git blob {blob}, {'0' * 40} published; "
            "removed the download\n"
        )
    assert not (out / "lxmert/all_ans.json").exists() and not leftovers(tmp_path)


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.download", *argv], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_a_404_is_one_line_and_exit_2(tmp_path):
    server = Server({})
    try:
        proc = cli("pretrain", "--out", str(tmp_path / "data"), "--mirror", server.url)
    finally:
        server.close()
    url = f"{server.url}lxmert/mscoco_train.json"
    assert (proc.returncode, proc.stderr) == (2, f"lxmert-download: error: {url}: HTTP 404 Not Found\n")
    assert not any((tmp_path / "data").rglob("*.json*"))


def test_a_refused_connection_is_one_line_and_exit_2(tmp_path):
    mirror = f"http://127.0.0.1:{free_port()}"  # no trailing slash: one is added
    proc = cli("model", "--out", str(tmp_path / "data"), "--mirror", mirror)
    assert proc.returncode == 2
    assert proc.stderr == f"lxmert-download: error: {mirror}/model_LXRT.pth: connection refused\n"
    assert not any(tmp_path.rglob("model_LXRT.pth*"))


def test_a_zip_member_outside_its_folder_is_refused(served, tmp_path, capsys):
    served.files["mscoco_imgfeat/val2014_obj36.zip"] = tsv_zip("../escape.tsv", "x")
    status, _, err = run(capsys, "coco-features", "--out", tmp_path / "data", "--mirror", served.url)
    assert status == 2 and err.count("\n") == 1 and "would land outside its folder" in err
    assert not (tmp_path / "escape.tsv").exists() and not (tmp_path / "data/escape.tsv").exists()


def test_every_item_is_a_remote_or_a_split_of_one():
    paths = {r.path for r in remotes()}
    for items in GROUPS.values():
        for item in items:
            assert isinstance(item, Remote) or (isinstance(item, Nlvr2Split) and item.source in paths)
