"""Checkpoints across Python interpreters (issue 19, item 8).

Debian 12's Python 3.11.2 pickles an enum member by name, getattr(ZeroStageEnum, 'gradients'); 3.11.7, 3.12 and 3.13
by value. DeepSpeed's optimizer files hold its ZeroStageEnum, so under 3.11.2 every resume was refused ("it names
getattr, which is not on the allow-list"). The loader now takes getattr as engine.checkpoint.enum_member_by_name:

- a crafted pickle with an allow-listed enum's member by name loads (to that very member);
- getattr of an allow-listed class that is not an enum, of an enum off the allow-list, of an object that is not a
  class, or of a name that is not a member, is refused, naming it, and nothing runs;
- with LXMERT_OTHER_PYTHON set (CI: the suite under the machine's system python3, the other one the main
  environment's), a DeepSpeed run written by that interpreter resumes under this one with its losses.

Marked `interpreters` (pyproject.toml), with the other checkpoint and resume tests CI runs under the second interpreter
(tests/test_faults_checkpoint.py's DeepSpeed ones and a plain one, two cases of tests/test_elastic_resume.py): about
a minute on 2 idle cores.
"""

from __future__ import annotations

import enum
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import checkpoint as ckpt
from engine.launch import deepspeed_available

pytestmark = [
    pytest.mark.interpreters,
    pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed"),
]

REPO = Path(__file__).resolve().parents[1]
OTHER_PYTHON = os.environ.get("LXMERT_OTHER_PYTHON")


class ByName:
    """Pickles as getattr(cls, name): what Python 3.11.2 writes for an enum member."""

    def __init__(self, cls, name) -> None:
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


class Colour(enum.Enum):  # an enum the allow-list does not name
    RED = 1


def write(path: Path, value) -> Path:
    torch.save({"optimizer_state_dict": {"zero_stage": value, "loss_scaler": None}}, path)
    return path


def test_an_enum_member_pickled_by_name_loads_as_that_member(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    loaded = ckpt.load_deepspeed_file(write(tmp_path / "optim.pt", ByName(ZeroStageEnum, "gradients")))
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    # and by value, as other Pythons write it
    loaded = ckpt.load_deepspeed_file(write(tmp_path / "by_value.pt", ZeroStageEnum.weights))
    assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.weights


def refused_getattrs():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [
        (LossScaler, "__init__", "getattr(deepspeed.runtime.fp16.loss_scaler.LossScaler, '__init__')"),  # not an enum
        (ZeroStageEnum, "_missing_", "getattr(deepspeed.runtime.zero.config.ZeroStageEnum, '_missing_')"),  # no member
        (ZeroStageEnum, "__class__", "getattr(deepspeed.runtime.zero.config.ZeroStageEnum, '__class__')"),
        (ZeroStageEnum, 2, "getattr(deepspeed.runtime.zero.config.ZeroStageEnum, 2)"),
        ("a string", "upper", "getattr(a str, 'upper')"),  # not a class
        ({"a": 1}, "update", "getattr(a dict, 'update')"),
        (Colour, "RED", f"{__name__}.Colour"),  # an enum off the allow-list: its own name is refused first
    ]


@pytest.mark.parametrize("index", range(7))
def test_getattr_beyond_an_allow_listed_enums_members_is_refused(tmp_path, index):
    cls, name, named = refused_getattrs()[index]
    path = write(tmp_path / "optim.pt", ByName(cls, name))
    with pytest.raises(ckpt.CheckpointError) as refused:
        ckpt.load_deepspeed_file(path)
    assert str(refused.value) == (
        f"{path}: refused: it names {named}, which is not on the allow-list of what a "
        "checkpoint may hold (loading it could run code)"
    )


def test_getattr_stays_refused_outside_the_checkpoint_loader(tmp_path):
    """The narrow getattr is the loader's, for the duration of one load: torch's own weights_only load refuses it."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = write(tmp_path / "optim.pt", ByName(ZeroStageEnum, "gradients"))
    ckpt.load_deepspeed_file(path)
    with pytest.raises(pickle.UnpicklingError, match="GLOBAL getattr was not an allowed global"):
        torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------------- across interpreters


def run(python: str, args: list[str], log: Path) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PYTHONHOME", "VIRTUAL_ENV")
    }
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    with open(log, "w") as f:
        return subprocess.run(
            [python, "-m", "engine.pretrain", *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=300
        )


def train_records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind", "train") == "train"]


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_PYTHON, reason="LXMERT_OTHER_PYTHON (a second interpreter) is not set")
def test_a_deepspeed_checkpoint_written_under_another_python_resumes_under_this_one(tmp_path):
    from conftest import build_pretrain_stores
    from test_faults_checkpoint import overrides

    stores = build_pretrain_stores(tmp_path / "data", 16)
    version = subprocess.run(
        [OTHER_PYTHON, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    written = tmp_path / "written"
    args = ["train.zero_stage=2", "train.max_steps=4"]
    proc = run(OTHER_PYTHON, overrides(stores, written, *args), tmp_path / "written.log")
    log = (tmp_path / "written.log").read_text()
    assert len(train_records(written)) == 4, f"Python {version}: exit {proc.returncode}\n{log[-3000:]}"
    # the run as it stood after its step-2 checkpoint, resumed here
    out = tmp_path / "resumed"
    shutil.copytree(ckpt.checkpoint_root(written) / ckpt.tag_of(2), ckpt.checkpoint_root(out) / ckpt.tag_of(2))
    proc = run(sys.executable, overrides(stores, out, *args), tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert f"resumed from {ckpt.checkpoint_root(out) / ckpt.tag_of(2)} at step 2" in log, log[-3000:]
    got, expected = train_records(out), train_records(written)[2:]
    assert [r["step"] for r in got] == [3, 4], log[-3000:]
    for g, e in zip(got, expected):  # another Python, the same torch: the same numbers up to rounding
        assert abs(g["loss"] - e["loss"]) <= 1e-5 * max(1.0, abs(e["loss"])), (version, got, expected)
