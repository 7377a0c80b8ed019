"""GPU acceptance of megatron-llmjp on one H100/H200: one command, one JSON report, <= 8 min.

    bash tools/gpu/setup.sh            # once per machine; a no-op where TE and mcore exist
    python tools/gpu/acceptance.py --output runs/gpu_acceptance/report.json
    python tools/gpu/acceptance.py --dry-run       # the plan, without CUDA

Parts, in the order they run, each in its own subprocess(es) with a timeout (a failing or hung
part is killed with its process group and the next part starts):

==============  ======  =====================================================================
part            budget  what
==============  ======  =====================================================================
probe             30 s  GPU name, compute capability, memory; torch, CUDA, TE, megatron-core
dense_8b         120 s  LLM-jp-4-8B shape (hidden 4096, FFN 14336, 32 heads, 8 KV groups) with
                        4 layers, sequence 4096, 8 x 4096 tokens a step, 6 steps: BF16, then
                        every FP8 recipe TE runs on this GPU (delayed, tensorwise, blockwise;
                        mxfp8 only on Blackwell). TFLOP/s per GPU and MFU (model FLOPs of
                        ``training/flops.py``, datasheet peak of ``precision/peaks.py``) over
                        the steps after the first two; peak allocated memory against the
                        planner's estimate (``planner.search.estimate_memory``).
moe_32b_a3b      130 s  LLM-jp-4-32B-A3B shape (hidden 2560, 128 experts of FFN 960, top-8,
                        TE grouped GEMM, EP1) with 2 layers, the same runs and figures.
checkpoint        60 s  A tiny model trained 4 steps on the CPU (gloo, megatron-core's local
                        spec; started in the background at the beginning), resumed on the GPU
                        (TE spec) for 4 more steps, and the GPU checkpoint exported with
                        ``llmjp-convert mcore-to-hf`` (its logits parity check included).
gpu_tests        140 s  ``pytest -m gpu tests/gpu``: per-test outcome and duration.
==============  ======  =====================================================================

The budgets add up to 480 s and the command ends by then (``--budget-s``; the part budgets
scale with it). Time a part leaves unused passes to the later parts, and a slower part may
borrow a quarter of each later part's budget (``deadlines``); inside a part, a run may use what
is left less 20 s for each run after it (``share``). A run or part past its time is killed
with its process group and reported as ``timeout``.

A performance run passes when it trains with finite losses and an MFU in (0, 1); a BF16 run
must also stay within the planner's estimate (its 3 GiB overhead allowance included), while for
FP8 runs the ratio is reported only (the planner models BF16 weights). The checkpoint part
passes when the GPU run continues at step 5 from the CPU checkpoint (weights, optimizer and
iteration) and the export's parity check passes; should the resume fail, the CPU weights are
loaded alone so that the export is still checked.

The report (``--output``, written atomically) holds, per part, ``status`` (passed, failed,
timeout, skipped, error), ``passed`` and the figures; it is also printed as a table. Exit
status: 0 every part passed, 1 a part did not, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCHEMA = "llmjp-gpu-acceptance/1"
PART_BUDGETS_S: dict[str, float] = {
    "probe": 30.0,
    "dense_8b": 120.0,
    "moe_32b_a3b": 130.0,
    "checkpoint": 60.0,
    "gpu_tests": 140.0,
}
"""Seconds per part on an H200 (sum 480); the order is the order they run in."""
PARTS = tuple(p for p in PART_BUDGETS_S if p != "probe")
STATUSES = ("passed", "failed", "timeout", "skipped", "error")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
WARMUP_STEPS = 2
"""Steps left out of the throughput figures (CUDA/cuDNN/TE autotuning, allocator growth)."""

_COMMON = [
    "data.synthetic=true",
    "precision.dtype=bf16",
    "logging.tensorboard=false",
    "logging.gpu_telemetry=false",
    "train.seq_length=4096",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "train.iters=6",
]
SHAPES: dict[str, list[str]] = {
    # Full hidden size, heads and FFN from the registry (config/presets.py), fewer layers.
    "dense_8b": ["model.name=llm-jp-4-8b", "model.num_layers=4", *_COMMON],
    "moe_32b_a3b": [
        "model.name=llm-jp-4-32b-a3b",
        "model.num_layers=2",
        "parallel.ep=1",
        "performance.moe_grouped_gemm=true",
        *_COMMON,
    ],
}
TINY_CHECKPOINT = [
    "model.name=llm-jp-4-tiny-dense",
    "data.synthetic=true",
    "precision.dtype=fp32",
    "train.seq_length=128",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "logging.tensorboard=false",
    "logging.gpu_telemetry=false",
]
CPU_ITERS, GPU_ITERS = 4, 8


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Run:
    """One training run of a performance part."""

    part: str
    name: str
    """``bf16`` or the FP8 recipe."""
    overrides: tuple[str, ...]
    skip_reason: str | None = None


@dataclass(frozen=True)
class Machine:
    """What the probe found (or what ``--dry-run`` assumes)."""

    device_name: str = "NVIDIA H200"
    capability: tuple[int, int] = (9, 0)
    te_version: str | None = "2.10.0"
    memory_bytes: int | None = None
    versions: dict = field(default_factory=dict)


def shape_overrides(part: str) -> list[str]:
    """The ``--set`` overrides of a performance part's BF16 run (``ConfigError``-free)."""
    return list(SHAPES[part])


