"""``ConfigError``: the one exception type for configuration problems.

It lives in its own module so that every layer (data, precision, parallel, ...) can raise it
without importing the config loader, and ``config/`` imports nothing above it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem found before any expensive work starts."""
