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

Recompute as megatron-core does it, from the run config's ``recompute`` section
(:class:`Recompute` is that section, hashable; ``Recompute.from_config``): ``full`` keeps the
input of each checkpointed group (``uniform``: groups of ``num_layers`` layers; ``block``: the
first ``num_layers`` layers of each pipeline chunk, the others keep everything) and rebuilds one
group at a time (a transient of one group's activations); ``selective`` drops what each named
module regenerates: ``core_attn`` the softmax statistics (flash attention already recomputes
the scores) or the s x s scores and probabilities (unfused), ``layernorm`` the stand-alone norm
outputs (with Transformer Engine a dense layer's norms are fused into the next linear layer,
which keeps its normalised input: only the MoE pre-MLP norm is stand-alone), ``moe_act`` the
experts' activation output, ``mlp``/``moe`` everything of the block but its input.

The layer backend (``spec``) decides the tensors: ``te`` is the Transformer Engine spec (flash
attention, fused norms and SwiGLU, grouped-GEMM experts), the accounting above. ``local`` is
megatron-core's local spec as this project builds it on CPU, measured tensor by tensor with
``torch.autograd.graph.saved_tensors_hooks`` on megatron-core 0.16.1 / torch 2.13
(``tests/distributed/test_recompute_saved_bytes.py``):

* RMSNorm (``torch.nn.functional.rms_norm``, composite on CPU) keeps an FP32 copy of its input,
  the FP32 normalised input and an FP32 1/rms: ``8h + 4`` bytes a token whatever the dtype;
  q/k norms likewise per head;
* unfused attention (``attention="unfused"``): Q, and K and V repeated to all query heads (new
  tensors when ``nq > ng``), the FP32 softmax output and its copy in the activation dtype
  (one tensor in FP32), an s x s boolean causal mask and RoPE's cos/sin per layer; with
  ``core_attn`` recompute the checkpoint keeps Q, K after RoPE and the whole fused QKV output
  (V is a view of it);
* SwiGLU without fusion keeps fc1's output (2F) and three F-sized tensors (SiLU output, the
  gated product, fc2's input); experts apply the routing probability in the activation (one
  more F and an FP32 probability per token-expert pair) and keep the permuted input;
* the router keeps top-k indices (int64) and probabilities (FP32), the routing map (bool) and
  the probability map (FP32) per token and expert, and the permutation's int64 indices per
  pair; auxiliary and z-losses add FP32 logits and scores and more indices.
Pipeline schedules decide how many microbatches a rank holds: 1F1B keeps ``pp - rank`` on rank
``rank`` (``pp`` on the first); the interleaved schedule keeps ``2*(pp - rank - 1) +
(vpp - 1)*pp + 1`` chunk-microbatches of ``L/(pp*vpp)`` layers, i.e.
``L*(1 + (pp-1)/(pp*vpp))`` layer-microbatches on the first rank, the factor Korthikanti et al.
give for the interleaved schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_llmjp.config.schema import ModelConfig, RecomputeConfig
from megatron_llmjp.config.validate import RECOMPUTE_MODULES
from megatron_llmjp.models.params import padded_vocab_size
from megatron_llmjp.models.recompute import DEFAULT_MODULES
from megatron_llmjp.parallel.layout import Layout

Granularity = Literal["none", "selective", "full"]
Spec = Literal["te", "local"]
AttentionKind = Literal["flash", "unfused"]
SELECTIVE_MODULES = ("core_attn", "layernorm", "mlp", "moe_act", "moe")
"""megatron-core's ``recompute_modules`` names that change what an LLM-jp-4 layer saves."""
assert set(SELECTIVE_MODULES) <= set(RECOMPUTE_MODULES)


