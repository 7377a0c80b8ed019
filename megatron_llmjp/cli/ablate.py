"""``llmjp-ablate``: paired training runs (same seed, data order and initial weights) of a base
config's variants, e.g. BF16 against FP8 recipes, and a report of their differences.

    llmjp-ablate configs/ablations/tiny_cpu_bf16_vs_fp8.yaml            # run here, then report
    llmjp-ablate configs/ablations/llm-jp-4-8b_fp8.yaml --launcher pbs --nodes 4 \\
        --container llmjp.sif --project gXXXXXXXX --walltime 12:00:00 [--dry-run]
    llmjp-ablate configs/ablations/llm-jp-4-8b_fp8.yaml --report-only

The ablation file format is documented in ``megatron_llmjp/ablate/spec.py``. First the shared
initial checkpoint is made (``train.iters=0``), then every variant runs from it: ``--launcher
local`` runs them one after another under torchrun, ``pbs``/``slurm`` submit one job each
(held until the initial checkpoint's job succeeded) with the ``llmjp-launch`` flags given here.
The report goes to ``OUTPUT/report/``. Invoked again, finished runs are skipped, unfinished
ones rerun (or resume from their own checkpoints), submitted ones are reported as pending.

Exit codes: 0 every selected variant finished (or jobs submitted / dry run printed), 1 a run
failed (the report still covers the others), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from megatron_llmjp.cli import add_overrides
from megatron_llmjp.config.loader import ConfigError

PROG = "llmjp-ablate"
CLUSTER_FLAGS = ("container", "walltime", "project", "queue", "account", "partition")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog=PROG,
        description="Run a base config's variants as matched pairs (same seed, data order and "
        "initial weights) and report loss deltas, divergence, throughput and MFU.",
    )
    p.add_argument("ablation", help="ablation file (YAML; see configs/ablations/)")
    p.add_argument("--launcher", choices=("local", "pbs", "slurm"), default="local")
    p.add_argument("--output-dir", help="ablation directory (overrides the file's output_dir)")
    add_overrides(p, "extra override for every run, repeatable (e.g. --set train.iters=20)")
    p.add_argument("--variants", help="comma-separated subset of variants to run")
    p.add_argument("--report-only", action="store_true", help="run nothing; write the report")
    p.add_argument("--nproc", type=int, help="local: processes per run (default: the file's)")
    p.add_argument("--dry-run", action="store_true", help="print the commands or job scripts")
    p.add_argument(
        "--resubmit", action="store_true", help="pbs/slurm: submit unfinished jobs again"
    )
    g = p.add_argument_group("llmjp-launch flags (pbs/slurm)")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--container", metavar="IMAGE.sif")
    g.add_argument("--walltime", metavar="HH:MM:SS")
    g.add_argument("--project")
    g.add_argument("--queue")
    g.add_argument("--account")
    g.add_argument("--partition")
    g.add_argument("--bind", dest="binds", action="append", default=[], metavar="SRC[:DST]")
    g.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    g.add_argument("--module", dest="modules", action="append", metavar="NAME")
    return p.parse_args(argv)


def _launch_options(args: argparse.Namespace):
    from megatron_llmjp.launch.plan import LaunchRequest

    if args.launcher == "local":
        given = [f for f in CLUSTER_FLAGS if getattr(args, f) is not None]
        given += ["bind"] * bool(args.binds) + ["env"] * bool(args.env)
        given += ["module"] * bool(args.modules) + ["resubmit"] * args.resubmit
        if given or args.nodes != 1:
            flag = given[0].replace("_", "-") if given else "nodes"
            raise ConfigError(f"--{flag} applies to --launcher pbs or slurm only")
        return None
    if args.nproc is not None:
        raise ConfigError("--nproc is for --launcher local; jobs use --nodes x --gpus-per-node")
    modules = None if args.modules is None else tuple(m for m in args.modules if m != "none")
    # The flags every job shares; each run fills in its config, overrides and directories.
    return LaunchRequest(
        scheduler=args.launcher,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        container=args.container,
        walltime=args.walltime,
        project=args.project,
        queue=args.queue,
        account=args.account,
        partition=args.partition,
        binds=tuple(args.binds),
        env=tuple(args.env),
        modules=modules,
    )


def _report(spec, plans, root: Path, launcher: str) -> int:
    """Write the report; returns how many variants have not finished."""
    from megatron_llmjp.ablate.report import DivergenceRule, VariantRun, write_report
    from megatron_llmjp.ablate.runner import FINAL_STATES, say, state_of

    runs = []
    for name in spec.variants:
        plan = plans[name]
        runs.append(
            VariantRun.from_dir(
                name,
                plan.output_dir,
                state=state_of(plan),
                overrides=spec.variants[name],
                iters=plan.cfg.train.iters,
            )
        )
    rule = DivergenceRule(spec.divergence_threshold, spec.divergence_mode, spec.smoothing)
    base_cfg = plans[spec.baseline].cfg
    notes = [
        f"Base config: `{spec.config or '(defaults)'}`; common overrides: "
        + (" ".join(f"`{o}`" for o in spec.overrides) or "(none)")
        + f". {base_cfg.train.iters} iterations, model `{base_cfg.model.name}`, seed "
        f"{base_cfg.train.seed}; every variant starts from `{root / 'init' / 'checkpoints'}` "
        f"(iteration 0). Launcher: {launcher}. Written {datetime.now():%Y-%m-%d %H:%M}.",
        "",
        "tokens/s, TFLOP/s/GPU and MFU are medians over the logged steps after the first; "
        "n/a where the metrics do not record them (MFU is measured on GPU only).",
    ]
    stats = write_report(root / "report", runs, spec.baseline, rule, spec.name, notes)
    diverged = [s.name for s in stats if s.diverged and s.name != spec.baseline]
    say(
        f"report: {root / 'report' / 'report.md'}"
        + (f"; diverged: {', '.join(diverged)}" if diverged else "; no variant diverged")
    )
    return sum(r.state not in FINAL_STATES for r in runs)


def _run_local(spec, plans, names, nproc: int, dry_run: bool) -> int:
    """Returns the number of runs that failed."""
    from megatron_llmjp.ablate.runner import FINAL_STATES, run_local, say, state_of, train_argv

    init = plans["init"]
    todo = [plans[n] for n in names]
    if dry_run:
        for plan in (init, *todo):
            argv = train_argv(spec.config, plan, nproc, 29500)
            print(f"# {plan.label} ({state_of(plan)}):\n{shlex.join(argv)}\n")
        return 0
    if state_of(init) == "done":
        say(f"init: checkpoint {init.cfg.checkpoint.dir} is complete, reused")
    elif run_local(spec, init, nproc, True) != "done":
        say("the shared initial checkpoint could not be made; no variant was run")
        return 1
    failed = 0
    for i, plan in enumerate(todo, 1):
        state = state_of(plan)
        if state in FINAL_STATES:
            say(f"[{i}/{len(todo)}] {plan.label}: {state}, skipped")
            continue
        if state == "submitted":
            say(f"[{i}/{len(todo)}] {plan.label}: a submitted job is pending, skipped")
            continue
        how = "resuming from its checkpoints" if spec.variant_checkpoints else "starting over"
        again = f" ({state} before; {how})" if state != "new" else ""
        say(f"[{i}/{len(todo)}] {plan.label}: running{again}; log {plan.output_dir}/train.log")
        if run_local(spec, plan, nproc, spec.variant_checkpoints) not in FINAL_STATES:
            failed += 1
    return failed


def _submit(spec, plans, names, opts, dry_run: bool, resubmit: bool) -> int:
    """Returns the number of runs submitted or pending."""
    from megatron_llmjp.ablate.runner import FINAL_STATES, read_status, say, state_of, submit

    init = plans["init"]
    after = None
    state = state_of(init)
    if state == "submitted" and not resubmit:
        after = read_status(init.output_dir).get("job_id")
        say(f"init: job {after} pending; variants wait for it")
    elif state != "done":
        after = submit(spec, init, opts, None, dry_run)
    waiting = int(after is not None)
    for name in names:
        plan = plans[name]
        state = state_of(plan)
        if state in FINAL_STATES:
            say(f"{name}: {state}, skipped")
            continue
        waiting += 1
        if state == "submitted" and not resubmit:
            job = read_status(plan.output_dir).get("job_id")
            say(f"{name}: job {job} pending (--resubmit submits it again)")
            continue
        submit(spec, plan, opts, after, dry_run)
    return waiting


def _interrupt(signum, frame) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a scheduler, kill) stops the current run the way Ctrl-C does: it is passed on to
    # the training processes, which save and exit, and the run is marked interrupted.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    from megatron_llmjp.ablate.spec import load_spec, run_plans, select
    from megatron_llmjp.launch.plan import LaunchError

    try:
        opts = _launch_options(args)
        spec = load_spec(args.ablation)
        names = select(spec, [n for n in (args.variants or "").split(",") if n])
        root = Path(args.output_dir or spec.output_dir).expanduser().resolve()
        nproc = args.nproc if args.nproc is not None else spec.nproc
        if nproc < 1:
            raise ConfigError(f"--nproc must be >= 1, got {nproc}")
        ranks = nproc if opts is None else opts.nodes * opts.gpus_per_node
        world = None if args.report_only else ranks
        plans = run_plans(spec, root, tuple(args.overrides), world)
        launcher = args.launcher if opts is None else f"{args.launcher} ({ranks} ranks)"
        if args.report_only:
            pending = _report(spec, plans, root, launcher)
            return 0 if pending == 0 else 1
        if not args.dry_run:
            from megatron_llmjp.checkpoint.store import atomic_write_text

            root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(root / "ablation.yaml", Path(args.ablation).read_text())
        if opts is None:
            if not args.dry_run:
                from megatron_llmjp.ablate.runner import say

                say(
                    f"{len(names)} variants of {spec.name} in {root} "
                    f"(baseline {spec.baseline}, {nproc} processes each)"
                )
            failed = _run_local(spec, plans, names, nproc, args.dry_run)
            if args.dry_run:
                return 0
            from megatron_llmjp.ablate.runner import state_of

            if state_of(plans["init"]) != "done":
                return 1
            _report(spec, plans, root, f"local ({nproc} processes)")
            return 1 if failed else 0
        waiting = _submit(spec, plans, names, opts, args.dry_run, args.resubmit)
        if args.dry_run:
            return 0
        if waiting:
            from megatron_llmjp.ablate.runner import say

            say(
                f"{waiting} jobs pending; when they have finished: {PROG} {args.ablation} "
                "--report-only"
            )
            return 0
        _report(spec, plans, root, launcher)
        return 0
    except (ConfigError, LaunchError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
