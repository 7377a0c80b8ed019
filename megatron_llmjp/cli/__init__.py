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
