"""Parallel-layout planner: per-GPU memory and step-time estimates for the trainer's layouts.

``search.search(cfg, options)`` enumerates layouts, lets ``parallel.layout.make_layout`` (the
trainer's own check) accept or reject each, estimates memory (``memory``, ``activations``) and
step time (``timing``) on a GPU type from ``hardware``, and ranks those that fit.
No torch import: planning runs anywhere in about a second.
"""
