"""Shared by the benchmark scripts: run ``llmjp-train`` under torchrun and read its metrics."""

from __future__ import annotations

import json
import os
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