def plan_runs(part: str, machine: Machine) -> list[Run]:
    """BF16 then every FP8 recipe of ``part``; recipes this GPU / TE cannot run are kept as
    skipped runs with the reason ``precision.recipes.fp8_hardware_error`` gives."""
    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.precision.recipes import fp8_hardware_error

    base = shape_overrides(part)
    runs = [Run(part, "bf16", tuple(base))]
    for recipe in FP8_RECIPES:
        overrides = (*base, f"precision.fp8={recipe}")
        p = build_config(overrides=list(overrides)).precision
        reason = fp8_hardware_error(p, machine.capability, machine.te_version)
        runs.append(Run(part, recipe, overrides, reason))
    return runs


def planner_row(device_name: str) -> str:
    """The planner's GPU table row for a ``torch.cuda.get_device_name()`` string (the H200 row
    where the GPU is not in the table: only the overhead term of the estimate uses it)."""
    from megatron_llmjp.precision.peaks import gpu_kind

    return {"H100 SXM": "h100", "A100": "a100-80gb"}.get(gpu_kind(device_name) or "", "h200")


def planner_estimate(overrides: list[str], device_name: str = "NVIDIA H200") -> dict:
    """The planner's per-GPU peak memory for the config of ``overrides`` on one GPU (bytes):
    ``planner.search.estimate_memory`` with the config's recompute setting."""
    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.parallel.layout import make_layout
    from megatron_llmjp.planner.activations import Recompute
    from megatron_llmjp.planner.hardware import get_gpu
    from megatron_llmjp.planner.search import PlanOptions, estimate_memory
    from megatron_llmjp.planner.timing import Cluster

    cfg = build_config(overrides=overrides)
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, 1)
    recompute = Recompute.from_config(cfg.recompute)
    opts = PlanOptions(world=1, cluster=Cluster(gpu=get_gpu(planner_row(device_name))))
    est = estimate_memory(cfg, layout, cfg.train.micro_batch_size, recompute, opts)
    return {
        "total_bytes": est.total,
        "without_overhead_bytes": est.total - est.overhead,
        "terms_bytes": est.terms(),
        "exact": est.exact,
        "fits": est.total <= opts.usable_bytes,
    }


def step_tflop(overrides: list[str]) -> float:
    """Model TFLOP of one optimizer step (``training.flops.step_flops``)."""
    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.training.flops import step_flops

    return step_flops(build_config(overrides=overrides)) / 1e12


