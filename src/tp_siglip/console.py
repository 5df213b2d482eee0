"""What the command-line tools print, and how: one mechanism for every line a rank writes.

``tp-siglip encode`` runs as one process or as N torchrun ranks that share one terminal (or one pipe, or
one log file). This module holds what they print with:

* :class:`Printer`: results go to stdout on rank 0 only (above the progress bar when there is one);
  errors go to stderr on every rank, prefixed with :func:`rank_prefix` (``[rank N] `` under torchrun,
  nothing for one process); :meth:`Printer.progress` gives rank 0 a tqdm bar (a bar only on a terminal).
* :func:`setup_logging`: diagnostics through ``logging``, with the same prefix.
* :func:`write_line`: every line above is written whole, text and newline in one ``os.write`` on the
  stream's file descriptor. ``print(text, file=sys.stderr)`` writes the text and the newline separately,
  so two ranks failing at once could glue their lines (``...HF_HUB_OFFLINE=1.[rank 0] error: ...``); a
  single write of at most ``PIPE_BUF`` bytes (4096 on Linux) to a pipe is never interleaved with another.

Choices made: a stream without a file descriptor (pytest's ``capsys``, an ``io.StringIO``) gets the whole
line in one ``write`` call instead; the stream's own buffer is flushed first so that earlier output stays
in order. tqdm comes with huggingface_hub; without it there is no bar (:class:`NoBar`).
"""

from __future__ import annotations

import io
import logging
import os
import sys
from typing import Any, Optional, TextIO

__all__ = ["NoBar", "Printer", "rank_prefix", "setup_logging", "write_line"]


def rank_prefix(rank: int, world_size: int) -> str:
    """``"[rank N] "`` when several ranks share the output, ``""`` for one process."""
    return f"[rank {rank}] " if world_size > 1 else ""


def write_line(text: str, stream: Optional[TextIO] = None) -> None:
    """Write ``text`` and one newline to ``stream`` (default: ``sys.stderr``) as a single write."""
    stream = sys.stderr if stream is None else stream
    line = text.rstrip("\n") + "\n"
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        fd = None
    if fd is None:
        stream.write(line)
        stream.flush()
        return
    stream.flush()  # whatever the stream still buffers comes first
    data = line.encode(getattr(stream, "encoding", None) or "utf-8", errors="replace")
    while data:  # os.write may write less than asked (only for more than PIPE_BUF bytes to a pipe)
        data = data[os.write(fd, data):]


class NoBar:
    """A progress bar that shows nothing (no tqdm, or not rank 0)."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class Printer:
    """Rank 0 prints results to stdout (above the progress bar); every rank prints its errors to stderr."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.bar: Any = None

    def __call__(self, text: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            write_line(text, sys.stdout)

    def error(self, text: str) -> None:
        write_line(f"{rank_prefix(self.rank, self.world_size)}error: {text}", sys.stderr)

    def progress(self, total: int) -> Any:
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm comes with huggingface_hub; without it, no bar
            return NoBar()
        self.bar = tqdm(total=total, unit="img", disable=None if self.rank == 0 else True)  # None: a bar only on a terminal
        return self.bar


class _LineHandler(logging.StreamHandler):
    """A ``StreamHandler`` that writes each record as one whole line (see :func:`write_line`)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record), self.stream)
        except Exception:  # logging's own convention: report, never raise
            self.handleError(record)


def setup_logging(rank: int, world_size: int, level: int = logging.WARNING) -> None:
    """Like ``logging.basicConfig``: if the root logger has no handler yet, log ``level`` and above to stderr,
    each line prefixed with :func:`rank_prefix`. A program (or pytest) that set up logging already is left alone."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = _LineHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{rank_prefix(rank, world_size)}%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
