"""What a run's output directory guarantees: one run at a time, a resume only where the config allows it, and a
failed write said in one line.

    lock = RunLock.take(output_dir, rank)     # before anything is written; RunError naming the holder otherwise
    ...
    lock.release()                            # also at exit (atexit) and when the Trainer's start-up fails

The lock, `<dir>/run.lock`, holds the holder's pid, host, start time and job (the launcher's MASTER_ADDR,
MASTER_PORT and TORCHELASTIC_RUN_ID, so the job's other ranks recognise it). It is created atomically: a hard link
to a fully written draft, which fails where the lock exists as O_CREAT | O_EXCL would (also on NFS), and no reader
ever sees half of it. The holder refreshes the file's modification time every HEARTBEAT_S seconds from a daemon
thread (never on the training step's path). Another run into the directory is refused at once, in one line naming
the directory and the holder, unless the lock is dead: its pid is gone on this host, or its heartbeat is older
than STALE_S (a holder on another node that was killed; also a reused pid here). A dead lock is taken over with one
line saying so. Released on every exit of the process but a kill (atexit), by the CLIs at the end of a run and when
the start-up fails; a killed holder's lock is what the dead-pid and heartbeat rules are for. The lock is re-entrant
within a process (tests and the main job build several Trainers on one directory in one process).

Ranks: rank 0 takes the lock; the other ranks (every rank shares the output directory's filesystem: DeepSpeed
writes each rank's checkpoint shard there) wait until the lock names their own job, and stop in one line when it
names a live other job (the refusal rank 0 prints too) or rank 0 never takes it (RANK_WAIT_S).

Resume checks (`resume_conflicts`): a checkpoint is continued only by a run whose config agrees with the run that
wrote it (its <run>/config.yaml) wherever a resume cannot absorb a change; ABSORBED lists the keys that may differ.

A fresh start into a directory a run has written (train.resume=none): rank 0, holding the lock, moves what is there
into <dir>/previous-<UTC time>/ first (`set_aside`), so the new run's checkpoints, log and config never mix with or
write over the old ones, and nothing already written is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0  # how often the holder refreshes the lock's modification time
STALE_S = 600.0  # a lock whose heartbeat is older is dead (clock skew between nodes and NFS caching tolerated)
RANK_WAIT_S = 300.0  # how long a rank > 0 waits for rank 0 to take the lock (rank 0 opens the stores first)


class RunError(RuntimeError):
    """A run that cannot start or go on for a reason outside the config (a directory in use, a full disk); the
    message is one line naming the directory or file."""


def _host() -> str:
    return socket.gethostname()


def _job_id() -> str:
    """What every rank of one launch shares (empty for a process started alone)."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return ""
    return f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}:{env.get('TORCHELASTIC_RUN_ID', '')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read(path: Path) -> tuple[dict[str, Any] | None, float | None]:
    """The lock's holder and the age of its heartbeat in seconds; (None, None) when there is no lock file, and
    ({}, age) when it cannot be parsed (a holder killed while writing it: the heartbeat rule applies)."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(text)
    except ValueError:
        holder = {}
    return holder if isinstance(holder, dict) else {}, age


def _describe(holder: dict[str, Any], age: float) -> str:
    if not holder:
        return f"an unreadable lock (heartbeat {age:.0f} s ago)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} since {started} (heartbeat {age:.0f} s ago)"


def _dead(holder: dict[str, Any], age: float) -> str | None:
    """Why the lock is dead, or None while its holder may be running."""
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old (stale after {STALE_S:.0f} s)"
    if holder.get("host") == _host() and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"pid {holder['pid']} is not running on this host"
    return None


_held: dict[Path, RunLock] = {}  # this process's locks, by resolved directory


class RunLock:
    """One run's hold on an output directory (see the module docstring)."""

    def __init__(self, directory: Path, path: Path, token: str, created_dir: bool) -> None:
        self.directory, self.path, self.token, self.created_dir = directory, path, token, created_dir
        self.count = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"run.lock heartbeat {directory}", daemon=True)
        self._thread.start()

    @classmethod
    def take(
        cls,
        directory: str | Path,
        rank: int = 0,
        report: Callable[[str], Any] = logger.info,
        elsewhere: str = "another train.output_dir",
    ) -> RunLock | None:
        """Rank 0: the lock of `directory` (created if missing), or RunError naming the holder (and `elsewhere`,
        where else to write). Other ranks: wait for rank 0's (None), or RunError."""
        directory = Path(directory)
        if rank != 0:
            _wait_for_rank0(directory, rank)
            return None
        key = directory.resolve()
        mine = _held.get(key)
        if mine is not None and mine.path.is_file():
            mine.count += 1
            return mine
        created = not directory.exists()
        path = directory / LOCK_FILE
        token = secrets.token_hex(8)
        record = {"pid": os.getpid(), "host": _host(), "started": time.time(), "job": _job_id(), "token": token}
        draft = directory / f".{LOCK_FILE}.{token}"  # written whole first: a reader never sees a half-written lock
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(draft, "w", encoding="utf-8") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as error:  # an unwritable or full output directory: nothing of the run can be written
            with contextlib.suppress(OSError):
                draft.unlink(missing_ok=True)
            raise RunError(write_failure(error, directory, "taking the run's lock")) from None
        try:
            return cls._install(directory, key, path, draft, token, created, report, elsewhere)
        finally:
            draft.unlink(missing_ok=True)

    @classmethod
    def _install(
        cls,
        directory: Path,
        key: Path,
        path: Path,
        draft: Path,
        token: str,
        created: bool,
        report: Callable[[str], Any],
        elsewhere: str,
    ) -> RunLock:
        for _ in range(5):  # each round: create, or find a live holder, or move a dead lock aside
            try:
                os.link(draft, path)  # atomic, and fails where the lock exists (as O_CREAT | O_EXCL would)
            except FileExistsError:
                holder, age = _read(path)
                if holder is None:
                    continue  # released meanwhile
                why = _dead(holder, age)
                if why is None:
                    raise RunError(
                        f"{directory} is in use by another run: {_describe(holder, age)}, lock {path}; "
                        f"wait for it, or write to {elsewhere}"
                    ) from None
                if _move_aside(path, holder):
                    report(f"{directory}: took over the lock of {_describe(holder, age)}: {why}")
                continue
            lock = cls(directory, path, token, created)
            _held[key] = lock
            return lock
        raise RunError(f"{directory}: could not take the lock {path} (other runs keep taking it)")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # the directory went away: nothing left to guard
                return

    def release(self) -> None:
        """Drop one hold; the last removes the lock file (only if it is still this run's) and the directory if
        the lock created it and nothing else was written."""
        self.count -= 1
        if self.count > 0:
            return
        self._stop.set()
        _held.pop(self.directory.resolve(), None)
        holder, _ = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            try:
                self.directory.rmdir()  # only when empty
            except OSError:
                pass