KEEP = 0.75
"""Fraction of its budget a part keeps for itself however long the parts before it take; the
rest may be lent to a slower earlier part."""
RUN_RESERVE_S = 20.0
"""Seconds kept for each later run of a part while one of its runs is going."""


def deadlines(start: float, parts: list[str], budgets: dict[str, float]) -> dict[str, float]:
    """Absolute time each part must end by. The whole command ends by ``start`` plus the sum of
    the budgets of the parts that run; a part may use its own budget, whatever the parts before
    it left unused and ``1 - KEEP`` of each later part's budget (the probe: its own budget)."""
    order = ["probe", *parts]
    end = start + sum(budgets[p] for p in order)
    out = {"probe": start + budgets["probe"]}
    for i, p in enumerate(order[1:], start=1):
        out[p] = end - KEEP * sum(budgets[q] for q in order[i + 1 :])
    return out


def share(now: float, part_deadline: float, runs_left: int) -> float:
    """Seconds the next of ``runs_left`` runs may take: the part's time left less
    ``RUN_RESERVE_S`` for each run after it, and never less than an equal share."""
    left = part_deadline - now
    n = max(1, runs_left)
    return max(0.0, left / n, left - RUN_RESERVE_S * (n - 1))


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="tools/gpu/acceptance.py",
        description="GPU acceptance on one H100/H200: one JSON report in at most 8 minutes.",
    )
    p.add_argument("--output", default="runs/gpu_acceptance/report.json", help="JSON report")
    p.add_argument("--workdir", help="run directories and logs (default: next to --output)")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated subset of {', '.join(PARTS)} (default: all)",
    )
    p.add_argument("--budget-s", type=float, default=480.0, help="whole command (default 480)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; needs no CUDA")
    p.add_argument("--worker", choices=["probe", "train"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = [x for x in parts if x not in PARTS]
    if unknown or not parts:
        p.error(f"--parts: unknown {unknown or 'empty list'}; choose from {', '.join(PARTS)}")
    args.parts = [x for x in PARTS if x in parts]  # always in the running order
    if not 60 <= args.budget_s <= 3600:
        p.error(f"--budget-s must be in [60, 3600] seconds, got {args.budget_s}")
    return args


def budgets_for(total: float) -> dict[str, float]:
    """The part budgets scaled to ``total`` seconds (480 gives ``PART_BUDGETS_S``)."""
    scale = total / sum(PART_BUDGETS_S.values())
    return {k: v * scale for k, v in PART_BUDGETS_S.items()}


# --------------------------------------------------------------------------- children


def child_env(**extra: str) -> dict:
    """The environment of every child: this checkout first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH")) if x)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env.update(extra)
    return env


@dataclass
class Child:
    """A subprocess in its own session, output to ``log``; killed with its group on timeout."""

    proc: subprocess.Popen
    log: Path
    started: float

    @classmethod
    def start(cls, cmd: list[str], log: Path, env: dict) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(proc, log, time.monotonic())

    def wait(self, timeout: float) -> tuple[int | None, float]:
        """(exit status or None on timeout, seconds since the start)."""
        try:
            rc = self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        return rc, time.monotonic() - self.started

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def tail(self, n: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def torchrun(nproc: int = 1) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
    ]


def train_cmd(out: Path, overrides: list[str]) -> list[str]:
    cmd = [*torchrun(), "-m", "megatron_llmjp.cli.train", "--output-dir", str(out)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


# --------------------------------------------------------------------------- workers


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a temporary file in the same directory, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def worker_probe() -> dict:
    """Versions and the GPU, in a child so that the parent never creates a CUDA context."""
    import importlib.metadata as md

    import torch

    out: dict = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    for dist in ("megatron-core", "transformer_engine", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    try:
        import transformer_engine

        out["te_version"] = str(transformer_engine.__version__)
    except Exception as e:  # an unusable build counts as missing, with the reason
        out["te_version"], out["te_error"] = None, f"{type(e).__name__}: {e}"
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        out["device_name"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
        out["memory_bytes"] = props.total_memory
        out["device_count"] = torch.cuda.device_count()
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_train(spec: dict) -> dict:
    """One performance run through the trainer API (``training.trainer.run``) on one GPU."""
    import torch

    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.training.flops import ThroughputMeter
    from megatron_llmjp.training.trainer import run

    for var in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "OMPI_COMM_WORLD_RANK",
        "SLURM_PROCID",
        "PMIX_RANK",
    ):
        os.environ.pop(var, None)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    cfg = build_config(None, spec["overrides"], spec["output_dir"])
    result = run(cfg)
    history = result.history
    measured = history[WARMUP_STEPS:] or history
    step_time = statistics.median(r["step_time"] for r in measured)
    meter = ThroughputMeter.for_run(cfg, 1)
    cuda = torch.cuda.is_available()  # (the worker also runs on CPU for the tests)
    return {
        "steps": len(history),
        "losses": [r["loss"] for r in history],
        "step_time_s": step_time,
        "measured_steps": len(measured),
        "tokens_per_s": cfg.train.global_batch_size * cfg.train.seq_length / step_time,
        "peak_tflops": meter.peak_tflops,
        **meter.fields(step_time),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
    }


# --------------------------------------------------------------------------- parts


def judge_run(figures: dict, estimate: dict, bf16: bool) -> tuple[bool, list[str]]:
    """A performance run passes when every loss is finite, MFU (where the GPU has a known peak)
    is in (0, 1), and, for BF16 (what the planner models), the peak allocated memory does not
    exceed the planner's estimate including its overhead allowance."""
    import math

    problems = []
    if not figures.get("losses") or not all(math.isfinite(x) for x in figures["losses"]):
        problems.append("non-finite or missing loss")
    mfu = figures.get("mfu")
    if mfu is not None and not 0 < mfu < 1:
        problems.append(f"MFU {mfu:.3f} outside (0, 1)")
    peak = figures.get("peak_allocated_bytes")
    figures["memory_vs_estimate"] = (
        peak / estimate["without_overhead_bytes"] if peak and estimate else None
    )
    figures["memory_within_estimate"] = bool(peak is not None and peak <= estimate["total_bytes"])
    if bf16 and not figures["memory_within_estimate"]:
        problems.append("peak memory above the planner's estimate")
    return not problems, problems


def part_performance(part: str, machine: Machine, work: Path, deadline: float) -> dict:
    runs = plan_runs(part, machine)
    todo = [r for r in runs if r.skip_reason is None]
    results = []
    for run in runs:
        entry: dict = {"name": run.name, "overrides": list(run.overrides)}
        if run.skip_reason is not None:
            results.append(
                {**entry, "status": "skipped", "passed": None, "reason": run.skip_reason}
            )
            continue
        estimate = planner_estimate(list(run.overrides), machine.device_name)
        entry["planner_estimate"] = estimate
        entry["step_tflop"] = step_tflop(list(run.overrides))
        out = work / part / run.name
        spec_path, result_path = out / "spec.json", out / "result.json"
        _write_json(
            spec_path,
            {
                "overrides": list(run.overrides),
                "output_dir": str(out / "run"),
                "result": str(result_path),
            },
        )
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "train",
            "--spec",
            str(spec_path),
        ]
        child = Child.start(cmd, out / "log.txt", child_env())
        rc, wall = child.wait(share(time.monotonic(), deadline, len(todo)))
        todo.remove(run)
        entry.update(wall_s=round(wall, 1), log=str(child.log))
        if rc is None:
            entry.update(status="timeout", passed=False, detail=child.tail())
        elif rc != 0 or not result_path.is_file():
            entry.update(status="failed", passed=False, detail=child.tail())
        else:
            figures = json.loads(result_path.read_text())
            ok, problems = judge_run(figures, estimate, run.name == "bf16")
            entry.update(status="passed" if ok else "failed", passed=ok, figures=figures)
            if problems:
                entry["detail"] = "; ".join(problems)
        results.append(entry)
    ran = [r for r in results if r["status"] != "skipped"]
    passed = bool(ran) and all(r["passed"] for r in ran)
    return {"status": "passed" if passed else "failed", "passed": passed, "runs": results}


def start_cpu_checkpoint(work: Path) -> Child:
    """The CPU half of the checkpoint part: gloo, megatron-core's local spec (no CUDA visible),
    a few threads so that it barely disturbs the GPU runs it overlaps."""
    out = work / "checkpoint" / "cpu"
    overrides = [*TINY_CHECKPOINT, f"train.iters={CPU_ITERS}", f"checkpoint.dir={ckpt_dir(work)}"]
    env = child_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="2")
    return Child.start(train_cmd(out, overrides), out / "log.txt", env)


