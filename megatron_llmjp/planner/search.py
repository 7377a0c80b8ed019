"""Enumerate parallel layouts, keep those the trainer accepts and that fit, rank by step time.

Candidates are generated from divisors of the world size; ``make_layout`` (the trainer's own
check) is the only judge of validity, so the planner can never offer a layout the trainer
refuses. Each valid layout is estimated on its first and last pipeline ranks: the first holds
the embedding and the most in-flight microbatches, the last the output layer and the logits;
every middle rank holds no more than the first.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.schema import ParallelConfig, RunConfig
from megatron_llmjp.config.validate import validate_static
from megatron_llmjp.models.params import count_parameters
from megatron_llmjp.parallel.layout import Layout, LayoutError, make_layout
from megatron_llmjp.planner.activations import Recompute, activation_memory
from megatron_llmjp.planner.hardware import GiB
from megatron_llmjp.planner.memory import static_memory
from megatron_llmjp.planner.timing import Cluster, StepTime, step_time

MIN_TOKENS_PER_CP_RANK = 4096
"""Default search: context parallelism is for long sequences (at least this many tokens per
rank); below that its smaller GEMMs and per-step exchanges cost more than the model counts.
Force it with ``--cp``."""


@dataclass(frozen=True)
class SearchSpace:
    """Values to try per dimension; None: all sensible ones (see ``candidates``)."""

    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    vpp: tuple[int | None, ...] | None = None
    cp: tuple[int, ...] | None = None
    ep: tuple[int, ...] | None = None
    etp: tuple[int, ...] | None = None
    micro_batch_sizes: tuple[int, ...] | None = None
    """None: the config's ``train.micro_batch_size`` only."""
    recompute: tuple[Recompute, ...] | None = None
    """None: the config's ``recompute`` section only."""


@dataclass(frozen=True)
class PlanOptions:
    world: int
    cluster: Cluster
    margin: float = 0.05
    """Fraction of GPU memory kept free (allocator fragmentation, spikes)."""
    overhead_bytes: int = 3 * GiB
    """CUDA context, NCCL and Transformer Engine workspaces, per GPU."""
    moe_imbalance: float = 1.0
    space: SearchSpace = field(default_factory=SearchSpace)

    @property
    def usable_bytes(self) -> int:
        return int(self.cluster.gpu.memory_bytes * (1 - self.margin))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes on the binding pipeline rank."""

    pp_rank: int
    weights: int
    grads: int
    optimizer: int
    activations: int
    """Saved activations at the schedule's peak."""
    transient: int
    """Working set on top of the saved activations (or the optimizer step's, if larger)."""
    overhead: int
    exact: bool

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.grads
            + self.optimizer
            + self.activations
            + self.transient
            + self.overhead
        )

    def terms(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.grads,
            "optimizer": self.optimizer,
            "activations": self.activations,
            "transient": self.transient,
            "overhead": self.overhead,
        }


