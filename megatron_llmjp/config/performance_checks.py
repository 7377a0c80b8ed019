"""The ``performance`` section: static checks, and its resolution for a machine.

Here, in ``config/``, so that validating a config imports nothing above it. The machine is
described by :class:`PerformanceEnvironment` (a plain value: ``models/performance.py`` probes
the real one, tests describe any other), so :func:`resolve_performance` is a pure function of
the config and that description. It runs before any process group exists
(``training.trainer.check_runtime``) and is what ``models/performance.py`` maps onto
megatron-core.

megatron-core 0.16.1 / Transformer Engine facts the rules rely on:

* ``gradient_accumulation_fusion``: TE's linear layers fuse the weight-gradient accumulation
  themselves (``fuse_wgrad_accumulation``), but megatron-core's own ``ColumnParallelLinear``
  (the output layer, also in the TE spec) needs NVIDIA apex's ``fused_weight_gradient_mlp_cuda``
  extension and refuses to build without it (``tensor_parallel/layers.py``).
* ``cross_entropy_loss_fusion`` with ``cross_entropy_fusion_impl="native"`` (Megatron-LM's
  default implementation): megatron-core's fused vocab-parallel cross entropy, CUDA kernels.
* ``moe_permute_fusion`` needs TE's ``transformer_engine.pytorch.permutation`` (TE >= 2.1.0;
  ``TransformerConfig`` refuses it otherwise); ``moe_grouped_gemm`` with the TE spec builds
  ``TEGroupedMLP``, which needs TE >= 1.9.0.
* ``overlap_p2p_comm`` exists in the interleaved schedule only (the non-interleaved one
  raises) and excludes ``batch_p2p_comm``; Megatron-LM sets ``batch_p2p_comm = not
  overlap_p2p_comm`` and enables the overlap whenever virtual stages are used.
* ``tp_comm_overlap`` needs TE's userbuffers (``initialize_ub``, TE >= 1.9.0 for its
  ``bootstrap_backend`` argument), sequence parallelism, and tp > 1.
* The ``flex`` token dispatcher with its ``deepep`` backend (``moe_flex_dispatcher_backend``)
  needs the ``deep_ep`` package, tp * ep > 1 (``MoEFlexTokenDispatcher``), FP32 routing
  probabilities (``_DeepepManager``) and, per DeepEP's requirements, Hopper (sm_90) or newer.
* ``AttnBackend``: ``auto`` lets TE choose among flash, fused and unfused attention; ``local``
  is megatron-core's own attention, the only one the local (CPU) spec has.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.schema import PerformanceConfig, RunConfig

MIN_TE_PERMUTE_FUSION = "2.1.0"
"""``transformer_engine.pytorch.permutation`` (megatron-core 0.16.1's check)."""
MIN_TE_GROUPED_GEMM = "1.9.0.dev0"
"""``TEGroupedLinear`` (megatron-core 0.16.1, ``extensions/transformer_engine.py``)."""
MIN_TE_USERBUFFERS = "1.9.0"
"""``initialize_ub(..., bootstrap_backend=...)``."""
MIN_DEEPEP_CAPABILITY = (9, 0)
"""DeepEP's stated requirement: Hopper (sm_90) or an architecture with the SM90 PTX ISA."""

_GPU_SWITCHES = (
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
    "moe_permute_fusion",
    "moe_grouped_gemm",
    "tp_comm_overlap",
)
"""Switches that select CUDA kernels: off on CPU, and refused there when asked for."""
_MOE_SWITCHES = ("moe_permute_fusion", "moe_grouped_gemm")
_TE_ATTENTION = ("flash", "fused", "unfused")


@dataclass(frozen=True)
class PerformanceEnvironment:
    """What a machine offers the performance switches. The default describes a CPU machine.

    ``models.performance.probe_environment`` reads the real one; tests describe others."""

    cuda: bool = False
    """A CUDA device is present (NCCL is the backend)."""
    capability: tuple[int, int] | None = None
    """Compute capability of the CUDA device, e.g. (9, 0) for H100/H200."""
    te_version: str | None = None
    """Transformer Engine's version when it is importable, else None."""
    deep_ep: bool = False
    """DeepEP (``deep_ep.Buffer``) is importable."""
    fused_wgrad: bool = False
    """apex's ``fused_weight_gradient_mlp_cuda`` extension is importable."""


@dataclass(frozen=True)
class ResolvedPerformance:
    """Every switch decided for one config on one machine (no None left)."""

    transformer_engine: bool
    """The Transformer Engine layer spec is in use (CUDA, TE, no emulated FP8)."""
    gradient_accumulation_fusion: bool
    cross_entropy_loss_fusion: bool
    moe_permute_fusion: bool
    moe_grouped_gemm: bool
    tp_comm_overlap: bool
    overlap_p2p_comm: bool
    batch_p2p_comm: bool
    attention_backend: str
    """A member name of megatron-core's ``AttnBackend``."""
    moe_token_dispatcher: str
    manual_gc_interval: int


def _version_at_least(have: str, low: str) -> bool:
    from packaging.version import Version

    return Version(have) >= Version(low)


def _sequence_parallel(cfg: RunConfig) -> bool:
    sp = cfg.parallel.sequence_parallel
    return cfg.parallel.tp > 1 if sp is None else sp


def _interleaved(cfg: RunConfig) -> bool:
    return cfg.parallel.pp > 1 and (cfg.parallel.vpp or 1) > 1


def validate_performance(cfg: RunConfig) -> None:
    """Checks of ``cfg.performance`` (and the dispatcher) that need the config only; raises
    ``ConfigError`` naming the field. Whether the machine supports a switch is decided by
    :func:`resolve_performance`."""
    p, par, m = cfg.performance, cfg.parallel, cfg.model
    if p.manual_gc_interval < 0:
        raise ConfigError(
            f"performance.manual_gc_interval must be >= 0 (0: automatic GC), got "
            f"{p.manual_gc_interval}"
        )
    if not m.is_moe:
        for key in _MOE_SWITCHES:
            if getattr(p, key):
                raise ConfigError(
                    f"performance.{key}=true applies to MoE models only, and model "
                    f"{m.name!r} is dense (model.family={m.family})"
                )
    if p.overlap_p2p_comm and not _interleaved(cfg):
        raise ConfigError(
            "performance.overlap_p2p_comm=true needs the interleaved pipeline schedule "
            f"(parallel.pp > 1 and parallel.vpp > 1), got pp={par.pp} vpp={par.vpp}: "
            "megatron-core's other schedules have no p2p overlap"
        )
    if p.tp_comm_overlap:
        if par.tp < 2 or not _sequence_parallel(cfg):
            raise ConfigError(
                "performance.tp_comm_overlap=true overlaps the all-gathers/reduce-scatters of "
                "sequence parallelism with GEMMs: it needs parallel.tp > 1 and "
                f"parallel.sequence_parallel, got tp={par.tp} "
                f"sequence_parallel={par.sequence_parallel}"
            )
        if cfg.precision.dtype != "bf16":
            raise ConfigError(
                "performance.tp_comm_overlap=true needs precision.dtype=bf16 (Transformer "
                f"Engine's userbuffers hold BF16 or FP8 data), got {cfg.precision.dtype}"
            )
    if m.is_moe and par.moe_token_dispatcher == "flex":
        if par.tp * par.ep < 2:
            raise ConfigError(
                "parallel.moe_token_dispatcher=flex dispatches over the tp x ep ranks and "
                f"megatron-core needs parallel.tp * parallel.ep > 1, got tp={par.tp} ep={par.ep}"
            )
        if m.moe_router_dtype != "fp32":
            raise ConfigError(
                "parallel.moe_token_dispatcher=flex (DeepEP) takes FP32 routing probabilities "
                f"only: set model.moe_router_dtype=fp32 (got {m.moe_router_dtype})"
            )


def resolve_performance(
    cfg: RunConfig, env: PerformanceEnvironment, *, refuse: bool = True
) -> ResolvedPerformance:
    """Decide every switch of ``cfg.performance`` for the machine ``env`` describes.

    None takes the device default: on a GPU with Transformer Engine what Megatron-LM uses
    (gradient-accumulation fusion when apex's kernel is there, cross-entropy fusion, MoE
    permute fusion and grouped GEMM, TE's attention choice, p2p overlap with virtual
    pipeline stages); everything off on CPU.

    ``refuse`` (training): raise ``ConfigError`` naming the field when a switch is asked for
    that this machine or layout cannot run (static checks included). Without it (a model
    built outside training from a run's config, e.g. a conversion or parity check of a GPU
    run on CPU, often in another layout), such a section resolves as if every switch were
    left to the device default; the MoE dispatcher is still checked."""
    if not refuse:
        try:
            return _resolve(cfg, env, check_recompute=True)
        except ConfigError:
            gc_interval = max(0, cfg.performance.manual_gc_interval)
            defaults = replace(cfg, performance=PerformanceConfig(manual_gc_interval=gc_interval))
            return _resolve(defaults, env, check_recompute=False)
    return _resolve(cfg, env, check_recompute=True)


def _resolve(
    cfg: RunConfig, env: PerformanceEnvironment, check_recompute: bool
) -> ResolvedPerformance:
    validate_performance(cfg)
    p, m = cfg.performance, cfg.model
    emulated = cfg.precision.fp8 is not None and cfg.precision.fp8_backend == "emulated"
    te = env.cuda and env.te_version is not None and not emulated
    if not env.cuda:
        for key in _GPU_SWITCHES:
            if getattr(p, key):
                raise ConfigError(
                    f"performance.{key}=true selects CUDA kernels and this machine has no CUDA "
                    "device: leave it null (the device default, off on CPU) or set it false"
                )
    why_no_te = (
        "Transformer Engine is not importable here"
        if env.te_version is None
        else "the layers are megatron-core's local ones (precision.fp8_backend=emulated)"
    )

    def needs_te(key: str, low: str, what: str) -> None:
        if not te:
            raise ConfigError(f"performance.{key}=true needs {what}, and {why_no_te}")
        if not _version_at_least(env.te_version, low):
            raise ConfigError(
                f"performance.{key}=true needs Transformer Engine >= {low} ({what}), found "
                f"{env.te_version}"
            )

    gaf = p.gradient_accumulation_fusion
    if gaf is None:
        gaf = te and env.fused_wgrad
    elif gaf and not env.fused_wgrad:
        raise ConfigError(
            "performance.gradient_accumulation_fusion=true needs NVIDIA apex's "
            "fused_weight_gradient_mlp_cuda extension (megatron-core's output layer uses it), "
            "which is not importable here"
        )
    ce = te if p.cross_entropy_loss_fusion is None else p.cross_entropy_loss_fusion

    permute = p.moe_permute_fusion
    if permute is None:
        permute = m.is_moe and te and _version_at_least(env.te_version, MIN_TE_PERMUTE_FUSION)
    elif permute:
        needs_te("moe_permute_fusion", MIN_TE_PERMUTE_FUSION, "TE's fused token permutation")
    grouped = p.moe_grouped_gemm
    if grouped is None:
        grouped = m.is_moe and te and _version_at_least(env.te_version, MIN_TE_GROUPED_GEMM)
    elif grouped:
        needs_te("moe_grouped_gemm", MIN_TE_GROUPED_GEMM, "TE's grouped linear layers")
    if check_recompute and m.is_moe and not grouped and "moe_act" in (cfg.recompute.modules or []):
        raise ConfigError(
            "recompute.modules contains moe_act, which megatron-core supports only with "
            "grouped GEMM (performance.moe_grouped_gemm, a GPU with Transformer Engine)"
        )

    tp_overlap = bool(p.tp_comm_overlap)
    if tp_overlap:
        needs_te("tp_comm_overlap", MIN_TE_USERBUFFERS, "TE's userbuffers")

    overlap = p.overlap_p2p_comm
    if overlap is None:
        overlap = env.cuda and _interleaved(cfg)
    elif overlap and not env.cuda:
        # Measured: with gloo, the overlapped isend/irecv of the interleaved schedule deliver
        # activations that change from run to run (the loss of step 1 differs), while the
        # unbatched, non-overlapped exchange is exact.
        raise ConfigError(
            "performance.overlap_p2p_comm=true needs NCCL (a CUDA device): with gloo the "
            "overlapped p2p of the interleaved schedule is not exact; leave it null on CPU"
        )

    backend = p.attention_backend
    if backend == "auto":
        backend = "auto" if te else "local"
    elif backend in _TE_ATTENTION and not te:
        raise ConfigError(
            f"performance.attention_backend={backend} is a Transformer Engine attention "
            f"kernel, and {why_no_te if env.cuda else 'this machine has no CUDA device'}; "
            "use auto (local attention without TE)"
        )
    elif backend == "local" and te:
        raise ConfigError(
            "performance.attention_backend=local is megatron-core's own attention, which the "
            "Transformer Engine layer spec used on this GPU does not have; choose auto, flash, "
            "fused or unfused"
        )

    dispatcher = cfg.parallel.moe_token_dispatcher
    if m.is_moe and dispatcher == "flex":
        if not env.cuda:
            raise ConfigError(
                "parallel.moe_token_dispatcher=flex runs DeepEP's CUDA kernels and this machine "
                "has no CUDA device: use alltoall or allgather on CPU"
            )
        have = tuple(env.capability or (0, 0))
        if have < MIN_DEEPEP_CAPABILITY:
            need = ".".join(map(str, MIN_DEEPEP_CAPABILITY))
            raise ConfigError(
                f"parallel.moe_token_dispatcher=flex (DeepEP) needs compute capability >= "
                f"{need} (Hopper or newer), this GPU is sm_{have[0]}{have[1]}: use alltoall"
            )
        if not env.deep_ep:
            raise ConfigError(
                "parallel.moe_token_dispatcher=flex needs DeepEP (the deep_ep package, built "
                "with NVSHMEM), which is not importable here: add it to the image or use alltoall"
            )

    return ResolvedPerformance(
        transformer_engine=te,
        gradient_accumulation_fusion=bool(gaf),
        cross_entropy_loss_fusion=bool(ce),
        moe_permute_fusion=bool(permute),
        moe_grouped_gemm=bool(grouped),
        tp_comm_overlap=tp_overlap,
        overlap_p2p_comm=bool(overlap),
        # gloo pairs batched isend/irecv differently from NCCL and corrupts the interleaved
        # schedule; unbatched p2p is exact on both (and required by the p2p overlap).
        batch_p2p_comm=env.cuda and not overlap,
        attention_backend=backend,
        moe_token_dispatcher=dispatcher,
        manual_gc_interval=p.manual_gc_interval,
    )
