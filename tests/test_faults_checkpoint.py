"""Faults in checkpoints (issue 14): a run killed anywhere resumes; a damaged or incomplete checkpoint is skipped
with one line, or the run stops with one line naming the file; nothing in a checkpoint runs code.

- Missing or truncated parts (model, state, tensors, manifest; DeepSpeed's model states, optimizer shard and RNG
  file) and flipped bytes: the checkpoint is skipped with a line naming it and why, and the run resumes from the
  previous one with the uninterrupted run's losses; with none left it stops (exit 2, one line naming the file). A
  first save that never finished (the old DeepSpeed failure: an empty mp_rank_00_model_states.pt, no `latest`, no
  manifest) starts afresh.
- A crafted pickle (its __reduce__ runs a shell command that creates a marker file; the control shows it does so
  under torch.load(weights_only=False)) in place of each file the resume path reads, with the manifest rewritten to
  match it or not: the marker never appears, and the run skips the checkpoint or stops naming the file. A
  checkpoint from before manifests (state.pt) is refused with a message.
- Kill loops: `python -m engine.pretrain` as a subprocess, SIGKILLed at seeded random moments (inside steps, by
  timing; inside saves, the run's first one included, at exact points through LXMERT_KILL_AT: between parts, after
  the manifest, after the rename) and rerun until it finishes: its metrics.jsonl train records and final
  model.safetensors equal an uninterrupted run's, on the plain path and on DeepSpeed (one process, ZeRO-2, fp32).
  KILL_LOOP_SEED overrides the seed; the seed and the plan are in every assertion message.

Tiny model and stores as in test_engine_train.py, CPU fp32. The DeepSpeed tests are marked slow, as elsewhere.
Those marked `interpreters` also run under a second Python in CI (tests/test_checkpoint_interpreters.py says why).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_pretrain_stores, free_port, tiny_model_overrides

from engine import checkpoint as ckpt
from engine import pretrain
from engine.atomic import KILL_AT
from engine.config import ConfigError, load_config
from engine.launch import deepspeed_available
from engine.plots import read_metrics
from engine.runtime import resume_point
from engine.tasks.pretrain import PretrainTask
from engine.train import Trainer
from lxmert.convert import read_state_dict

REPO = Path(__file__).resolve().parents[1]
D = 16
STEPS, SAVE_EVERY = 6, 2  # checkpoints at steps 2, 4 and 6 (the last one at the end)
SEED = int(os.environ.get("KILL_LOOP_SEED", "14"))
needs_deepspeed = pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pretrain_stores(tmp_path_factory.mktemp("fault_stores"), D)


def overrides(stores, out: Path, *extra: str, steps: int = STEPS, save_every: int = SAVE_EVERY) -> list[str]:
    """A tiny one-rank pre-training run of `steps` steps, a checkpoint every `save_every` (test_preemption's too)."""
    text, feats = stores
    return [
        *tiny_model_overrides(text, D),
        f"data.train.text={text}",
        f"data.train.features={feats}",
        "data.num_workers=0",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "train.batch_size=8",
        "train.epochs=100",
        f"train.max_steps={steps}",
        "train.log_every=1",
        f"train.save_every={save_every}",
        "train.threads=1",
        f"train.output_dir={out}",
        "train.seed=0",
        *extra,
    ]


def make_trainer(stores, out: Path, *extra: str, deepspeed: bool = False) -> Trainer:
    return Trainer(load_config(None, overrides(stores, out, *extra)), PretrainTask(), use_deepspeed=deepspeed)


def losses(trainer: Trainer) -> list[float]:
    return [r["loss"] for r in trainer.history]


def step_dir(out: Path, step: int) -> Path:
    return ckpt.checkpoint_root(out) / ckpt.tag_of(step)


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "missing":
        file.unlink()
    elif how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        file.write_bytes(b"")
    elif how == "flipped":  # the same size, one byte changed: only the checksum can tell
        middle = len(data) // 2
        file.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        raise ValueError(how)


def rewrite_manifest(path: Path, drop: tuple[str, ...] = ()) -> None:
    """Make the manifest agree with the files as they are now (what someone who crafted a file would do)."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    manifest["parts"] = {
        name: {"bytes": (path / name).stat().st_size, "sha256": hashlib.sha256((path / name).read_bytes()).hexdigest()}
        for name in manifest["parts"]
        if name not in drop
    }
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


class RunsAShellCommand:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint does to whoever loads it with pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_crafted(file: Path, marker: Path) -> None:
    torch.save({"module": RunsAShellCommand(marker), "optimizer": RunsAShellCommand(marker)}, file)


# ------------------------------------------------------------------------------------------- the plain path


@pytest.fixture(scope="module")
def plain_run(stores, tmp_path_factory) -> tuple[Path, list[float]]:
    """An uninterrupted run: checkpoints at 2, 4, 6 (copied and damaged by the tests) and its losses."""
    out = tmp_path_factory.mktemp("plain_run")
    trainer = make_trainer(stores, out)
    trainer.train()
    return out, losses(trainer)


@pytest.mark.interpreters
def test_a_plain_checkpoint_is_json_and_safetensors_listed_in_its_manifest(plain_run):
    out, _ = plain_run
    path = step_dir(out, 4)
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 4 and manifest["path"] == "plain"
    assert sorted(manifest["parts"]) == [ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.TENSORS_FILE]
    assert sorted(p.name for p in path.iterdir()) == sorted([*manifest["parts"], ckpt.MANIFEST])
    assert (ckpt.checkpoint_root(out) / ckpt.LATEST).read_text() == ckpt.tag_of(STEPS) + "\n"
    assert not list(ckpt.checkpoint_root(out).glob("*.tmp"))
    state = ckpt.load_plain(path)
    assert state["step"] == 4 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)  # tuples survive
    params = [i for group in state["optimizer"]["param_groups"] for i in group["params"]]
    assert sorted(state["optimizer"]["state"]) == params and isinstance(state["rng"]["python"][1], list)  # int keys


@pytest.mark.parametrize(
    "part, how, reason",
    [
        (ckpt.MODEL_FILE, "truncated", "model.safetensors has"),
        (ckpt.TENSORS_FILE, "missing", "state.safetensors is missing"),
        (ckpt.STATE_FILE, "truncated", "state.json has"),
        (ckpt.MODEL_FILE, "flipped", "model.safetensors: its checksum is not the manifest's"),
        (ckpt.MANIFEST, "truncated", "manifest.json: not readable as JSON"),
        (ckpt.MANIFEST, "missing", "no manifest.json: a save that did not finish"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_and_the_previous_one_resumed(
    plain_run, stores, tmp_path, capsys, part, how, reason
):
    run, expected = plain_run
    out = copy_run(run, tmp_path / "run")
    damage(step_dir(out, 6) / part, how)
    trainer = make_trainer(stores, out)
    printed = capsys.readouterr().out
    assert f"resume: skipped {step_dir(out, 6)}: {reason}" in printed, printed
    assert f"resumed from {step_dir(out, 4)} at step 4" in printed
    trainer.train()
    assert losses(trainer) == expected[4:]  # exact: the previous checkpoint's state, then the same steps


def test_no_checkpoint_that_loads_stops_with_one_line_naming_the_file(plain_run, stores, tmp_path, capsys):
    run, _ = plain_run
    out = copy_run(run, tmp_path / "run")
    log_before = (out / "metrics.jsonl").read_text()
    for step in (2, 4, 6):
        damage(step_dir(out, step) / ckpt.MODEL_FILE, "truncated")
    assert pretrain.main(overrides(stores, out)) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err + captured.out, captured.err
    assert f"{step_dir(out, 6)}/model.safetensors has" in captured.err and "train.resume=none" in captured.err
    assert all(f"resume: skipped {step_dir(out, s)}: model.safetensors has" in captured.out for s in (2, 4, 6))
    assert (out / "metrics.jsonl").read_text() == log_before  # nothing trained, nothing written


def test_a_first_save_that_never_finished_starts_afresh(stores, tmp_path, capsys):
    """The DeepSpeed failure of issue 14: killed in its first save, an empty mp_rank_00_model_states.pt, no
    `latest` (before: EOFError: Ran out of input); and a staging directory a killed save left."""
    root = ckpt.checkpoint_root(tmp_path)
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002/mp_rank_00_model_states.pt").write_bytes(b"")
    (root / "step_00000002/rng_rank0.pt").write_bytes(b"")
    (root / "step_00000004.tmp").mkdir()
    (root / "step_00000004.tmp/model.safetensors").write_bytes(b"half")
    assert resume_point("auto", tmp_path) is None
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and f"resume: skipped {root / 'step_00000002'}: no manifest.json" in printed
    trainer = make_trainer(stores, tmp_path, "train.max_steps=2")
    assert trainer.step == 0
    trainer.train()
    assert resume_point("auto", tmp_path) == root / "step_00000002"  # replaced by a complete one


def test_the_crafted_pickle_runs_code_under_plain_torch_load(tmp_path):
    """The control: the file the tests below plant does run a shell command when loaded with pickle."""
    marker = tmp_path / "ran"
    write_crafted(tmp_path / "crafted.pt", marker)
    torch.load(tmp_path / "crafted.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "part, manifest_rewritten",
    [
        (ckpt.MANIFEST, False),
        (ckpt.STATE_FILE, False),
        (ckpt.MODEL_FILE, False),
        (ckpt.STATE_FILE, True),
        (ckpt.TENSORS_FILE, True),
        (ckpt.MODEL_FILE, True),
    ],
)
def test_a_crafted_pickle_in_a_plain_checkpoint_never_runs(
    plain_run, stores, tmp_path, capsys, part, manifest_rewritten
):
    run, expected = plain_run
    out = copy_run(run, tmp_path / "run")
    marker = tmp_path / "ran"
    path = step_dir(out, 6)
    write_crafted(path / part, marker)
    if manifest_rewritten and part != ckpt.MANIFEST:
        rewrite_manifest(path)
        with pytest.raises(ConfigError, match=re.escape(f"resume: {path / part}: not readable as")):
            make_trainer(stores, out)
    else:  # the size or the checksum gives it away: skipped, the previous checkpoint resumed
        trainer = make_trainer(stores, out)
        assert f"resume: skipped {path}: {part}" in capsys.readouterr().out and trainer.step == 4
    assert not marker.exists()


def test_a_checkpoint_from_before_manifests_is_refused_with_a_message(stores, tmp_path, capsys):
    """state.pt (the old layout) is never unpickled: skipped by "auto", refused when named."""
    marker = tmp_path / "ran"
    old = step_dir(tmp_path / "run", 4)
    old.mkdir(parents=True)
    write_crafted(old / "state.pt", marker)
    assert resume_point("auto", tmp_path / "run") is None
    printed = capsys.readouterr().out
    assert f"resume: skipped {old}: no manifest.json" in printed and "before manifests (state.pt)" in printed
    assert "pickle" in printed
    with pytest.raises(ConfigError, match=f"train.resume {old}: not a checkpoint that loads: no manifest.json"):
        resume_point(str(old), tmp_path / "elsewhere")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- DeepSpeed


@pytest.fixture(scope="module")
def one_rank():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
        }.items():
            patch.setenv(key, value)
        yield


DS = ("train.zero_stage=2",)


@pytest.fixture(scope="module")
def ds_run(stores, tmp_path_factory, one_rank) -> tuple[Path, list[float]]:
    out = tmp_path_factory.mktemp("ds_run")
    trainer = make_trainer(stores, out, *DS, deepspeed=True)
    trainer.train()
    return out, losses(trainer)


@pytest.mark.interpreters
@pytest.mark.slow
@needs_deepspeed
def test_a_deepspeed_checkpoint_lists_every_part_and_loads_without_pickle(ds_run):
    out, _ = ds_run
    path = step_dir(out, 4)
    parts = ckpt.read_manifest(path)["parts"]
    assert sorted(parts) == [
        "mp_rank_00_model_states.pt",
        "rng_rank0.json",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ]
    # builtins.getattr: an enum member by name, where this Python pickles enums so (ckpt.enum_member_by_name)
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in ckpt.deepspeed_safe_globals()} | {"builtins.getattr"}
    for name in parts:
        if name.endswith(".pt"):
            assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path / name)) <= allowed, name
            assert isinstance(ckpt.load_deepspeed_file(path / name, "cpu"), dict)


def cpu_has_fp16() -> bool:
    """DeepSpeed refuses fp16 on a CPU whose oneDNN has no fp16 kernels (the CPU accelerator's check)."""
    return torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


@pytest.mark.interpreters
@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize(
    "stage, precision",
    [
        (3, "bf16"),
        pytest.param(1, "fp16", marks=pytest.mark.skipif(not cpu_has_fp16(), reason="DeepSpeed: no fp16 on this CPU")),
    ],
)
def test_the_allow_list_covers_deepspeeds_files(stores, tmp_path, one_rank, stage, precision):
    """ZeRO-3 (sharded model states) in bf16 and ZeRO-1 in fp16 (its DynamicLossScaler): every file loads with
    weights_only and the allow-list, and the run resumes from them."""
    extra = [f"train.zero_stage={stage}", f"train.precision={precision}", "train.max_steps=2", "train.save_every=1"]
    if precision == "fp16":
        template = tmp_path / "fp16.json"
        template.write_text(json.dumps({"fp16": {"enabled": "auto", "initial_scale_power": 1}}))
        extra += [f"deepspeed.config={template}", "model.layer_norm_eps=1e-5"]
    make_trainer(stores, tmp_path, *extra, deepspeed=True).train()
    path = step_dir(tmp_path, 2)
    for name in ckpt.read_manifest(path)["parts"]:
        if name.endswith(".pt"):
            assert isinstance(ckpt.load_deepspeed_file(path / name, "cpu"), dict), name
    resumed = make_trainer(stores, tmp_path, *extra, "train.resume=" + str(step_dir(tmp_path, 1)), deepspeed=True)
    assert resumed.step == 1


@pytest.mark.interpreters
@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize(
    "part, how, reason",
    [
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "missing", " is missing"),  # item 2: FileNotFoundError before
        ("mp_rank_00_model_states.pt", "empty", " has 0 bytes"),  # item 2: EOFError before
        ("rng_rank0.json", "missing", " is missing"),  # item 5: resumed without its RNG states before
        ("rng_rank0.json", "truncated", " has "),
        ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "flipped", ": its checksum is not the manifest's"),
    ],
)
def test_a_damaged_deepspeed_checkpoint_is_skipped_and_the_previous_one_resumed(
    ds_run, stores, tmp_path, capsys, one_rank, part, how, reason
):
    run, expected = ds_run
    out = copy_run(run, tmp_path / "run")
    damage(step_dir(out, 6) / part, how)
    skipped = f"resume: skipped {step_dir(out, 6)}: {part}{reason}"
    if how != "missing":  # the same file logic as the plain path's: full DeepSpeed resumes for the missing parts
        assert resume_point("auto", out) == step_dir(out, 4)
        assert skipped in capsys.readouterr().out
        return
    trainer = make_trainer(stores, out, *DS, deepspeed=True)
    printed = capsys.readouterr().out
    assert skipped in printed, printed
    assert trainer.step == 4
    trainer.train()
    assert losses(trainer) == expected[4:]  # the RNG states and the optimizer's too: exactly the same steps


