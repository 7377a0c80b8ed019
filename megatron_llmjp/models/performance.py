"""megatron-core's performance switches: ``PerformanceConfig`` onto ``TransformerConfig``.

The one place that maps the ``performance`` section.
"""

from __future__ import annotations

from megatron_llmjp.config.schema import RunConfig


def performance_kwargs(cfg: RunConfig, te: bool) -> dict:
    """``TransformerConfig`` keyword arguments for ``cfg.performance`` on this backend
    (``te``: the Transformer Engine spec is in use)."""
    kwargs = dict(
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if cfg.model.is_moe:
        kwargs.update(moe_grouped_gemm=te, moe_permute_fusion=False)
    return kwargs
