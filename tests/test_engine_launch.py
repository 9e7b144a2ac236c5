"""engine/launch.py: ranks and threads from the launcher's environment, DeepSpeed found without importing it, the
first-build notice, and every ZeRO stage as one process without a launcher (the README's "one process" line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_pretrain_stores, tiny_model_overrides

from engine import launch
from engine.config import load_config
from engine.launch import Launch, deepspeed_available, default_threads, set_threads
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launcher(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)


def test_launch_reads_deepspeed_and_torchrun_variables(monkeypatch, no_launcher):
    assert Launch.from_env() == Launch(0, 0, 1, 1, False)
    # the deepspeed launcher: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE
    for key, value in {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    assert Launch.from_env() == Launch(5, 1, 8, 4, True)
    # torchrun: LOCAL_WORLD_SIZE, which wins over LOCAL_SIZE
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert Launch.from_env().local_world_size == 2


def test_default_threads_share_the_cores_among_the_local_ranks(monkeypatch):
    monkeypatch.setattr(launch, "available_cores", lambda: 16)
    assert default_threads(Launch(local_world_size=1)) == 16
    assert default_threads(Launch(world_size=8, local_world_size=4)) == 4
    assert default_threads(Launch(world_size=64, local_world_size=32)) == 1  # never 0


def test_set_threads_honours_the_knob_then_the_environment_then_the_default(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(launch, "available_cores", lambda: 6)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(0, Launch(world_size=2, local_world_size=2)) == 3  # 6 cores / 2 ranks
        assert set_threads(2, Launch(world_size=2, local_world_size=2)) == 2  # train.threads
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_threads(0, Launch(world_size=2, local_world_size=2)) == 1  # the user's OMP_NUM_THREADS is kept
    finally:
        torch.set_num_threads(before)


def test_deepspeed_is_found_without_being_imported():
    code = "import sys; from engine.launch import deepspeed_available; print(deepspeed_available(), 'deepspeed' in sys.modules)"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == [str(deepspeed_available()), "False"]


def test_deepspeeds_cpu_shared_memory_comm_op_stays_off(monkeypatch, no_launcher):
    """It serves only inference_all_reduce, JIT-builds under a lock a killed build leaves behind, and leaks
    /dev/shm (engine/launch.py); on the CPU the process group goes without it, on CUDA nothing is touched."""

    class FakeDeepSpeed:
        calls = []

        class ops:
            __compatible_ops__ = {"deepspeed_shm_comm": True, "fused_adam": True}

        @classmethod
        def init_distributed(cls, **kwargs):
            cls.calls.append((kwargs, dict(cls.ops.__compatible_ops__)))

    monkeypatch.setattr(launch, "import_deepspeed", lambda: FakeDeepSpeed)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # no real process group here
    launch.init_distributed(torch.device("cpu"), Launch())
    assert FakeDeepSpeed.calls == [
        ({"dist_backend": "gloo", "verbose": False}, {"deepspeed_shm_comm": False, "fused_adam": True})
    ]
    assert os.environ["LOCAL_RANK"] == "0"  # deepspeed.initialize insists on it
    FakeDeepSpeed.ops.__compatible_ops__["deepspeed_shm_comm"] = True
    launch.init_distributed(torch.device("cuda", 0), Launch())
    assert FakeDeepSpeed.calls[-1] == (
        {"dist_backend": "nccl", "verbose": False},
        {"deepspeed_shm_comm": True, "fused_adam": True},
    )
    monkeypatch.delenv("LOCAL_RANK")


# -------------------------------------------------------------------- one process, every ZeRO stage, no launcher

D = 16


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return build_pretrain_stores(tmp_path_factory.mktemp("launch_stores"), D)


def run_overrides(stores, out: Path, *extra: str) -> list[str]:
    text, feats = stores
    return [
        *tiny_model_overrides(text, D),
        "model.hidden_dropout_prob=0.0",
        "model.attention_probs_dropout_prob=0.0",
        f"data.train.text={text}",
        f"data.train.features={feats}",
        "data.num_workers=0",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "train.batch_size=8",
        "train.epochs=100",
        "train.max_steps=3",
        "train.log_every=1",
        f"train.output_dir={out}",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_runs_as_one_process_without_a_launcher(stage, stores, tmp_path):
    """`lxmert-pretrain ... train.zero_stage=N` with no launcher variables: the DeepSpeed path on a world of one
    (no MPI discovery), the plain path's losses, and no DeepSpeed noise on the console."""
    reference = Trainer(
        load_config(None, run_overrides(stores, tmp_path / "plain")), PretrainTask(), use_deepspeed=False
    )
    reference.train()
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    out = tmp_path / "ds"
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "lxmert-pretrain"),
            *run_overrides(stores, out, f"train.zero_stage={stage}"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    assert len(train) == 3
    for got, want in zip(train, reference.history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    console = proc.stdout + proc.stderr
    for noise in (
        "Setting accelerator to CPU",
        "untested optimizer",
        "built successfully",
        "is deprecated",
        "mpi4py",
        "Traceback",
    ):
        assert noise not in console, (noise, console[-3000:])
    assert (out / "checkpoints" / "latest").is_file() and (out / "model.safetensors").is_file()
