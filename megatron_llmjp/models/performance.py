"""megatron-core's performance switches: ``PerformanceConfig`` onto ``TransformerConfig``.

The one place that maps the ``performance`` section (and the MoE dispatcher's backend). The
rules that decide each switch are in ``config/performance_checks.py``
(:func:`~megatron_llmjp.config.performance_checks.resolve_performance`, a pure function of the
config and a :class:`PerformanceEnvironment`); this module probes the real machine, turns the
decision into megatron-core keyword arguments, and runs what a switch needs at run time:
Transformer Engine's userbuffers for ``tp_comm_overlap`` and the manual garbage collector.
"""

from __future__ import annotations

import gc

from megatron_llmjp.config.performance_checks import (
    PerformanceEnvironment,
    ResolvedPerformance,
    resolve_performance,
)
from megatron_llmjp.config.schema import RunConfig

__all__ = [
    "PerformanceEnvironment",
    "PerformanceRuntime",
    "check_performance_runtime",
    "ddp_kwargs",
    "performance_kwargs",
    "probe_environment",
    "resolved_performance",
]


def probe_environment() -> PerformanceEnvironment:
    """This process's machine as the performance rules see it: the device
    (``parallel.cpu_compat.device_type``, so a CPU run asks CUDA nothing), and on CUDA the
    compute capability, Transformer Engine's version, DeepEP and apex's fused-wgrad kernel
    (each imported to be sure it loads)."""
    import torch

    from megatron_llmjp.parallel import cpu_compat

    if cpu_compat.device_type() != "cuda":
        return PerformanceEnvironment()
    try:
        import transformer_engine

        te_version = str(getattr(transformer_engine, "__version__", "0"))
    except ImportError:
        te_version = None
    try:
        from deep_ep import Buffer  # noqa: F401  (what megatron-core's fused_a2a imports)

        deep_ep = True
    except ImportError:
        deep_ep = False
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401

        fused_wgrad = True
    except ImportError:
        fused_wgrad = False
    return PerformanceEnvironment(
        cuda=True,
        capability=tuple(torch.cuda.get_device_capability()),
        te_version=te_version,
        deep_ep=deep_ep,
        fused_wgrad=fused_wgrad,
    )


def resolved_performance(
    cfg: RunConfig, env: PerformanceEnvironment | None = None, *, refuse: bool = False
) -> ResolvedPerformance:
    """Every switch of ``cfg.performance`` decided for ``env`` (default: this machine).

    What a model is built with; training has refused a switch the machine or layout cannot
    run before this (:func:`check_performance_runtime`), so ``refuse=False`` (the default)
    only matters for models built outside training (conversion, parity, upcycling), where
    such a section takes the device defaults. ``refuse=True`` raises ``ConfigError`` naming
    the field instead."""
    env = probe_environment() if env is None else env
    return resolve_performance(cfg, env, refuse=refuse)


def check_performance_runtime(cfg: RunConfig) -> ResolvedPerformance:
    """The machine check of the ``performance`` section for training; call it before any
    process group exists (``training.trainer.check_runtime`` does). Raises ``ConfigError``
    naming the field for a switch this machine or layout cannot run."""
    return resolved_performance(cfg, refuse=True)


def performance_kwargs(cfg: RunConfig, env: PerformanceEnvironment | None = None) -> dict:
    """``TransformerConfig`` keyword arguments for ``cfg.performance`` on ``env`` (default:
    this machine). Covers the fusions, TP and p2p overlap (with ``batch_p2p_comm``), the
    attention backend and, for MoE models, grouped GEMM, permute fusion and the flex
    dispatcher's backend. Raises ``ConfigError`` as :func:`resolved_performance`."""
    from megatron.core.transformer.enums import AttnBackend

    r = resolved_performance(cfg, env)
    kwargs = dict(
        gradient_accumulation_fusion=r.gradient_accumulation_fusion,
        cross_entropy_loss_fusion=r.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl="native",
        tp_comm_overlap=r.tp_comm_overlap,
        overlap_p2p_comm=r.overlap_p2p_comm,
        batch_p2p_comm=r.batch_p2p_comm,
        attention_backend=AttnBackend[r.attention_backend],
    )
    if cfg.model.is_moe:
        kwargs.update(moe_grouped_gemm=r.moe_grouped_gemm, moe_permute_fusion=r.moe_permute_fusion)
        if r.moe_token_dispatcher == "flex":
            kwargs.update(moe_flex_dispatcher_backend="deepep")
    return kwargs


