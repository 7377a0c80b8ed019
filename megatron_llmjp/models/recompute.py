"""Activation recompute: ``RecomputeConfig`` onto megatron-core's ``TransformerConfig``.

The one place that maps the ``recompute`` section; the planner reads the same section
(``planner/activations.py``). The config alone is checked by ``config/validate.py``; what
depends on the layer backend is checked here, before megatron-core sees the settings:

* ``layernorm`` and ``moe_act`` need Transformer Engine: both run through megatron-core
  0.16.1's ``CheckpointWithoutOutput``, whose ``fp8`` flag is ``fp8 is not None`` (True for its
  default ``False``), so its forward always calls TE's ``FP8GlobalStateManager`` (a
  ``NameError`` without TE). On the local spec (CPU) ``core_attn``, ``mlp`` and ``moe`` work.
* ``moe_act`` recomputes the activation of grouped-GEMM experts only (megatron-core refuses it
  without ``moe_grouped_gemm``); grouped GEMM needs Transformer Engine (``TEGroupedMLP``) or
  the CUDA ``grouped_gemm`` package.
* ``layernorm`` recomputes the layer's stand-alone norm modules. The Transformer Engine spec
  fuses a dense layer's two norms into ``linear_qkv`` and ``linear_fc1``
  (``TELayerNormColumnParallelLinear``), leaving only the MoE layer's pre-MLP norm: with TE
  ``layernorm`` recomputes nothing in a dense model.
* with TE FP8 (not delayed scaling, which the config check refuses) ``moe_act`` and
  ``layernorm`` need Transformer Engine >= 2.6 (megatron-core 0.16.1's requirement).
"""

from __future__ import annotations

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.schema import RunConfig

DEFAULT_MODULES: tuple[str, ...] = ("core_attn",)
"""megatron-core 0.16.1's default ``recompute_modules`` for selective recompute."""
TE_ONLY_MODULES: tuple[str, ...] = ("moe_act", "layernorm")
"""Modules megatron-core 0.16.1 recomputes only with Transformer Engine installed."""
LOCAL_MODULES: tuple[str, ...] = ("core_attn", "mlp", "moe")
"""Modules that recompute on the local spec (``mlp``: dense models, ``moe``: MoE models)."""


def selected_modules(cfg: RunConfig) -> tuple[str, ...]:
    """The modules selective recompute recomputes (megatron-core's default when unset); empty
    for ``none`` and ``full``."""
    r = cfg.recompute
    if r.granularity != "selective":
        return ()
    return tuple(DEFAULT_MODULES if r.modules is None else r.modules)


def check_recompute_backend(cfg: RunConfig, te: bool, te_installed: bool | None = None) -> None:
    """Raise ``ConfigError`` (naming ``recompute.modules``) for modules the layer backend
    cannot recompute. ``te``: the Transformer Engine spec is in use (else the local spec);
    ``te_installed``: Transformer Engine imports (default: ``te``; the local spec runs on a
    GPU with TE for emulated FP8). Needs no process group."""
    if te_installed is None:
        te_installed = te
    modules = selected_modules(cfg)
    key = f"recompute.modules={list(modules)}"
    need_te = [x for x in modules if x in TE_ONLY_MODULES]
    if need_te and not te_installed:
        raise ConfigError(
            f"{key}: {', '.join(need_te)} recompute needs Transformer Engine (CUDA): "
            "megatron-core 0.16.1 recomputes layernorm and moe_act with "
            "CheckpointWithoutOutput, which calls TE (and moe_act needs grouped-GEMM experts). "
            f"Without TE (the local spec, CPU) use {', '.join(LOCAL_MODULES)}"
        )
    # moe_act also needs grouped-GEMM experts: config.performance_checks decides that, from
    # the resolved performance.moe_grouped_gemm.
    if te and "layernorm" in modules and not cfg.model.is_moe:
        raise ConfigError(
            f"{key}: with Transformer Engine a dense model's norms are fused into linear_qkv "
            "and linear_fc1, so layernorm recomputes nothing (drop it)"
        )
    if te and cfg.precision.fp8 and cfg.precision.fp8_backend == "te":
        bad = sorted({"moe_act", "layernorm"} & set(modules))
        if bad:
            from megatron.core.utils import is_te_min_version

            if not is_te_min_version("2.6.0dev0"):
                raise ConfigError(
                    f"{key}: {', '.join(bad)} recompute with precision.fp8 needs Transformer "
                    "Engine >= 2.6 (megatron-core 0.16.1)"
                )


def recompute_kwargs(cfg: RunConfig, te: bool | None = None) -> dict:
    """``TransformerConfig`` keyword arguments for ``cfg.recompute`` (empty for ``none``).

    ``te``: whether the Transformer Engine spec is in use (None: decide as ``models.build``
    does). Raises ``ConfigError`` from :func:`check_recompute_backend`."""
    if te is None:
        from megatron_llmjp.models.build import use_transformer_engine

        te = use_transformer_engine(cfg)
    from megatron.core.tensor_parallel import random as mcore_random

    # what megatron-core's CheckpointWithoutOutput needs: its own "TE imports" flag
    check_recompute_backend(cfg, te, te or mcore_random.HAVE_TE)
    r = cfg.recompute
    if r.granularity == "none":
        return {}
    if r.granularity == "selective":
        modules = list(selected_modules(cfg))
        return dict(recompute_granularity="selective", recompute_modules=modules)
    return dict(
        recompute_granularity="full",
        recompute_method=r.method,
        recompute_num_layers=r.num_layers,
    )
