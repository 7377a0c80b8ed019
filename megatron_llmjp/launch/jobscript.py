"""Job scripts from the templates under ``launch/``, and what they resolve to on an allocation.

Templates use ``{{name}}`` placeholders (bash keeps ``$``/``${}`` to itself). Every value that
ends up in a command is shell-quoted here; ``plan`` has already refused paths that could not
stand unquoted in ``#PBS``/``#SBATCH`` lines.

The generated script derives MASTER_ADDR, MASTER_PORT and the hostfile itself, at job start,
from the scheduler's node list. ``resolve`` runs that same script with ``LLMJP_DRY_RUN=1``
against a node file, so a dry run shows what the job will execute, not a re-implementation.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import tempfile
from datetime import datetime
from pathlib import Path

from megatron_llmjp.launch.plan import (
    PACKAGE_ROOT,
    LaunchError,
    Plan,
    find_tool,
    format_walltime,
)

TEMPLATES_ENV = "LLMJP_LAUNCH_TEMPLATES"
TEMPLATE_FILES = {
    "pbs": "pbs/train.sh.in",
    "slurm": "slurm/train.sh.in",
    "local": "local/mpirun.sh.in",
}
SUBMIT_TOOL = {"pbs": "qsub", "slurm": "sbatch"}
DRY_RUN_JOB_ID = {"pbs": "1234567.pbs1", "slurm": "1234567", "local": "local"}
"""The job id a dry run resolves with (the real one is known only after submission)."""

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


def template_root() -> Path:
    root = Path(os.environ.get(TEMPLATES_ENV) or PACKAGE_ROOT / "launch")
    if not (root / "job_helpers.sh").is_file():
        raise LaunchError(
            f"job templates not found in {root}: run llmjp-launch from a checkout of the "
            f"repository, or point {TEMPLATES_ENV} at its launch/ directory"
        )
    return root


def render(text: str, values: dict[str, str]) -> str:
    """Fill ``{{name}}`` placeholders; a placeholder without a value is an error."""
    missing = sorted({m[1] for m in _PLACEHOLDER.finditer(text)} - set(values))
    if missing:
        raise LaunchError(f"job template needs values for: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: values[m[1]], text)


def master_port(job_id: str) -> int:
    """The port ``derive_port`` in the job script picks: 20000-29999 from the job id's digits."""
    digits = re.sub(r"\D", "", job_id.split(".", 1)[0])
    return 20000 + int(digits or 0) % 10000


def parse_nodefile(text: str) -> list[str]:
    """Unique host names in order of first appearance (PBS lists a host once per MPI slot)."""
    hosts: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and fields[0] not in hosts:
            hosts.append(fields[0])
    return hosts


def script_path(plan: Plan, now: datetime | None = None) -> Path:
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return plan.launch_dir / f"{plan.job_name}-{stamp}.{plan.scheduler}.sh"


def _q(items) -> str:
    return " ".join(shlex.quote(str(i)) for i in items)


def _continued(argv: tuple[str, ...] | list[str], per_line: int = 6) -> str:
    """A long argument list as backslash-continued lines (``--set`` pairs kept together)."""
    parts: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in ("--set", "--config", "--output-dir", "-m") and i + 1 < len(argv):
            parts.append(_q(argv[i : i + 2]))
            i += 2
        else:
            parts.append(shlex.quote(argv[i]))
            i += 1
    lines = [" ".join(parts[j : j + per_line]) for j in range(0, len(parts), per_line)]
    return " \\\n    ".join(lines)


