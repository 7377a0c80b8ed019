"""Command-line entry points, one thin module per command (``llmjp-train``, ``llmjp-plan``, ...)."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The ``--set KEY=VALUE`` option every config-reading command shares (into ``overrides``)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


def doc_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first line (after ``prog: ``)
    and whose epilog is the rest of it (the examples), kept as written."""
    lines = doc.splitlines()
    return argparse.ArgumentParser(
        prog=prog,
        description=lines[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(lines[2:]),
    )
