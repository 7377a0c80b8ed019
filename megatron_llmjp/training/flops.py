"""Model FLOPs of a training step, and the achieved TFLOP/s and MFU the trainer logs.

Conventions (model FLOPs: what the model needs, not what the hardware executes):

* A multiply-add is 2 FLOPs; a training step is 3x the forward matmul FLOPs (the backward
  computes the input and the weight gradients); activation recomputation is not counted.
* Attention projections: Q, K, V with ``kv_channels`` per head (independent of
  hidden / heads) and ``num_query_groups`` K/V heads (GQA), and the output projection.
* Attention core (QK^T and AV): **causal**, each query attends to ``s / 2`` keys on average
  (``causal=False`` counts all ``s`` keys), i.e. ``2 * 2 * (s/2) * heads * kv_channels``
  per token and layer.
* Dense MLP: SwiGLU, three ``hidden x ffn`` matrices. MoE: the router (``hidden x experts``)
  plus the top-k experts a token is routed to (active FLOPs; unused experts cost nothing).
* Output layer: ``hidden x vocab`` with the **true** vocabulary (TP padding rows are not model
  FLOPs); embedding lookups, norms, softmax and the loss are not matmuls and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_llmjp.config.schema import ModelConfig, RunConfig


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one token, by part (attention and MLP parts per layer)."""

    attention_proj: float
    attention_core: float
    mlp: float
    output: float
    num_layers: int

    @property
    def per_token(self) -> float:
        layer = self.attention_proj + self.attention_core + self.mlp
        return self.num_layers * layer + self.output


def forward_flops(m: ModelConfig, seq_length: int, causal: bool = True) -> ForwardFlops:
    """Forward FLOPs per token of ``m`` at ``seq_length`` (see the module docstring)."""
    h, d = m.hidden_size, m.kv_channels
    q, kv = m.num_attention_heads * d, m.num_query_groups * d
    keys = seq_length / 2 if causal else seq_length
    if m.is_moe:
        mlp = 2 * h * m.num_experts + m.moe_router_topk * 2 * 3 * h * m.moe_ffn_hidden_size
    else:
        mlp = 2 * 3 * h * m.ffn_hidden_size
    return ForwardFlops(
        attention_proj=2 * h * (q + 2 * kv) + 2 * q * h,
        attention_core=2 * 2 * keys * q,
        mlp=mlp,
        output=2 * h * m.vocab_size,
        num_layers=m.num_layers,
    )


def step_flops(cfg: RunConfig) -> float:
    """Model FLOPs of one optimizer step (forward + backward over the global batch)."""
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    return 3 * forward_flops(cfg.model, cfg.train.seq_length).per_token * tokens


@dataclass(frozen=True)
class ThroughputMeter:
    """Turns a step time into ``tflops_per_gpu`` (always) and ``mfu`` (a GPU with a known
    peak for the precision in use)."""

    step_flops: float
    world_size: int
    peak_tflops: float | None

    @classmethod
    def for_run(cls, cfg: RunConfig, world_size: int) -> ThroughputMeter:
        from megatron_llmjp.precision.peaks import compute_precision, peak_tflops

        peak = None
        if torch.cuda.is_available():
            peak = peak_tflops(torch.cuda.get_device_name(), compute_precision(cfg.precision))
        return cls(step_flops(cfg), world_size, peak)

    def fields(self, seconds: float) -> dict:
        tflops = self.step_flops / seconds / self.world_size / 1e12
        out = {"tflops_per_gpu": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        return out