@pytest.mark.interpreters
@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize(
    "part", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank0.json"]
)
def test_a_crafted_pickle_in_a_deepspeed_checkpoint_never_runs(ds_run, stores, tmp_path, one_rank, part):
    """The manifest rewritten to match: DeepSpeed's own loader would have run it (weights_only=False)."""
    run, _ = ds_run
    out = copy_run(run, tmp_path / "run")
    marker = tmp_path / "ran"
    path = step_dir(out, 6)
    write_crafted(path / part, marker)
    rewrite_manifest(path)
    refused = "refused: it names posix.system, which is not on the allow-list" if part.endswith(".pt") else "JSON"
    with pytest.raises(ConfigError, match=f"resume: {path / part}: .*{refused}"):
        make_trainer(stores, out, *DS, deepspeed=True)
    assert not marker.exists()


@pytest.mark.interpreters
@pytest.mark.slow
@needs_deepspeed
def test_a_deepspeed_checkpoint_without_its_rng_file_never_resumes_silently(ds_run, stores, tmp_path, one_rank):
    """Even with a manifest that does not list it (hand-edited): a clear error, not a resume without RNG states."""
    run, _ = ds_run
    out = copy_run(run, tmp_path / "run")
    path = step_dir(out, 6)
    (path / "rng_rank0.json").unlink()
    rewrite_manifest(path, drop=("rng_rank0.json",))
    with pytest.raises(ConfigError, match=f"{path / 'rng_rank0.json'} is missing: the checkpoint holds no RNG"):
        make_trainer(stores, out, *DS, deepspeed=True)


