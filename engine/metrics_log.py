"""Training logs: one JSON line per logging step in <output_dir>/metrics.jsonl, the same records sent to the
trackers train.report_to names (TensorBoard, Weights & Biases), a compact console line, and a progress bar with
samples/s and the time left (on a terminal only).

    log = MetricsLog(output_dir, enabled=rank == 0, progress_total=total_steps, progress_initial=step,
                     report_to=["wandb"], wandb=WandbRun(project="lxmert-engine", config=to_dict(config)))
    log.advance(1)                               # one optimizer step: the bar moves, its ETA updates
    log.write({"step": 10, "loss": 3.2, ...})    # appended, flushed: a killed run keeps every line written
    log.console("step 10 | loss 3.2 | ...")     # logged (engine/logs.py); through tqdm when a progress bar is open
    log.close(status)                            # then engine.plots.write_plots(log.path, output_dir)

Records are plain dicts (a train record is engine/records.py's TrainRecord.to_json(); an evaluation record is the
task's, which EvalRecord reads). Train records carry no "kind" (or "kind": "train"); evaluation records carry
"kind": "eval" and the step they evaluate, e.g. {"kind": "eval", "step": 100, "loss": 2.9, "losses": {...},
"accuracy": 0.61}. JSON has no inf/nan: non-finite floats are written as the strings "inf", "-inf", "nan".

Trackers (train.report_to; none by default): each gets every train and eval record metrics.jsonl gets (not the
resume and stop records), as the scalars `tracker_scalars` maps it to: every finite number at global step
record["step"]; nested dicts join their keys with "/" (losses.mlm -> losses/mlm); eval records go under "eval/"
(eval/loss, eval/losses/mlm, eval/accuracy). Not sent: "step" itself, "total_steps", booleans ("skipped": the
"skipped_steps" count says it), strings, None, inf and nan.
- tensorboard: scalars in <output_dir>/tensorboard/ (torch's SummaryWriter).
- wandb: wandb.init(project, name, dir, config=the run's resolved config) and one wandb.log per record, with the
  record's step under "step", W&B's x axis for every metric (define_metric), so that a resumed run's repeated
  steps are kept as metrics.jsonl keeps them. The run's id is kept in <output_dir>/wandb_run_id: a run resumed
  from a checkpoint continues that W&B run. close(status) finishes it with the run's exit status (a preempted or
  timed-out run, 75, is marked preempting first). W&B's own settings (WANDB_MODE=offline, WANDB_ENTITY, the key)
  apply.
A requested tracker whose package does not import is a ConfigError in one line saying what to pip install
(`check_trackers`, which the trainer calls before anything is written); wandb is imported only when asked for. A
tracker that fails later (W&B's service process killed by a scheduler's SIGTERM) is dropped with one console line:
the run and metrics.jsonl go on.

Progress bar (tqdm, only when stderr is a terminal and progress_total is given): steps done / total, elapsed <
remaining (tqdm's ETA from its smoothed step rate, counted from progress_initial on a resumed run) and the
samples/s last given to advance(samples_per_s=...); a logging step calls advance(0, samples_per_s=...).

Throughput figures (samples/s, tokens/s, TFLOP/s, MFU, data-wait share) are computed by the trainer over the
window since the previous log line; this module only writes them. `peak_memory_gib` reads the accelerator's
allocator peak (CUDA) or the process's peak resident set size (CPU).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.atomic import write_text_atomic
from engine.output_dir import RunError
from engine.stopping import EXIT_PREEMPTED

# Fields that are not measurements: the x axis itself and a constant.
_NOT_SCALARS = {"step", "total_steps", "kind"}
TRACKERS = ("tensorboard", "wandb")  # train.report_to's names (besides "none")
WANDB_RUN_ID = "wandb_run_id"  # in the output directory: the W&B run a resumed run continues
logger = logging.getLogger(__name__)


def read_metrics(metrics_path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train records, eval records) of a metrics.jsonl in step order, a resumed run resolved: the one reader
    (the plots, the reports and the main job read through it). What it accepts: engine/plots.py's docstring."""
    path = Path(metrics_path)
    kept: list[tuple[str, dict[str, Any]]] = []
    last_step: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                warnings.warn(f"{path}:{line_number}: skipped a line that is not JSON ({e.msg})", stacklevel=2)
                continue
            if not isinstance(record, dict):
                warnings.warn(f"{path}:{line_number}: skipped a line that is not a JSON object", stacklevel=2)
                continue
            kind = record.get("kind") or "train"
            if kind == "resume" and isinstance(record.get("step"), int):  # the run went on from this checkpoint
                kept = [(k, r) for k, r in kept if r["step"] <= record["step"]]
                last_step = {k: r["step"] for k, r in kept}
                continue
            if kind not in ("train", "eval"):
                continue
            step = record.get("step")
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            if not isinstance(step, int) or isinstance(step, bool):
                warnings.warn(f"{path}:{line_number}: skipped a {kind} record without an integer step", stacklevel=2)
                continue
            if kind in last_step and step <= last_step[kind]:  # a resumed run: start over from this step
                kept = [(k, r) for k, r in kept if r["step"] < step or (k != kind and r["step"] == step)]
                last_step = {k: r["step"] for k, r in kept}  # kept is in step order within each kind
            kept.append((kind, {**record, "step": step}))
            last_step[kind] = step
    return [r for k, r in kept if k == "train"], [r for k, r in kept if k == "eval"]


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory since the start (or the last reset): CUDA allocator peak, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _plain(value: Any) -> Any:
    """JSON-safe: tensors to numbers, non-finite floats to their names (JSON has no inf/nan)."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def tracker_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars a tracker gets of one record, {tag: value} (see the module docstring for the tags)."""
    kind = record.get("kind") or "train"
    prefix = "" if kind == "train" else f"{kind}/"
    scalars: dict[str, float] = {}

    def add(tag: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{tag}/{k}", v)
            return
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            scalars[tag] = float(value)

    for key, value in record.items():
        if key not in _NOT_SCALARS:
            add(prefix + key, value)
    return scalars


def _load_summary_writer() -> tuple[type | None, str]:
    """(torch's SummaryWriter, "") or (None, why not: "" when tensorboard is not installed). Tests replace this
    function to inject a fake writer."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ModuleNotFoundError as e:
        if e.name == "tensorboard":
            return None, ""
        return None, f"torch.utils.tensorboard did not import ({type(e).__name__}: {e})"
    except Exception as e:  # a broken install (a protobuf clash)
        return None, f"torch.utils.tensorboard did not import ({type(e).__name__}: {e})"
    return SummaryWriter, ""


def _load_wandb() -> tuple[Any, str]:
    """(the wandb module, "") or (None, why not: "" when wandb is not installed); imported here only, when a run
    asks for it."""
    try:
        import wandb
    except ModuleNotFoundError as e:
        if e.name == "wandb":
            return None, ""
        return None, f"wandb did not import ({type(e).__name__}: {e})"
    except Exception as e:
        return None, f"wandb did not import ({type(e).__name__}: {e})"
    return wandb, ""


def _tracker_package(name: str) -> Any:
    """What tracker `name` writes with (SummaryWriter, the wandb module), or a one-line ConfigError saying what to
    install."""
    found, why_not = _load_summary_writer() if name == "tensorboard" else _load_wandb()
    if found is not None:
        return found
    from engine.config import ConfigError  # here: reading metrics (plots) does not import the config

    if why_not:
        raise ConfigError(f"train.report_to: {name}: {why_not}")
    raise ConfigError(
        f"train.report_to: {name} is not installed: pip install {name} (the lxmert-engine[{name}] extra), or "
        f"leave {name} out of train.report_to"
    )


def check_trackers(report_to: Sequence[str]) -> None:
    """Every tracker report_to asks for imports (ConfigError otherwise): the run checks it before it writes."""
    for name in report_to:
        if name in TRACKERS:
            _tracker_package(name)


@dataclass
class WandbRun:
    """What wandb.init gets (train.wandb_*): the project, the run's name and directory ("" = the output
    directory's name, the output directory), the run's resolved config, and whether the run resumes a checkpoint
    (then it continues the W&B run whose id the output directory keeps)."""

    project: str = "lxmert-engine"
    name: str = ""
    dir: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    resume: bool = False


class _TensorBoard:
    name = "TensorBoard"

    def __init__(self, writer_class: type, log_dir: Path) -> None:
        self.writer = writer_class(log_dir=str(log_dir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # log lines are rare: a killed run keeps its curves too

    def close(self, status: int) -> None:
        self.writer.close()


class _Wandb:
    name = "W&B"

    def __init__(self, wandb: Any, output_dir: Path, options: WandbRun) -> None:
        id_file = output_dir / WANDB_RUN_ID
        run_id = None
        if options.resume and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        directory = Path(options.dir or output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=options.project,
                name=options.name or output_dir.resolve().name,
                dir=str(directory),
                config=options.config,
                id=run_id,
                resume="allow" if run_id else None,
            )
        except Exception as error:  # no key, no network, a refused id: the run asked for W&B, so it stops here
            message = " ".join(str(error).split())
            raise RunError(f"train.report_to: wandb.init failed ({type(error).__name__}: {message})") from None
        write_text_atomic(id_file, self.run.id + "\n")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({"step": step, **scalars})

    def close(self, status: int) -> None:
        if status == EXIT_PREEMPTED:
            self.run.mark_preempting()
        self.run.finish(exit_code=status)


class MetricsLog:
    """Appends JSON records to `<output_dir>/metrics.jsonl` and sends them to the trackers report_to names
    (rank 0 only: others get enabled=False)."""

    def __init__(
        self,
        output_dir: str | Path,
        enabled: bool = True,
        progress_total: int | None = None,
        progress_initial: int = 0,
        report_to: Sequence[str] = (),
        wandb: WandbRun | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard_dir = Path(output_dir) / "tensorboard"
        self._file = None
        self._bar = None
        self._trackers: list[Any] = []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            for name in dict.fromkeys(n for n in report_to if n in TRACKERS):
                package = _tracker_package(name)
                if name == "tensorboard":
                    self._trackers.append(_TensorBoard(package, self.tensorboard_dir))
                else:
                    self._trackers.append(_Wandb(package, self.path.parent, wandb or WandbRun()))
        except BaseException:
            self.close(1)
            raise
        self._file = open(self.path, "a", buffering=1)
        if progress_total is not None and sys.stderr.isatty():
            from tqdm import tqdm

            # tqdm's default right side: n/total [elapsed<remaining, rate, postfix]; the postfix is samples/s
            self._bar = tqdm(
                total=progress_total, initial=progress_initial, unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(_plain(record)) + "\n")
        self._file.flush()
        step = record.get("step")
        if self._trackers and (record.get("kind") or "train") in ("train", "eval") and isinstance(step, int):
            scalars = tracker_scalars(record)
            for tracker in list(self._trackers):
                try:
                    tracker.log(step, scalars)
                except Exception as error:  # W&B's service killed by a scheduler's SIGTERM: the run goes on
                    self._trackers.remove(tracker)
                    self._tracker_failed(tracker, error)

    def advance(self, steps: int = 1, samples_per_s: float | None = None) -> None:
        """Move the bar `steps` steps; samples_per_s (the latest logged figure) stays shown until the next one."""
        if self._bar is not None:
            if samples_per_s is not None:
                self._bar.set_postfix_str(f"{samples_per_s:.1f} samples/s", refresh=False)
            self._bar.update(steps)

    def console(self, line: str, level: int = logging.INFO) -> None:
        """A console line (rank 0's log only): logged, or written above the progress bar while one is open."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            logger.log(level, line)

    def _tracker_failed(self, tracker: Any, error: Exception) -> None:
        message = " ".join(str(error).split())
        line = f"{tracker.name} logging stopped ({type(error).__name__}: {message}); metrics.jsonl goes on"
        self.console(line, logging.WARNING)

    def close(self, status: int = 0) -> None:
        """Closes the file and the bar and ends the trackers; status: the run's exit status (0 when it ended,
        a stop's, 1 for an error), which W&B records."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            try:
                tracker.close(status)
            except Exception as error:  # the checkpoint and metrics.jsonl are what a stopping run must keep
                self._tracker_failed(tracker, error)
        if self._file is not None:
            self._file.close()
            self._file = None


def console_line(record: dict[str, Any]) -> str:
    """`step 10/300 | loss 3.21 (mlm 2.1 ...) | lr 1.00e-03 | gnorm 1.2 | 812 samples/s | MFU 41.0% | wait 3% |
    1.2 GiB | eta 0:04:10`; the fields a record lacks are left out."""
    parts = [f"step {record['step']}/{record['total_steps']}", f"loss {record['loss']:.4f}"]
    components = " ".join(f"{k} {v:.3f}" for k, v in record.get("losses", {}).items())
    if components:
        parts[-1] += f" ({components})"
    parts.append(f"lr {record['lr'] + 0.0:.2e}")  # + 0.0: the linear schedule ends at -0.0
    parts.append(f"gnorm {record['grad_norm']:.3g}" if isinstance(record["grad_norm"], float) else "gnorm -")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    if record.get("tflops") is not None:
        parts.append(f"{record['tflops']:.2f} TFLOP/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("data_wait_share") is not None:
        parts.append(f"wait {100 * record['data_wait_share']:.0f}%")
    parts.append(f"{record['peak_memory_gib']:.2f} GiB")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    if record.get("eta_s") is not None:
        parts.append(f"eta {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """`0:04:10`, `1 d 2:03:04`: hours, minutes and seconds, days when there are any."""
    seconds = max(0, round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} d {text}" if days else text
