"""Static checks of the ``precision`` section: they need the config only.

Here, in ``config/``, so that validating a config imports nothing above it; the mapping onto
megatron-core / Transformer Engine and the machine checks are in ``precision/recipes.py``.
"""

from __future__ import annotations

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.schema import PrecisionConfig, RunConfig

_FP8_ONLY = (
    "fp8_format",
    "fp8_margin",
    "fp8_interval",
    "fp8_amax_history_len",
    "fp8_amax_compute_algo",
    "fp8_wgrad",
    "fp8_param_gather",
    "bf16_first_layers",
    "bf16_last_layers",
)
"""Fields that mean nothing without a recipe (``fp8_backend`` only picks an implementation)."""
_DELAYED_ONLY = ("fp8_margin", "fp8_interval", "fp8_amax_history_len", "fp8_amax_compute_algo")


def _changed(p: PrecisionConfig, keys: tuple[str, ...]) -> list[str]:
    default = PrecisionConfig()
    return [k for k in keys if getattr(p, k) != getattr(default, k)]


def validate_precision(cfg: RunConfig) -> None:
    """Static checks of ``cfg.precision``; raises ``ConfigError`` naming the field."""
    p = cfg.precision
    for key, low in (
        ("fp8_amax_history_len", 1),
        ("fp8_interval", 1),
        ("fp8_margin", 0),
        ("bf16_first_layers", 0),
        ("bf16_last_layers", 0),
    ):
        if getattr(p, key) < low:
            raise ConfigError(f"precision.{key} must be >= {low}, got {getattr(p, key)}")
    if p.fp8 is None:
        changed = _changed(p, _FP8_ONLY)
        if changed:
            k = changed[0]
            raise ConfigError(
                f"precision.{k}={getattr(p, k)} is set but precision.fp8 is null (no FP8): "
                "choose a recipe (precision.fp8=delayed|tensorwise|blockwise|mxfp8) or drop it"
            )
        return
    if p.dtype != "bf16":
        raise ConfigError(
            f"precision.fp8={p.fp8} needs precision.dtype=bf16 (FP8 GEMMs run inside a BF16 "
            f"model), got precision.dtype={p.dtype}"
        )
    if p.fp8 != "delayed":
        changed = _changed(p, _DELAYED_ONLY)
        if changed:
            k = changed[0]
            raise ConfigError(
                f"precision.{k}={getattr(p, k)} applies to delayed scaling only, but "
                f"precision.fp8={p.fp8} computes its scales from the current amax"
            )
    n, first, last = cfg.model.num_layers, p.bf16_first_layers, p.bf16_last_layers
    if first + last > n:
        raise ConfigError(
            f"precision.bf16_first_layers + precision.bf16_last_layers = {first} + {last} "
            f"exceeds model.num_layers={n}"
        )
    if p.fp8_param_gather:
        if p.fp8_backend == "emulated":
            raise ConfigError(
                "precision.fp8_param_gather needs precision.fp8_backend=te (the emulated "
                "backend keeps BF16 weights and quantises them in each GEMM)"
            )
        if not cfg.optim.use_distributed_optimizer:
            raise ConfigError(
                "precision.fp8_param_gather needs optim.use_distributed_optimizer=true (the "
                "distributed optimizer quantises the updated shards before the all-gather)"
            )
    if p.fp8_backend == "te" and (first or last):
        if p.fp8 == "delayed":
            raise ConfigError(
                "precision.bf16_first_layers/bf16_last_layers with precision.fp8=delayed: "
                "megatron-core cannot keep layers in BF16 under TE delayed scaling (one "
                "fp8_autocast spans the block); use another recipe or "
                "precision.fp8_backend=emulated"
            )
        per_stage = n // cfg.parallel.pp
        if max(first, last) > per_stage:
            raise ConfigError(
                f"precision.bf16_first_layers={first} / bf16_last_layers={last}: megatron-core "
                f"allows at most the layers of one pipeline stage ({per_stage})"
            )
