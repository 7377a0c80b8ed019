"""Per-GPU bytes of weights, gradients and optimizer states, as megatron-core allocates them.

What megatron-core 0.16 allocates per rank (megatron DDP + ``get_megatron_optimizer``):

* weights: with the distributed optimizer the parameters are views into one contiguous
  ``param_data`` buffer per (dense | expert) group, padding included; without it each parameter
  keeps its own storage.
* gradients: one ``grad_data`` buffer per group of the same size, FP32 when
  ``precision.grad_reduce_in_fp32`` (the default) else in the parameter dtype.
* optimizer: Adam's two FP32 moments per parameter element this rank updates, plus an FP32
  master copy when the parameters are BF16 (with FP32 parameters the master copy is the
  parameter itself). The distributed optimizer updates the rank's 1/dp slice of each bucket:
  dense parameters over the data-parallel group (dp * cp ranks), expert parameters (ep > 1)
  over the expert-data-parallel group (``Layout.expert_dp``).

``static_memory(..., dp_rank=r)`` walks the tensors and is exact for that rank (the grounding
test checks it on every rank of several layouts against what megatron-core really allocates);
without ``dp_rank`` it uses closed forms: weights and gradients are still exact with one bucket
per buffer, and the optimizer figure is the 1/dp slice size, which is the largest any DP rank
can own (ranks differ by the padding that falls into their slice, under 64 elements a tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_llmjp.config.schema import ModelConfig, OptimConfig, PrecisionConfig
from megatron_llmjp.parallel.layout import Layout
from megatron_llmjp.planner.shards import (
    bucket_size,
    buffer_size,
    chunk_params,
    chunk_sums,
    lay_out_buffer,
    rank_chunks,
)


@dataclass(frozen=True)
class StaticMemory:
    """Bytes one rank holds for the whole run (allocated before the first step)."""

    weights: int
    grads: int
    optimizer: int
    params: int
    """Parameter elements on this rank (no padding)."""
    exact: bool
    """False when a figure is an upper bound (multi-bucket padding, or optimizer slice size)."""
    optimizer_step_transient: int = 0
    """Extra bytes while the optimizer steps: an FP32 copy of BF16 gradients (none when the
    gradients are already FP32: megatron then uses the buffer itself)."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def dtype_bytes(precision: PrecisionConfig) -> tuple[int, int]:
    """(parameter bytes, gradient-buffer bytes) per element."""
    param = 2 if precision.dtype == "bf16" else 4
    grad = 4 if precision.grad_reduce_in_fp32 else param
    return param, grad


def static_memory(
    m: ModelConfig,
    layout: Layout,
    precision: PrecisionConfig,
    optim: OptimConfig,
    overlap_grad_reduce: bool,
    pp_rank: int,
    dp_rank: int | None = None,
    expert_dp_rank: int | None = None,
    te: bool = False,
) -> StaticMemory:
    """Weights, gradient buffers and optimizer states of pipeline rank ``pp_rank``.

    Give ``dp_rank`` (and ``expert_dp_rank`` for ep > 1) for the exact figure of one rank;
    without them the optimizer figure is the largest over the data-parallel ranks."""
    p_bytes, g_bytes = dtype_bytes(precision)
    dist = optim.use_distributed_optimizer
    # Bytes per element the optimizer updates: two FP32 moments, plus an FP32 master copy of
    # 16-bit parameters.
    opt_bytes = 8 + (4 if p_bytes == 2 else 0)
    groups = ((False, layout.dp * layout.cp, dp_rank), (True, layout.expert_dp, expert_dp_rank))
    weights = grads = owned = params = transient = 0
    exact = True
    exact_walk = dp_rank is not None
    for i, chunk in enumerate(rank_chunks(m, layout, pp_rank)):
        bucket = bucket_size(layout, overlap_grad_reduce, pp_rank, i)
        tensors = chunk_params(m, layout, chunk, te) if exact_walk else None
        sums = None if exact_walk else chunk_sums(m, layout, chunk)
        for expert, group, rank in groups:
            if exact_walk:
                sel = [p for p in tensors if p.expert == expert]
                n = sum(p.numel for p in sel)
                if not sel:
                    continue
                lay = lay_out_buffer(sel, group, dist, bucket)
                numel = lay.numel
                mine = lay.owned(group, rank or 0) if dist else n
            else:
                n = sums[expert].numel
                if not n:
                    continue
                size = buffer_size(sums[expert], group, dist, bucket)
                numel = size.numel
                mine = numel // group if dist and group > 1 else n
                exact = exact and size.exact and not (dist and group > 1)
            params += n
            weights += (numel if dist else n) * p_bytes
            grads += numel * g_bytes
            owned += mine
            if p_bytes == 2 and g_bytes == 2:
                transient += 4 * mine
    return StaticMemory(
        weights=weights,
        grads=grads,
        optimizer=owned * opt_bytes,
        params=params,
        exact=exact,
        optimizer_step_transient=transient,
    )
