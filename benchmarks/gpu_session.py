"""The project's GPU measurements in one command: every benchmark stage in order, each under a time limit.

    python -m benchmarks.gpu_session --out DIR [--wheels DIR] [--budget SECONDS]   # on a GPU machine
    python -m benchmarks.gpu_session --dry-run [--out DIR]                         # every stage shrunken, CPU

The stages (`stages()`; what each runs, its limit and what --out receives: benchmarks/README.md) run the project's
own commands as subprocesses, each in a process group of its own killed at the stage's limit, and read back what
those commands write (rows, logs, metrics.jsonl). Every number of a dry run is labelled DRY_LABEL.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import harness
from engine.metrics_log import read_metrics

REPO = Path(__file__).resolve().parent.parent
GPU_BUDGET_S = 540.0
DRY_BUDGET_S = 600.0
DRY_LABEL = "cpu, dry-run: not a GPU number"
MIN_STAGE_S = 5.0  # a stage with less time than this is skipped, not started
KILL_GRACE_S = 5.0  # SIGTERM to SIGKILL

# the pre-training stage
RECIPE = "configs/pretrain_adamw.yaml"  # LXMERT-base, fused AdamW, bf16, ZeRO-1 (DeepSpeed), batch 256
SOURCES = "[mscoco,vg,vqa,gqa]"  # the synthetic set's (the recipe also names visual7w)
TRAIN_TARGET_S = 120.0  # the two minutes of training asked for
PRETRAIN_OVERHEAD_S = 75.0  # start-up (imports, DeepSpeed, model, loader), the final checkpoint and the export
DEFAULT_RATE = 2000.0  # samples/s assumed when the throughput stage measured none (a guess, named in the summary)
ENGINE_RATE_FACTOR = 0.7  # the engine's step (loader, logging) against the benchmark's resident-data step
MAX_STEPS = 2400  # 614k sentences: writing and converting them took 40 s on a 2-core machine
DATA_ESTIMATE_S = 40.0  # what the pretrain_data stage is expected to take (its limit is larger)
GPU_PATHS = ("ours-flash", "+zero1", "+cudagraphs")  # the throughput rows the session exists for
THROUGHPUT_TAIL_S = 135.0  # of the throughput stage's limit: the variant running at its --time-budget, the profile
SYNTHETIC_IMAGES = 512  # 461 train images of 36 x 2048 fp16 features: 68 MB, resident on the GPU

# where the stages write, under the work directory
KERNEL_TESTS_XML = "kernel_tests/kernel_tests.xml"
KERNELS_ROWS = "kernels/kernels.jsonl"
THROUGHPUT_ROWS = "throughput/throughput.jsonl"
PRETRAIN_METRICS = "pretrain/run/metrics.jsonl"
OUT_FILES = ("summary.md", "summary.json", "session.log", "results.tar.gz")
RESULT_SUFFIXES = {".md", ".svg", ".png", ".json", ".jsonl", ".xml", ".yaml", ".txt"}
RESULT_SKIP_DIRS = {"data", "raw", "stores", "checkpoints", "site", "tensorboard", "logs"}
RESULTS_MAX_BYTES = 64 * 2**20


# ------------------------------------------------------------------------------------------ the session


@dataclass
class Number:
    """One reported number and where it was measured; its label goes wherever it is printed."""

    stage: str
    name: str
    value: float
    unit: str
    measured_on: str  # "gpu" or "cpu"
    device: str
    dry_run: bool

    @property
    def label(self) -> str:
        if self.dry_run or self.measured_on != "gpu":
            return DRY_LABEL if self.dry_run else f"{self.device}: cpu, not a GPU number"
        return self.device


@dataclass
class Result:
    name: str
    status: str  # ok / failed / timed out / skipped
    seconds: float = 0.0
    limit_s: float = 0.0
    returncode: int | None = None
    commands: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class Stage:
    name: str
    what: str
    limit_s: float  # the hard limit
    reserve_s: float  # kept back for this stage while the earlier ones run
    commands: Callable[[Session], list[list[str]]]  # evaluated when the stage starts
    needs: tuple[str, ...] = ()
    numbers: Callable[[Session], list[Number]] = lambda session: []
    after: Callable[[Session, Result], None] = lambda session, result: None  # may stop the session


@dataclass
class Session:
    out: Path
    work: Path
    dry_run: bool
    budget_s: float
    wheels: Path | None = None  # installed by the preflight into work/site
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    date: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds"))
    results: list[Result] = field(default_factory=list)
    numbers: list[Number] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)  # the pre-training's sizes, decided by pretrain_data
    stop: str = ""  # set by a stage: every later stage is skipped with this reason
    current_limit: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def path(self, relative: str) -> Path:
        path = self.work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def measured_on(self) -> str:
        return "cpu" if self.dry_run else self.environment.get("measured_on", "gpu")

    @property
    def device(self) -> str:
        return self.environment.get("device") or ("cpu" if self.dry_run else "unknown GPU")

    def number(self, stage: str, name: str, value: float, unit: str = "", row: dict | None = None) -> Number:
        measured_on = "cpu" if self.dry_run else (row or {}).get("measured_on", self.measured_on)
        device = (row or {}).get("device", self.device)
        return Number(stage, name, float(value), unit, measured_on, device, self.dry_run)


def stage_env(session: Session, extra_paths: list[Path]) -> dict[str, str]:
    """The stages' environment: on the GPU without TRITON_INTERPRET (kernels compile), in the dry run with it and
    with CUDA hidden; the private site of --wheels first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    if session.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    paths = [str(p) for p in extra_paths] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


