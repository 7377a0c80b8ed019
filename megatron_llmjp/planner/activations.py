"""Activation memory per GPU: what the backward pass keeps, per layer and per microbatch.

Basis: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), which counts the tensors each layer saves for backward: per layer and
microbatch ``s*b*h*(34 + 5*a*s/h)`` bytes with 16-bit activations, divided by ``t`` for the
tensor-parallel parts (``sbh*(10 + 24/t + 5as/(ht))``) and entirely with sequence parallelism
(``sbh/t*(34 + 5as/h)``); selective recompute drops the ``5as/h`` attention term and full
recompute keeps only each layer's input (``2sbh``, ``/t`` with SP). The same accounting, tensor
by tensor, adapted to these models:

* flash attention (Transformer Engine fused attention) stores no s x s score or dropout tensors,
  only Q, K, V, the output and FP32 softmax statistics: the ``5as/h`` term becomes
  ``2*(nq + 2*ng)*d + 2*nq*d + 4*nq`` bytes a token;
* GQA (``ng`` key/value heads of ``d`` channels) and a head dim independent of ``h/a``;
* no dropout (LLM-jp-4 trains with dropout 0): no masks;
* RMSNorm saves its input and an FP32 1/rms; qk-layernorm saves the pre-norm Q and K;
* SwiGLU: the fc1 output (2F) and the activation output (F) instead of GeLU's 4h + 4h;
* MoE: router logits and scores in FP32, and per (token, expert) pair the dispatched input, fc1
  output, activation output and expert output (the unpermute weighting needs it). A rank's
  pairs are its SP shard times top-k, gathered over the expert-TP group; ``imbalance`` scales
  them for uneven routing.
* the last stage's vocabulary-parallel cross entropy keeps FP32 exp-logits (4 bytes x V/t a
  token) and briefly the BF16 logits (2 bytes).

Recompute as megatron-core does it: ``full`` (uniform, one layer per checkpoint) keeps each
layer's input and rebuilds one layer at a time (a transient of one layer's activations);
``selective`` drops what each named module regenerates: ``core_attn`` the softmax statistics
(flash attention already recomputes the scores), ``layernorm`` the norm outputs, ``moe_act``
the experts' activation output, ``mlp``/``moe`` everything of the block but its input.
Transients on top of the saved tensors: the MoE all-to-all send/receive buffers of one layer
(2 x top-k copies of the rank's tokens), the logits, the recomputed layer.

Pipeline schedules decide how many microbatches a rank holds: 1F1B keeps ``pp - rank`` on rank
``rank`` (``pp`` on the first); the interleaved schedule keeps ``2*(pp - rank - 1) +
(vpp - 1)*pp + 1`` chunk-microbatches of ``L/(pp*vpp)`` layers, i.e.
``L*(1 + (pp-1)/(pp*vpp))`` layer-microbatches on the first rank, the factor Korthikanti et al.
give for the interleaved schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_llmjp.config.schema import ModelConfig
from megatron_llmjp.models.params import padded_vocab_size
from megatron_llmjp.parallel.layout import Layout

RecomputeMode = Literal["none", "selective", "full"]
SELECTIVE_MODULES = ("core_attn", "layernorm", "mlp", "moe_act", "moe")
"""megatron-core's ``recompute_modules`` names that change what a layer saves."""


@dataclass(frozen=True)
class Recompute:
    mode: RecomputeMode = "none"
    modules: tuple[str, ...] = ("core_attn",)
    """Used with ``mode="selective"`` (megatron-core's default is core_attn)."""

    def label(self) -> str:
        if self.mode != "selective":
            return self.mode
        short = {"core_attn": "attn", "layernorm": "ln"}
        return "sel:" + "+".join(short.get(x, x) for x in self.modules)


@dataclass(frozen=True)
class ActivationMemory:
    saved: int
    """Bytes kept for backward at the schedule's peak (all in-flight microbatches)."""
    transient: int
    """Largest short-lived working set on top (logits, MoE dispatch buffers, a recomputed
    layer): not kept across layers."""
    per_layer: int
    """Saved bytes of one layer for one microbatch."""
    in_flight: float
    """Layer-microbatches held at the peak (layers per chunk x chunk-microbatches)."""
    terms: dict[str, int] = field(default_factory=dict)
    """Saved bytes of one layer for one microbatch, by tensor."""

    @property
    def total(self) -> int:
        return self.saved + self.transient