@dataclass(frozen=True)
class Recompute:
    """The run config's ``recompute`` section (``RecomputeConfig``) as a hashable value: the
    same field names and values. ``full`` without a method is megatron's usual full recompute,
    ``uniform`` with one layer per checkpoint; ``selective`` without modules is megatron-core's
    default (``core_attn``)."""

    granularity: Granularity = "none"
    modules: tuple[str, ...] = ()
    method: Literal["uniform", "block"] | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.granularity == "selective" and not self.modules:
            object.__setattr__(self, "modules", DEFAULT_MODULES)
        if self.granularity != "selective":
            object.__setattr__(self, "modules", ())
        if self.granularity == "full" and self.method is None:
            object.__setattr__(self, "method", "uniform")
            object.__setattr__(self, "num_layers", self.num_layers or 1)
        if self.granularity != "full":
            object.__setattr__(self, "method", None)
            object.__setattr__(self, "num_layers", None)
        # megatron-core reads the modules as a set: one order (its own) for equal settings.
        order = {name: i for i, name in enumerate(RECOMPUTE_MODULES)}
        modules = sorted(self.modules, key=lambda x: (order.get(x, len(order)), x))
        object.__setattr__(self, "modules", tuple(modules))

    @classmethod
    def from_config(cls, r: RecomputeConfig) -> Recompute:
        """The planner's value for a config's ``recompute`` section."""
        return cls(r.granularity, tuple(r.modules or ()), r.method, r.num_layers)

    def to_config(self) -> RecomputeConfig:
        """The ``recompute`` section this value stands for (validated like any config)."""
        return RecomputeConfig(
            granularity=self.granularity,
            modules=list(self.modules) if self.granularity == "selective" else None,
            method=self.method,
            num_layers=self.num_layers,
        )

    def overrides(self) -> list[str]:
        """``--set`` overrides that put this setting into any run config, all four keys (a
        key left from the config's own section could contradict it), e.g.
        ``["recompute.granularity=selective", "recompute.modules=[moe_act,layernorm]",
        "recompute.method=null", "recompute.num_layers=null"]``."""
        modules = f"[{','.join(self.modules)}]" if self.granularity == "selective" else "null"
        return [
            f"recompute.granularity={self.granularity}",
            f"recompute.modules={modules}",
            f"recompute.method={self.method or 'null'}",
            f"recompute.num_layers={self.num_layers or 'null'}",
        ]

    def label(self) -> str:
        """Short form for tables: ``none``, ``sel:moe_act+ln``, ``full:u1``, ``full:b2``."""
        if self.granularity == "full":
            return f"full:{(self.method or 'u')[0]}{self.num_layers}"
        if self.granularity != "selective":
            return self.granularity
        short = {"core_attn": "attn", "layernorm": "ln"}
        return "sel:" + "+".join(short.get(x, x) for x in self.modules)

    def full_layers(self, layers_per_chunk: int) -> int:
        """Layers of a pipeline chunk that full recompute recomputes (0 without it)."""
        if self.granularity != "full":
            return 0
        if self.method == "block":
            return min(self.num_layers or 0, layers_per_chunk)
        return layers_per_chunk


