"""The ``precision`` section: validation and the one mapping onto megatron-core / TE settings.

``validate_precision`` (in ``config/precision_checks.py``, re-exported here) needs the config
only;
``check_precision_runtime`` needs the machine (CUDA, Transformer Engine, compute capability)
and runs from ``training.trainer.check_runtime``, before any process group exists.

megatron-core 0.16.1 facts this relies on (``fp8_utils.get_fp8_recipe`` and
``TransformerConfig``):

* Setting ``TransformerConfig.fp8`` is all TE needs: ``TransformerBlock.forward`` enters
  ``get_fp8_context`` (TE's ``fp8_autocast`` with the recipe and the amax reduction group, which
  spans TP x DP x CP) around the whole block for delayed scaling and around each layer for the
  other recipes, skipping the first/last layers kept in BF16.
* With TE < 2.1 only delayed scaling exists; tensorwise needs TE >= 2.2.0.dev0, blockwise
  >= 2.3.0.dev0, MXFP8 >= 2.1.0. FP8 MoE needs TE >= 1.7 (grouped GEMM >= 1.11); TEGroupedMLP
  pads each expert's tokens to the FP8 alignment itself.
* ``fp8_interval`` is ignored by TE >= 1.8 (the emulated backend honours it).
* Delayed scaling cannot keep first/last layers in BF16 (megatron raises): one autocast region
  spans the block so that its amaxes are reduced together.
* FP8 parameters (``fp8_param``) also need ``fp8_param_gather`` in the DDP config and the recipe
  in the optimizer config (the distributed optimizer quantises its updated shards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.precision_checks import validate_precision
from megatron_llmjp.config.schema import PrecisionConfig

__all__ = [
    "check_precision_runtime",
    "ddp_kwargs",
    "emulated_fp8",
    "fp8_hardware_error",
    "optimizer_kwargs",
    "transformer_kwargs",
    "validate_precision",
]

_MIN_CAPABILITY = {
    "delayed": ((8, 9), "Ada or Hopper"),
    "tensorwise": ((8, 9), "Ada or Hopper"),
    "blockwise": ((9, 0), "Hopper or newer"),
    "mxfp8": ((10, 0), "Blackwell"),
}
_MIN_TE = {"tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0", "mxfp8": "2.1.0"}


def fp8_hardware_error(
    p: PrecisionConfig, capability: tuple[int, int], te_version: str | None
) -> str | None:
    """Why TE cannot run ``p`` on a GPU of ``capability`` with TE ``te_version`` (None: fine)."""
    if p.fp8 is None or p.fp8_backend != "te":
        return None
    if te_version is None:
        return (
            f"precision.fp8={p.fp8} with precision.fp8_backend=te needs Transformer Engine, "
            "which is not importable here; set precision.fp8_backend=emulated to emulate FP8 "
            "(slow, numerics studies only)"
        )
    (need, arch), have = _MIN_CAPABILITY[p.fp8], tuple(capability)
    if have < need:
        return (
            f"precision.fp8={p.fp8} needs {arch} (compute capability >= {need[0]}.{need[1]}), "
            f"this GPU is sm_{have[0]}{have[1]}; choose another recipe or "
            "precision.fp8_backend=emulated"
        )
    from packaging.version import Version

    low = _MIN_TE.get(p.fp8)
    if low is not None and Version(te_version) < Version(low):
        return (
            f"precision.fp8={p.fp8} needs Transformer Engine >= {low} (megatron-core 0.16.1), "
            f"found {te_version}"
        )
    return None


def check_precision_runtime(p: PrecisionConfig) -> None:
    """Checks that need the machine; raises ``ConfigError`` before any process group exists."""
    if p.fp8 is None or p.fp8_backend != "te":
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"precision.fp8={p.fp8} with precision.fp8_backend=te needs CUDA and Transformer "
            "Engine, and this machine has no CUDA device; set precision.fp8_backend=emulated "
            "to emulate FP8 (slow, numerics studies only)"
        )
    try:
        import transformer_engine

        te_version = str(getattr(transformer_engine, "__version__", "0"))
    except ImportError:
        te_version = None
    problem = fp8_hardware_error(p, torch.cuda.get_device_capability(), te_version)
    if problem:
        raise ConfigError(problem)


def transformer_kwargs(p: PrecisionConfig) -> dict:
    """``TransformerConfig`` fields for ``p`` (empty without FP8 or with the emulated backend,
    which megatron-core must not see: it would look for TE)."""
    if p.fp8 is None or p.fp8_backend != "te":
        return {}
    first, last = p.bf16_first_layers, p.bf16_last_layers
    return dict(
        fp8=p.fp8_format,
        fp8_recipe=p.fp8,
        fp8_margin=p.fp8_margin,
        fp8_interval=p.fp8_interval,
        fp8_amax_history_len=p.fp8_amax_history_len,
        fp8_amax_compute_algo=p.fp8_amax_compute_algo,
        fp8_wgrad=p.fp8_wgrad,
        fp8_param=p.fp8_param_gather,
        first_last_layers_bf16=bool(first or last),
        num_layers_at_start_in_bf16=first,
        num_layers_at_end_in_bf16=last,
    )


def ddp_kwargs(p: PrecisionConfig) -> dict:
    """``DistributedDataParallelConfig`` fields for ``p``."""
    te = p.fp8 is not None and p.fp8_backend == "te"
    return {"fp8_param_gather": True} if te and p.fp8_param_gather else {}


def optimizer_kwargs(p: PrecisionConfig) -> dict:
    """``OptimizerConfig`` fields for ``p``."""
    te = p.fp8 is not None and p.fp8_backend == "te"
    return {"fp8_recipe": p.fp8} if te else {}


@dataclass(frozen=True)
class EmulatedFP8:
    """What the emulated linear layers need to know (built from ``PrecisionConfig``)."""

    recipe: str
    forward_dtype: torch.dtype
    backward_dtype: torch.dtype
    margin: int = 0
    interval: int = 1
    history_len: int = 1024
    compute_algo: str = "max"
    wgrad: bool = True
    num_layers: int = 0
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0

    def layer_in_fp8(self, layer_index: int) -> bool:
        """Whether the layer with this 0-based *global* index quantises its GEMMs."""
        return self.bf16_first_layers <= layer_index < self.num_layers - self.bf16_last_layers


def emulated_fp8(p: PrecisionConfig, num_layers: int) -> EmulatedFP8 | None:
    """The emulation settings of ``p``, or None unless ``p`` asks for the emulated backend."""
    if p.fp8 is None or p.fp8_backend != "emulated":
        return None
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    return EmulatedFP8(
        recipe=p.fp8,
        forward_dtype=e4m3,
        backward_dtype=e5m2 if p.fp8_format == "hybrid" else e4m3,
        margin=p.fp8_margin,
        interval=p.fp8_interval,
        history_len=p.fp8_amax_history_len,
        compute_algo=p.fp8_amax_compute_algo,
        wgrad=p.fp8_wgrad,
        num_layers=num_layers,
        bf16_first_layers=p.bf16_first_layers,
        bf16_last_layers=p.bf16_last_layers,
    )
