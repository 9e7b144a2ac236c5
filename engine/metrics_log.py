"""Training logs: one JSON line per logging step in <output_dir>/metrics.jsonl, a compact console line.

    log = MetricsLog(output_dir, enabled=rank == 0)
    log.write({"step": 10, "loss": 3.2, ...})    # appended, flushed: a killed run keeps every line written
    log.console("step 10 | loss 3.2 | ...")     # through tqdm when a progress bar is open

Throughput figures (samples/s, tokens/s, TFLOP/s, MFU, data-wait share) are computed by the trainer over the
window since the previous log line; this module only writes them. `peak_memory_gib` reads the accelerator's
allocator peak (CUDA) or the process's peak resident set size (CPU).
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch


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


class MetricsLog:
    """Appends JSON records to `<output_dir>/metrics.jsonl` (rank 0 only: others get enabled=False)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, progress_total: int | None = None,
                 progress_initial: int = 0) -> None:  # fmt: skip
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._bar = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
            if progress_total is not None and sys.stderr.isatty():
                from tqdm import tqdm

                self._bar = tqdm(total=progress_total, initial=progress_initial, unit="step", dynamic_ncols=True)

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(_plain(record)) + "\n")
            self._file.flush()

    def advance(self, steps: int = 1, samples_per_s: float | None = None) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if samples_per_s is not None:
                self._bar.set_postfix(samples_s=f"{samples_per_s:.1f}", refresh=False)

    def console(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            self._file.close()
            self._file = None


def console_line(record: dict[str, Any]) -> str:
    """`step 10/300 | loss 3.21 (mlm 2.1 ...) | lr 1.0e-03 | 812 samples/s | MFU 41.0% | wait 3% | 1.2 GiB`."""
    parts = [f"step {record['step']}/{record['total_steps']}", f"loss {record['loss']:.4f}"]
    components = " ".join(f"{k} {v:.3f}" for k, v in record.get("losses", {}).items())
    if components:
        parts[-1] += f" ({components})"
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"gnorm {record['grad_norm']:.3g}" if isinstance(record["grad_norm"], float) else "gnorm -")
    parts.append(f"{record['samples_per_s']:.1f} samples/s")
    parts.append(f"{record['tflops']:.2f} TFLOP/s")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"wait {100 * record['data_wait_share']:.0f}%")
    parts.append(f"{record['peak_memory_gib']:.2f} GiB")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)
