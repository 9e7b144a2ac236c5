"""The shared benchmark harness: who measured (environment, the one commit reader), how (timers, peak memory),
where it goes (rows as JSON lines, Markdown tables, plots) and the tiny model of the CPU runs.

time_cuda times between CUDA events with L2 flushed before every call (a 256 MB write, as triton.testing.do_bench);
time_cpu by perf_counter; both report median and 20th / 80th percentiles in ms (summarize). This module imports no
GPU library besides torch, so importing it never decides triton's interpreter mode ahead of the caller.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPO_ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = REPO_ROOT / "runs" / "benchmarks"  # where a run writes by default: ignored by git, tracked files untouched
L2_FLUSH_BYTES = 256 * 2**20  # larger than any L2 so far (H100 50 MB, H200 60 MB)
COMMIT_ENV = "BENCH_COMMIT"  # the commit of a copy of the tree without .git (git_commit reads it there)
# the tiny model of the CPU runs (throughput --smoke, scaling --model tiny, host_waits, the gpu_session dry run)
TINY_MODEL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37, l_layers=1, r_layers=1, x_layers=1)
TINY_FEAT_DIM = 16


# ------------------------------------------------------------------------------------------ environment


def _version(*distributions: str) -> str | None:
    """The installed version of the first distribution found, by name or by name prefix ending in '*'."""
    for name in distributions:
        if name.endswith("*"):
            for dist in importlib.metadata.distributions():
                if (dist.metadata["Name"] or "").lower().startswith(name[:-1]):
                    return dist.version
            continue
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def git_commit() -> str | None:
    """HEAD, with "-dirty" when the tree differs from it (result files excepted); $BENCH_COMMIT without git."""

    def git(*args: str) -> str:
        command = ["git", "-C", str(REPO_ROOT), *args]
        return subprocess.check_output(command, text=True, stderr=subprocess.DEVNULL, timeout=10)

    try:
        commit = git("rev-parse", "HEAD").strip()
        changes = [line for line in git("status", "--porcelain").splitlines() if "benchmarks/results/" not in line]
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV)
    return commit + ("-dirty" if changes else "")


def environment() -> dict[str, Any]:
    """Flat fields every result row carries: device ("cpu" without a GPU, so no CPU row passes for a GPU one) and
    on a GPU its compute capability, SM count and memory, where it was measured, software versions, commit, date,
    host."""
    cuda = torch.cuda.is_available()
    props = torch.cuda.get_device_properties(0) if cuda else None
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "capability": f"{props.major}.{props.minor}" if cuda else None,
        "sm_count": props.multi_processor_count if cuda else None,
        "memory_gib": props.total_memory / 2**30 if cuda else None,
        "measured_on": "gpu" if cuda else "cpu",
        "host_cpu": platform.processor() or platform.machine() or None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton", "pytorch-triton"),
        "deepspeed": _version("deepspeed"),
        "dali": _version("nvidia-dali*"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
    }


# ----------------------------------------------------------------------------------------------- timers


def summarize(times_ms: Sequence[float]) -> dict[str, float | int]:
    """median / p20 / p80 / min of per-call times in ms, and how many calls were timed."""
    q = torch.tensor(list(times_ms), dtype=torch.float64).quantile(torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64))
    return {
        "median_ms": q[1].item(),
        "p20_ms": q[0].item(),
        "p80_ms": q[2].item(),
        "min_ms": min(times_ms),
        "reps": len(times_ms),
    }


def time_cuda(
    fn: Callable[..., Any], warmup: int = 10, reps: int = 50, setup: Callable[[], Any] | None = None
) -> dict[str, float | int]:
    """GPU time of fn() between CUDA events, L2 flushed before each call; see summarize().

    setup, when given, runs before every call outside the timed region and its result is fn's argument
    (a fresh forward for timing a backward alone)."""
    # allocated per call and freed on return: the caching allocator keeps the block for the next call, and
    # peak_memory (allocated, not reserved, bytes) never counts it
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    call = fn if setup is None else lambda: fn(setup())
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        args = () if setup is None else (setup(),)
        flush.zero_()
        start.record()
        fn(*args)
        end.record()
        del args
    torch.cuda.synchronize()
    return summarize([start.elapsed_time(end) for start, end in zip(starts, ends)])


def time_cpu(
    fn: Callable[..., Any], warmup: int = 3, reps: int = 20, setup: Callable[[], Any] | None = None
) -> dict[str, float | int]:
    """Host wall time of fn() by perf_counter, setup as in time_cuda; see summarize()."""
    for _ in range(warmup):
        fn() if setup is None else fn(setup())
    times = []
    for _ in range(reps):
        args = () if setup is None else (setup(),)
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
        del args
    return summarize(times)


def peak_memory(fn: Callable[..., Any], setup: Callable[[], Any] | None = None) -> int:
    """torch.cuda.max_memory_allocated (bytes) over one call of fn, counting everything live during it
    (setup's result, made before the count starts, too)."""
    args = () if setup is None else (setup(),)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Seconds spent in each named phase of one step: `clock.mark("forward")` closes the phase that started at
    the previous mark (or at construction). With sync=True the device is synchronised before each reading, so
    a phase owns the GPU work it queued; that also stops the host from queueing ahead across phases (the
    data copy of the next batch cannot overlap the optimizer, a backward cannot start before the forward's
    last kernel), so synchronised steps are slower than free-running ones: a breakdown, not a throughput."""

    def __init__(self, device: torch.device | str, sync: bool = True) -> None:
        self.device, self.sync = device, sync
        self.phases: dict[str, float] = {}
        if sync:
            synchronize(device)
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.sync:
            synchronize(self.device)
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return sum(self.phases.values())


# ---------------------------------------------------------------------------------------------- results


def append_rows(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Append each row as one JSON line (creating folders); values JSON cannot hold are written as str."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    return path


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; none when it is missing, and a line cut short (a killed run) is dropped."""
    path = Path(path)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def write_summary(path: str | os.PathLike, lines: Sequence[str]) -> Path:
    """A benchmark's Markdown summary: written to `path` (creating folders) and printed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print(text, end="")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]], columns: str | Sequence[str | tuple[str, str]]) -> str:
    """A Markdown table of rows; a column is a key, or (key, header); a string lists them as "key; key=header; ...".
    Missing values are left blank."""
    if isinstance(columns, str):
        columns = [tuple(c.strip().split("=", 1)) if "=" in c else c.strip() for c in columns.split(";")]
    keys = [c if isinstance(c, str) else c[0] for c in columns]
    headers = [c if isinstance(c, str) else c[1] for c in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def tiny_model_overrides(text: Any, feat_dim: int) -> list[str]:
    """engine.config overrides of TINY_MODEL on a synthetic text store: feature size, label counts."""
    from engine.data import synthetic

    return [
        *(f"model.{key}={value}" for key, value in TINY_MODEL.items()),
        f"model.visual_feat_dim={feat_dim}",
        f"model.num_qa_labels={len(text.answers)}",
        f"model.num_object_labels={len(synthetic.OBJECT_NAMES)}",
        f"model.num_attr_labels={len(synthetic.ATTRIBUTE_NAMES)}",
    ]


# ------------------------------------------------------------------------------------------------- plots


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]], title: str, x_label: str, y_label: str, log2_x: bool = False
) -> Figure:
    """A matplotlib line chart (Agg; engine.plots.save_figure writes it as SVG or PNG): one line with dots per
    series, in x order, gid "series:NAME"; log2_x puts x on a log2 scale with a tick at every x (batch sizes, GPU
    counts); y starts at 0. A None y is left out."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    drawn = {name: sorted((x, y) for x, y in points if y is not None) for name, points in series.items()}
    if not any(drawn.values()):
        raise ValueError("nothing to plot: every series is empty")
    fig = Figure(figsize=(8.0, 4.6), layout="constrained")
    ax = fig.subplots()
    for name, points in drawn.items():
        xs, ys = [x for x, _ in points], [y for _, y in points]
        ax.plot(xs, ys, marker="o", linewidth=2, label=name, gid=f"series:{name}")
    if log2_x:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(sorted({x for points in drawn.values() for x, _ in points})))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(True, color="#dddddd")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig
