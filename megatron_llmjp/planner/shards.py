"""Which parameter tensors a rank holds, and how megatron-core's DDP buffers lay them out.

The tensor list follows megatron-core's ``GPTModel`` registration order (``named_parameters``),
because the distributed optimizer's shard boundaries depend on it. The local (CPU) spec and the
Transformer Engine spec hold the same tensors; TE fuses the norms into the next linear, which
changes the order only (``te=True``).

The DDP buffer arithmetic restates megatron-core 0.16 ``_ParamAndGradBuffer`` from its rules:
with the distributed optimizer every parameter starts at a multiple of 64 elements and every
bucket ends at a multiple of lcm(dp, 128); parameters are laid out in reverse order; a shared
(tied, pp > 1) embedding gets a bucket of its own; a new bucket starts once one holds
``bucket_size`` elements (only with overlapped gradient reduction, only on the first pipeline
rank's first model chunk). Without the distributed optimizer there is no padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from megatron_llmjp.config.schema import ModelConfig
from megatron_llmjp.models.params import padded_vocab_size
from megatron_llmjp.parallel.layout import Layout

PARAM_ALIGN = 64
"""Distributed optimizer: parameters start at 64-element (128-byte for 16-bit) boundaries."""
BUCKET_ALIGN = 128
"""Distributed optimizer: buckets end at a multiple of lcm(dp, 128) elements."""


@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    expert: bool
    """In megatron's expert-parallel buffer (``allreduce=False``): expert weights when ep > 1.
    With ep == 1 expert weights are reduced like dense ones and live in the dense buffer."""
    shared: bool = False
    """A tied embedding on a pipeline with pp > 1 (its own bucket)."""


def _ceil(n: int, k: int) -> int:
    return -(-n // k) * k


def layer_params(m: ModelConfig, tp: int, ep: int, etp: int, te: bool = False) -> tuple[Param, ...]:
    """One transformer layer's tensors on one rank, in registration order, names relative to
    ``decoder.layers.N.``."""
    return _layer_params(
        m.hidden_size,
        m.kv_channels,
        m.num_attention_heads,
        m.num_query_groups,
        m.qk_layernorm,
        m.ffn_hidden_size if not m.is_moe else None,
        m.num_experts if m.is_moe else None,
        m.moe_ffn_hidden_size if m.is_moe else None,
        tp,
        ep,
        etp,
        te,
    )


@lru_cache(maxsize=4096)  # ModelConfig is unhashable: cache on the fields that matter
def _layer_params(
    h: int,
    d: int,
    nq: int,
    ng: int,
    qk_layernorm: bool,
    ffn: int | None,
    experts: int | None,
    moe_ffn: int | None,
    tp: int,
    ep: int,
    etp: int,
    te: bool,
) -> tuple[Param, ...]:
    out: list[Param] = []

    def add(name: str, numel: int, expert: bool = False) -> None:
        out.append(Param(name, numel, expert))

    if not te:
        add("input_layernorm.weight", h)
    add("self_attention.linear_proj.weight", h * nq * d // tp)
    if te:
        add("self_attention.linear_qkv.layer_norm_weight", h)
    add("self_attention.linear_qkv.weight", (nq + 2 * ng) * d * h // tp)
    if qk_layernorm:
        add("self_attention.q_layernorm.weight", d)
        add("self_attention.k_layernorm.weight", d)
    if experts is not None:
        add("pre_mlp_layernorm.weight", h)
        add("mlp.router.weight", experts * h)
        f, local, is_ep = moe_ffn // etp, experts // ep, ep > 1
        if te:  # TEGroupedMLP: all fc1 weights, then all fc2 weights
            for e in range(local):
                add(f"mlp.experts.linear_fc1.weight{e}", 2 * f * h, is_ep)
            for e in range(local):
                add(f"mlp.experts.linear_fc2.weight{e}", h * f, is_ep)
        else:  # SequentialMLP: one MLP per expert
            for e in range(local):
                add(f"mlp.experts.local_experts.{e}.linear_fc1.weight", 2 * f * h, is_ep)
                add(f"mlp.experts.local_experts.{e}.linear_fc2.weight", h * f, is_ep)
    else:
        f = ffn // tp
        if te:
            add("mlp.linear_fc1.layer_norm_weight", h)
        else:
            add("pre_mlp_layernorm.weight", h)
        add("mlp.linear_fc1.weight", 2 * f * h)
        add("mlp.linear_fc2.weight", h * f)
    return tuple(out)


@dataclass(frozen=True)
class Chunk:
    """What one model chunk (virtual stage) of a pipeline rank holds."""

    first: bool
    """Holds the input embedding (first virtual stage of pipeline rank 0)."""
    last: bool
    """Holds the final norm and the output layer (last virtual stage of the last rank)."""
    num_layers: int


def rank_chunks(m: ModelConfig, layout: Layout, pp_rank: int) -> list[Chunk]:
    """The chunks of pipeline rank ``pp_rank``: layers are split evenly, virtual stage v of
    rank p holds global stage v * pp + p (megatron's interleaved assignment)."""
    chunks = layout.vpp or 1
    per = m.num_layers // (layout.pp * chunks)
    return [
        Chunk(
            first=pp_rank == 0 and v == 0,
            last=pp_rank == layout.pp - 1 and v == chunks - 1,
            num_layers=per,
        )
        for v in range(chunks)
    ]


def chunk_params(m: ModelConfig, layout: Layout, chunk: Chunk, te: bool = False) -> list[Param]:
    """All tensors of one chunk in ``named_parameters`` order (layers numbered locally)."""
    h = m.hidden_size
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, layout.tp)
    tied_pp = m.tie_word_embeddings and layout.pp > 1
    out: list[Param] = []
    if chunk.first:
        out.append(
            Param("embedding.word_embeddings.weight", vocab // layout.tp * h, False, tied_pp)
        )
    layer = layer_params(m, layout.tp, layout.ep, layout.etp, te)
    for i in range(chunk.num_layers):
        out += [Param(f"decoder.layers.{i}.{p.name}", p.numel, p.expert) for p in layer]
    if chunk.last:
        out.append(Param("decoder.final_layernorm.weight", h, False))
        if not m.tie_word_embeddings or layout.pp > 1:
            out.append(Param("output_layer.weight", vocab // layout.tp * h, False, tied_pp))
    return out


def bucket_size(
    layout: Layout, overlap_grad_reduce: bool, pp_rank: int, chunk_index: int
) -> int | None:
    """megatron's DDP bucket size in elements, or None for one bucket per buffer: buckets only
    with overlapped reduction, and only on pipeline rank 0's first chunk (max(40M, 1M * dp))."""
    if not overlap_grad_reduce or pp_rank > 0 or chunk_index > 0:
        return None
    return max(40_000_000, 1_000_000 * layout.dp)


@dataclass(frozen=True)
class BufferLayout:
    """One DDP buffer (dense or expert) of one chunk, as megatron-core lays it out."""

    numel: int
    """Elements of the param/grad buffer, padding included."""
    buckets: tuple[tuple[int, int], ...]
    ranges: tuple[tuple[int, int], ...]
    """Each parameter's [start, end) in the buffer, in layout (reverse) order."""

    def owned(self, dp: int, dp_rank: int) -> int:
        """Parameter elements the distributed optimizer assigns to ``dp_rank``: the rank's
        1/dp slice of every bucket, padding excluded (main params and Adam moments)."""
        total = 0
        for start, end in self.buckets:
            shard = (end - start) // dp
            lo, hi = start + dp_rank * shard, start + (dp_rank + 1) * shard
            for a, b in self.ranges:
                if b > lo and a < hi:
                    total += min(b, hi) - max(a, lo)
        return total


def lay_out_buffer(
    params: list[Param], dp: int, distributed: bool, bucket: int | None
) -> BufferLayout:
    """Emulate ``_ParamAndGradBuffer``'s index computation for ``params`` (registration order)."""
    align = math.lcm(dp, BUCKET_ALIGN)

    def end_of_bucket(i: int) -> int:
        return _ceil(i, align) if distributed else i

    start = bucket_start = 0
    buckets, ranges = [], []
    open_bucket = False
    for p in reversed(params):
        if distributed:
            start = _ceil(start, PARAM_ALIGN)
        if distributed and p.shared and open_bucket:
            start = end_of_bucket(start)
            buckets.append((bucket_start, start))
            bucket_start, open_bucket = start, False
        end = start + p.numel
        ranges.append((start, end))
        open_bucket = True
        if (bucket is not None and end - bucket_start >= bucket) or (distributed and p.shared):
            start = end_of_bucket(end)
            buckets.append((bucket_start, start))
            bucket_start, open_bucket = start, False
        else:
            start = end
    if open_bucket:
        start = end_of_bucket(start)
        buckets.append((bucket_start, start))
    return BufferLayout(numel=start, buckets=tuple(buckets), ranges=tuple(ranges))


@dataclass(frozen=True)
class GroupSums:
    """Sums over the tensors of one buffer, all the closed form needs."""

    numel: int
    padded: int
    """Sum of the non-shared tensors' sizes rounded up to 64 elements."""
    shared: tuple[int, ...] = ()
    """Sizes of shared (tied, pp > 1) embeddings, each a bucket of its own."""


def chunk_sums(m: ModelConfig, layout: Layout, chunk: Chunk) -> dict[bool, GroupSums]:
    """``GroupSums`` of the dense (False) and expert (True) buffers of one chunk, from one
    layer's tensors times the layer count: the planner's fast path (no per-tensor walk)."""
    layer = layer_params(m, layout.tp, layout.ep, layout.etp)
    out = {}
    for expert in (False, True):
        n, padded = _layer_sums(layer, expert)
        n, padded = n * chunk.num_layers, padded * chunk.num_layers
        shared: list[int] = []
        if not expert:
            ends = chunk_params(m, layout, Chunk(chunk.first, chunk.last, 0))
            for p in ends:
                n += p.numel
                if p.shared:
                    shared.append(p.numel)
                else:
                    padded += _ceil(p.numel, PARAM_ALIGN)
        out[expert] = GroupSums(n, padded, tuple(shared))
    return out


@lru_cache(maxsize=4096)
def _layer_sums(layer: tuple[Param, ...], expert: bool) -> tuple[int, int]:
    sel = [p for p in layer if p.expert == expert]
    return sum(p.numel for p in sel), sum(_ceil(p.numel, PARAM_ALIGN) for p in sel)


def sums_of(params: list[Param]) -> GroupSums:
    return GroupSums(
        numel=sum(p.numel for p in params),
        padded=sum(_ceil(p.numel, PARAM_ALIGN) for p in params if not p.shared),
        shared=tuple(p.numel for p in params if p.shared),
    )


@dataclass(frozen=True)
class BufferSize:
    """A buffer's size from sums alone (no per-tensor walk): what the planner uses."""

    numel: int
    """Buffer elements, padding included (an upper bound when ``exact`` is False)."""
    params: int
    """Parameter elements (no padding)."""
    exact: bool


def buffer_size(sums: GroupSums, dp: int, distributed: bool, bucket: int | None) -> BufferSize:
    """Closed form of ``lay_out_buffer(...).numel``.

    With one bucket, rounding each start to 64 and the end to lcm(dp, 128) (a multiple of 64)
    gives ``ceil(sum(ceil64(numel)), lcm)`` per bucket, whatever the order; a shared embedding is
    a bucket of its own. With several buckets the split points depend on the order, so each
    bucket is charged its worst-case end padding (lcm - 64 elements): exact to within that."""
    if not distributed:
        return BufferSize(sums.numel, sums.numel, True)
    align = math.lcm(dp, BUCKET_ALIGN)
    total = sum(_ceil(n, align) for n in sums.shared)
    rest = sums.padded
    if rest == 0:
        return BufferSize(total, sums.numel, True)
    if bucket is None or rest < bucket:
        return BufferSize(total + _ceil(rest, align), sums.numel, True)
    n_buckets = rest // bucket + 1
    return BufferSize(total + rest + n_buckets * (align - PARAM_ALIGN), sums.numel, False)
