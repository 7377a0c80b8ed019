"""Shared by the benchmark scripts: run ``llmjp-train`` under torchrun and read its metrics,
and describe the machine a measurement ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def torchrun_train(world: int, overrides: list[str], out: Path, port: int) -> tuple[str, list]:
    """(stdout, metrics records) of one run; raises with the stderr tail if it fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(world),
        "--master-port",
        str(port),
        "-m",
        "megatron_llmjp.cli.train",
        "--output-dir",
        str(out),
    ]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return proc.stdout, records


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``"1.93 2.10 2.40"``."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """One line: host, CPU model, usable cores and the load average now (timings on a shared
    machine are only comparable within one invocation)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{platform.node()}: {cpu}, {cores} usable cores, load average {load_average()}"


def spread(values: list[float]) -> str:
    """``median (min-max, n=N)`` of ``values``."""
    import statistics

    if not values:
        return "n/a"
    return (
        f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f}, n={len(values)})"
    )
