"""Command-line entry points (``llmjp-train``, ``llmjp-params``)."""