def layer_terms(
    m: ModelConfig,
    layout: Layout,
    micro_batch: int,
    seq_length: int,
    act_bytes: int,
    recompute: Recompute,
    imbalance: float = 1.0,
) -> dict[str, float]:
    """Bytes one layer saves for one microbatch, by tensor, without full recompute."""
    a, h, d = act_bytes, m.hidden_size, m.kv_channels
    nq, ng, tp = m.num_attention_heads, m.num_query_groups, layout.tp
    tokens = seq_length * micro_batch / layout.cp
    sp = tp if layout.sequence_parallel else 1  # sequence-sharded tensors
    sel = set(recompute.modules) if recompute.mode == "selective" else set()
    t: dict[str, float] = {}
    t["attn_norm_in"] = (a * h + 4) / sp
    if "layernorm" not in sel:
        t["attn_norm_out"] = a * h / sp
    # K/V heads per rank: with fewer groups than TP ranks megatron-core holds one whole group
    # (replicated on tp / ng ranks), not a fraction.
    kv = max(ng, tp) / tp
    if m.qk_layernorm:
        t["qk_norm_in"] = a * (nq / tp + kv) * d
    t["qkv"] = a * (nq / tp + 2 * kv) * d
    t["attn_out"] = a * nq * d / tp
    if "core_attn" not in sel:
        t["softmax_stats"] = 4 * nq / tp
    t["mlp_norm_in"] = (a * h + 4) / sp
    if "layernorm" not in sel:
        t["mlp_norm_out"] = a * h / sp
    if m.is_moe:
        if "moe" not in sel:
            e_f = m.moe_ffn_hidden_size / layout.etp
            pairs = m.moe_router_topk * imbalance * layout.etp / sp
            t["router"] = 8 * m.num_experts / sp
            t["expert_in"] = pairs * a * h
            t["expert_fc1_out"] = pairs * a * 2 * e_f
            if "moe_act" not in sel:
                t["expert_act_out"] = pairs * a * e_f
            t["expert_out"] = pairs * a * h
    elif "mlp" not in sel:
        t["fc1_out"] = a * 2 * m.ffn_hidden_size / tp
        t["act_out"] = a * m.ffn_hidden_size / tp
    return {k: v * tokens for k, v in t.items()}


def in_flight_chunks(layout: Layout, pp_rank: int, num_microbatches: int) -> int:
    """Chunk-microbatches whose activations pipeline rank ``pp_rank`` holds at its peak:
    megatron-core's warm-up count plus the one in its steady 1F1B phase."""
    pp, vpp = layout.pp, layout.vpp or 1
    if vpp == 1:
        return min(pp - pp_rank, num_microbatches)
    warmup = 2 * (pp - pp_rank - 1) + (vpp - 1) * pp
    return min(warmup + 1, num_microbatches * vpp)


def activation_memory(
    m: ModelConfig,
    layout: Layout,
    micro_batch: int,
    seq_length: int,
    num_microbatches: int,
    act_bytes: int,
    recompute: Recompute,
    pp_rank: int,
    imbalance: float = 1.0,
) -> ActivationMemory:
    """Activation bytes of pipeline rank ``pp_rank`` at its peak (see the module docstring)."""
    terms = layer_terms(m, layout, micro_batch, seq_length, act_bytes, recompute, imbalance)
    full_layer = sum(
        layer_terms(m, layout, micro_batch, seq_length, act_bytes, Recompute()).values()
    )
    tokens = seq_length * micro_batch / layout.cp
    sp = layout.tp if layout.sequence_parallel else 1
    if recompute.mode == "full":
        # megatron's uniform full recompute, one layer per checkpoint: the layer input only.
        per_layer = act_bytes * m.hidden_size / sp * tokens
        terms = {"layer_input": per_layer}
    else:
        per_layer = sum(terms.values())
    layers_per_chunk = m.num_layers // (layout.pp * (layout.vpp or 1))
    in_flight = in_flight_chunks(layout, pp_rank, num_microbatches) * layers_per_chunk
    saved = per_layer * in_flight
    transient = full_layer if recompute.mode == "full" else 0.0
    if m.is_moe and layout.ep > 1:
        # The permuted tokens before the all-to-all and the combine output after it.
        pairs = m.moe_router_topk * imbalance * layout.etp / sp
        transient = max(transient, 2 * pairs * act_bytes * m.hidden_size * tokens)
    if pp_rank == layout.pp - 1:
        vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, layout.tp)
        logits = tokens * vocab / layout.tp
        # Final norm (input + output) and the FP32 exp-logits of one microbatch; 16-bit logits
        # live only until they are converted (FP32 logits are converted in place).
        saved += (2 * act_bytes * m.hidden_size + 4) / sp * tokens + 4 * logits
        if act_bytes == 2:
            transient = max(transient, 2 * logits)
    return ActivationMemory(
        saved=int(saved),
        transient=int(transient),
        per_layer=int(per_layer),
        in_flight=in_flight,
        terms={k: int(v) for k, v in terms.items()},
    )
