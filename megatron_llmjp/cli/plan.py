"""``llmjp-plan``: which parallel layouts fit in GPU memory, and which should be fastest.

Examples::

    llmjp-plan --config configs/abci3/llm-jp-4-8b_32node_bf16.yaml --nodes 32
    llmjp-plan llm-jp-4-332b-a31b --nodes 64 --gpu h200 --gbs 2048 --recompute none,selective \
        --recompute-modules moe_act,layernorm
    llmjp-plan llm-jp-4-32b-a3b --nodes 32 --mbs 1,2,4 --json --top 3
    llmjp-plan --list-gpus

The config is built and validated exactly as ``llmjp-train`` builds it (its data section is
ignored), and every layout shown was accepted by the trainer's own layout check. Activation
recompute is the config's ``recompute`` section unless ``--recompute`` explores others, each
checked by the config's own rules for each layout; every plan comes with the ``--set``
overrides that give a config its layout and recompute. Nothing is allocated: this runs in
about a second on a laptop, without torch.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from typing import TextIO

from megatron_llmjp.cli import add_overrides
from megatron_llmjp.config.loader import ConfigError, build_config
from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.config.validate import SECTIONS
from megatron_llmjp.models.params import count_parameters
from megatron_llmjp.planner.activations import SELECTIVE_MODULES, Recompute
from megatron_llmjp.planner.hardware import COMM_EFFICIENCY, GPUS, GiB, UnknownGPUError, get_gpu
from megatron_llmjp.planner.search import (
    Plan,
    PlanOptions,
    PlanResult,
    SearchSpace,
    explain,
    plural,
    search,
    world_label,
)
from megatron_llmjp.planner.timing import Cluster

PROG = "llmjp-plan"

# What a bare MODEL is planned with: LLM-jp-4's production settings (llm-jp/scripts v4).
MODEL_DEFAULTS = [
    "precision.dtype=bf16",
    "train.seq_length=4096",
    "train.micro_batch_size=1",
    "train.global_batch_size=1024",
    "optim.use_distributed_optimizer=true",
    "parallel.overlap_grad_reduce=true",
    "parallel.overlap_param_gather=true",
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Enumerate the parallel layouts the trainer accepts, estimate per-GPU "
        "memory and step time, drop those that do not fit, rank the rest.",
    )
    p.add_argument("model", nargs="?", help="registry model name (or use --config)")
    p.add_argument("--config", help="a training config (YAML), as given to llmjp-train")
    add_overrides(p, "dotted config override, repeatable (as llmjp-train)")
    p.add_argument("--nodes", type=int, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--world", type=int, help="total GPUs instead of --nodes")
    p.add_argument("--gpu", default="h200", help=f"GPU type: {', '.join(sorted(GPUS))}")
    p.add_argument("--list-gpus", action="store_true", help="print the GPU table and exit")
    g = p.add_argument_group("training settings (override the config)")
    g.add_argument("--seq-length", type=int)
    g.add_argument("--gbs", type=int, help="global batch size")
    g.add_argument("--mbs", help="micro batch sizes to try, e.g. 1,2 (default: the config's)")
    g.add_argument("--dtype", choices=["bf16", "fp32"])
    g.add_argument(
        "--recompute",
        help="recompute.granularity values to try: none, selective, full, or a list "
        "(none,full); default: the config's recompute section (none for a bare MODEL). full "
        "is the config's full setting, else method uniform with 1 layer per checkpoint; "
        "full:uniform:N and full:block:N set recompute.method and recompute.num_layers",
    )
    g.add_argument(
        "--recompute-modules",
        help=f"recompute.modules for selective, from {','.join(SELECTIVE_MODULES)} "
        "(LLM-jp 332B: moe_act,layernorm); default: the config's, else core_attn",
    )
    s = p.add_argument_group("search space (default: all sensible values)")
    for dim in ("tp", "pp", "vpp", "cp", "ep", "etp"):
        s.add_argument(f"--{dim}", help=f"{dim} values to try, e.g. 1,2,4")
    e = p.add_argument_group("estimates")
    e.add_argument("--margin", type=float, default=0.05, help="GPU memory kept free (0.05)")
    e.add_argument("--overhead-gib", type=float, default=3.0, help="CUDA/NCCL/TE per GPU (3)")
    e.add_argument("--mfu", type=float, default=0.45, help="compute efficiency (0.45)")
    e.add_argument("--ib-gbps", type=float, help="inter-node GB/s per GPU and direction")
    e.add_argument(
        "--moe-imbalance", type=float, default=1.0, help="MoE tokens per rank over the mean (1)"
    )
    o = p.add_argument_group("output")
    o.add_argument("--top", type=int, default=10, help="rows to show (10)")
    o.add_argument("--all", action="store_true", help="also list layouts that do not fit")
    o.add_argument("--json", action="store_true", help="one JSON object for scripts")
    return p


def _ints(text: str | None, name: str, allow_none: bool = False) -> tuple | None:
    if text is None:
        return None
    out: list = []
    for part in text.split(","):
        part = part.strip().lower()
        if allow_none and part in ("none", "1", "0"):
            out.append(None)
            continue
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(f"--{name} {text!r}: expected integers separated by commas") from None
        if value < 1:
            raise ConfigError(f"--{name} {text!r}: values must be >= 1")
        out.append(value)
    return tuple(dict.fromkeys(out))


def _recompute(
    modes: str | None, modules: str | None, cfg: RunConfig
) -> tuple[Recompute, ...] | None:
    """The recompute settings to search (None: the config's only), as ``recompute`` sections
    of the run config; each is checked with the config's own rules, per layout, by the
    search."""
    if modes is None and modules is None:
        return None
    mods: tuple[str, ...] = tuple(cfg.recompute.modules or ())
    if modules is not None:
        mods = tuple(x.strip() for x in modules.split(",") if x.strip())
        unknown = [x for x in mods if x not in SELECTIVE_MODULES]
        if unknown:
            raise ConfigError(
                f"--recompute-modules: unknown {unknown[0]!r}; known: "
                f"{', '.join(SELECTIVE_MODULES)}"
            )
    out = []
    for mode in (x.strip() for x in (modes or "selective").split(",")):
        full = re.fullmatch(r"full:(uniform|block):([1-9][0-9]*)", mode)
        if full:  # recompute.method and recompute.num_layers
            out.append(Recompute("full", (), full[1], int(full[2])))
        elif mode not in ("none", "selective", "full"):
            raise ConfigError(
                f"--recompute {mode!r}: expected none, selective, full or "
                "full:uniform:N / full:block:N"
            )
        elif mode == "full" and cfg.recompute.granularity == "full":
            out.append(Recompute.from_config(cfg.recompute))
        else:
            out.append(Recompute(mode, mods))
    return tuple(dict.fromkeys(out))


PLAN_USES = tuple(s for s in SECTIONS if s != "data")
"""The config sections planning checks: all but the training data, which it never reads."""


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """The config as the trainer would build it, plus the planner's command-line settings."""
    if args.model and args.config:
        raise ConfigError("give a MODEL or --config, not both")
    if not args.model and not args.config:
        raise ConfigError("give a MODEL name or --config FILE")
    overrides = [] if args.config else [f"model.name={args.model}", *MODEL_DEFAULTS]
    overrides += args.overrides
    for flag, key in (("seq_length", "train.seq_length"), ("gbs", "train.global_batch_size")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.dtype:
        overrides.append(f"precision.dtype={args.dtype}")
    mbs = _ints(args.mbs, "mbs")
    if mbs:
        overrides.append(f"train.micro_batch_size={mbs[0]}")
    return build_config(args.config, overrides, uses=PLAN_USES)


def options(args: argparse.Namespace, cfg: RunConfig) -> PlanOptions:
    gpu = get_gpu(args.gpu)
    if args.gpus_per_node < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1, got {args.gpus_per_node}")
    if args.world is not None and args.nodes is not None:
        raise ConfigError("give --nodes or --world, not both")
    if args.world is None and args.nodes is None:
        raise ConfigError(
            "give --nodes N (or --world GPUS): a config does not fix the world size, the "
            "launcher does"
        )
    world = args.world if args.world is not None else args.nodes * args.gpus_per_node
    if world < 1:
        raise ConfigError(f"the world size must be >= 1, got {world}")
    if not 0 <= args.margin < 1:
        raise ConfigError(f"--margin must be in [0, 1), got {args.margin}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    space = SearchSpace(
        tp=_ints(args.tp, "tp"),
        pp=_ints(args.pp, "pp"),
        vpp=_ints(args.vpp, "vpp", allow_none=True),
        cp=_ints(args.cp, "cp"),
        ep=_ints(args.ep, "ep"),
        etp=_ints(args.etp, "etp"),
        micro_batch_sizes=_ints(args.mbs, "mbs"),
        recompute=_recompute(args.recompute, args.recompute_modules, cfg),
    )
    cluster = Cluster(gpu=gpu, gpus_per_node=args.gpus_per_node, ib_gbps=args.ib_gbps, mfu=args.mfu)
    return PlanOptions(
        world=world,
        cluster=cluster,
        margin=args.margin,
        overhead_bytes=int(args.overhead_gib * GiB),
        moe_imbalance=args.moe_imbalance,
        space=space,
    )


def _header(cfg: RunConfig, opts: PlanOptions, result: PlanResult) -> list[str]:
    c = count_parameters(cfg.model)
    t, pr, cl = cfg.train, cfg.precision, opts.cluster
    grads = "fp32" if pr.grad_reduce_in_fp32 else pr.dtype
    optim = "distributed optimizer" if cfg.optim.use_distributed_optimizer else "optimizer"
    ib = cl.ib / 1e9
    valid = len({(p.layout, p.micro_batch_size) for p in result.plans})
    n_rc = len(opts.space.recompute or (None,))
    plans = f" x {n_rc} recompute settings = {len(result.plans)} plans" if n_rc > 1 else ""
    fitting = len(result.fitting)
    return [
        f"{cfg.model.name}: {c.total / 1e9:.2f}B parameters ({c.active / 1e9:.2f}B active) on "
        f"{world_label(opts)}",
        f"memory: {cl.gpu.memory_bytes / GiB:.1f} GiB per GPU, usable "
        f"{opts.usable_bytes / GiB:.1f} GiB ({opts.margin:.0%} margin), of which "
        f"{opts.overhead_bytes / GiB:.1f} GiB CUDA/NCCL overhead",
        f"training: {pr.dtype}, seq {t.seq_length}, global batch {t.global_batch_size}, "
        f"{grads} gradient buffers, {optim}",
        f"step time: compute at {cl.mfu:.0%} of {cl.gpu.bf16_tflops:.0f} TFLOP/s; NVLink "
        f"{cl.gpu.nvlink_gbps:.0f} GB/s, InfiniBand {ib:.0f} GB/s per GPU, x{COMM_EFFICIENCY}",
        f"{plural(result.candidates, 'candidate')}, {plural(valid, 'valid layout')}{plans}, "
        f"{fitting} fit",
    ]


_COLUMNS = (
    "  # tp pp vpp cp ep etp   dp mbs recompute        GiB  wgt  grd  opt  act  tmp  "
    "step s  tok/s/GPU  MFU  bubble"
)


def _row(i: int | str, p: Plan) -> str:
    lay, mem, t = p.layout, p.memory, p.time
    mark = "*" if p.is_config_layout else " "
    fit = "" if p.fits else "  (does not fit)"
    g = {k: v / GiB for k, v in mem.terms().items()}
    bubble = t.bubble / t.step
    return (
        f"{i!s:>3}{mark}{lay.tp:>2} {lay.pp:>2} {lay.vpp or '-':>3} {lay.cp:>2} {lay.ep:>2} "
        f"{lay.etp:>3} {lay.dp:>4} {p.micro_batch_size:>3} {p.recompute.label():<14}"
        f"{mem.total / GiB:>6.1f} {g['weights']:>4.0f} {g['gradients']:>4.0f} "
        f"{g['optimizer']:>4.0f} {g['activations']:>4.0f} {g['transient']:>4.0f} "
        f"{t.step:>7.2f} {t.tokens_per_s_per_gpu:>10.0f} {t.mfu:>4.0%} {bubble:>7.1%}{fit}"
    )


def print_table(
    cfg: RunConfig, opts: PlanOptions, result: PlanResult, top: int, show_all: bool, out: TextIO
) -> None:
    for line in _header(cfg, opts, result):
        print(line, file=out)
    rows = result.plans if show_all else result.fitting
    star = "; * = the config's layout" if result.config_plan or result.config_error else ""
    print(
        f"top {min(top, len(rows))} by estimated step time (GiB per GPU on the binding "
        f"pipeline rank{star}):",
        file=out,
    )
    print(_COLUMNS, file=out)
    for i, p in enumerate(rows[:top], 1):
        print(_row(i, p), file=out)
    cp = result.config_plan
    if result.config_error:
        print(
            f"the config's layout is not valid at this world size: {result.config_error}", file=out
        )
    elif cp is not None:
        if cp.fits:
            # its place among the fitting plans (it is one of them unless the search space
            # given on the command line excludes its layout or recompute setting)
            rank = 1 + sum(p.time.step < cp.time.step for p in result.fitting if p != cp)
            best = min([cp, *result.fitting], key=lambda p: p.time.step).time.step
            print(
                f"the config's layout ({cp.describe()}) fits and ranks {rank} of "
                f"{len(result.fitting)}: {cp.time.step:.2f} s/step, "
                f"{cp.time.step / best - 1:+.0%} vs the best",
                file=out,
            )
        else:
            print(
                f"the config's layout ({cp.describe()}) does NOT fit: "
                f"{cp.memory.total / GiB:.1f} GiB > {opts.usable_bytes / GiB:.1f} GiB",
                file=out,
            )
        if cp.fits and rows and cp not in rows[:top]:
            print(_row("cfg", cp), file=out)
    if result.fitting:
        print(
            "apply the best with: "
            + " ".join(f"--set {shlex.quote(o)}" for o in result.fitting[0].overrides()),
            file=out,
        )


def as_json(
    cfg: RunConfig,
    opts: PlanOptions,
    result: PlanResult,
    top: int,
    show_all: bool,
    error: str | None,
) -> dict:
    c = count_parameters(cfg.model)
    rows = result.plans if show_all else result.fitting
    out = {
        "model": cfg.model.name,
        "parameters": {"total": c.total, "active": c.active},
        "world": opts.world,
        "gpus_per_node": opts.cluster.gpus_per_node,
        "gpu": opts.cluster.gpu.name,
        "gpu_memory_gib": opts.cluster.gpu.memory_bytes / GiB,
        "usable_gib": opts.usable_bytes / GiB,
        "margin": opts.margin,
        "overhead_gib": opts.overhead_bytes / GiB,
        "mfu_assumed": opts.cluster.mfu,
        "seq_length": cfg.train.seq_length,
        "global_batch_size": cfg.train.global_batch_size,
        "dtype": cfg.precision.dtype,
        "candidates": result.candidates,
        "valid_plans": len(result.plans),
        "fitting_plans": len(result.fitting),
        "plans": [p.as_dict() for p in rows[:top]],
        "config_layout": result.config_plan.as_dict() if result.config_plan else None,
        "config_error": result.config_error,
    }
    if error:
        out["error"] = error
        if result.plans:
            out["closest"] = min(result.plans, key=lambda p: p.memory.total).as_dict()
    return out


def print_gpus(out: TextIO) -> None:
    for g in GPUS.values():
        print(
            f"{g.name:<10} {g.memory_bytes / GiB:6.1f} GiB  {g.bf16_tflops:6.1f} TFLOP/s bf16  "
            f"NVLink {g.nvlink_gbps:.0f} GB/s  IB {g.ib_gbps:.0f} GB/s/GPU  [{g.node}]",
            file=out,
        )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.list_gpus:
        print_gpus(sys.stdout)
        return 0
    if args.top < 1:
        print(f"{PROG}: error: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    try:
        cfg = build_run_config(args)
        opts = options(args, cfg)
    except (ConfigError, UnknownGPUError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    result = search(cfg, opts, config_layout=args.config is not None)
    error = None if result.fitting else explain(cfg, opts, result)
    if args.json:
        print(json.dumps(as_json(cfg, opts, result, args.top, args.all, error), indent=1))
    elif not error or args.all:
        print_table(cfg, opts, result, args.top, args.all, sys.stdout)
    if error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