def ddp_kwargs(cfg: RunConfig) -> dict:
    """``DistributedDataParallelConfig`` keyword arguments: ``align_param_gather``, as
    Megatron-LM sets it (on with ``parallel.overlap_param_gather`` under the interleaved
    schedule, pp > 1 and vpp > 1; off otherwise). Aligned, every pipeline stage dispatches
    its parameter all-gathers from the schedule's ``param_sync_func`` (which the trainer sets)
    instead of from the first forward pre-hook of each chunk. Same numbers either way
    (measured on CPU: identical losses with and without it, PP2 x VPP2 x DP2)."""
    par = cfg.parallel
    interleaved = par.pp > 1 and (par.vpp or 1) > 1
    return {"align_param_gather": bool(par.overlap_param_gather and interleaved)}


def _initialize_userbuffers(cfg: RunConfig, layout, te_version: str) -> None:
    """Transformer Engine's userbuffers for ``tp_comm_overlap``, as Megatron-LM initialises
    them: one buffer of (seq_length * micro_batch_size / cp, hidden_size), FP8 when the TE FP8
    recipe is on (plus a BF16 one when layers are kept in BF16). Needs the process groups."""
    from packaging.version import Version
    from transformer_engine.pytorch import module as te_module

    p = cfg.precision
    fp8 = p.fp8 is not None and p.fp8_backend == "te"
    shape = [cfg.train.seq_length * cfg.train.micro_batch_size // layout.cp, cfg.model.hidden_size]
    if Version(te_version) >= Version("2.7.0"):
        mode = te_module.base.UserBufferQuantizationMode
        modes = [mode.FP8 if fp8 else mode.NONE]
        if fp8 and (p.bf16_first_layers or p.bf16_last_layers):
            modes.append(mode.NONE)
        te_module.base.initialize_ub(
            shape=shape, tp_size=layout.tp, quantization_modes=modes, bootstrap_backend="nccl"
        )
    else:
        te_module.base.initialize_ub(
            shape=shape, tp_size=layout.tp, use_fp8=fp8, bootstrap_backend="nccl"
        )


class PerformanceRuntime:
    """What the switches need while training runs. ``start`` after the process groups exist
    and before the model is built; ``after_step`` after every optimizer step; ``close`` at the
    end (also on failure)."""

    def __init__(self, gc_interval: int, userbuffers: bool):
        self.gc_interval = gc_interval
        """Collect every this many steps with the automatic collector off (0: automatic)."""
        self.userbuffers = userbuffers
        self._gc_was_enabled = gc.isenabled()

    @classmethod
    def start(cls, cfg: RunConfig, layout) -> PerformanceRuntime:
        """Initialise TE's userbuffers when ``tp_comm_overlap`` resolves on, and switch to
        manual garbage collection when ``performance.manual_gc_interval`` > 0 (one full
        collection now, as Megatron-LM's ``manual_gc`` option does)."""
        r = resolved_performance(cfg, refuse=True)
        self = cls(r.manual_gc_interval, r.tp_comm_overlap)
        if r.tp_comm_overlap:
            _initialize_userbuffers(cfg, layout, probe_environment().te_version)
        if self.gc_interval:
            gc.disable()
            gc.collect()
        return self

    def after_step(self, iteration: int) -> bool:
        """Collect garbage when ``iteration`` (1-based, the step just finished) is a multiple
        of the interval; returns whether it collected."""
        if self.gc_interval and iteration % self.gc_interval == 0:
            gc.collect()
            return True
        return False

    def close(self) -> None:
        """Automatic GC back as it was; TE's userbuffers released. Idempotent."""
        if self.gc_interval:
            if self._gc_was_enabled:
                gc.enable()
            self.gc_interval = 0
        if self.userbuffers:
            from transformer_engine.pytorch import module as te_module

            te_module.base.destroy_ub()
            self.userbuffers = False
