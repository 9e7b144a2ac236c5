"""Stopping a run early without losing it: preemption signals, a wall-clock limit, and a run that only skips steps.

    requests = StopRequests(config.train.preempt_signal)     # handlers that only set a flag: install() ...
    clock, group = TimeLimit(config.train.time_limit), agreement_group(world_size)
    code = agree(requests.code or (TIME_LIMIT if rank == 0 and clock.due() else 0), group)  # at a step boundary:
    status = status_of(code) if code else None              # the same on every rank; ... restore()

The signal handlers never raise: SIGTERM, SIGINT (^C) and train.preempt_signal (SIGUSR1 by default, what SLURM's
`--signal=USR1@120` sends ahead of its SIGTERM) only record which signal came first. The loop (engine/train.py)
asks at step boundaries; with several ranks they agree on the step through `agree`, a MAX all-reduce of one
integer in host memory on a gloo group (the default group on the CPU, a gloo group beside NCCL on GPUs): ranks get
signals at different moments, and a device tensor read there would make the host wait for the device every step.
A second ^C more than a second after the first exits at once (one line, status 130; the checkpoint being written
is discarded, engine/checkpoint.py writes them atomically); the same SIGINT passed on at once by a launcher
(torchrun forwards what a scheduler also sends its workers) does not count as a second one. DataLoader workers
leave these signals to their main process (shield_worker).

Exit statuses (the CLIs and engine.main return them; README, "Preemption and time limits"):
    0    finished
    2    a configuration or input error (one line)
    3    stopped after train.max_skipped_steps consecutive non-finite steps, with a checkpoint of the last applied
         weights (a skipped step applies nothing)
    75   stopped early with a checkpoint, to be resumed by the same command: SIGTERM, train.preempt_signal or
         train.time_limit (EX_TEMPFAIL of sysexits.h: "try again later")
    130  ^C, after its checkpoint (or before training started, with nothing to save); a second ^C at once
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130
EXIT_ALLOWANCE_S = 5.0  # train.time_limit: the process's exit after the last save (workers, process groups, torch)
SECOND_INTERRUPT_AFTER_S = 1.0  # a SIGINT sooner than this after the first is the same ^C passed on by a launcher

# What a stop is agreed on: the highest code any rank (or rank 0's clock) reports wins.
TIME_LIMIT, PREEMPT_SIGNAL, SIGTERM_CODE, SIGINT_CODE = 1, 2, 3, 4
_REASONS = {
    TIME_LIMIT: "train.time_limit",
    PREEMPT_SIGNAL: "preempt signal",
    SIGTERM_CODE: "SIGTERM",
    SIGINT_CODE: "SIGINT",
}


def reason_name(code: int, preempt_signal: str = "") -> str:
    return preempt_signal if code == PREEMPT_SIGNAL and preempt_signal else _REASONS[code]


def status_of(code: int) -> int:
    """The process's exit status after a stop agreed on with `code`."""
    return EXIT_INTERRUPTED if code == SIGINT_CODE else EXIT_PREEMPTED


def signal_number(name: str) -> signal.Signals:
    """A signal by name ("SIGUSR1", "USR1"); ValueError for one that cannot be caught or is not a signal."""
    text = name.strip().upper()
    text = text if text.startswith("SIG") else "SIG" + text
    number = getattr(signal.Signals, text, None)
    if number is None or number in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{name!r} is not a signal a process can catch (e.g. SIGUSR1, SIGUSR2)")
    return number


_DURATION = re.compile(r"(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})")


def parse_duration(value: float | str) -> float:
    """Seconds from a number or "HH:MM:SS" / "D-HH:MM:SS" (SLURM's --time layout); ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value).strip())
        if not match:
            raise ValueError(f"{value!r} is neither seconds nor HH:MM:SS (or D-HH:MM:SS)")
        days, hours, minutes, secs = (int(g or 0) for g in match.groups())
        if minutes > 59 or secs > 59:
            raise ValueError(f"{value!r}: minutes and seconds must be below 60")
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{value!r} must be a positive duration")
    return seconds


def process_age() -> float:
    """Seconds since this process started (Linux: /proc; elsewhere since this module was imported)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()
_ENDS_THE_PROCESS = False  # set by interrupt_in_one_line while a CLI's main runs: its stop is the process's end


def _ignore_stop_signals() -> None:
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_IGN)