# ------------------------------------------------------------------------------------------------ kill loops

SAVE_POINTS = ("checkpoint.part", "checkpoint.manifest", "checkpoint.renamed")
STEP_SECONDS = 0.15  # about one tiny step here: a step kill lands this far, at most, after the previous record


def saves_after(step: int) -> int:
    """The saves a run resumed at `step` makes (every SAVE_EVERY steps and at the end)."""
    return len({s for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY) if s > step} | ({STEPS} if step < STEPS else set()))


def kill_plan(rng: random.Random, attempt: int, resumed: int, parts: int) -> tuple | None:
    """Attempt 0 dies in the run's first save; attempt 1 inside a step; later ones in either (None: the run
    resumed after its last checkpoint has no step or save left to die in)."""
    kind = "save" if attempt == 0 else "step" if attempt == 1 else rng.choice(["save", "step"])
    if kind == "step" and resumed + 2 <= STEPS:
        return "step", rng.randint(resumed + 2, STEPS), round(rng.random(), 3)
    saves = 1 if attempt == 0 else saves_after(resumed)
    if saves == 0:
        return None
    point = rng.choice(SAVE_POINTS)
    return "save", point, rng.randint(1, parts * saves if point == "checkpoint.part" else saves)


def new_train_steps(metrics: Path, offset: int) -> set[int]:
    """The steps of the train records written past byte `offset` (complete lines only)."""
    if not metrics.is_file():
        return set()
    with open(metrics, "rb") as f:
        f.seek(offset)
        lines = f.read().split(b"\n")[:-1]
    steps = set()
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind", "train") == "train":
            steps.add(record.get("step"))
    return steps


