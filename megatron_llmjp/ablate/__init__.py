"""Paired-run ablations (``llmjp-ablate``): one base run, a baseline and variants that start
from one shared initial checkpoint with the same seed and data order, and a report of their
loss curves, loss deltas, divergence, throughput and MFU.

``spec`` reads and checks the ablation file, ``runner`` runs (or submits) the runs and keeps
their status, ``report`` turns their ``metrics.jsonl`` files into ``report.md``,
``summary.json`` and plots.
"""