@dataclass(frozen=True)
class Plan:
    layout: Layout
    micro_batch_size: int
    num_microbatches: int
    recompute: Recompute
    memory: MemoryEstimate
    time: StepTime
    fits: bool
    is_config_layout: bool = False

    def describe(self) -> str:
        lay = self.layout
        vpp = f" vpp={lay.vpp}" if lay.vpp else ""
        return (
            f"tp={lay.tp} pp={lay.pp}{vpp} cp={lay.cp} ep={lay.ep} etp={lay.etp} dp={lay.dp} "
            f"mbs={self.micro_batch_size} recompute={self.recompute.label()}"
        )

    def overrides(self) -> list[str]:
        """``--set`` overrides that give a run config this plan's layout, micro batch and
        recompute (for ``llmjp-train``/``llmjp-launch``)."""
        lay = self.layout
        vpp = lay.vpp if lay.vpp else "null"
        return [
            f"parallel.tp={lay.tp}",
            f"parallel.pp={lay.pp}",
            f"parallel.vpp={vpp}",
            f"parallel.cp={lay.cp}",
            f"parallel.ep={lay.ep}",
            f"parallel.etp={lay.etp}",
            f"train.micro_batch_size={self.micro_batch_size}",
            *self.recompute.overrides(),
        ]

    def as_dict(self) -> dict:
        lay = self.layout
        return {
            "tp": lay.tp,
            "pp": lay.pp,
            "vpp": lay.vpp,
            "cp": lay.cp,
            "ep": lay.ep,
            "etp": lay.etp,
            "dp": lay.dp,
            "expert_dp": lay.expert_dp,
            "sequence_parallel": lay.sequence_parallel,
            "micro_batch_size": self.micro_batch_size,
            "num_microbatches": self.num_microbatches,
            "recompute": self.recompute.label(),
            "recompute_config": {
                "granularity": self.recompute.granularity,
                "modules": list(self.recompute.modules) or None,
                "method": self.recompute.method,
                "num_layers": self.recompute.num_layers,
            },
            "overrides": self.overrides(),
            "fits": self.fits,
            "is_config_layout": self.is_config_layout,
            "memory_gib": {k: v / GiB for k, v in self.memory.terms().items()}
            | {"total": self.memory.total / GiB},
            "memory_binding_pp_rank": self.memory.pp_rank,
            "step_time_s": self.time.step,
            "time_s": {
                "compute": self.time.compute,
                "tp_comm": self.time.tp_comm,
                "ep_comm": self.time.ep_comm,
                "pp_comm": self.time.pp_comm,
                "bubble": self.time.bubble,
                "dp_exposed": self.time.dp_exposed,
                "optimizer": self.time.optimizer,
            },
            "mfu": self.time.mfu,
            "tokens_per_s_per_gpu": self.time.tokens_per_s_per_gpu,
        }