# ------------------------------------------------------------------------------------------- the runner


def run_command(command: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, bool]:
    """(exit status, timed out): one command in its own process group, output appended to `log`. At the timeout
    the group gets SIGTERM, then SIGKILL after KILL_GRACE_S; whatever a command that returned left running in its
    group (workers, daemons) is killed too."""
    with log.open("ab") as f:
        f.write(f"$ {' '.join(command)}\n".encode())
        f.flush()
        io = dict(stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
        proc = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, **io)
        try:
            return proc.wait(max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(KILL_GRACE_S)
            f.write(f"\n[gpu_session: the stage's limit reached: killed after {timeout:.0f} s]\n".encode())
            return None, True
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_stage(session: Session, stage: Stage, kept_for_later: float) -> Result:
    result = Result(stage.name, "skipped")
    failed_needs = [r.name for r in session.results if r.name in stage.needs and r.status != "ok"]
    if session.stop:
        result.note = session.stop
        return result
    if failed_needs:
        result.note = f"needs {', '.join(failed_needs)}, which did not succeed"
        return result
    limit = min(stage.limit_s, session.left() - kept_for_later)
    if limit < MIN_STAGE_S:
        result.note = f"no time left ({session.left():.0f} s, {kept_for_later:.0f} s kept for the later stages)"
        return result
    result.limit_s = session.current_limit = limit
    log = session.path(f"logs/{stage.name}.log")
    start = time.perf_counter()
    try:
        commands = stage.commands(session)
    except Exception as error:  # a plan that cannot be made (missing input): the stage fails, the session goes on
        result.status, result.note = "failed", f"{type(error).__name__}: {error}"
        return result
    result.commands = [" ".join(c) for c in commands]
    result.status = "ok"
    for command in commands:
        code, timed_out = run_command(command, log, limit - (time.perf_counter() - start), session.env)
        if timed_out:
            result.status, result.note = "timed out", f"killed at its limit of {limit:.0f} s: {' '.join(command)[:200]}"
            break
        if code != 0:
            result.status, result.returncode = "failed", code
            result.note = f"exit status {code}: {' '.join(command)[:200]}"
            break
        result.returncode = code
    result.seconds = time.perf_counter() - start
    try:  # whatever it wrote counts, a failed or killed stage's too
        session.numbers += stage.numbers(session)
    except Exception as error:
        unreadable = f"its numbers unreadable: {type(error).__name__}: {error}"
        result.note = f"{result.note}; {unreadable}" if result.note else unreadable
    stage.after(session, result)
    return result


def run_session(session: Session, stages: list[Stage]) -> int:
    """Every stage in order (each limited), the outputs rewritten after each; 0 when every stage succeeded."""
    for i, stage in enumerate(stages):
        print(f"[{session.elapsed():6.1f} s] {stage.name}: {stage.what}", flush=True)
        result = run_stage(session, stage, sum(s.reserve_s for s in stages[i + 1 :]))
        session.results.append(result)
        print(
            f"[{session.elapsed():6.1f} s] {stage.name}: {result.status}"
            + (f" in {result.seconds:.1f} s (limit {result.limit_s:.0f} s)" if result.limit_s else "")
            + (f": {result.note}" if result.note else ""),
            flush=True,
        )
        if result.status in ("failed", "timed out"):
            tail = log_text(session, stage.name)[-2500:]
            print("  " + tail.replace("\n", "\n  ").rstrip(), flush=True)
        write_outputs(session)
    print((session.out / "summary.md").read_text(encoding="utf-8"), flush=True)
    return 0 if all(r.status == "ok" for r in session.results) else 1


def log_text(session: Session, stage: str) -> str:
    """What the stage's commands printed (logs/<stage>.log); "" before it ran."""
    path = session.work / "logs" / f"{stage}.log"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""


# ------------------------------------------------------------------------------------------- the stages


IMPORT_CHECK = """
import importlib, json
names = ("torch", "triton", "deepspeed", "transformers", "safetensors", "tokenizers")
found = {name: getattr(importlib.import_module(name), "__version__", "?") for name in names}
from deepspeed.accelerator import get_accelerator
found["deepspeed_accelerator"] = get_accelerator()._name
from lxmert.tokenizer import LxmertTokenizer
found["tokens"] = LxmertTokenizer().encode("Who is holding the umbrella?")
assert found["tokens"] == [101, 2040, 2003, 3173, 1996, 12977, 1029, 102], found["tokens"]
print(json.dumps(found))
"""

ENVIRONMENT = """
import json, sys
from benchmarks import harness
json.dump(harness.environment(), open(sys.argv[1], "w"), indent=1)
"""


def preflight_commands(session: Session) -> list[list[str]]:
    """Install the wheels of --wheels (no index: an offline machine), then import what the stages need."""
    commands = []
    if session.wheels is not None:
        wheels = sorted(str(p) for p in session.wheels.glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"--wheels {session.wheels}: no .whl file there")
        pip = "-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target".split()
        commands.append([session.python, *pip, str(session.work / "site"), *wheels])
    return [*commands, [session.python, "-c", IMPORT_CHECK]]


def environment_commands(session: Session) -> list[list[str]]:
    commands = [[session.python, "-c", ENVIRONMENT, str(session.path("environment/environment.json"))]]
    return commands + ([["nvidia-smi"]] if shutil.which("nvidia-smi") else [])  # its whole output in the log


def after_environment(session: Session, result: Result) -> None:
    path = session.work / "environment/environment.json"
    if path.is_file():
        session.environment = json.loads(path.read_text(encoding="utf-8"))
    if not session.dry_run and session.environment.get("measured_on") == "cpu":
        session.stop = "no CUDA device here: --dry-run is the CPU form"


def kernel_test_commands(session: Session) -> list[list[str]]:
    """-v: a line a test, so a run killed at its limit still shows which passed (the XML is written at the end).
    On the GPU the tests run in 8 processes when pytest-xdist is installed: most of their time is Triton
    compiling each kernel variant, one process at a time otherwise."""
    tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernel_*.py"))
    parallel = ["-n", "8"] if not session.dry_run and importlib.util.find_spec("xdist") else []
    subset = ["-k", "float32"] if session.dry_run else []  # the interpreter is slow; the test suite runs them all
    pytest = [session.python, *"-m pytest -v -rA -p no:cacheprovider".split(), *parallel, *subset]
    return [[*pytest, f"--junitxml={session.path(KERNEL_TESTS_XML)}", *tests]]


def kernel_test_numbers(session: Session) -> list[Number]:
    path = session.work / KERNEL_TESTS_XML
    if not path.is_file():
        return []
    suites = list(ElementTree.parse(path).getroot().iter("testsuite"))  # the root itself, or <testsuites>' children
    count = lambda key: sum(int(s.get(key, 0)) for s in suites)  # noqa: E731
    failed = count("failures") + count("errors")
    return [
        session.number("kernel_tests", "tests passed", count("tests") - failed - count("skipped")),
        session.number("kernel_tests", "tests failed", failed),
        session.number("kernel_tests", "tests skipped", count("skipped")),
    ]


def kernels_commands(session: Session) -> list[list[str]]:
    # the same arguments in the dry run: without a GPU the script runs its checks (interpreter, tiny sizes) only
    return [[session.python, "-m", "benchmarks.kernels", "--quick", "--out", str(session.path(KERNELS_ROWS))]]


def kernels_numbers(session: Session) -> list[Number]:
    """benchmarks.kernels' own count of checks (its log) and its own speed-up table (its rows)."""
    numbers = []
    checks = re.findall(r"^checks: (\d+) passed, (\d+) failed", log_text(session, "kernels"), re.M)
    if checks:
        passed, failed = checks[-1]
        numbers += [
            session.number("kernels", "correctness checks passed", int(passed)),
            session.number("kernels", "correctness checks failed", int(failed)),
        ]
    rows = harness.read_rows(session.work / KERNELS_ROWS)
    if any(r.get("mode") for r in rows):
        from benchmarks.kernels import pivot, speedups  # imports triton: only once the stages have run

        for line in speedups(pivot([r for r in rows if r.get("bench") != "check"])):
            what = f"{line['bench']} {line['config']} {line['dtype']} {line['ours']}"
            numbers.append(session.number("kernels", f"{what} fwd+bwd", line["ours_ms"], "ms", rows[-1]))
            if line["speedup"]:
                over = f"{what} speed-up over {line['best_other']}"
                numbers.append(session.number("kernels", over, line["speedup"], "x", rows[-1]))
    return numbers


def throughput_commands(session: Session) -> list[list[str]]:
    # no variant starts after --time-budget; the last one (a torch.compile row takes 1-2 min) and the profile
    # run past it, so the budget leaves THROUGHPUT_TAIL_S of the stage's limit for them
    budget = max(session.current_limit - THROUGHPUT_TAIL_S, 30)
    size = ["--smoke"] if session.dry_run else ["--quick", "--time-budget", f"{budget:.0f}"]
    out, data = str(session.path(THROUGHPUT_ROWS)), str(session.path("throughput/data"))
    return [[session.python, "-m", "benchmarks.throughput", *size, "--out", out, "--data-dir", data]]


def throughput_numbers(session: Session) -> list[Number]:
    numbers, rows = [], harness.read_rows(session.work / THROUGHPUT_ROWS)
    for row in rows:
        if row.get("kind") == "parity":
            what = f"parity {row['precision']} b{row['batch']}: relative difference of transformers' loss and ours"
            numbers.append(session.number("throughput", what, row["rel_diff"], "", row))
        elif row.get("kind") == "throughput" and row.get("samples_per_s"):
            numbers.append(session.number("throughput", f"{row['name']}", row["samples_per_s"], "samples/s", row))
            if row.get("mfu") is not None:
                numbers.append(session.number("throughput", f"{row['name']} MFU", 100 * row["mfu"], "%", row))
            if row.get("speedup_vs_hf"):
                over = f"{row['name']} over transformers"
                numbers.append(session.number("throughput", over, row["speedup_vs_hf"], "x", row))
        elif row.get("kind") == "throughput" and str(row.get("note", "")).startswith(("failed", "skipped")):
            session.notes.append(f"throughput {row['name']}: {row['note'][:200]}")
    names = [row.get("name", "") for row in rows]
    for path in GPU_PATHS:  # what the CPU cannot answer: say so when the time budget left one out
        if not any(path in name for name in names):
            session.notes.append(f"throughput: no {path} row (the stage's time budget ran out first)")
    return numbers


def measured_rate(session: Session) -> tuple[float, str]:
    """samples/s the pre-training is planned with: ours (sdpa, bf16, resident data) from the throughput stage."""
    want = dict(kind="throughput", impl="ours", attn="sdpa", precision="bf16", loader="resident").items()
    rows = harness.read_rows(session.work / THROUGHPUT_ROWS)
    rates = [r["samples_per_s"] for r in rows if r.items() >= want and r.get("samples_per_s")]
    if rates:
        best = max(rates)
        return best * ENGINE_RATE_FACTOR, f"{ENGINE_RATE_FACTOR} x the throughput stage's {best:.0f} samples/s"
    return DEFAULT_RATE, f"assumed {DEFAULT_RATE:.0f} samples/s (the throughput stage measured none)"


def plan_pretraining(session: Session) -> dict[str, Any]:
    """Batch, steps and the synthetic set's size: LXMERT-base for about TRAIN_TARGET_S on the GPU (less when
    the time left after this data stage is short), a tiny model for 4 steps in the dry run."""
    if session.dry_run:
        dry = "dry run: fixed 4 steps"
        return dict(batch=8, max_steps=4, log_every=1, images=24, feat_dim=16, captions=5, rate_source=dry)
    rate, source = measured_rate(session)
    train_s = min(TRAIN_TARGET_S, max(session.left() - DATA_ESTIMATE_S - PRETRAIN_OVERHEAD_S, 20.0))
    batch = 256
    steps = int(min(max(train_s * rate / batch, 10), MAX_STEPS))
    train_images = SYNTHETIC_IMAGES - round(SYNTHETIC_IMAGES * 0.1)  # engine.data.synthetic's minival share
    captions = math.ceil((steps + 2) * batch / train_images)  # one sample a sentence: no epoch ends first
    sizes = dict(batch=batch, max_steps=steps, log_every=10, images=SYNTHETIC_IMAGES, feat_dim=2048, captions=captions)
    return {**sizes, "planned_train_s": train_s, "rate": rate, "rate_source": source}


def pretrain_data_commands(session: Session) -> list[list[str]]:
    session.plan |= plan_pretraining(session)
    plan, py = session.plan, session.python
    raw, stores = session.path("pretrain_data/raw"), session.path("pretrain_data/stores")
    feat_dim, tsv, text = str(plan["feat_dim"]), raw / "mscoco_imgfeat", raw / "lxmert"
    sizes = ["--images", str(plan["images"]), "--feat-dim", feat_dim, "--captions-per-image", str(plan["captions"])]
    convert = [py, "-m", "engine.data.convert", "--quiet"]
    return [
        [py, "-m", "engine.data.synthetic", str(raw), *sizes, "--seed", "0"],
        [*convert, "--feat-dim", feat_dim, "--tsv", str(tsv / "train2014_obj36.tsv"), str(tsv / "val2014_obj36.tsv")]
        + ["--out", str(stores / "feats")],
        [*convert, "--text", str(text / "mscoco_train.json"), "--features", str(stores / "feats")]
        + ["--answers", str(text / "all_ans.json"), "--out", str(stores / "text_train")],
    ]


def pretrain_data_numbers(session: Session) -> list[Number]:
    path = session.work / "pretrain_data/raw/synthetic.json"
    if not path.is_file():
        return []
    train = json.loads(path.read_text(encoding="utf-8"))["splits"]["train"]
    return [
        session.number("pretrain_data", "synthetic train images", train["images"]),
        session.number("pretrain_data", "synthetic train sentences (samples an epoch)", train["sentences"]),
    ]


def pretrain_commands(session: Session) -> list[list[str]]:
    plan, stores = session.plan, session.work / "pretrain_data/stores"
    answers = len(json.loads((session.work / "pretrain_data/raw/synthetic.json").read_text())["answers"])
    overrides = [f"data.train.features={stores / 'feats'}", f"data.train.text={stores / 'text_train'}"]
    overrides += ["data.eval.features=", "data.eval.text=", "data.loader=gpu", f"data.sources={SOURCES}"]
    overrides += [f"model.num_qa_labels={answers}", "train.precision=bf16", "train.resume=none"]
    overrides += [f"train.batch_size={plan['batch']}", f"train.max_steps={plan['max_steps']}"]
    overrides += [f"train.log_every={plan['log_every']}", f"train.output_dir={session.path('pretrain/run')}"]
    if session.dry_run:
        overrides += [f"model.{k}={v}" for k, v in harness.TINY_MODEL.items()]
        overrides.append(f"model.visual_feat_dim={plan['feat_dim']}")
    return [[session.python, "-m", "engine.pretrain", "--config", RECIPE, *overrides]]


def pretrain_numbers(session: Session) -> list[Number]:
    path = session.work / PRETRAIN_METRICS
    if not path.is_file():
        return []
    records, _ = read_metrics(path)
    if not records:
        return []
    steady = records[1:] or records  # the first window holds the warm-up (allocator, cuBLAS, DeepSpeed's first step)
    median = lambda key: statistics.median(r[key] for r in steady if r.get(key) is not None)  # noqa: E731
    number = lambda name, value, unit="": session.number("pretrain", name, value, unit)  # noqa: E731
    rate = f"batch {session.plan.get('batch')}: samples/s (median of {len(steady)} log windows after the first)"
    numbers = [
        number("steps done", records[-1]["step"]),
        number(rate, median("samples_per_s"), "samples/s"),
        number("tokens/s (median)", median("tokens_per_s"), "tokens/s"),
        number("step time (median)", 1e3 * median("step_time_s"), "ms"),
        number("TFLOP/s (median)", median("tflops"), "TFLOP/s"),
        number("data-wait share (median)", 100 * median("data_wait_share"), "%"),
        number("last loss", records[-1]["loss"]),
    ]
    if any(r.get("mfu") is not None for r in steady):
        numbers.append(number("MFU (median)", 100 * median("mfu"), "%"))
    if any(r.get("peak_memory_gib") is not None for r in records):
        numbers.append(number("peak memory", max(r["peak_memory_gib"] or 0 for r in records), "GiB"))
    return numbers


def stages(dry_run: bool) -> list[Stage]:
    """The session's stages. Limits and reserves are GPU seconds (their sum of limits is over the budget on
    purpose: the reserves decide who yields); the dry run has generous limits and no reserves."""
    where = " in the Triton interpreter" if dry_run else " on CUDA"
    kernels = "python -m benchmarks.kernels --quick" + (" (CPU: its checks only)" if dry_run else "")
    throughput = "python -m benchmarks.throughput " + ("--smoke" if dry_run else "--quick")
    data = "a synthetic set in the authors' formats, converted into stores"
    model = "a tiny model, 4 steps" if dry_run else "LXMERT-base, about 2 minutes"
    pretrain = f"{model}, bf16, {RECIPE} through python -m engine.pretrain"
    table = [  # name, what, limit s, reserve s, commands, numbers
        ("preflight", "the carried wheels installed, the imports the stages need", 60, 10, preflight_commands, None),
        ("environment", "device, capability, nvidia-smi, versions, commit, date", 40, 10, environment_commands, None),
        ("kernel_tests", "tests/test_kernel_*.py" + where, 150, 40, kernel_test_commands, kernel_test_numbers),
        ("kernels", kernels, 100, 40, kernels_commands, kernels_numbers),
        ("throughput", throughput, 210, 60, throughput_commands, throughput_numbers),
        ("pretrain_data", data, 75, 40, pretrain_data_commands, pretrain_data_numbers),
        ("pretrain", pretrain, 330, 150, pretrain_commands, pretrain_numbers),
    ]
    out = [
        Stage(name, what, *((240.0, 0.0) if dry_run else (limit, reserve)), commands, numbers=numbers or Stage.numbers)
        for name, what, limit, reserve, commands, numbers in table
    ]
    out[1].after, out[6].needs = after_environment, ("pretrain_data",)
    return out


# ---------------------------------------------------------------------------------------------- --out


def summary_dict(session: Session) -> dict[str, Any]:
    about = dict(
        dry_run=session.dry_run, measured_on=session.measured_on, label=DRY_LABEL if session.dry_run else session.device
    )
    about.update(commit=session.environment.get("commit"), date=session.date, budget_s=session.budget_s)
    about.update(elapsed_s=session.elapsed(), plan=session.plan, notes=session.notes)
    return {
        "session": about,
        "environment": session.environment,
        "stages": [asdict(r) for r in session.results],
        "numbers": [{**asdict(n), "label": n.label} for n in session.numbers],
    }


def format_value(value: float) -> str:
    """Counts as integers, measurements to 4 significant digits (60.00, not 60)."""
    return f"{value:.0f}" if value == int(value) and abs(value) < 1e9 else f"{value:#.4g}"


def summary_markdown(session: Session) -> str:
    env = session.environment
    title = "DRY RUN on the CPU: no number in this file is a GPU number" if session.dry_run else f"on {session.device}"
    lines = [f"# GPU session {title}\n"]
    versions = ", ".join(f"{k} {env.get(k)}" for k in "torch triton cuda deepspeed transformers python".split())
    device = f"Device {session.device}"
    if env.get("capability"):
        device += f", compute capability {env['capability']}, {env['sm_count']} SMs, {env['memory_gib']:.0f} GiB"
    lines.append(f"{device}. {versions}.\n")
    lines.append(
        f"Commit {env.get('commit') or 'unknown (set BENCH_COMMIT)'}; started {session.date}; "
        f"{session.elapsed():.0f} s of a {session.budget_s:.0f} s budget.\n"
    )
    stage_rows = [{**asdict(r), "seconds": f"{r.seconds:.1f}", "limit_s": f"{r.limit_s:.0f}"} for r in session.results]
    lines += ["## Stages\n", harness.markdown_table(stage_rows, "name=stage; status; seconds; limit_s=limit s; note")]
    if "batch" in session.plan:
        plan = session.plan
        lines.append(f"\nPre-training plan: batch {plan['batch']}, {plan['max_steps']} steps ({plan['rate_source']}).")
    lines += [f"\nNote: {note}" for note in session.notes]
    where = f" ({DRY_LABEL})" if session.dry_run else ""
    lines.append(f"\n## Numbers\n\nEach line ends with where it was measured{where}.")
    for stage in dict.fromkeys(n.stage for n in session.numbers):
        lines.append(f"\n### {stage}\n")
        for n in (n for n in session.numbers if n.stage == stage):
            lines.append(f"- {n.name}: {format_value(n.value)}{' ' + n.unit if n.unit else ''} [{n.label}]")
    lines.append("\nFiles: " + ", ".join(OUT_FILES) + " (those written). Commands and full output: session.log.")
    return "\n".join(lines) + "\n"


def session_log(session: Session) -> str:
    return "".join(
        f"===== {r.name}: {r.status}, {r.seconds:.1f} s (limit {r.limit_s:.0f} s) {r.note}\n"
        f"{log_text(session, r.name)}\n"
        for r in session.results
    )


def write_results(session: Session, path: Path) -> None:
    """What the stages wrote, the bulky folders left out (data, stores, checkpoints), up to RESULTS_MAX_BYTES."""
    total = 0
    with tarfile.open(path, "w:gz") as tar:
        for file in sorted(p for p in session.work.rglob("*") if p.suffix in RESULT_SUFFIXES and p.is_file()):
            relative, size = file.relative_to(session.work), file.stat().st_size
            if not set(relative.parts[:-1]) & RESULT_SKIP_DIRS and total + size <= RESULTS_MAX_BYTES:
                tar.add(file, arcname=str(relative))
                total += size


def write_outputs(session: Session) -> None:
    session.out.mkdir(parents=True, exist_ok=True)
    write_results(session, session.out / "results.tar.gz")
    (session.out / "session.log").write_text(session_log(session), encoding="utf-8")
    summary = json.dumps(summary_dict(session), indent=1, default=str) + "\n"
    (session.out / "summary.json").write_text(summary, encoding="utf-8")
    (session.out / "summary.md").write_text(summary_markdown(session), encoding="utf-8")


# -------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="summary, log, results (required on a GPU; dry run: a temp folder)")
    parser.add_argument("--dry-run", action="store_true", help="every stage shrunken on the CPU; numbers say so")
    parser.add_argument("--wheels", type=Path, help="install these wheels first, without an index, into a private site")
    parser.add_argument("--budget", type=float, help=f"seconds (default {GPU_BUDGET_S:.0f}, dry {DRY_BUDGET_S:.0f})")
    parser.add_argument("--work", type=Path, help="scratch folder, kept afterwards (default: a temporary one)")
    args = parser.parse_args(argv)
    if not (args.dry_run or args.out):
        parser.error("--out is required; --dry-run runs the CPU form")
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_session_dry_run_"))
    for name in OUT_FILES:  # a rerun into the same folder leaves no stale file of an earlier session
        (out / name).unlink(missing_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_session_work_"))
    budget = args.budget or (DRY_BUDGET_S if args.dry_run else GPU_BUDGET_S)
    session = Session(out=out, work=work, dry_run=args.dry_run, budget_s=budget, wheels=args.wheels)
    session.env = stage_env(session, [work / "site"] if args.wheels else [])
    print(f"{'dry run (CPU)' if args.dry_run else 'GPU session'}: budget {budget:.0f} s, out {out}, work {work}")
    try:
        return run_session(session, stages(args.dry_run))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