class StopRequests:
    """Between install() and restore() (or within `with`): SIGTERM, SIGINT and the preempt signal set a flag (the
    first one is kept); restore() puts the previous handlers back. Outside the main thread (signals cannot be
    handled there) nothing is installed. A process forked meanwhile inherits the handlers, which do nothing there
    (DataLoader workers: see shield_worker)."""

    def __init__(self, preempt_signal: str = "") -> None:
        self.preempt = signal_number(preempt_signal) if preempt_signal else None
        self.code = 0
        self._first_interrupt: float | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for number in {signal.SIGTERM, signal.SIGINT, *([self.preempt] if self.preempt else [])}:
                previous = signal.signal(number, self._handle)
                owner = getattr(previous, "__self__", None)
                if isinstance(owner, StopRequests):  # kept by a stopped CLI run in this process: what it replaced
                    previous = owner._previous.get(number, signal.SIG_DFL)
                self._previous[number] = previous

    def restore(self) -> None:
        if self.code and _ENDS_THE_PROCESS:  # a CLI stopping: see interrupt_in_one_line
            return
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequests:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def _handle(self, number: int, frame: Any) -> None:
        if os.getpid() != self._pid:
            return
        if number == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is None:
                self._first_interrupt = now
            elif now - self._first_interrupt > SECOND_INTERRUPT_AFTER_S:
                os.write(2, b"interrupted again: exiting now, without a checkpoint of this step\n")
                os._exit(EXIT_INTERRUPTED)
        code = {signal.SIGINT: SIGINT_CODE, signal.SIGTERM: SIGTERM_CODE}.get(number, PREEMPT_SIGNAL)
        self.code = self.code or code


class TimeLimit:
    """train.time_limit, counted from the start of the process: `due()` says whether to stop at this step boundary,
    leaving time for what may still come before the next boundary, a checkpoint and the exit. The margin is twice
    the longest step-to-step interval seen (steps, evaluations and checkpoints in it) plus twice the longest
    checkpoint save seen plus EXIT_ALLOWANCE_S; before the first save its time is unknown, hence the advice to set
    the limit a few minutes below the scheduler's. The first interval holds the first step's warm-up (compilation
    included): it errs early."""

    def __init__(self, limit: float | str | None) -> None:
        self.limit = parse_duration(limit) if limit not in (None, "") else None
        self.longest_interval = 0.0
        self.longest_save = 0.0
        self._boundary = time.monotonic()

    def boundary(self) -> None:
        """A step boundary: the interval since the previous one is measured."""
        now = time.monotonic()
        self.longest_interval = max(self.longest_interval, now - self._boundary)
        self._boundary = now

    def saved(self, seconds: float) -> None:
        self.longest_save = max(self.longest_save, seconds)

    def due(self) -> bool:
        if self.limit is None:
            return False
        return process_age() + 2 * (self.longest_interval + self.longest_save) + EXIT_ALLOWANCE_S >= self.limit


def shield_worker(worker_id: int) -> None:
    """A DataLoader worker_init_fn: a scheduler signals every process of the job, loader workers included, but the
    stop is the main process's to make (it may still fetch the batches of the step in flight). A worker forked while
    StopRequests is installed ignores the signals the main process handles; SIGTERM only where it comes from its
    parent, which is how torch and multiprocessing shut workers down (torch's own worker handler dies of anyone's
    SIGTERM, and the main process would then fail on the lost worker): a thread waits for it, blocked elsewhere."""
    handled = [
        n for n in signal.valid_signals() if getattr(signal.getsignal(n), "__func__", None) is StopRequests._handle
    ]
    for number in handled:
        if number != signal.SIGTERM:
            signal.signal(number, signal.SIG_IGN)
    if signal.SIGTERM in handled:
        parent = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

        def wait_for_the_parent() -> None:
            while True:
                if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                    os._exit(0)

        threading.Thread(target=wait_for_the_parent, name="sigterm-from-parent", daemon=True).start()


def agreement_group(world_size: int) -> Any:
    """The process group `agree` all-reduces on: None alone; the default group where it is gloo; else a new gloo
    group (a collective call: every rank makes it, at the same point)."""
    if world_size <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def agree(code: int, group: Any) -> int:
    """The highest stop code over the ranks of `group` (code alone without one): an all-reduce of one integer in
    host memory, which never waits for the device."""
    if group is None:
        return code
    import torch
    import torch.distributed as dist

    flag = torch.full((1,), code, dtype=torch.int32, device="cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def interrupt_in_one_line(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """A CLI's main: ^C outside the training loop (loading, building, DeepSpeed's start) is one line on stderr and
    status 130, not a traceback."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            # In a CLI a stop ends the process: StopRequests then keeps its handlers to the exit, so the same signal
            # passed on again (a launcher forwarding the scheduler's SIGTERM or ^C) is absorbed instead of killing
            # the process on its way out (status -2 instead of 130) or raising KeyboardInterrupt there.
            # At the exit they become SIG_IGN: the interpreter's finalisation puts Python-level handlers back to
            # SIG_DFL, and a duplicate arriving then would still kill the process.
            global _ENDS_THE_PROCESS
            ends, _ENDS_THE_PROCESS = _ENDS_THE_PROCESS, True
            try:
                status = main(*args, **kwargs)
                if status in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
                    atexit.register(_ignore_stop_signals)
                return status
            except KeyboardInterrupt:
                print(f"{prog}: interrupted (^C) outside the training loop", file=sys.stderr, flush=True)
                return EXIT_INTERRUPTED
            finally:
                _ENDS_THE_PROCESS = ends

        return run

    return wrap