def _move_aside(path: Path, holder: dict[str, Any]) -> bool:
    """Rename a dead lock out of the way (atomic: of two runs taking it over, one rename wins). If what was moved
    is not the lock judged dead (a third run took it meanwhile), it is put back."""
    aside = path.with_name(f"{LOCK_FILE}.dead.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved, _ = _read(aside)
    if moved is not None and moved.get("token") != holder.get("token"):
        try:
            os.link(aside, path)  # never over a lock created meanwhile
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


PREVIOUS = "previous-"  # <dir>/previous-<UTC time>/: what a fresh start found there


def set_aside(directory: str | Path) -> Path | None:
    """Everything in `directory` but the lock (and earlier set-asides) moved into a new <dir>/previous-<UTC time>/,
    each entry by one rename (a kill midway leaves the rest, which the next fresh start moves); None when there is
    nothing to move."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    kept = (LOCK_FILE, f".{LOCK_FILE}", PREVIOUS)
    entries = sorted(p for p in directory.iterdir() if not p.name.startswith(kept))
    if not entries:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = directory / f"{PREVIOUS}{stamp}"
    for n in range(2, 1000):  # two fresh starts in one second
        if not target.exists():
            break
        target = directory / f"{PREVIOUS}{stamp}-{n}"
    target.mkdir()
    for entry in entries:
        entry.rename(target / entry.name)
    return target


def _wait_for_rank0(directory: Path, rank: int) -> None:
    """A rank > 0: return once the lock is this job's; RunError when it is a live other job's, or never taken."""
    job, path = _job_id(), directory / LOCK_FILE
    deadline = time.monotonic() + RANK_WAIT_S
    while time.monotonic() < deadline:
        holder, age = _read(path)
        if holder is not None:
            if holder.get("job") == job:
                return
            if _dead(holder, age) is None:  # a live other run: rank 0 refuses it too (a dead one it takes over)
                raise RunError(f"{directory} is in use by another run: {_describe(holder, age)}")  # rank 0's line
        time.sleep(0.2)
    raise RunError(f"rank {rank}: rank 0 did not take the lock {path} within {RANK_WAIT_S:.0f} s")


def release_all() -> None:
    """Every lock this process holds (atexit: normal exits and uncaught exceptions)."""
    for lock in list(_held.values()):
        lock.count = 1
        lock.release()


atexit.register(release_all)


# ----------------------------------------------------------------------------------------- resume checks

ABSORBED = (
    "model.attn_backend",
    "model.feat_loss_backend",
    "model.initializer_range",
    "data.loader",
    "data.num_workers",
    "train.epochs",
    "train.max_steps",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.world_size",
    "train.compile",
    "train.compile_backend",
    "train.cuda_graphs",
    "train.activation_checkpointing",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.output_dir",
    "train.resume",
    "train.init_from",
    "train.threads",
    "train.report_to",
    "train.wandb_project",
    "train.wandb_name",
    "train.wandb_dir",
    "deepspeed.config",
)
"""The keys a resumed run may change (everything else must equal the checkpoint's run):
- the model's kernels (attn_backend, feat_loss_backend: the same parameters and arithmetic up to rounding) and
  initializer_range (a resumed model is loaded, never initialised);
- the loader's kind and workers (every loader gives the same batches for a seed);
- how long the run goes (epochs, max_steps: the schedule is recomputed over the new total, so the learning rate
  moves to the new curve; a line says so);
- how the global batch is split (micro batch, accumulation, ranks: the global batch, which must match, is what
  the optimizer sees) and what only costs time or memory (compile, activation checkpointing, threads, the
  DeepSpeed template's tuning);
- the loop's cadence and bookkeeping (log / eval / save intervals, checkpoints kept, the trackers and their
  W&B settings), where it writes and what it resumes or starts from (output_dir, resume, init_from: a checkpoint
  takes precedence over init_from).
Refused, with both values: the rest of the architecture and the heads (the weights' shapes and the losses), the
global batch, the stores and every data.* draw (the loader's position means nothing in another stream),
train.task, train.seed, precision, ZeRO stage and offload (the optimizer state's layout), and optim.* (the
checkpoint's optimizer and schedule state carries the old lr, betas and schedule and would silently win).
A deliberate new schedule from a checkpoint's weights is train.resume=weights:<checkpoint> (a new output_dir)."""

SCHEDULE_LENGTH = ("train.epochs", "train.max_steps")
WEIGHTS_KEYS = ("train.task",)  # besides the architecture, what a weights-only start must share


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    if key.startswith("data.") and key.endswith((".text", ".features")) and old and new:  # a store by another name
        try:
            return os.path.samefile(old, new)
        except OSError:
            return False
    return False


def resume_conflicts(
    old: dict[str, Any], new: dict[str, Any], only: tuple[str, ...] | None = None
) -> tuple[list[str], list[str]]:
    """(conflicts, absorbed schedule changes) between the flattened config of the checkpoint's run and this
    run's: "key old -> new" each. `only`: compare just these keys (a weights-only start)."""
    conflicts, stretched = [], []
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            continue  # a key added or retired since: nothing to compare
        if only is not None and key not in only:
            continue
        if _same(key, old[key], new[key]):
            continue
        change = f"{key} {old[key]!r} -> {new[key]!r}"
        if only is None and key in ABSORBED:
            if key in SCHEDULE_LENGTH:
                stretched.append(change)
            continue
        conflicts.append(change)
    return conflicts, stretched


# ----------------------------------------------------------------------------------------- failed writes

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def write_failure(error: OSError, directory: str | Path, what: str, needed: int | None = None) -> str:
    """One line for an OSError while writing `what` into `directory`: the file, why, the bytes needed where
    known and free on that filesystem."""
    where = error.filename or directory
    line = f"{what} into {directory} failed: {where}: {error.strerror or error}"
    parts = []
    if needed:
        parts.append(f"it needed about {needed / 2**20:.1f} MiB")
    try:
        parts.append(f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free there")
    except OSError:
        pass
    return line + (f" ({', '.join(parts)})" if parts else "")
