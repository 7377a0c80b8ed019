"""Estimated step time of a layout: compute at an assumed MFU, communication, pipeline bubble.

Deliberately simple, for ranking layouts rather than predicting seconds:

* compute: ``6 * N * tokens`` FLOPs for the matmuls of the ``N`` parameters a token uses
  (Kaplan et al. 2020; for MoE the routed top-k experts only) plus causal attention
  ``6 * s * nq * d`` FLOPs per token and layer, divided over tp * cp ranks, run at
  ``mfu`` x the GPU's peak BF16 rate. Recompute adds the forward of what it recomputes.
* tensor parallel: per layer and microbatch, over the TP group, the all-gathers and
  reduce-scatters of sequence parallelism (2 forward, 3 backward per block: megatron re-gathers
  the sequence-sharded input for the weight gradient), or 2 + 2 all-reduces without SP; the
  MoE block communicates over the expert-TP group only when etp > 1.
* context parallel: the ring-attention K/V exchange, ``3 * (cp - 1)`` chunk transfers per layer
  and microbatch (counted with TP communication in the output).
* expert parallel: 4 all-to-alls per MoE layer and microbatch (dispatch and combine, forward
  and backward) of top-k copies of the rank's tokens; the share to ranks outside the node goes
  over InfiniBand.
* pipeline: per microbatch and model chunk, one activation and one gradient p2p transfer;
  the bubble is ``(pp - 1) / vpp`` microbatch times (Narayanan et al. 2021).
* data parallel: reduce-scatter of the gradient buffers and all-gather of the parameters
  (distributed optimizer) or an all-reduce; with overlap, only what exceeds the last
  microbatch's backward (and the first one's forward, for the gather) is exposed.
* selective recompute of element-wise modules (norms, activations) re-reads and re-writes
  their tensors at HBM speed; recomputed matmuls add their forward FLOPs.
* the optimizer step is memory-bound: about 30 bytes of HBM traffic per element updated.

Bandwidth: a ring collective moves ``(n - 1) / n`` of the data per GPU; a group whose ranks fit
in one node (megatron's rank order: tp, cp, ep, dp, pp from fastest varying) uses NVLink,
otherwise InfiniBand at the NICs of its members in a node (one NIC per GPU); all-to-all and p2p
traffic leaving the node goes through the sender's NIC; all at ``COMM_EFFICIENCY`` of nominal.
Not modelled: overlap of TP/EP communication with compute, GEMM efficiency falling with small
shards or few tokens per expert, stage imbalance beyond the embedding/output layers, routing
imbalance, per-microbatch launch latencies.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_llmjp.config.schema import ModelConfig, PrecisionConfig
from megatron_llmjp.models.params import count_parameters, padded_vocab_size
from megatron_llmjp.parallel.layout import Layout
from megatron_llmjp.planner.activations import Recompute, layer_terms
from megatron_llmjp.planner.hardware import COMM_EFFICIENCY, GPU, HBM_EFFICIENCY
from megatron_llmjp.planner.memory import dtype_bytes
from megatron_llmjp.planner.shards import chunk_sums, rank_chunks

OPTIMIZER_BYTES_PER_ELEMENT = 30
"""HBM traffic of one Adam update with FP32 master weights: read the gradient (4), read and write
the master weight and both moments (24), write the 16-bit parameter (2)."""


@dataclass(frozen=True)
class Cluster:
    gpu: GPU
    gpus_per_node: int = 8
    ib_gbps: float | None = None
    """Inter-node GB/s per GPU and direction; None: the GPU row's reference node."""
    mfu: float = 0.45
    """Fraction of peak BF16 the compute kernels reach (communication is added on top)."""

    @property
    def ib(self) -> float:
        return (self.ib_gbps if self.ib_gbps is not None else self.gpu.ib_gbps) * 1e9

    @property
    def nvlink(self) -> float:
        return self.gpu.nvlink_gbps * 1e9


@dataclass(frozen=True)
class StepTime:
    step: float
    """Seconds per optimizer step."""
    compute: float
    tp_comm: float
    ep_comm: float
    pp_comm: float
    bubble: float
    dp_exposed: float
    optimizer: float
    model_flops: float
    """FLOPs of one step without recompute, all GPUs (for MFU)."""
    mfu: float
    tokens_per_s_per_gpu: float