def ckpt_dir(work: Path) -> Path:
    return (work / "checkpoint" / "checkpoints").resolve()


def part_checkpoint(
    cpu: Child | None, work: Path, deadline: float, resume_env: dict | None = None
) -> dict:
    """CPU training -> full resume on the GPU -> HF export with the parity check. Should the
    full resume fail, the CPU weights are loaded alone (``checkpoint.load_optimizer=false``)
    so that the export is still checked; the part then fails on the resume. ``resume_env``:
    the environment of the resume and export (default: ``child_env()``, the GPU)."""
    steps: dict = {}
    env = child_env() if resume_env is None else resume_env

    def left() -> float:
        return deadline - time.monotonic()

    def record(step: str, child: Child, rc: int | None, wall: float, **figures) -> bool:
        ok = rc == 0 and figures.pop("ok", True)
        status = "passed" if ok else ("timeout" if rc is None else "failed")
        steps[step] = {"status": status, "passed": ok, "wall_s": round(wall, 1), **figures}
        if not ok:
            steps[step]["detail"] = child.tail()
        return ok

    def verdict() -> dict:
        ok = all(s["passed"] for s in steps.values()) and "export_hf" in steps
        bad = [s["status"] for s in steps.values() if not s["passed"]]
        status = "passed" if ok else ("timeout" if "timeout" in bad else "failed")
        return {"status": status, "passed": ok, "steps": steps}

    if cpu is None:
        cpu = start_cpu_checkpoint(work)
    rc, wall = cpu.wait(left() * 0.4)
    cpu_records = read_metrics(work / "checkpoint" / "cpu")
    cpu_last = cpu_records[-1]["loss"] if cpu_records else None
    if not record("cpu_train", cpu, rc, wall, last_loss=cpu_last):
        return verdict()
    # Full resume (weights, optimizer, iteration) of the CPU checkpoint on the GPU.
    out = work / "checkpoint" / "gpu"
    overrides = [*TINY_CHECKPOINT, f"train.iters={GPU_ITERS}", f"checkpoint.dir={ckpt_dir(work)}"]
    gpu = Child.start(train_cmd(out, overrides), out / "log.txt", env)
    rc, wall = gpu.wait(share(time.monotonic(), deadline, 2))
    records = read_metrics(out)
    first = records[0]["step"] if records else None
    gpu_first = records[0]["loss"] if records else None
    # The first GPU step continues the CPU run (step CPU_ITERS + 1); its loss is near the last
    # CPU loss (a fresh model's would be too, on random tokens: the step is the evidence).
    resumed = first == CPU_ITERS + 1 and len(records) == GPU_ITERS - CPU_ITERS
    close = cpu_last is not None and gpu_first is not None and abs(gpu_first - cpu_last) < 0.5
    export_from = ckpt_dir(work)
    ok = record(
        "gpu_resume", gpu, rc, wall, ok=resumed and close, first_step=first, first_loss=gpu_first
    )
    if not ok:
        out = work / "checkpoint" / "gpu_weights"
        export_from = out / "checkpoints"
        overrides = [
            *TINY_CHECKPOINT,
            f"train.iters={GPU_ITERS - CPU_ITERS}",
            f"checkpoint.load={ckpt_dir(work)}",
            "checkpoint.load_optimizer=false",
            f"checkpoint.dir={export_from}",
        ]
        gpu = Child.start(train_cmd(out, overrides), out / "log.txt", env)
        rc, wall = gpu.wait(share(time.monotonic(), deadline, 2))
        if not record("gpu_load_weights", gpu, rc, wall):
            return verdict()
    # Export the GPU checkpoint; llmjp-convert compares the logits of both models (exit 3).
    hf = work / "checkpoint" / "hf"
    cmd = [
        sys.executable,
        "-m",
        "megatron_llmjp.cli.convert",
        "mcore-to-hf",
        "--input",
        str(export_from),
        "--output",
        str(hf),
        "--force",
        "--no-progress",
    ]
    conv = Child.start(cmd, work / "checkpoint" / "convert.txt", env)
    rc, wall = conv.wait(left())
    files = sorted(p.name for p in hf.iterdir()) if hf.is_dir() else []
    record("export_hf", conv, rc, wall, files=files, output_tail=conv.tail(600))
    return verdict()