@dataclass
class PlanResult:
    plans: list[Plan]
    """Every valid layout and recompute setting: those that fit by step time, then the rest by
    memory."""
    candidates: int
    rejected: Counter
    """Normalised ``LayoutError`` (or recompute ``ConfigError``) message -> how many
    candidates it rejected."""
    examples: dict[str, str]
    """Normalised message -> one real message."""
    config_plan: Plan | None = None
    config_error: str | None = None

    @property
    def fitting(self) -> list[Plan]:
        return [p for p in self.plans if p.fits]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg: RunConfig, opts: PlanOptions) -> Iterator[ParallelConfig]:
    """Parallel sections to try: tp up to a node, pp and ep among the divisors of the world,
    vpp among the divisors of the layers per stage, etp 1 or tp (ep > 1), and cp only while
    each rank keeps at least ``MIN_TOKENS_PER_CP_RANK`` tokens (the model does not charge the
    efficiency context parallelism loses on short sequences)."""
    m, w, s = cfg.model, opts.world, opts.space
    divs = _divisors(w)
    tps = s.tp or [d for d in divs if d <= opts.cluster.gpus_per_node]
    pps = s.pp or divs
    seq = cfg.train.seq_length
    cps = s.cp or [d for d in divs if d == 1 or seq // d >= MIN_TOKENS_PER_CP_RANK]
    eps = s.ep or ([d for d in divs if d <= m.num_experts] if m.is_moe else [1])
    for tp in tps:
        for pp in pps:
            if s.vpp is not None:
                vpps = list(s.vpp)
            else:
                per_stage = m.num_layers // pp if m.num_layers % pp == 0 else 0
                vpps = [None] + [v for v in _divisors(per_stage) if v > 1 and pp > 1]
            for vpp in vpps:
                for cp in cps:
                    for ep in eps:
                        etps = s.etp or ((None,) if ep == 1 else tuple(sorted({1, tp})))
                        for etp in etps:
                            yield replace(
                                cfg.parallel, tp=tp, pp=pp, vpp=vpp, cp=cp, ep=ep, etp=etp
                            )


def estimate_memory(
    cfg: RunConfig, layout: Layout, micro_batch: int, recompute: Recompute, opts: PlanOptions
) -> MemoryEstimate:
    """Peak per-GPU bytes of ``layout``: the larger of the first and last pipeline ranks."""
    m, t = cfg.model, cfg.train
    n_micro = t.global_batch_size // (micro_batch * layout.dp)
    act_bytes = 2 if cfg.precision.dtype == "bf16" else 4
    best: MemoryEstimate | None = None
    for pp_rank in sorted({0, layout.pp - 1}):
        st = static_memory(
            m,
            layout,
            cfg.precision,
            cfg.optim,
            cfg.parallel.overlap_grad_reduce,
            pp_rank,
        )
        act = activation_memory(
            m,
            layout,
            micro_batch,
            t.seq_length,
            n_micro,
            act_bytes,
            recompute,
            pp_rank,
            opts.moe_imbalance,
        )
        # The optimizer step runs after the activations are freed.
        transient = max(act.transient, st.optimizer_step_transient - act.saved, 0)
        est = MemoryEstimate(
            pp_rank=pp_rank,
            weights=st.weights,
            grads=st.grads,
            optimizer=st.optimizer,
            activations=act.saved,
            transient=transient,
            overhead=opts.overhead_bytes,
            exact=st.exact,
        )
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def evaluate(
    cfg: RunConfig, layout: Layout, micro_batch: int, recompute: Recompute, opts: PlanOptions
) -> Plan:
    mem = estimate_memory(cfg, layout, micro_batch, recompute, opts)
    p, t = cfg.parallel, cfg.train
    time = step_time(
        cfg.model,
        layout,
        micro_batch,
        t.global_batch_size,
        t.seq_length,
        cfg.precision,
        cfg.optim.use_distributed_optimizer,
        p.overlap_grad_reduce,
        p.overlap_param_gather,
        recompute,
        opts.cluster,
    )
    return Plan(
        layout=layout,
        micro_batch_size=micro_batch,
        num_microbatches=t.global_batch_size // (micro_batch * layout.dp),
        recompute=recompute,
        memory=mem,
        time=time,
        fits=mem.total <= opts.usable_bytes,
    )


def _normalise(msg: str) -> str:
    return re.sub(r"\d+", "N", msg)


def _layout_key(lay: Layout) -> tuple:
    return (lay.tp, lay.pp, lay.vpp, lay.cp, lay.ep, lay.etp)


def search(cfg: RunConfig, opts: PlanOptions, config_layout: bool = True) -> PlanResult:
    """Every layout the trainer accepts for ``cfg`` at ``opts.world`` ranks, estimated.

    With ``config_layout`` the layout of ``cfg.parallel`` is marked (and estimated even when
    the search space excludes it); without, ``cfg.parallel`` only supplies the other settings."""
    mbs_list = opts.space.micro_batch_sizes or (cfg.train.micro_batch_size,)
    config_rc = Recompute.from_config(cfg.recompute)
    settings = opts.space.recompute or (config_rc,)
    rejected: Counter = Counter()
    examples: dict[str, str] = {}
    seen: set = set()
    plans: list[Plan] = []
    n = 0
    config_key = None
    config_error = None
    if config_layout:
        try:
            config_key = _layout_key(make_layout(cfg.parallel, cfg.model, cfg.train, opts.world))
        except LayoutError as e:
            config_error = str(e)
    for par in candidates(cfg, opts):
        for mbs in mbs_list:
            n += 1
            train = replace(cfg.train, micro_batch_size=mbs)
            try:
                lay = make_layout(par, cfg.model, train, opts.world)
            except LayoutError as e:
                key = _normalise(str(e))
                rejected[key] += 1
                examples.setdefault(key, str(e))
                continue
            if (lay, mbs) in seen:
                continue
            seen.add((lay, mbs))
            for rc in settings:
                try:  # the trainer's own check of the recompute section, for this layout
                    validate_static(
                        replace(cfg, parallel=par, recompute=rc.to_config()), uses=["recompute"]
                    )
                except ConfigError as e:
                    key = _normalise(str(e))
                    rejected[key] += 1
                    examples.setdefault(key, str(e))
                    continue
                plan = evaluate(replace(cfg, train=train), lay, mbs, rc, opts)
                is_config = (
                    _layout_key(lay) == config_key
                    and mbs == cfg.train.micro_batch_size
                    and rc == config_rc
                )
                plans.append(replace(plan, is_config_layout=is_config))
    plans.sort(key=lambda p: (not p.fits, p.time.step if p.fits else p.memory.total))
    config_plan = None
    if config_key is not None:
        mine = [p for p in plans if p.is_config_layout]
        if mine:
            config_plan = mine[0]
        else:  # outside the search space given on the command line: estimate it anyway
            lay = make_layout(cfg.parallel, cfg.model, cfg.train, opts.world)
            config_plan = replace(
                evaluate(cfg, lay, cfg.train.micro_batch_size, config_rc, opts),
                is_config_layout=True,
            )
    return PlanResult(plans, n, rejected, examples, config_plan, config_error)


def _advice(term: str, cfg: RunConfig, plan: Plan) -> str:
    """What would shrink the largest term of ``plan``, given the config's settings."""
    lay = plan.layout
    if term == "weights":
        return "larger tp/pp/ep (more GPUs per model replica) or a GPU with more memory"
    if term == "gradients":
        tip = "larger tp/pp/ep (more GPUs per model replica)"
        if cfg.precision.grad_reduce_in_fp32 and cfg.precision.dtype == "bf16":
            tip += ", or precision.grad_reduce_in_fp32=false (halves the gradient buffers)"
        return tip
    if term == "optimizer":
        if not cfg.optim.use_distributed_optimizer:
            return "optim.use_distributed_optimizer=true (shards it over the data-parallel ranks)"
        experts = f" (expert weights by {lay.expert_dp})" if cfg.model.is_moe else ""
        return (
            f"more data-parallel ranks: the distributed optimizer divides it by dp*cp="
            f"{lay.dp * lay.cp}{experts} here"
        )
    if term in ("activations", "transient"):
        tips = ["a smaller micro batch (--mbs)", "more tp/cp/pp"]
        if plan.recompute.granularity != "full":
            tips.insert(1, "--recompute selective or full (recompute.granularity)")
        return ", ".join(tips)
    return "a smaller --overhead-gib if the software stack needs less"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def explain(cfg: RunConfig, opts: PlanOptions, result: PlanResult) -> str:
    """Why nothing fits: the binding constraint, as one line."""
    gpu = opts.cluster.gpu
    where = f"{cfg.model.name} on {world_label(opts)}"
    if not result.plans:
        top = result.rejected.most_common(3)
        reasons = "; ".join(f"{result.examples[k]} ({plural(c, 'candidate')})" for k, c in top)
        return (
            f"no valid layout for {where}: the trainer's layout rules reject all "
            f"{result.candidates} candidates; most common reasons: {reasons}"
        )
    best = min(result.plans, key=lambda p: p.memory.total)
    mem = best.memory
    terms = mem.terms()
    largest = max(terms, key=terms.get)
    parts = ", ".join(f"{k} {v / GiB:.1f} GiB" for k, v in terms.items() if v)
    return (
        f"no layout fits {where}: usable memory is {opts.usable_bytes / GiB:.1f} GiB per GPU "
        f"({gpu.memory_bytes / GiB:.1f} GiB less a {opts.margin:.0%} margin); the smallest "
        f"per-GPU memory is {mem.total / GiB:.1f} GiB with {best.describe()} (pipeline rank "
        f"{mem.pp_rank}): {parts}. The largest term is {largest}: try more nodes, "
        f"{_advice(largest, cfg, best)}"
    )


def world_label(opts: PlanOptions) -> str:
    gpn, gpu = opts.cluster.gpus_per_node, opts.cluster.gpu.name
    if opts.world % gpn == 0 and opts.world >= gpn:
        return f"{plural(opts.world // gpn, 'node')} x {gpn} {gpu} (world {opts.world})"
    return f"{opts.world} {gpu} (world {opts.world})"


def model_summary(cfg: RunConfig) -> str:
    c = count_parameters(cfg.model)
    return f"{cfg.model.name}: {c.total / 1e9:.2f}B parameters, {c.active / 1e9:.2f}B active"