@dataclass(frozen=True)
class ActivationMemory:
    saved: int
    """Bytes kept for backward at the schedule's peak (all in-flight microbatches)."""
    transient: int
    """Largest short-lived working set on top (logits, MoE dispatch buffers, a recomputed
    group of layers): not kept across layers."""
    per_layer: int
    """Saved bytes of one layer for one microbatch (the mean over a pipeline chunk)."""
    shared: int
    """Saved bytes of one chunk-microbatch that belong to no single layer (full recompute:
    RoPE's table, an input of every checkpoint)."""
    in_flight: float
    """Layer-microbatches held at the peak (layers per chunk x chunk-microbatches)."""
    terms: dict[str, int] = field(default_factory=dict)
    """Saved bytes of one layer for one microbatch, by tensor (a layer that full recompute
    does not cover, if any)."""

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
    spec: Spec = "te",
    attention: AttentionKind | None = None,
) -> dict[str, float]:
    """Bytes one layer saves for one microbatch, by tensor, without full recompute.

    ``act_bytes``: bytes of an activation element (2 for BF16, 4 for FP32); ``spec``: the
    layer backend, ``attention``: ``flash`` or ``unfused`` (default: flash with ``te``,
    unfused with ``local``). Formulas: see the module docstring."""
    if attention is None:
        attention = "flash" if spec == "te" else "unfused"
    a, h, d = act_bytes, m.hidden_size, m.kv_channels
    nq, ng, tp = m.num_attention_heads, m.num_query_groups, layout.tp
    tokens = seq_length * micro_batch / layout.cp
    s_local = seq_length / layout.cp
    sp = tp if layout.sequence_parallel else 1  # sequence-sharded tensors
    sel = set(recompute.modules) if recompute.granularity == "selective" else set()
    local = spec == "local"
    # Norms as stand-alone modules: the local spec's, and TE's MoE pre-MLP norm; TE fuses a
    # dense layer's norms into linear_qkv / linear_fc1, which keep the normalised input.
    norm_in = (8 * h + 4) if local else (a * h + 4)
    t: dict[str, float] = {}
    t["attn_norm_in"] = norm_in / sp
    if not (local and "layernorm" in sel):
        t["attn_norm_out"] = a * h / sp
    # K/V heads per rank: with fewer groups than TP ranks megatron-core holds one whole group
    # (replicated on tp / ng ranks), not a fraction.
    kv = max(ng, tp) / tp
    q = nq / tp
    if m.qk_layernorm:
        t["qk_norm_in"] = ((8 * d + 4) if local else a * d) * (q + kv)
    if attention == "flash":
        t["qkv"] = a * (q + 2 * kv) * d
        if "core_attn" not in sel:
            t["softmax_stats"] = 4 * q
    elif "core_attn" in sel:
        # The checkpoint keeps Q and K after RoPE and V, a view of the fused QKV output.
        t["q_k"] = a * (q + kv) * d
        t["qkv"] = a * (q + 2 * kv) * d
    else:
        # Q, K and V repeated to the query heads (new tensors when q > kv), FP32 softmax output
        # and its copy in the activation dtype, the causal mask (s x s bool per layer).
        t["q_k_v"] = a * (3 * q if q > kv else q + kv) * d
        if q == kv:
            t["qkv"] = a * (q + 2 * kv) * d
        t["scores"] = (4 + (a if a < 4 else 0)) * q * s_local
        t["mask"] = s_local * s_local / tokens
    if local:
        t["rope"] = 4 * a * d * s_local / tokens  # cos and sin for Q and K, per layer
    t["attn_out"] = a * q * d
    t["mlp_norm_in"] = norm_in / sp
    standalone_mlp_norm = local or m.is_moe
    if not (standalone_mlp_norm and "layernorm" in sel):
        t["mlp_norm_out"] = a * h / sp
    if m.is_moe:
        if "moe" not in sel:
            e_f = m.moe_ffn_hidden_size / layout.etp
            k, e = m.moe_router_topk, m.num_experts
            pairs = k * imbalance * layout.etp / sp
            if local:
                router = 20 * k + 5 * e  # top-k ids and probs, routing and probability maps
                if m.moe_aux_loss_coeff or m.moe_z_loss_coeff:
                    router += 8 * e + 8 * k + 4
                t["router"] = router / sp
                t["expert_in"] = pairs * (a * h + 4)  # permuted tokens and FP32 probabilities
                t["expert_fc1_out"] = pairs * a * 2 * e_f
                t["expert_act"] = pairs * a * (3 if "moe_act" in sel else 4) * e_f
            else:
                t["router"] = 8 * e / sp
                t["expert_in"] = pairs * a * h
                t["expert_fc1_out"] = pairs * a * 2 * e_f
                if "moe_act" not in sel:
                    t["expert_act_out"] = pairs * a * e_f
                t["expert_out"] = pairs * a * h
    elif "mlp" not in sel:
        f = m.ffn_hidden_size / tp
        t["fc1_out"] = a * 2 * f
        t["act_out"] = a * (3 if local else 1) * f
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
    spec: Spec = "te",
    attention: AttentionKind | None = None,
) -> ActivationMemory:
    """Activation bytes of pipeline rank ``pp_rank`` at its peak (see the module docstring)."""
    kw = dict(imbalance=imbalance, spec=spec, attention=attention)
    terms = layer_terms(m, layout, micro_batch, seq_length, act_bytes, recompute, **kw)
    full_layer = sum(
        layer_terms(m, layout, micro_batch, seq_length, act_bytes, Recompute(), **kw).values()
    )
    tokens = seq_length * micro_batch / layout.cp
    sp = layout.tp if layout.sequence_parallel else 1
    layers_per_chunk = m.num_layers // (layout.pp * (layout.vpp or 1))
    layer = sum(terms.values())
    transient = 0.0
    recomputed = recompute.full_layers(layers_per_chunk)
    if recomputed:
        # megatron's checkpoint keeps the input of each group: one per num_layers layers
        # (uniform) or one per recomputed layer (block); the other layers keep everything.
        layer_input = act_bytes * m.hidden_size / sp * tokens
        group = recompute.num_layers if recompute.method == "uniform" else 1
        chunk = recomputed / group * layer_input + (layers_per_chunk - recomputed) * layer
        # every checkpoint also saves RoPE's FP32 table (s x d), one tensor for the chunk
        shared = 4 * seq_length / layout.cp * m.kv_channels
        transient = group * full_layer
        if recomputed == layers_per_chunk:
            terms = {"layer_input": layer_input / group}
    else:
        chunk = layers_per_chunk * layer
        shared = 0.0
    per_layer = chunk / layers_per_chunk if layers_per_chunk else 0.0
    chunks = in_flight_chunks(layout, pp_rank, num_microbatches)
    in_flight = chunks * layers_per_chunk
    saved = (chunk + shared) * chunks
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
        shared=int(shared),
        in_flight=in_flight,
        terms={k: int(v) for k, v in terms.items()},
    )