@dataclass(frozen=True)
class TokenFlops:
    layer: float
    """Forward + backward FLOPs of one layer for one token."""
    attention_fwd: float
    """Forward FLOPs of the attention core of one layer for one token (causal)."""
    mlp_fwd: float
    output: float
    """Forward + backward FLOPs of the output layer for one token (padded vocabulary)."""


def token_flops(m: ModelConfig, seq_length: int, tp: int) -> TokenFlops:
    c = count_parameters(m)
    per = c.per_layer
    if m.is_moe:
        mlp = m.num_experts * m.hidden_size + m.moe_router_topk * 3 * m.hidden_size * (
            m.moe_ffn_hidden_size
        )
    else:
        mlp = per["mlp"]
    attn_core = 2 * seq_length * m.num_attention_heads * m.kv_channels  # causal: s/2 keys
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    return TokenFlops(
        layer=6 * (per["attention"] + mlp) + 3 * attn_core,
        attention_fwd=attn_core,
        mlp_fwd=2 * mlp,
        output=6 * vocab * m.hidden_size,
    )


def model_flops_per_token(m: ModelConfig, seq_length: int) -> float:
    """Forward + backward FLOPs a token costs without recompute (what MFU counts)."""
    f = token_flops(m, seq_length, 1)
    return m.num_layers * f.layer + 6 * m.vocab_size * m.hidden_size


