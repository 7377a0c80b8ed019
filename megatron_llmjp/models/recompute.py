"""Activation recompute: ``RecomputeConfig`` onto megatron-core's ``TransformerConfig``.

The one place that maps the ``recompute`` section; the planner reads the same section.
"""

from __future__ import annotations

from megatron_llmjp.config.schema import RunConfig

DEFAULT_MODULES: tuple[str, ...] = ("core_attn",)
"""megatron-core 0.16.1's default ``recompute_modules`` for selective recompute."""


def recompute_kwargs(cfg: RunConfig) -> dict:
    """``TransformerConfig`` keyword arguments for ``cfg.recompute`` (empty for ``none``)."""
    r = cfg.recompute
    if r.granularity == "none":
        return {}
    if r.granularity == "selective":
        modules = list(DEFAULT_MODULES if r.modules is None else r.modules)
        return dict(recompute_granularity="selective", recompute_modules=modules)
    return dict(
        recompute_granularity="full",
        recompute_method=r.method,
        recompute_num_layers=r.num_layers,
    )
