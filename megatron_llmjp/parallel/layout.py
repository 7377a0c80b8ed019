"""The parallel layout as a small pure value, checked before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.config.schema import ModelConfig, ParallelConfig, TrainConfig


class LayoutError(ConfigError):
    """A parallel layout that megatron-core cannot run (message names the fields)."""


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    vpp: int | None
    cp: int
    ep: int
    etp: int
    dp: int
    sequence_parallel: bool

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert weights (megatron's expert-data-parallel group)."""
        return self.world // (self.ep * self.etp * self.pp)

    def describe(self) -> str:
        vpp = f" vpp={self.vpp}" if self.vpp else ""
        return (
            f"world={self.world}: tp={self.tp} pp={self.pp}{vpp} cp={self.cp} ep={self.ep} "
            f"etp={self.etp} dp={self.dp} sp={self.sequence_parallel}"
        )


def check_query_groups(m: ModelConfig, tp: int) -> None:
    """The KV-head rule of megatron-core 0.16.1's ``Attention``: with at least ``tp`` query
    groups each TP rank holds ``num_query_groups / tp`` of them; with fewer, each group's K/V
    heads are replicated on ``tp / num_query_groups`` ranks (the fused QKV output is gathered
    and every rank takes its group's slice), so ``tp`` must be a multiple of the groups. The
    fused QKV projection, ``(heads + 2 * groups) * kv_channels`` rows, is split over ``tp``."""
    groups = m.num_query_groups
    if groups >= tp and groups % tp:
        raise LayoutError(
            f"model.num_query_groups={groups} is not divisible by parallel.tp={tp} (with "
            "fewer groups than TP ranks, tp must be a multiple of the groups)"
        )
    if groups < tp and tp % groups:
        raise LayoutError(
            f"parallel.tp={tp} is larger than model.num_query_groups={groups} but not a "
            "multiple of it: megatron-core replicates each KV group on tp / num_query_groups "
            "ranks"
        )
    rows = (m.num_attention_heads + 2 * groups) * m.kv_channels
    if rows % tp:
        raise LayoutError(
            f"the fused QKV projection's (model.num_attention_heads + 2*num_query_groups) * "
            f"kv_channels = {rows} rows are not divisible by parallel.tp={tp}"
        )


def make_layout(p: ParallelConfig, m: ModelConfig, t: TrainConfig, world: int) -> Layout:
    """Derive dp and check every divisibility rule the trainer relies on."""
    for name in ("tp", "pp", "cp", "ep"):
        if getattr(p, name) < 1:
            raise LayoutError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
    # With ep == 1 megatron-core treats expert weights as dense ones (reduced over the DP group
    # only), so they must be sharded exactly like the dense layers: etp == tp. Otherwise each TP
    # rank would update its replica from its own sequence-parallel tokens and the copies drift.
    etp = (p.tp if m.is_moe and p.ep == 1 else 1) if p.etp is None else p.etp
    if etp < 1:
        raise LayoutError(f"parallel.etp must be >= 1, got {p.etp}")
    if m.is_moe and p.ep == 1 and etp != p.tp:
        raise LayoutError(
            f"parallel.etp={etp} with parallel.ep=1 must equal parallel.tp={p.tp}: without "
            "expert parallelism megatron-core reduces expert gradients like dense ones"
        )
    model_par = p.tp * p.pp * p.cp
    if world % model_par:
        raise LayoutError(
            f"world size {world} is not divisible by parallel.tp*pp*cp = "
            f"{p.tp}*{p.pp}*{p.cp} = {model_par}"
        )
    dp = world // model_par
    if world % (p.ep * etp * p.pp):
        raise LayoutError(
            f"world size {world} is not divisible by parallel.ep*etp*pp = "
            f"{p.ep}*{etp}*{p.pp} = {p.ep * etp * p.pp}"
        )
    if (p.tp * p.cp * dp) % (p.ep * etp):
        raise LayoutError(
            f"parallel.ep*etp = {p.ep * etp} must divide tp*cp*dp = {p.tp * p.cp * dp} "
            "(experts are sharded over the ranks of one pipeline stage)"
        )
    if m.num_attention_heads % p.tp:
        raise LayoutError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tp={p.tp}"
        )
    check_query_groups(m, p.tp)
    if m.num_layers % p.pp:
        raise LayoutError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    vpp = p.vpp if p.vpp and p.vpp > 1 else None
    if p.vpp is not None and p.vpp < 1:
        raise LayoutError(f"parallel.vpp must be >= 1 or null, got {p.vpp}")
    if vpp:
        if p.pp < 2:
            raise LayoutError(f"parallel.vpp={vpp} needs parallel.pp >= 2, got pp={p.pp}")
        if m.num_layers % (p.pp * vpp):
            raise LayoutError(
                f"model.num_layers={m.num_layers} is not divisible by parallel.pp*vpp = "
                f"{p.pp}*{vpp} = {p.pp * vpp} (each virtual stage needs whole layers)"
            )
    if m.is_moe:
        if m.num_experts % p.ep:
            raise LayoutError(
                f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}"
            )
        if m.moe_ffn_hidden_size % etp:
            raise LayoutError(
                f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} is not divisible by "
                f"parallel.etp={etp}"
            )
    elif p.ep > 1 or etp > 1:
        raise LayoutError(
            f"parallel.ep={p.ep}, etp={etp}: expert parallelism needs an MoE model "
            f"(model.name={m.name} is dense)"
        )
    if m.ffn_hidden_size is not None and m.ffn_hidden_size % p.tp:
        raise LayoutError(
            f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by parallel.tp={p.tp}"
        )
    sp = (p.tp > 1) if p.sequence_parallel is None else p.sequence_parallel
    if sp and p.tp == 1:
        sp = False
    if m.is_moe and p.tp > 1 and not sp:
        raise LayoutError(
            "parallel.sequence_parallel=false: megatron-core MoE layers with tp > 1 need "
            "sequence parallelism"
        )
    if sp and t.seq_length % p.tp:
        raise LayoutError(
            f"train.seq_length={t.seq_length} is not divisible by parallel.tp={p.tp} "
            "(sequence parallelism splits the sequence over the TP ranks)"
        )
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        raise LayoutError(
            f"train.seq_length={t.seq_length} is not divisible by 2*parallel.cp={2 * p.cp}"
        )
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise LayoutError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size*dp = {t.micro_batch_size}*{dp} = "
            f"{t.micro_batch_size * dp}"
        )
    if vpp:
        n_micro = t.global_batch_size // (t.micro_batch_size * dp)
        if n_micro % p.pp:
            raise LayoutError(
                f"the interleaved schedule (parallel.vpp={vpp}) needs the number of "
                f"microbatches per step ({n_micro} = global_batch_size / (micro_batch_size*dp))"
                f" to be a multiple of parallel.pp={p.pp}"
            )
    return Layout(
        world=world,
        tp=p.tp,
        pp=p.pp,
        vpp=vpp,
        cp=p.cp,
        ep=p.ep,
        etp=etp,
        dp=dp,
        sequence_parallel=sp,
    )


def smallest_layout(p: ParallelConfig, m: ModelConfig, t: TrainConfig) -> Layout:
    """The layout of the fewest ranks that ``p`` allows (dp as small as the rules permit):
    what a checkpoint written outside training (conversion, upcycling) records."""
    base = p.tp * p.pp * p.cp
    error = None
    for mult in range(1, 4 * p.ep * (p.etp or p.tp) + 1):
        try:
            return make_layout(p, m, t, base * mult)
        except LayoutError as e:
            error = e
    raise LayoutError(f"parallel.*: no world size up to {base * mult} fits ({error})")