def kill_in_step(proc: subprocess.Popen, metrics: Path, offset: int, step: int, fraction: float) -> None:
    """SIGKILL `proc` `fraction` of a step after it logged step - 1: in step `step` (or the save before it)."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and step - 1 not in new_train_steps(metrics, offset):
        time.sleep(0.005)
    time.sleep(fraction * STEP_SECONDS)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


def run_until_done(command: list[str], out: Path, parts: int, kills: int, seed: int) -> list:
    """Run `command` (a training run into `out`) again and again, killing the first `kills` attempts as
    kill_plan says, until one finishes. Returns the plan: (the step it resumed from, the kill) per attempt."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", KILL_AT)
    }
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    rng = random.Random(seed)
    plan: list = []
    for attempt in range(kills + 2):
        latest = ckpt.find_latest(out)
        resumed = ckpt.read_manifest(latest)["step"] if latest else 0
        kill = kill_plan(rng, attempt, resumed, parts) if attempt < kills else None
        plan.append((resumed, kill))
        run_env = dict(env)
        if kill and kill[0] == "save":
            run_env[KILL_AT] = f"{kill[1]}:{kill[2]}"
        metrics = out / "metrics.jsonl"
        offset = metrics.stat().st_size if metrics.is_file() else 0
        log = out.parent / f"{out.name}.{attempt}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(command, cwd=REPO, env=run_env, stdout=f, stderr=subprocess.STDOUT)
            if kill and kill[0] == "step":
                kill_in_step(proc, metrics, offset, kill[1], kill[2])
            rc = proc.wait(timeout=300)
        text = log.read_text()
        if rc == 0 or (rc != -signal.SIGKILL and "\ndone: " in text):  # a rare abort at exit after finishing
            return plan
        assert rc == -signal.SIGKILL, f"seed {seed}, plan {plan}: exit code {rc}; {log}:\n{text[-3000:]}"
    raise AssertionError(f"seed {seed}, plan {plan}: not finished after {len(plan)} runs")


