"""Atomic file writes: a temporary file in the same directory, flushed, fsynced and renamed over the target,
so a crash leaves either the old file or the new one, never half of one. The file gets the permissions a plain
open() would give it (0666 less the umask), not mkstemp's private 0600. A kill -9 can leave the temporary file
behind (`.<name>.<random>.tmp`); `remove_temp_files` clears them from a directory only this process writes.

`file_sha256(path)` is the one file checksum (checkpoint manifests, the stores' vocabulary fingerprints), read in
chunks so a multi-GB checkpoint part is never held in memory.

`kill_point(name)` is the crash tests' hook: with LXMERT_KILL_AT=name:N in the environment the process kills
itself (SIGKILL, like a power cut or the OOM killer) the N-th time it passes that point; otherwise a no-op.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def write_atomic(path: str | os.PathLike, write: Callable[[IO[str]], Any], newline: str | None = None) -> None:
    """Call write(f) on a temporary text file beside `path`, then rename it over `path` (and fsync the dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        kill_point("atomic.replace")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call write(name) to fill a temporary file beside `path` by name (a library that opens the file itself,
    as safetensors does), then fsync it, give it open()'s mode and rename it over `path` (and fsync the dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())  # the writer may have replaced the file with a private one
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_file_mode() -> int:
    """0666 less the process's umask: the mode open() gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_temp_files(directory: str | os.PathLike) -> None:
    """Delete the temporary files that writes killed before their rename left in `directory`."""
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


KILL_AT = "LXMERT_KILL_AT"
_passes: dict[str, int] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, hex, read in 1 MiB chunks (hashlib.file_digest would need Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def kill_point(name: str) -> None:
    """SIGKILL this process the N-th time it gets here when the environment has LXMERT_KILL_AT=name:N."""
    target = os.environ.get(KILL_AT)
    if not target or target.rpartition(":")[0] != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(target.rpartition(":")[2]):
        os.kill(os.getpid(), signal.SIGKILL)