def _ring(nbytes: float, n: int, stride: int, cl: Cluster) -> float:
    """Seconds for a ring all-gather or reduce-scatter of ``nbytes`` (the full tensor) over a
    group of ``n`` ranks ``stride`` apart.

    Across nodes, NCCL runs one ring per NIC: the k group members of a node chain over NVLink
    and each drives its own NIC out, so the group moves data at k x the per-GPU InfiniBand rate
    (all-reduce bus bandwidth across 8-GPU nodes is about the node's total NIC bandwidth)."""
    if n <= 1:
        return 0.0
    if stride * n <= cl.gpus_per_node:
        bw = cl.nvlink
    else:
        k = max(1, min(n, cl.gpus_per_node // stride))
        bw = min(cl.nvlink, k * cl.ib)
    return (n - 1) / n * nbytes / (bw * COMM_EFFICIENCY)


def _all_to_all(nbytes: float, n: int, stride: int, cl: Cluster) -> float:
    """Seconds for an all-to-all where each rank sends ``nbytes`` spread evenly over ``n``."""
    if n <= 1:
        return 0.0
    local = max(1, min(n, cl.gpus_per_node // stride))
    t_local = (local - 1) / n * nbytes / (cl.nvlink * COMM_EFFICIENCY)
    t_remote = (n - local) / n * nbytes / (cl.ib * COMM_EFFICIENCY)
    return max(t_local, t_remote)


def step_time(
    m: ModelConfig,
    layout: Layout,
    micro_batch: int,
    global_batch: int,
    seq_length: int,
    precision: PrecisionConfig,
    distributed_optimizer: bool,
    overlap_grad_reduce: bool,
    overlap_param_gather: bool,
    recompute: Recompute,
    cl: Cluster,
) -> StepTime:
    """The step-time model of the module docstring for one layout."""
    tp, cp, ep, etp, pp, vpp = layout.tp, layout.cp, layout.ep, layout.etp, layout.pp, layout.vpp
    vpp = vpp or 1
    a = 2 if precision.dtype == "bf16" else 4
    # FP32 matmuls run as TF32 on these GPUs, at half the BF16 tensor-core rate.
    peak = cl.gpu.bf16_tflops * 1e12 * (cl.mfu if a == 2 else cl.mfu / 2)
    m_micro = global_batch // (micro_batch * layout.dp)
    tokens = seq_length * micro_batch  # one microbatch of one pipeline
    f = token_flops(m, seq_length, tp)
    extra = 0.0
    sel = set(recompute.modules)
    layers_per_chunk = m.num_layers // (pp * vpp)
    # Fraction of the layers full recompute rebuilds (all but with method=block).
    full = recompute.full_layers(layers_per_chunk) / layers_per_chunk if layers_per_chunk else 0
    extra = full * f.layer / 3
    if "core_attn" in sel:
        extra += f.attention_fwd
    if ("mlp" in sel and not m.is_moe) or ("moe" in sel and m.is_moe):
        extra += f.mlp_fwd
    layers = m.num_layers // pp
    # Recomputed element-wise work (norms, activation functions) is memory-bound: charge
    # reading the inputs and writing the outputs again, ~3x the bytes no longer saved.
    t_elementwise = 0.0
    if sel - {"core_attn", "mlp", "moe"}:
        kept = sum(layer_terms(m, layout, micro_batch, seq_length, a, recompute).values())
        none = sum(layer_terms(m, layout, micro_batch, seq_length, a, Recompute()).values())
        t_elementwise = 3 * (none - kept) / (cl.gpu.hbm_gbps * 1e9 * HBM_EFFICIENCY)

    # Communication of one layer for one microbatch.
    sp = layout.sequence_parallel
    hidden_bytes = tokens / cp * m.hidden_size * a
    units = (5 if sp else 4) + 2 * full
    t_tp = units * _ring(hidden_bytes, tp, 1, cl)
    if m.is_moe:
        if etp > 1:
            t_tp += units * _ring(hidden_bytes * m.moe_router_topk, etp, 1, cl)
        a2a_bytes = hidden_bytes / (tp if sp else 1) * m.moe_router_topk
        n_a2a = 4 + (2 if "moe" in sel else 2 * full)
        t_ep = n_a2a * _all_to_all(a2a_bytes, ep, etp, cl)
    else:
        t_tp += units * _ring(hidden_bytes, tp, 1, cl)
        t_ep = 0.0
    # Context parallelism (ring attention): each rank passes its K/V chunk around the ring,
    # cp - 1 hops forward and twice that backward (K/V again, then dK/dV).
    t_cp = 0.0
    if cp > 1:
        kv_bytes = tokens / cp * 2 * m.num_query_groups * m.kv_channels * a / tp
        hops = (3 + full) * (cp - 1)
        bw = cl.nvlink if tp * cp <= cl.gpus_per_node else cl.ib
        t_cp = hops * kv_bytes / (bw * COMM_EFFICIENCY)
    t_p2p = 0.0
    if pp > 1:
        p2p_bytes = hidden_bytes / (tp if sp else 1)
        bw = cl.nvlink if layout.world <= cl.gpus_per_node else cl.ib
        t_p2p = 2 * vpp * p2p_bytes / (bw * COMM_EFFICIENCY)

    def stage_compute(last: bool) -> float:
        flops = tokens * (layers * (f.layer + extra) + (f.output if last else 0.0)) / (tp * cp)
        return flops / peak + layers * t_elementwise

    comp = max(stage_compute(pp == 1), stage_compute(True))
    per_micro = comp + layers * (t_tp + t_ep + t_cp) + t_p2p
    bubble = (pp - 1) / vpp * per_micro
    pipeline = m_micro * per_micro + bubble

    # Data-parallel gradient reduction and parameter gather, from this rank's buffers.
    p_bytes, g_bytes = dtype_bytes(precision)
    dense = expert = 0
    for chunk in rank_chunks(m, layout, 0):
        sums = chunk_sums(m, layout, chunk)
        dense += sums[False].numel
        expert += sums[True].numel
    groups = ((dense, layout.dp * cp, tp), (expert, layout.expert_dp, ep * etp))
    t_rs = t_ag = 0.0
    owned = 0.0
    for n, size, stride in groups:
        if not n:
            continue
        if distributed_optimizer:
            t_rs += _ring(n * g_bytes, size, stride, cl)
            t_ag += _ring(n * p_bytes, size, stride, cl)
            owned += n / size
        else:
            t_rs += 2 * _ring(n * g_bytes, size, stride, cl)
            owned += n
    bwd, fwd = comp * 2 / 3, comp / 3
    dp_exposed = max(0.0, t_rs - bwd) if overlap_grad_reduce else t_rs
    overlap_ag = overlap_param_gather and distributed_optimizer
    dp_exposed += max(0.0, t_ag - fwd) if overlap_ag else t_ag
    t_opt = owned * OPTIMIZER_BYTES_PER_ELEMENT / (cl.gpu.hbm_gbps * 1e9 * HBM_EFFICIENCY)

    step = pipeline + dp_exposed + t_opt
    step_tokens = global_batch * seq_length
    model_flops = model_flops_per_token(m, seq_length) * step_tokens
    return StepTime(
        step=step,
        compute=m_micro * comp,
        tp_comm=m_micro * layers * (t_tp + t_cp),
        ep_comm=m_micro * layers * t_ep,
        pp_comm=m_micro * t_p2p,
        bubble=bubble,
        dp_exposed=dp_exposed,
        optimizer=t_opt,
        model_flops=model_flops,
        mfu=model_flops / (step * layout.world * cl.gpu.bf16_tflops * 1e12),
        tokens_per_s_per_gpu=step_tokens / step / layout.world,
    )