def assert_same_run(out: Path, reference: Path, plan: list, seed: int) -> None:
    """The killed-and-rerun run logged the reference's train records (what decides numbers) and ended with its
    weights, exactly."""
    print(f"seed {seed}: (resumed from, kill) per run: {plan}")
    keys = ("step", "loss", "losses", "lr", "grad_norm", "skipped_steps")
    got, _ = read_metrics(out / "metrics.jsonl")
    want, _ = read_metrics(reference / "metrics.jsonl")
    message = f"seed {seed} (KILL_LOOP_SEED), plan {plan}"
    assert [{k: r.get(k) for k in keys} for r in got] == [{k: r.get(k) for k in keys} for r in want], message
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), message
    a, b = read_state_dict(out / "model.safetensors"), read_state_dict(reference / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), message
    assert any(kill and kill[0] == "save" and resumed == 0 for resumed, kill in plan), message  # the first save


def test_a_run_killed_at_random_moments_ends_as_an_uninterrupted_one(plain_run, stores, tmp_path):
    reference, _ = plain_run
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "engine.pretrain", *overrides(stores, out)]
    plan = run_until_done(command, out, parts=3, kills=4, seed=SEED)
    assert_same_run(out, reference, plan, SEED)


@pytest.mark.slow
@needs_deepspeed
def test_a_deepspeed_run_killed_at_random_moments_ends_as_an_uninterrupted_one(ds_run, stores, tmp_path):
    reference, _ = ds_run
    parts = len(ckpt.read_manifest(step_dir(reference, 2))["parts"])  # this rank's files: RNG, model, optimizer
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "engine.pretrain", *overrides(stores, out, *DS)]
    plan = run_until_done(command, out, parts=parts, kills=3, seed=SEED + 1)
    assert_same_run(out, reference, plan, SEED + 1)
