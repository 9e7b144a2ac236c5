"""The engine's console lines go through Python's logging: each module logs to its own `logging.getLogger(__name__)`
(config, log lines, evaluations, resume notes, the end-of-run report), and this module is the one place that gives
them a console. The command lines (lxmert-pretrain, lxmert-finetune, python -m engine.main, the benchmarks that
train) call configure_logging() first; importing engine configures nothing, so a library user gets standard
logging (no handler: warnings and errors only, on stderr).

    configure_logging()          # rank from the launcher's environment: rank 0 at INFO, the others at WARNING

The handler writes each record's message alone (`%(message)s`, no level or time) to stdout and flushes it, so the
console reads as plain lines; it looks up sys.stdout when it writes (a test's captured stdout included). Other
ranks log at WARNING, so a problem on any rank still shows.
"""

from __future__ import annotations

import logging
import sys

ROOT = "engine"  # the logger every engine module's logger is a child of


class _Stdout(logging.StreamHandler):
    """A StreamHandler on whatever sys.stdout is when a record is written, flushed each line."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # logging.StreamHandler's attribute, read when it writes and flushes
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(rank: int | None = None) -> logging.Logger:
    """Give the engine's loggers their console: plain lines on stdout, INFO on rank 0 and WARNING on the other
    ranks (`rank`: the launcher's, RANK, when None). Calling it again only sets the level."""
    if rank is None:
        from engine.launch import Launch

        rank = Launch.from_env().rank
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False  # a root handler another library sets up would print every line twice
    return logger
