"""Many machines, simulated on one (issue 19): the README's "Many machines" lines, run on 127.0.0.1 with one rank
per "node", and a 2-rank job killed at random moments.

- torchrun (--nnodes 2, --node_rank) and the deepspeed launcher (--hostfile, --no_ssh, --node_rank): two
  invocations, one rank each, log what one node with 2 ranks logs; both are killed (every process of both) after
  a checkpoint, and the job started again (torchrun: by the rendezvous line, whose node ranks need not be the first
  run's) ends with every logged record and the final weights of the uninterrupted run.
- srun: two tasks started as srun starts them (SLURM_* variables, no launcher in between; engine/launch.py reads
  them) train like the launchers.
- Kill loop: `deepspeed --num_gpus 2` SIGKILLed as a whole (its process group) at seeded random moments, inside
  steps and inside the 2-rank saves (the first one always), and rerun until it finishes: every
  logged record and the final weights are bit-identical to the uninterrupted run. KILL_LOOP_SEED overrides the
  seed; the seed and the plan are in every assertion message.

One uninterrupted reference (`deepspeed --num_gpus 2`, ZeRO-2, fp32, dropout on so that every rank's RNG states
matter on resume) serves every test. tests/test_engine_distributed.py's 2-rank runs are no substitute: they turn
dropout off to compare with one process. "Every logged record" is every train and eval record that
engine.metrics_log.read_metrics keeps (it drops what a killed run logged past the checkpoint the next run went on
from), less the fields that time the run. On the CPU a DeepSpeed rank occasionally aborts at exit after writing
everything (about 2 runs in 75), so a run counts as finished by what it printed last (the report's "done:" line),
not by its exit code.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import build_pretrain_stores, free_port, tiny_model_overrides
from test_documented_commands import PLAN, ClusterOnly, documented_commands
from test_faults_checkpoint import new_train_steps as train_steps_logged

from engine import checkpoint as ckpt
from engine.config import ConfigError
from engine.launch import Launch, deepspeed_available
from engine.metrics_log import read_metrics

pytestmark = pytest.mark.skipif(not deepspeed_available(), reason="DeepSpeed is not installed")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
D = 16
STEPS, SAVE_EVERY = 6, 2  # checkpoints at steps 2, 4 and 6
SEED = int(os.environ.get("KILL_LOOP_SEED", "19"))
# what times a run rather than decides its numbers
TIMING = {
    "samples_per_s",
    "tokens_per_s",
    "tflops",
    "mfu",
    "data_wait_share",
    "peak_memory_gib",
    "step_time_s",
    "eta_s",
    "seconds",
}
LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMP_NUM_THREADS",
)

# The README's lines, as a user on node N of 2 types them (node0 is the first node's address)
README_DEEPSPEED_NO_SSH = (
    "deepspeed --hostfile hostfile --no_ssh --node_rank $NODE_RANK --master_addr node0 --master_port 29500 --module "
    "engine.pretrain --config configs/pretrain.yaml train.zero_stage=2"
)
README_TORCHRUN = (
    "torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK --master_addr node0 --master_port 29500 -m "
    "engine.pretrain --config configs/pretrain.yaml train.zero_stage=2"
)
README_TORCHRUN_RDZV = (
    "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint node0:29500 --rdzv_id lxmert -m "
    "engine.pretrain --config configs/pretrain.yaml train.zero_stage=2"
)
README_SRUN = (
    "srun --nodes 2 --ntasks-per-node 8 python -m engine.pretrain --config configs/pretrain.yaml train.zero_stage=2"
)
README_HOSTFILE = ("node0 slots=8", "node1 slots=8")


# ---------------------------------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pretrain_stores(tmp_path_factory.mktemp("cluster_stores"), D)


def overrides(stores, out: Path) -> list[str]:
    """The tiny run every test trains (in place of the README's recipe): ZeRO-2 fp32, dropout on, one thread a rank
    whatever the launcher's ranks per node, checkpoints every 2 steps, the final evaluation."""
    text, feats = stores
    return [
        *tiny_model_overrides(text, D),
        f"data.train.text={text}",
        f"data.train.features={feats}",
        f"data.eval.text={text}",
        f"data.eval.features={feats}",
        "data.num_workers=0",
        "optim.name=adamw",
        "optim.lr=1e-3",
        "train.batch_size=8",
        "train.epochs=100",
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        f"train.save_every={SAVE_EVERY}",
        "train.threads=1",
        "train.zero_stage=2",
        "train.precision=fp32",
        "train.seed=0",
        f"train.output_dir={out}",
    ]


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # deepspeed, torchrun, python: the venv's
    return env | extra


def substituted(line: str, replacements: list[tuple[str, str]]) -> str:
    """The README's line with each replacement made; each must match, so a changed README fails here."""
    for old, new in replacements:
        assert old in line, f"{old!r} is no longer in {line!r}: update tests/test_cluster.py"
        line = line.replace(old, new)
    return line


def on_this_machine(line: str, node: int, port: int, stores, out: Path) -> list[str]:
    """A README line as node `node` runs it here: every address 127.0.0.1, one rank a node, a free port, the tiny
    run's overrides in place of the recipe."""
    line = substituted(line, [("node0", "127.0.0.1"), ("29500", str(port)), ("--config configs/pretrain.yaml ", "")])
    line = line.replace("$NODE_RANK", str(node)).replace("--nproc_per_node 8", "--nproc_per_node 1")
    if "--rdzv_endpoint" in line:  # a rendezvous hands the ranks each agent's host name unless told its address
        line = line.replace("--rdzv_id lxmert", "--rdzv_id lxmert --local_addr 127.0.0.1")
    return [*shlex.split(line), *overrides(stores, out)]


class Job:
    """The processes of one job (a launcher per node), each started in a process group of its own; kill() is a
    SIGKILL to every one of them and every process under them (torchrun starts its ranks in sessions of their own;
    the deepspeed launcher keeps them in its group)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def start(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> subprocess.Popen:
        with open(log, "w") as f:
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def alive(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def kill(self) -> None:
        import psutil

        victims = []
        for proc in self.procs:
            try:
                victims += psutil.Process(proc.pid).children(recursive=True)  # before their parents die
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs:
            try:  # the whole group, even where the launcher itself has exited
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for victim in victims:
            try:
                victim.kill()
            except psutil.NoSuchProcess:
                pass
        for proc in self.procs:
            proc.wait()

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        finally:
            self.kill()  # nothing outlives the test

    def printed(self) -> str:
        return "\n".join(log.read_text() for log in self.logs if log.is_file())

    def text(self) -> str:
        """The end of each log, for a message."""
        return "\n".join(f"--- {log}:\n{log.read_text()[-3000:]}" for log in self.logs if log.is_file())

    def finished(self) -> bool:
        """Rank 0 printed its report: everything was written, whatever the exit codes."""
        return "\ndone: " in self.printed()


def wait_for(job: Job, ready, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while job.alive() and time.monotonic() < deadline:
        if ready():
            return True
        time.sleep(0.005)
    return False


def logged(out: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) records as read_metrics resolves a resumed run, less the fields that time the run."""
    train, evals = read_metrics(out / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in train], [
        {k: v for k, v in r.items() if k not in TIMING} for r in evals
    ]


def assert_same_run(out: Path, reference: Path, message: str) -> None:
    """Every logged record and the final weights' bytes are the reference's; every rank's shards are in the final
    checkpoint of the shared output directory."""
    got, want = logged(out), logged(reference)
    assert [r["step"] for r in got[0]] == list(range(1, STEPS + 1)), message
    assert got[0] == want[0], message
    assert got[1] == want[1] and len(got[1]) == 1, message
    assert (out / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes(), message
    final = ckpt.checkpoint_root(out) / ckpt.tag_of(STEPS)
    parts = ckpt.read_manifest(final)["parts"]
    assert {"rng_rank0.json", "rng_rank1.json"} <= set(parts), (message, sorted(parts))
    assert sum("optim_states" in p for p in parts) == 2, (message, sorted(parts))


def one_node(stores, out: Path, log: Path) -> Job:
    """`deepspeed --num_gpus 2 --module engine.pretrain ...`: one node, two ranks, one process group."""
    job = Job()
    argv = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "--module",
        "engine.pretrain",
        *overrides(stores, out),
    ]
    job.start(argv, base_env(), log)
    return job


@pytest.fixture(scope="module")
def reference(stores, tmp_path_factory) -> Path:
    """The uninterrupted run: one node with 2 ranks."""
    out = tmp_path_factory.mktemp("cluster_reference") / "run"
    job = one_node(stores, out, out.parent / "launch.log")
    codes = job.wait()
    assert job.finished(), f"exit codes {codes}\n{job.text()}"
    return out


# --------------------------------------------------------------------------------------------- two nodes, one rank each


def test_the_readme_shows_the_lines_these_tests_run():
    documented, plan = documented_commands(), dict(PLAN)
    for line in (README_DEEPSPEED_NO_SSH, README_TORCHRUN, README_TORCHRUN_RDZV, README_SRUN):
        assert line in documented, f"README.md no longer shows {line!r}: update tests/test_cluster.py"
        assert isinstance(plan[line], ClusterOnly) and "tests/test_cluster.py" in plan[line].reason, line
    readme = (REPO / "README.md").read_text()
    assert all(re.search(rf"^\s+{host}$", readme, re.M) for host in README_HOSTFILE), README_HOSTFILE


def start_two_nodes(line: str, stores, out: Path, name: str, *, hostfile: bool = False) -> Job:
    port = free_port()
    job = Job()
    if hostfile:  # the README's hostfile with one slot a node
        lines = [substituted(h, [("slots=8", "slots=1")]) for h in README_HOSTFILE]
        (out.parent / "hostfile").write_text("\n".join(lines) + "\n")
    for node in (0, 1):
        argv = on_this_machine(line, node, port, stores, out)
        job.start(argv, base_env(), out.parent / f"{name}.node{node}.log", cwd=out.parent)
    return job


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_nodes_train_as_one_and_resume_after_both_die(launcher, reference, stores, tmp_path):
    """Two invocations of the README's line, one rank each: every process killed once step 3 is logged (past the
    step-2 checkpoint), started again; the records and weights are the one-node run's."""
    out = tmp_path / "run"
    first, again = {
        "torchrun": (README_TORCHRUN, README_TORCHRUN_RDZV),
        "deepspeed": (README_DEEPSPEED_NO_SSH, README_DEEPSPEED_NO_SSH),
    }[launcher]
    hostfile = launcher == "deepspeed"
    job = start_two_nodes(first, stores, out, "first", hostfile=hostfile)
    try:
        reached = wait_for(job, lambda: 3 in train_steps_logged(out / "metrics.jsonl", 0))
    finally:
        job.kill()
    assert reached, job.text()
    latest = ckpt.find_latest(out)  # step 2's (step 4's only if the kill came late)
    resumed = ckpt.read_manifest(latest)["step"] if latest else 0
    assert 2 <= resumed < STEPS, job.text()
    job = start_two_nodes(again, stores, out, "again", hostfile=hostfile)
    codes = job.wait()
    assert job.finished(), f"exit codes {codes}\n{job.text()}"
    assert f"resumed from {latest} at step {resumed}" in job.printed(), job.text()
    assert_same_run(out, reference, f"{launcher}: {job.text()}")


def srun_tasks(stores, out: Path, logs: Path, argv_of=lambda node, argv: argv) -> Job:
    """`srun --nodes 2 --ntasks-per-node 1 python -m engine.pretrain ...` as srun starts it: no launcher, each task
    told its place by SLURM_* variables; MASTER_ADDR from the job script. argv_of(node, argv) may change a task's
    command line."""
    line = substituted(
        README_SRUN, [("srun --nodes 2 --ntasks-per-node 8 ", ""), ("--config configs/pretrain.yaml ", "")]
    )
    port = free_port()
    job = Job()
    for node in (0, 1):
        slurm = {
            "SLURM_PROCID": str(node),
            "SLURM_LOCALID": "0",
            "SLURM_NODEID": str(node),
            "SLURM_NTASKS": "2",
            "SLURM_STEP_NUM_TASKS": "2",
            "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
            "SLURM_STEP_NUM_NODES": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        argv = argv_of(node, [*shlex.split(line), *overrides(stores, out)])
        job.start(argv, base_env(**slurm), logs / f"task{node}.log")
    return job


@pytest.mark.slow
def test_srun_tasks_train_as_the_launchers_ranks(reference, stores, tmp_path):
    out = tmp_path / "run"
    job = srun_tasks(stores, out, tmp_path)
    codes = job.wait()
    assert job.finished(), f"exit codes {codes}\n{job.text()}"
    assert_same_run(out, reference, job.text())


FULL_DISK_ON_ONE_NODE = """\
# node 1's disk fills up during the save of step {step}: its optimizer shard cannot be written
import errno, runpy, torch

real_save = torch.save


def save(obj, f, *args, **kwargs):
    if "{tag}.tmp" in str(f) and "optim_states" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real_save(obj, f, *args, **kwargs)


torch.save = save
runpy.run_module("engine.pretrain", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_a_save_that_fails_on_one_node_stops_every_rank_with_one_line_and_resumes(reference, stores, tmp_path):
    """A full disk on one node during a 2-rank save: both ranks stop there (neither waits in a collective for the
    other), exit 2, each says the one line naming the file and the rank; the last complete checkpoint stays latest,
    and the same command, once there is room, ends as the uninterrupted run."""
    out, step = tmp_path / "run", 2 * SAVE_EVERY
    script = tmp_path / "full_disk_on_one_node.py"
    script.write_text(FULL_DISK_ON_ONE_NODE.format(step=step, tag=ckpt.tag_of(step)))

    def node1_full(node: int, argv: list[str]) -> list[str]:
        at = argv.index("-m")
        return [*argv[:at], str(script), *argv[at + 2 :]] if node == 1 else argv

    (tmp_path / "failing").mkdir()
    job = srun_tasks(stores, out, tmp_path / "failing", node1_full)
    codes = job.wait(timeout=240)  # rank 0 waited at DeepSpeed's barrier: gloo's broke (a traceback), NCCL's hangs
    assert codes == [2, 2], f"exit codes {codes}\n{job.text()}"
    shard = ckpt.checkpoint_root(out) / f"{ckpt.tag_of(step)}.tmp" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    kept = ckpt.checkpoint_root(out) / ckpt.tag_of(step - SAVE_EVERY)
    said = f"lxmert-pretrain: error: checkpoint {ckpt.tag_of(step)} into {ckpt.checkpoint_root(out)} failed: "
    said += f"{shard}: No space left on device on rank 1 ("
    for log in job.logs:  # rank 0 says it, and rank 1, whose disk it is
        text = log.read_text()
        errors = [line for line in text.splitlines() if line.startswith("lxmert-pretrain: error:")]
        assert len(errors) == 1 and errors[0].startswith(said), f"{log}:\n{text[-3000:]}"
        assert errors[0].endswith(f"; {kept} stays the latest") and "Traceback" not in text, errors[0]
    assert (ckpt.checkpoint_root(out) / ckpt.LATEST).read_text().strip() == ckpt.tag_of(step - SAVE_EVERY)
    assert not (ckpt.checkpoint_root(out) / ckpt.tag_of(step)).exists()

    (tmp_path / "rerun").mkdir()
    job = srun_tasks(stores, out, tmp_path / "rerun")
    codes = job.wait()
    assert job.finished(), f"exit codes {codes}\n{job.text()}"
    assert f"resumed from {kept} at step {step - SAVE_EVERY}" in job.printed()
    assert_same_run(out, reference, job.text())


def test_launch_reads_srun_variables_only_in_a_step_of_several_tasks(monkeypatch):
    # export_ranks writes the process environment: a copy of it here, or RANK=11 outlives the test (and every later
    # Trainer of the suite takes itself for rank 11)
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for key in [k for k in os.environ if k.startswith("SLURM_")] + list(LAUNCH_VARS):
        monkeypatch.delenv(key, raising=False)
    # the batch script's own shell: SLURM_NTASKS but no step
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert Launch.from_env() == Launch()
    # a task of `srun --nodes 2 --ntasks-per-node 8`, the 4th on the second node
    for key, value in {
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_PROCID": "11",
        "SLURM_LOCALID": "3",
        "SLURM_NODEID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
        "MASTER_ADDR": "127.0.0.1",
    }.items():
        monkeypatch.setenv(key, value)
    assert Launch.from_env() == Launch(11, 3, 16, 8, True, slurm=True)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "5,3")  # uneven nodes
    assert Launch.from_env().local_world_size == 3
    Launch.from_env().export_ranks()
    assert [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_PORT")] == [
        "11",
        "3",
        "16",
        "3",
        "29500",
    ]
    assert Launch.from_env() == Launch(11, 3, 16, 3, True)  # a launcher's variables, now set, win
    # a launcher under srun (srun torchrun ...): its variables win
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert not Launch.from_env().slurm
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(ConfigError, match=r"srun started rank 11 of 16, but MASTER_ADDR is not set"):
        Launch.from_env()


# --------------------------------------------------------------------------------------------------- the kill loop

STEP_SECONDS = 0.3  # about one tiny step of 2 ranks here: a step kill lands this far, at most, after a record


def kill_plan(rng: random.Random, attempt: int, resumed: int) -> tuple:
    """Attempt 0 dies in the run's first save, attempt 1 inside a step, later ones in either: ("step", s, fraction)
    dies that fraction of a step after step s - 1 was logged; ("save", s, ms) that many ms after the save of step s
    began (rank 0 made its staging directory)."""
    kind = "save" if attempt == 0 else "step" if attempt == 1 else rng.choice(["save", "step"])
    if kind == "step" and resumed + 2 <= STEPS:
        return "step", rng.randint(resumed + 2, STEPS), round(rng.random(), 3)
    saves = [s for s in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY) if s > resumed]
    return "save", saves[0] if attempt == 0 else rng.choice(saves), rng.randint(0, 60)


def run_killed(job: Job, out: Path, kill: tuple, offset: int) -> None:
    if kill[0] == "step":
        wait_for(job, lambda: kill[1] - 1 in train_steps_logged(out / "metrics.jsonl", offset))
        time.sleep(kill[2] * STEP_SECONDS)
    else:
        staging = ckpt.checkpoint_root(out) / f"{ckpt.tag_of(kill[1])}{ckpt.STAGING}"
        wait_for(job, staging.exists)
        time.sleep(kill[2] / 1000)
    job.kill()


@pytest.mark.slow
def test_a_two_rank_job_killed_at_random_moments_ends_as_an_uninterrupted_one(reference, stores, tmp_path):
    out = tmp_path / "killed"
    rng = random.Random(SEED)
    kills = 3
    plan: list = []
    for attempt in range(kills + 2):
        latest = ckpt.find_latest(out)
        resumed = ckpt.read_manifest(latest)["step"] if latest else 0
        kill = kill_plan(rng, attempt, resumed) if attempt < kills and resumed < STEPS else None
        plan.append((resumed, kill))
        metrics = out / "metrics.jsonl"
        offset = metrics.stat().st_size if metrics.is_file() else 0
        job = one_node(stores, out, tmp_path / f"attempt{attempt}.log")
        try:
            if kill:
                run_killed(job, out, kill, offset)
            codes = job.wait()
        finally:
            job.kill()
        if job.finished():
            break
        assert kill, f"seed {SEED}, plan {plan}: exit codes {codes}\n{job.text()}"
    message = f"seed {SEED} (KILL_LOOP_SEED), plan (resumed from, kill) per run: {plan}"
    print(message)
    assert job.finished(), message
    assert_same_run(out, reference, message)
