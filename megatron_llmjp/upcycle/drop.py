"""Drop-Upcycling on tensors: one dense SwiGLU FFN -> the experts of one MoE layer.

Nakamura et al., "Drop-Upcycling: Training Sparse Mixture of Experts with Partial
Re-initialization" (ICLR 2025, arXiv 2502.19261). For every expert ``e`` of a layer:

1. **Slice.** ``F`` distinct indices of the dense intermediate dimension ``Fd`` are drawn
   uniformly (``randperm(Fd)[:F]``, kept in ascending order so that ``F == Fd`` copies the
   dense FFN exactly). The expert's gate and up rows and its down columns are the dense ones
   at those indices; an intermediate unit of SwiGLU is the triple (gate row, up row, down
   column), so any subset of units is a smaller FFN.
2. **Drop.** ``round(R * F)`` of the expert's ``F`` units (half rounded up) are drawn
   uniformly; the same units are re-initialised in all three matrices.
3. **Re-initialise.** Per expert and per matrix (gate, up, down), the dropped rows (columns
   for down) are replaced by draws from a normal distribution with the mean and standard
   deviation of the block being replaced (the dropped rows themselves), so the new weights
   have the scale of what they replace.

The paper calls these steps column-wise sampling of the intermediate dimension, statistics,
and partial re-initialisation from N(mu, sigma^2). Its authors' reference implementation
(``conversions/drop_upcycling.py`` of github.com/Taishi-N324/Drop-Upcycling) computes mu and
sigma over the rows (down: columns) being replaced, per weight matrix and per expert, as here,
not over the whole dense matrix. It differs in two details: it
draws the dropped positions independently for gate, up and down, and it rounds ``R * F``
down. Here one set of units is dropped in all three matrices, so a dropped unit is a wholly new
neuron and a kept one an exact copy.

``R = 0`` is plain upcycling (every expert a copy of its slice). The router is not derived
from the dense model: it is drawn fresh from N(0, router_std^2).

Every random draw comes from an explicit ``torch.Generator`` seeded from (seed, layer, what),
so a layer's experts do not depend on the order layers are processed in, nor on torch's
global RNG.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def layer_generator(seed: int, layer: int, what: str) -> torch.Generator:
    """An independent, reproducible stream for one layer (``what``: ``experts`` or
    ``router``)."""
    digest = hashlib.sha256(f"drop-upcycling:{seed}:{layer}:{what}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def num_dropped(expert_ffn: int, drop_ratio: float) -> int:
    """Units re-initialised per expert: ``round(drop_ratio * expert_ffn)``, halves rounded up."""
    return min(expert_ffn, int(drop_ratio * expert_ffn + 0.5))


@dataclass(frozen=True)
class ExpertPlan:
    """Which dense units each expert of one layer takes, and which of them it re-initialises."""

    slices: torch.Tensor
    """``[E, F]`` int64: the dense intermediate indices of each expert, ascending."""
    dropped: torch.Tensor
    """``[E, n]`` int64: positions in ``[0, F)`` of the units each expert re-initialises."""


def plan_experts(
    dense_ffn: int,
    expert_ffn: int,
    num_experts: int,
    drop_ratio: float,
    generator: torch.Generator,
) -> ExpertPlan:
    """Draw every expert's slice and dropped units (step 1 and 2)."""
    if not 1 <= expert_ffn <= dense_ffn:
        raise ValueError(f"expert_ffn={expert_ffn} must be in [1, dense_ffn={dense_ffn}]")
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio={drop_ratio} must be in [0, 1]")
    n = num_dropped(expert_ffn, drop_ratio)
    slices, dropped = [], []
    for _ in range(num_experts):
        slices.append(torch.randperm(dense_ffn, generator=generator)[:expert_ffn].sort().values)
        dropped.append(torch.randperm(expert_ffn, generator=generator)[:n].sort().values)
    return ExpertPlan(torch.stack(slices), torch.stack(dropped))


def _reinit(block: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Normal draws with the mean and (unbiased) standard deviation of ``block``."""
    b = block.double()
    mean = b.mean().item()
    std = b.std().item() if block.numel() > 1 else 0.0
    out = torch.empty(block.shape, dtype=torch.float32)
    return out.normal_(mean, std, generator=generator)


def upcycle_ffn(
    fc1: torch.Tensor,
    fc2: torch.Tensor,
    plan: ExpertPlan,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts of one layer from its dense FFN (step 3).

    ``fc1`` is megatron-core's fused ``linear_fc1.weight`` ``[2*Fd, H]`` (gate rows, then up
    rows), ``fc2`` is ``linear_fc2.weight`` ``[H, Fd]``. Returns the experts' ``[E, 2*F, H]``
    (per expert: gate rows, then up rows) and ``[E, H, F]``, in the input dtype (draws are made
    in FP32 and rounded once)."""
    dense_ffn = fc2.shape[1]
    if fc1.shape[0] != 2 * dense_ffn or fc1.shape[1] != fc2.shape[0]:
        raise ValueError(
            f"fc1 {tuple(fc1.shape)} and fc2 {tuple(fc2.shape)} are not one SwiGLU FFN "
            "([2*Fd, H] and [H, Fd])"
        )
    gate, up = fc1.float().chunk(2, dim=0)
    down = fc2.float()
    experts_fc1, experts_fc2 = [], []
    for idx, drop in zip(plan.slices, plan.dropped, strict=True):
        g, u, d = gate[idx], up[idx], down[:, idx]  # advanced indexing: copies
        if drop.numel():
            g[drop] = _reinit(g[drop], generator)
            u[drop] = _reinit(u[drop], generator)
            d[:, drop] = _reinit(d[:, drop], generator)
        experts_fc1.append(torch.cat([g, u], dim=0))
        experts_fc2.append(d)
    return (
        torch.stack(experts_fc1).to(fc1.dtype),
        torch.stack(experts_fc2).to(fc2.dtype),
    )


def init_router(
    num_experts: int, hidden: int, std: float, generator: torch.Generator
) -> torch.Tensor:
    """A fresh router ``[E, H]`` from N(0, std^2) in FP32 (std 0: all zeros, uniform routing)."""
    if std < 0:
        raise ValueError(f"router std must be >= 0, got {std}")
    return torch.empty(num_experts, hidden).normal_(0.0, std, generator=generator)