def _free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_mpirun_flags(plan: Plan) -> list[str]:
    flags = ["--bind-to", "none"]
    if plan.world > (os.cpu_count() or 1):
        flags.append("--oversubscribe")  # OpenMPI refuses more ranks than cores otherwise
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def job_script(plan: Plan, path: Path) -> str:
    """The job script for ``plan``, to be written to ``path``."""
    root = template_root()
    req = plan.request
    env = dict(plan.env)
    values = {
        "helpers": (root / "job_helpers.sh").read_text(),
        "job_name": plan.job_name,
        "nodes": str(req.nodes),
        "gpus_per_node": str(req.gpus_per_node),
        "world": str(plan.world),
        "layout": plan.layout,
        "launch_dir": str(plan.launch_dir),
        "script_path": str(path),
        "log_path": str(path.with_suffix(".log")),
        "workdir": shlex.quote(str(plan.workdir)),
        "mkdirs": _q(plan.mkdirs),
        "module_lines": "\n".join(f"step load_modules {_q([m])}" for m in plan.modules),
        "binds": shlex.quote(",".join(plan.binds)),
        "optional_binds": _q(plan.optional_binds),
        "container": shlex.quote(str(plan.container)) if plan.container else "",
        "train_cmd": _continued(plan.train_argv),
    }
    if plan.scheduler == "local":
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_local_port()), **env}
        container_cmd = ""
        if plan.container is not None:
            container_cmd = (
                f"singularity exec --nv --bind {values['binds']} {values['container']} \\\n  "
            )
        values.update(
            mpirun=shlex.quote(find_tool("mpirun") or "mpirun"),
            mpirun_flags=_q(_local_mpirun_flags(plan)),
            container_cmd=container_cmd,
        )
    else:
        values["walltime"] = format_walltime(plan.walltime_s or 0, plan.scheduler)
    if plan.scheduler == "pbs":
        values.update(
            project=req.project or "",
            queue=req.queue or plan.site.queue or "",
            rtype=plan.site.rtype or "",
            mpi_env=" ".join(
                f"-x {k}" for k in ["MASTER_ADDR", "MASTER_PORT", "PATH", *sorted(env)]
            ),
        )
    if plan.scheduler == "slurm":
        extra = []
        if req.account:
            extra.append(f"#SBATCH --account={req.account}")
        if req.partition:
            extra.append(f"#SBATCH --partition={req.partition}")
        values["extra_directives"] = "\n".join(extra)
    values["env_lines"] = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    text = (root / TEMPLATE_FILES[plan.scheduler]).read_text()
    return render(text, values)


def submit_command(plan: Plan, path: Path) -> list[str]:
    if plan.scheduler == "local":
        return ["bash", str(path)]
    return [SUBMIT_TOOL[plan.scheduler], str(path)]


def sample_hosts(n: int) -> list[str]:
    return [f"node{i:03d}" for i in range(1, n + 1)]


def resolve(plan: Plan, script: str, hosts: list[str] | None = None) -> str:
    """Run ``script`` as the job would start on ``hosts``, printing instead of executing.

    Sets the variables the scheduler would (PBS_NODEFILE and PBS_JOBID; SLURM_JOB_ID and
    SLURM_JOB_NODELIST, with ``scontrol show hostnames`` answered from ``hosts``, since
    scontrol is absent off a SLURM cluster). Returns the script's output.
    """
    hosts = hosts if hosts is not None else sample_hosts(plan.request.nodes)
    job_id = DRY_RUN_JOB_ID[plan.scheduler]
    with tempfile.TemporaryDirectory(prefix="llmjp-dry-run-") as tmp:
        tmpdir = Path(tmp)
        (tmpdir / "job.sh").write_text(script)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PBS_", "SLURM_"))}
        env.pop("MASTER_ADDR", None)
        env.pop("MASTER_PORT", None)
        env["LLMJP_DRY_RUN"] = "1"
        if plan.scheduler == "pbs":
            (tmpdir / "nodefile").write_text("".join(f"{h}\n" for h in hosts))
            env.update(PBS_NODEFILE=str(tmpdir / "nodefile"), PBS_JOBID=job_id)
        elif plan.scheduler == "slurm":
            shim = tmpdir / "bin"
            shim.mkdir()
            (shim / "scontrol").write_text(
                '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "%s\\n" '
                + " ".join(shlex.quote(h) for h in hosts)
                + "\n"
            )
            (shim / "scontrol").chmod(0o755)
            env.update(
                SLURM_JOB_ID=job_id,
                SLURM_JOB_NODELIST=",".join(hosts),
                PATH=f"{shim}{os.pathsep}{env.get('PATH', '')}",
            )
        proc = subprocess.run(
            ["bash", str(tmpdir / "job.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise LaunchError(f"the job script fails for this allocation: {detail}")
    return proc.stdout
