"""One progress display for the long-running tools (preprocessing, conversion, upcycling).

A ``tqdm`` bar on a terminal. When the stream is not a terminal (a batch job's log), plain
lines instead: no carriage returns or escape codes, at most one line per ``log_every`` seconds,
and nothing at all for a job shorter than that.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import tqdm

PLAIN_FORMAT = (
    "{desc}: {percentage:5.1f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
)
"""The line written per update when the stream is not a terminal (no bar)."""


class _PlainLines:
    """File-like adapter: each redraw tqdm writes (``\\r`` + status + padding) becomes one line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: TextIO | None) -> bool:
    """Whether ``stream`` is an interactive terminal."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    total: float,
    desc: str,
    *,
    unit: str = "it",
    unit_scale: bool = False,
    enabled: bool = True,
    stream: TextIO | None = None,
    tty_every: float = 0.2,
    log_every: float = 60.0,
) -> tqdm:
    """A ``tqdm`` progress bar over ``total`` units on ``stream`` (default: stderr).

    On a terminal it is redrawn at most every ``tty_every`` seconds; otherwise it writes plain
    lines (``PLAIN_FORMAT``), the first after ``log_every`` seconds and then at most one per
    ``log_every`` seconds. ``enabled=False`` returns a bar that writes nothing. Use it as a
    context manager or call ``close()``."""
    stream = sys.stderr if stream is None else stream
    common = dict(total=total, desc=desc, unit=unit, unit_scale=unit_scale, disable=not enabled)
    if is_terminal(stream):
        return tqdm(file=stream, mininterval=tty_every, dynamic_ncols=True, **common)
    return tqdm(
        file=_PlainLines(stream),
        mininterval=log_every,
        delay=log_every,
        ascii=True,
        bar_format=PLAIN_FORMAT,
        **common,
    )