_PYTEST_LINE = re.compile(r"^(tests/gpu/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def parse_junit(path: Path) -> list[dict]:
    """Per-test outcome from pytest's JUnit XML: name, outcome, seconds, message."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "")[:500]
                break
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tests.append(
            {
                "name": name,
                "outcome": outcome,
                "seconds": float(case.get("time", 0)),
                "message": message,
            }
        )
    return tests


def parse_pytest_output(text: str) -> list[dict]:
    """Per-test outcome from ``pytest -v`` lines (what is left when pytest was killed)."""
    return [
        {"name": m.group(1), "outcome": m.group(2).lower(), "seconds": None, "message": ""}
        for m in map(_PYTEST_LINE.match, text.splitlines())
        if m
    ]


def judge_tests(tests: list[dict], rc: int | None) -> str:
    """passed: pytest exited 0 and ran at least one test that passed."""
    if rc is None:
        return "timeout"
    bad = [t for t in tests if t["outcome"] in ("failed", "error")]
    if rc == 0 and tests and not bad and any(t["outcome"] == "passed" for t in tests):
        return "passed"
    return "failed"


def part_gpu_tests(work: Path, deadline: float) -> dict:
    xml = work / "gpu_tests" / "junit.xml"
    xml.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "tests/gpu",
        "-v",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
        "-o",
        "junit_family=xunit2",
    ]
    child = Child.start(cmd, work / "gpu_tests" / "log.txt", child_env())
    rc, wall = child.wait(deadline - time.monotonic())
    text = child.log.read_text(errors="replace") if child.log.is_file() else ""
    tests = parse_junit(xml) if rc is not None and xml.is_file() else parse_pytest_output(text)
    status = judge_tests(tests, rc)
    counts = {
        k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped", "error")
    }
    out = {
        "status": status,
        "passed": status == "passed",
        "wall_s": round(wall, 1),
        "counts": counts,
        "tests": tests,
        "log": str(child.log),
    }
    if status != "passed":
        out["detail"] = text[-3000:]
    return out


# --------------------------------------------------------------------------- report


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(part/run, status, figures) lines of the printed table."""
    rows = []
    for name, part in report["parts"].items():
        why = "" if part["passed"] else _last_line(part.get("detail", ""))
        rows.append((name, part["status"], f"{part.get('wall_s', '?')} s {why}".rstrip()))
        for run in part.get("runs", []):
            f = run.get("figures") or {}
            est = (run.get("planner_estimate") or {}).get("without_overhead_bytes")
            if f:
                mfu = f"{f['mfu']:.1%}" if f.get("mfu") is not None else "n/a"
                text = (
                    f"{f['tflops_per_gpu']:.0f} TFLOP/s, MFU {mfu}, peak "
                    f"{f['peak_allocated_bytes'] / 2**30:.1f} GiB vs planner "
                    f"{(est or 0) / 2**30:.1f} GiB"
                )
            else:
                text = run.get("reason") or _last_line(run.get("detail", ""))
            rows.append((f"  {run['name']}", run["status"], text))
        for step, s in part.get("steps", {}).items():
            why = "" if s["passed"] else _last_line(s.get("detail", ""))
            rows.append((f"  {step}", s["status"], f"{s.get('wall_s', '?')} s {why}".rstrip()))
        if "counts" in part:
            rows.append(("  tests", "", ", ".join(f"{v} {k}" for k, v in part["counts"].items())))
    return rows


def _last_line(text: str, width: int = 100) -> str:
    """The last non-empty line of a log tail, shortened for the table."""
    lines = [x.strip() for x in (text or "").splitlines() if x.strip()]
    return lines[-1][-width:] if lines else ""


def format_table(report: dict) -> str:
    rows = summary_rows(report)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append(f"{verdict} in {report['wall_s']:.0f} s (budget {report['budget_s']:.0f} s)")
    return "\n".join(lines)


def validate_report(report: dict) -> None:
    """Raises ``ValueError`` if ``report`` does not follow the schema (used by the tests)."""
    for key in ("schema", "started", "wall_s", "budget_s", "machine", "parts", "passed"):
        if key not in report:
            raise ValueError(f"report lacks {key!r}")
    if report["schema"] != SCHEMA:
        raise ValueError(f"schema {report['schema']!r} != {SCHEMA!r}")
    for name, part in report["parts"].items():
        if name not in PARTS:
            raise ValueError(f"unknown part {name!r}")
        if part.get("status") not in STATUSES or not isinstance(part.get("passed"), bool):
            raise ValueError(f"part {name!r}: bad status/passed {part}")
        for run in part.get("runs", []):
            if run.get("status") not in STATUSES:
                raise ValueError(f"{name}/{run.get('name')}: bad status")
            if run["status"] == "passed":
                f = run["figures"]
                for k in ("tflops_per_gpu", "peak_allocated_bytes", "step_time_s"):
                    if not isinstance(f.get(k), (int, float)):
                        raise ValueError(f"{name}/{run['name']}: figure {k!r} missing")
    parts_ok = all(p["passed"] for p in report["parts"].values())
    if report["passed"] != (parts_ok and bool(report["parts"])):
        raise ValueError("report.passed disagrees with its parts")


def dry_run_text(args: argparse.Namespace, machine: Machine) -> str:
    budgets = budgets_for(args.budget_s)
    lines = [
        f"GPU acceptance plan (assumed GPU: {machine.device_name}, sm_"
        f"{machine.capability[0]}{machine.capability[1]}, TE {machine.te_version}); "
        f"budget {args.budget_s:.0f} s"
    ]
    lines.append(f"  probe          {budgets['probe']:5.0f} s")
    for part in args.parts:
        lines.append(f"  {part:<14} {budgets[part]:5.0f} s")
        if part in SHAPES:
            lines.append(f"    --set {' '.join(shape_overrides(part))}")
            for run in plan_runs(part, machine):
                if run.skip_reason:
                    lines.append(f"    {run.name:<11} skipped: {run.skip_reason}")
                    continue
                est = planner_estimate(list(run.overrides), machine.device_name)
                lines.append(
                    f"    {run.name:<11} {step_tflop(list(run.overrides)):7.1f} TFLOP/step, "
                    f"planner peak {est['without_overhead_bytes'] / 2**30:6.1f} GiB "
                    f"(+{(est['total_bytes'] - est['without_overhead_bytes']) / 2**30:.0f} GiB "
                    "overhead)"
                )
        elif part == "checkpoint":
            lines.append(f"    CPU {CPU_ITERS} steps -> GPU resume to {GPU_ITERS} -> mcore-to-hf")
        else:
            lines.append("    pytest -m gpu tests/gpu")
    lines.append(f"report: {args.output}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.spec).read_text()) if args.spec else {}
        result = worker_probe() if args.worker == "probe" else worker_train(spec)
        if spec.get("result"):
            _write_json(Path(spec["result"]), result)
        else:
            print(json.dumps(result))
        return 0
    if args.dry_run:
        print(dry_run_text(args, Machine()))
        return 0
    return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    output = Path(args.output).resolve()
    work = Path(args.workdir).resolve() if args.workdir else output.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    # A previous acceptance's runs would be resumed (checkpoints) or appended to (metrics):
    # only the folders and files this command writes are removed.
    for name in args.parts:
        shutil.rmtree(work / name, ignore_errors=True)
    for name in ("probe.json", "probe_result.json", "probe.txt"):
        (work / name).unlink(missing_ok=True)
    t0 = time.monotonic()
    ends = deadlines(t0, args.parts, budgets_for(args.budget_s))
    report: dict = {
        "schema": SCHEMA,
        "started": datetime.now(UTC).isoformat(),
        "budget_s": args.budget_s,
        "workdir": str(work),
        "machine": {},
        "parts": {},
        "passed": False,
        "wall_s": 0.0,
    }

    def save() -> None:
        report["wall_s"] = round(time.monotonic() - t0, 1)
        report["passed"] = bool(report["parts"]) and all(
            p["passed"] for p in report["parts"].values()
        )
        _write_json(output, report)

    cpu = start_cpu_checkpoint(work) if "checkpoint" in args.parts else None
    probe_spec = work / "probe.json"
    _write_json(probe_spec, {"result": str(work / "probe_result.json")})
    probe = Child.start(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            "probe",
            "--spec",
            str(probe_spec),
        ],
        work / "probe.txt",
        child_env(),
    )
    rc, _ = probe.wait(ends["probe"] - time.monotonic())
    info = json.loads((work / "probe_result.json").read_text()) if rc == 0 else {}
    report["machine"] = info or {"error": probe.tail()}
    no_gpu = None
    if not info:
        no_gpu = "the probe failed (see machine.error)"
    elif not info.get("cuda_available"):
        no_gpu = "no CUDA device (see machine)"
    elif not info.get("te_version") or not info.get("megatron-core"):
        no_gpu = "Transformer Engine or megatron-core missing: run tools/gpu/setup.sh"
    machine = Machine(
        device_name=info.get("device_name", ""),
        capability=tuple(info.get("capability", (0, 0))),
        te_version=info.get("te_version"),
        memory_bytes=info.get("memory_bytes"),
    )
    for part in args.parts:
        started = time.monotonic()
        print(f"[acceptance] {part} (until +{ends[part] - t0:.0f} s)", flush=True)
        try:
            if no_gpu is not None:
                result = {"status": "error", "passed": False, "detail": no_gpu}
            elif part in SHAPES:
                result = part_performance(part, machine, work, ends[part])
            elif part == "checkpoint":
                result = part_checkpoint(cpu, work, ends[part])
                cpu = None
            else:
                result = part_gpu_tests(work, ends[part])
        except Exception as e:  # one part's bug must not cost the others
            result = {"status": "error", "passed": False, "detail": f"{type(e).__name__}: {e}"}
        result.setdefault("wall_s", round(time.monotonic() - started, 1))
        result["budget_s"] = round(budgets_for(args.budget_s)[part], 1)
        report["parts"][part] = result
        save()
    if cpu is not None:
        cpu.kill()
    save()
    print(format_table(report), flush=True)
    print(f"report: {output}", flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
