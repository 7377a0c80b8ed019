"""Run an ablation's runs here (torchrun, one after another) or submit them as scheduler jobs,
and keep each run's status so that a second invocation skips what has finished.

Run directory (``OUTPUT``, the ablation's ``output_dir``)::

    OUTPUT/ablation.yaml            copy of the ablation file
    OUTPUT/init/                    the shared initial run: checkpoints/ (iteration 0),
                                    train.log, status.json
    OUTPUT/variants/NAME/           a variant's run directory: metrics.jsonl, config.yaml,
                                    train.log, status.json, checkpoints/ (variant_checkpoints)
    OUTPUT/report/                  report.md, summary.json, loss.png, loss_delta.png,
                                    grad_norm.png

``status.json`` holds ``state`` and the run's overrides. States: ``done`` (exit 0 and the
metrics reach ``train.iters``; for scheduler jobs the exit code is not seen, the metrics
decide), ``stopped`` (exit 3: the run stopped on a non-finite step; a result, not rerun),
``failed`` and ``interrupted`` (run again next time: a variant with its own checkpoint
directory resumes from its latest save, one without starts over from the initial checkpoint),
``submitted`` (a scheduler job not yet finished: reported as pending and not submitted again
unless ``--resubmit``). A run whose recorded overrides differ from the current ones is an
error: the directory belongs to another ablation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_llmjp.ablate.report import read_metrics
from megatron_llmjp.ablate.spec import AblationSpec, RunPlan
from megatron_llmjp.checkpoint.store import atomic_write_text, has_checkpoint, read_latest
from megatron_llmjp.config.loader import ConfigError

if TYPE_CHECKING:
    from megatron_llmjp.launch.plan import LaunchRequest

FINAL_STATES = ("done", "stopped")
EXIT_NONFINITE = 3
"""``llmjp-train``'s exit code for a run stopped on a non-finite step."""


def say(message: str) -> None:
    print(f"llmjp-ablate: {message}", flush=True)


# -- status ---------------------------------------------------------------------------------


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, **fields) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    status = {**fields, "updated": datetime.now().isoformat(timespec="seconds")}
    atomic_write_text(run_dir / "status.json", json.dumps(status, indent=2) + "\n")
    return status


def last_step(run_dir: Path) -> int:
    records = read_metrics(run_dir / "metrics.jsonl")
    return records[-1]["step"] if records else 0


def _check_owner(plan: RunPlan, status: dict) -> None:
    recorded = status.get("overrides")
    if recorded is not None and list(recorded) != list(plan.overrides):
        raise ConfigError(
            f"{plan.output_dir} was run with other overrides ({' '.join(recorded)}); "
            f"now: {' '.join(plan.overrides)}. Remove that directory to rerun {plan.label}, or "
            "give the ablation another output_dir"
        )


def init_done(plan: RunPlan) -> bool:
    ckpt = Path(plan.cfg.checkpoint.dir)
    return has_checkpoint(ckpt) and read_latest(ckpt) == 0


def state_of(plan: RunPlan) -> str:
    """The run's state (see the module docstring); ``new`` when it never started. A submitted
    job whose output is complete is marked ``done`` here."""
    status = read_status(plan.output_dir)
    _check_owner(plan, status)
    state = status.get("state", "new")
    if plan.name is None:
        complete = init_done(plan)
        if state in ("done", "submitted") and not complete:
            return "submitted" if state == "submitted" else "failed"
    else:
        complete = last_step(plan.output_dir) >= plan.cfg.train.iters
        if state == "done" and not complete:  # e.g. exit 0 after saving on SIGTERM
            return "interrupted"
    if state == "submitted" and complete:
        write_status(plan.output_dir, **{**status, "state": "done", "returncode": None})
        return "done"
    return state


# -- local runs -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_argv(config: str | None, plan: RunPlan, nproc: int, port: int) -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    argv += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    argv += ["-m", "megatron_llmjp.cli.train"]
    if config is not None:
        argv += ["--config", config]
    argv += ["--output-dir", str(plan.output_dir)]
    for item in plan.overrides:
        argv += ["--set", item]
    return argv


_TORCHRUN_NOISE = ("ChildFailedError", "error_file", "errors.html", "elastic")


def _tail(path: Path, lines: int = 4) -> str:
    """The error lines of a failed run's log (torchrun's own summary left out), else its end."""
    try:
        text = path.read_text(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    errors = [
        t
        for t in text
        if ("Error" in t or "error:" in t or "stopped:" in t)
        and not any(n in t for n in _TORCHRUN_NOISE)
    ]
    picked = list(dict.fromkeys(errors))[-lines:] or text[-lines:]
    return "\n".join(f"    {line}" for line in picked)


def run_local(spec: AblationSpec, plan: RunPlan, nproc: int, has_own_checkpoints: bool) -> str:
    """Run ``plan`` under torchrun now, its output appended to ``DIR/train.log``; returns the
    new state. Ctrl-C stops the run (it saves if it has a checkpoint dir) and re-raises."""
    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if plan.name is not None and not has_own_checkpoints and metrics.exists():
        # The run starts over from the initial checkpoint; metrics.jsonl is appended to.
        metrics.replace(out / "metrics.jsonl.interrupted")
    argv = train_argv(spec.config, plan, nproc, free_port())
    log_path = out / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    fields = {"overrides": list(plan.overrides), "launcher": "local", "nproc": nproc}
    write_status(out, state="running", **fields)
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"=== llmjp-ablate {datetime.now().isoformat(timespec='seconds')}: ")
        log.write(" ".join(shlex.quote(a) for a in argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.send_signal(signal.SIGTERM)  # the trainer saves and exits on SIGTERM
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            write_status(out, state="interrupted", returncode=proc.returncode, **fields)
            raise
    seconds = round(time.monotonic() - t0, 1)
    if rc == 0:
        complete = init_done(plan) if plan.name is None else last_step(out) >= plan.cfg.train.iters
        state = "done" if complete else "interrupted"
    else:
        state = "stopped" if rc == EXIT_NONFINITE and plan.name is not None else "failed"
    write_status(out, state=state, returncode=rc, seconds=seconds, **fields)
    if state == "done":
        say(f"{plan.label}: done in {seconds:.1f} s")
    elif state == "stopped":
        say(f"{plan.label}: stopped on a non-finite step after {seconds:.1f} s (diverged)")
    else:
        say(f"{plan.label}: {state} (exit {rc}) after {seconds:.1f} s; end of {log_path}:")
        print(_tail(log_path), flush=True)
    return state


# -- scheduler jobs -------------------------------------------------------------------------


DEPENDENCY = {
    "pbs": lambda job: ["-W", f"depend=afterok:{job}"],
    "slurm": lambda job: [f"--dependency=afterok:{job}"],
}
"""Submit flags that hold a variant's job until the initial checkpoint's job succeeded."""


def job_plan(spec: AblationSpec, plan: RunPlan, opts: LaunchRequest):
    """The ``llmjp-launch`` plan of one run. A variant is planned without ``checkpoint.load``
    (the initial checkpoint may not exist yet: its job can still be queued), which is added to
    the command afterwards, with a bind of its directory when the job runs in a container."""
    from megatron_llmjp.launch.plan import make_plan

    load = next((o for o in plan.overrides if o.startswith("checkpoint.load=")), None)
    later = plan.name is not None and load is not None
    overrides = tuple(o for o in plan.overrides if not (later and o == load))
    req = dataclasses.replace(
        opts,
        config=spec.config,
        overrides=overrides,
        output_dir=str(plan.output_dir),
        job_name=f"{spec.name}-{plan.label}",
    )
    job = make_plan(req)
    if later:
        binds = job.binds
        init_dir = Path(load.split("=", 1)[1]).resolve()
        covered = any(init_dir == Path(b) or Path(b) in init_dir.parents for b in binds)
        if job.container is not None and not covered:
            binds = (*binds, str(init_dir))
        job = dataclasses.replace(
            job, train_argv=(*job.train_argv, "--set", f"checkpoint.load={init_dir}"), binds=binds
        )
    return job


def submit(
    spec: AblationSpec, plan: RunPlan, opts: LaunchRequest, after: str | None, dry_run: bool
) -> str:
    """Write and submit one job (held until job ``after`` succeeded); returns its job id.
    With ``dry_run``, print the script and the submit command instead."""
    from megatron_llmjp.launch.jobscript import SUBMIT_TOOL, job_script, script_path, submit_command
    from megatron_llmjp.launch.plan import LaunchError

    job = job_plan(spec, plan, opts)
    path = script_path(job)
    script = job_script(job, path)
    command = submit_command(job, path)
    if after is not None:
        command = [command[0], *DEPENDENCY[opts.scheduler](after), *command[1:]]
    if dry_run:
        rule = "#" + "-" * 79
        print(f"# {plan.label}: job script, to be written to {path}:\n{rule}")
        print(script.rstrip("\n"))
        print(f"{rule}\n# submit: {shlex.join(command)}\n", flush=True)
        return f"<{plan.label} job id>"
    tool = SUBMIT_TOOL[opts.scheduler]
    if shutil.which(tool) is None:
        raise LaunchError(f"{tool} not found on PATH: submit from a login node, or add --dry-run")
    job.launch_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().replace("\n", " | ")
        raise LaunchError(f"{command[0]} failed (exit {proc.returncode}): {detail}")
    # qsub prints the id ("123.pbs1"); sbatch prints "Submitted batch job 123".
    job_id = proc.stdout.strip().split()[-1]
    write_status(
        plan.output_dir,
        state="submitted",
        job_id=job_id,
        script=str(path),
        overrides=list(plan.overrides),
        launcher=opts.scheduler,
    )
    say(f"{plan.label}: submitted job {job_id} ({job.world} ranks); script {path}")
    return job_id
