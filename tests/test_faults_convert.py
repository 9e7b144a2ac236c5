"""The converter under kill -9 and bad files: `python -m engine.data.convert` killed with SIGKILL at seeded
points (rows, chunk appends and commits, atomic writes, inside finish, around the rename) and at seeded random
times, then rerun until it completes, must leave exactly the store an uninterrupted run writes, byte for byte,
and nothing beside it. Truncated inputs give an error naming the file and row, or are skipped and counted.

The exact points are engine.atomic.kill_point hooks, armed by LXMERT_KILL_AT=name:N in the child's environment
only. LXMERT_FAULT_SEED=k reruns the schedule of seed k (every assertion message prints its seed). A --tsv run
does not import torch, so a child starts in well under a second: the file takes about half a minute.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.atomic import KILL_AT
from engine.data import convert, synthetic
from engine.data.store import RegionStore, TextStore

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("LXMERT_FAULT_SEED", "14"))
D, CHUNK = 8, 3  # 27 + 3 good images in chunks of 3: every file ends on a chunk boundary
# points of an uninterrupted --tsv run -> how often it passes them: 12 commits (9 + 1 of the train file, 1 + 1 of
# the mixed one), 9 arrays each; 15 atomic writes (progress.json at the start and per commit, img_ids.json,
# meta.json); a header for each of the 9 files
POINTS = {
    "convert.row": 30,
    "store.append": 108,
    "store.commit": 12,
    "atomic.replace": 15,
    "finish.header": 9,
    "finish.sealed": 1,
    "install.cleaned": 1,
    "install.renamed": 1,
}


def cli(args: list[str], kill: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != KILL_AT}
    if kill is not None:
        env[KILL_AT] = kill
    command = [sys.executable, "-m", "engine.data.convert", *args, "--quiet"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def store_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def assert_same_store(out: Path, reference: Path, note: str) -> None:
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name], f"{note}: left beside the store"
    got, want = store_bytes(out), store_bytes(reference)
    assert got.keys() == want.keys(), f"{note}: files {sorted(got)} != {sorted(want)}"
    differ = [name for name in got if got[name] != want[name]]
    assert not differ, f"{note}: {differ} differ from an uninterrupted conversion"


def random_kill(rng: np.random.Generator, points: dict[str, int] = POINTS) -> str:
    name = str(rng.choice(sorted(points)))
    return f"{name}:{rng.integers(1, points[name] + 1)}"


def until_complete(
    args: list[str], kills: list[str], note: str, first_hits: bool = True
) -> list[tuple[str | None, int]]:
    """Run the command with each kill in turn (a run the kill does not reach completes), then without: every
    run must be killed or complete; the first must be killed (first_hits). Returns (kill, exit status) of each."""
    history: list[tuple[str | None, int]] = []
    for kill in [*kills, None]:
        result = cli(args, kill)
        history.append((kill, result.returncode))
        if result.returncode == -signal.SIGKILL:
            continue
        done = result.returncode == 0 or (result.returncode == 2 and "already exists" in result.stderr)
        assert done, f"{note}: runs {history}: {result.stderr}"
        break
    assert not first_hits or history[0][1] == -signal.SIGKILL, (
        f"{note}: the first kill ({kills[0]}) was not reached: {history}"
    )
    assert history[-1][1] != -signal.SIGKILL, f"{note}: never completed: {history}"
    return history


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Synthetic TSVs (the minival one with a garbage row and a row cut short, skipped by --skip-bad-rows), the
    command, and its uninterrupted store."""
    root = tmp_path_factory.mktemp("faults")
    synthetic.generate(root / "syn", 30, feat_dim=D, seed=4, captions_per_image=1, questions_per_image=1)
    train, val = root / "syn/mscoco_imgfeat/train2014_obj36.tsv", root / "syn/mscoco_imgfeat/val2014_obj36.tsv"
    lines = val.read_bytes().splitlines(keepends=True)
    mixed = root / "mixed.tsv"
    mixed.write_bytes(lines[0] + b"garbage\trow\n" + lines[1][: len(lines[1]) // 2] + b"\n" + lines[1] + lines[2])
    args = ["--tsv", str(train), str(mixed), "--feat-dim", str(D), "--chunk-images", str(CHUNK), "--skip-bad-rows"]
    assert convert.main([*args, "--out", str(root / "reference/feats"), "--quiet"]) == 0
    reference = root / "reference/feats"
    meta = RegionStore(reference).meta
    assert (meta["n_images"], meta["stats"]["bad_rows"]) == (30, 2)
    return {"root": root, "syn": root / "syn", "args": args, "reference": reference, "train": train}


def kill_schedules() -> list[tuple[int, str]]:
    """(case, first kill): each point once, the frequent ones twice, at seeded passes."""
    rng = np.random.default_rng(SEED)
    names = [*sorted(POINTS), "convert.row", "store.append"]
    return [(case, f"{name}:{rng.integers(1, POINTS[name] + 1)}") for case, name in enumerate(names)]


@pytest.mark.parametrize("case, first", kill_schedules())
def test_killed_at_a_point_then_rerun(data: dict, tmp_path: Path, case: int, first: str) -> None:
    rng = np.random.default_rng([SEED, case])
    kills = [first] + [random_kill(rng) for _ in range(rng.integers(0, 3))]  # a rerun may be killed too
    out = tmp_path / "feats"
    note = f"seed {SEED} case {case}, kills {kills}"
    until_complete([*data["args"], "--out", str(out)], kills, note)
    assert_same_store(out, data["reference"], note)
    RegionStore(out).verify()


@pytest.mark.parametrize("case", range(2))
def test_killed_at_a_random_time_then_rerun(data: dict, tmp_path: Path, case: int) -> None:
    rng = np.random.default_rng([SEED, 100 + case])
    out = tmp_path / "feats"
    args = [*data["args"], "--out", str(out), "--quiet"]
    delays = []
    for _ in range(3):
        delays.append(float(rng.uniform(0.2, 1.0)))  # the start (imports) takes about 0.3 s, a run about 0.6 s
        child = subprocess.Popen(
            [sys.executable, "-m", "engine.data.convert", *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(delays[-1])
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=60)
        note = f"seed {SEED} timed case {case}, kills after {delays} s"
        assert child.returncode in (0, -signal.SIGKILL) or "already exists" in err, f"{note}: {err}"
    result = cli(args[:-1])
    assert result.returncode == 0 or "already exists" in result.stderr, f"{note}: {result.stderr}"
    assert_same_store(out, data["reference"], note)


SWAP_POINTS = ("store.commit", "finish.sealed", "install.cleaned", "install.swapped", "install.renamed")


@pytest.mark.parametrize("point", SWAP_POINTS)
def test_killed_while_replacing_a_store(data: dict, tmp_path: Path, point: str) -> None:
    """--overwrite of an existing store: a kill before, during or after the swap never loses both stores, and
    the rerun ends with the new one alone."""
    out = tmp_path / "feats"
    assert convert.main(["--tsv", str(data["train"]), "--feat-dim", str(D), "--out", str(out), "--quiet"]) == 0
    old = store_bytes(out)
    rng = np.random.default_rng([SEED, 300 + SWAP_POINTS.index(point)])
    kill = f"{point}:{rng.integers(1, POINTS.get(point, 1) + 1)}"
    args = [*data["args"], "--out", str(out), "--overwrite"]
    note = f"seed {SEED} overwrite, kill {kill}"
    assert cli(args, kill).returncode == -signal.SIGKILL, note
    if point == "install.swapped":  # the old store is aside: another command puts it back, replaces nothing
        other = cli(["--tsv", str(data["train"]), "--feat-dim", str(D), "--fp32", "--out", str(out)])
        assert other.returncode == 2 and "already exists" in other.stderr, f"{note}: {other.stderr}"
        assert store_bytes(out) == old, note
    elif out.exists():
        assert store_bytes(out) in (old, store_bytes(data["reference"])), f"{note}: a store of neither build"
    if rng.random() < 0.5:
        until_complete(args, [random_kill(rng)], note, first_hits=False)  # the rerun may be killed too
    else:
        assert cli(args).returncode == 0, note
    assert_same_store(out, data["reference"], note)


def test_text_store_killed_in_the_records_and_after_sealing(data: dict, tmp_path: Path) -> None:
    """The sentence skeleton (engine/data/build.py) under kills; the run after a kill past meta.json installs
    the sealed store without converting anything again (everything is `resumed_at`)."""
    syn, features = data["syn"], data["reference"]
    texts = [str(syn / "lxmert/mscoco_train.json"), str(syn / "lxmert/mscoco_minival.json")]
    args = [
        "--text",
        *texts,
        "--features",
        str(features),
        "--answers",
        str(syn / "lxmert/all_ans.json"),
        "--chunk-sentences",
        "10",
    ]
    reference = tmp_path / "reference/text"
    assert convert.main([*args, "--out", str(reference), "--quiet"]) == 0
    out = tmp_path / "run/text"
    rng = np.random.default_rng([SEED, 200])
    kills = [f"build.record:{rng.integers(1, 28)}", "finish.sealed:1"]
    note = f"seed {SEED} text, kills {kills}"
    for kill in kills:
        assert cli([*args, "--out", str(out)], kill).returncode == -signal.SIGKILL, note
    result = cli([*args, "--out", str(out)])
    assert result.returncode == 0, f"{note}: {result.stderr}"
    n = len(TextStore(reference))
    assert f"sentences {n}," in result.stdout and f"resumed_at {n}" in result.stdout, f"{note}: {result.stdout}"
    assert_same_store(out, reference, note)


# ------------------------------------------------------------------------------------------ truncated input


def test_a_tsv_cut_mid_row(data: dict, tmp_path: Path) -> None:
    lines = data["train"].read_bytes().splitlines(keepends=True)
    cut = tmp_path / "cut.tsv"
    cut.write_bytes(b"".join(lines[:5]) + lines[5][: len(lines[5]) * 2 // 3])  # the download stopped in row 6
    args = ["--tsv", str(cut), "--feat-dim", str(D)]
    result = cli([*args, "--out", str(tmp_path / "a")])
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {cut}, row 6: ") and "(truncated row?)" in result.stderr
    assert not (tmp_path / "a").exists()
    result = cli([*args, "--out", str(tmp_path / "b"), "--skip-bad-rows"])
    assert result.returncode == 0 and "images 5, bad_rows 1" in result.stdout, result.stderr
    assert f"skipped: {cut}, row 6: " in result.stderr
    assert RegionStore(tmp_path / "b").img_ids == [line.split(b"\t")[0].decode() for line in lines[:5]]


def test_a_text_file_cut_mid_record(data: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (data["syn"] / "lxmert/mscoco_minival.json").read_bytes()
    cut = tmp_path / "cut.json"
    cut.write_bytes(text[: len(text) // 2])
    args = [
        "--text",
        str(cut),
        "--features",
        str(data["reference"]),
        "--answers",
        str(data["syn"] / "lxmert/all_ans.json"),
        "--quiet",
    ]
    for skip in ([], ["--skip-bad-rows"]):  # a cut file is not a bad record: skipping cannot mend it
        assert convert.main([*args, *skip, "--out", str(tmp_path / "t")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {cut}, record ") and "(truncated file?)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "t").exists()
