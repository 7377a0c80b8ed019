"""``discover_ranks``: torchrun, OpenMPI, SLURM and plain ``python``, from explicit env dicts."""

from __future__ import annotations

import pytest

from megatron_llmjp.parallel.dist import RankInfo, discover_ranks

TORCHRUN = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "6",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "OMPI_COMM_WORLD_SIZE": "16",
}
SLURM = {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "4"}


def test_torchrun():
    assert discover_ranks(TORCHRUN) == RankInfo(5, 1, 8, "torchrun")


def test_openmpi():
    assert discover_ranks(OPENMPI) == RankInfo(6, 2, 16, "openmpi")


def test_slurm():
    assert discover_ranks(SLURM) == RankInfo(3, 3, 4, "slurm")


def test_empty_env_is_single_process():
    info = discover_ranks({})
    assert info == RankInfo(0, 0, 1, "single")


def test_unrelated_variables_are_single_process():
    assert discover_ranks({"PATH": "/usr/bin", "HOME": "/root"}).source == "single"


def test_torchrun_wins_over_slurm():
    """``srun torchrun``: SLURM describes the srun task, torchrun the actual rank."""
    env = {**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", **TORCHRUN}
    assert discover_ranks(env) == RankInfo(5, 1, 8, "torchrun")


def test_openmpi_wins_over_slurm():
    """``mpirun`` inside an allocation: the SLURM variables describe the batch step."""
    assert discover_ranks({**SLURM, **OPENMPI}) == RankInfo(6, 2, 16, "openmpi")


def test_torchrun_wins_over_openmpi():
    assert discover_ranks({**OPENMPI, **TORCHRUN}).source == "torchrun"


def test_missing_local_rank_falls_back_to_rank():
    assert discover_ranks({"RANK": "2", "WORLD_SIZE": "4"}) == RankInfo(2, 2, 4, "torchrun")


@pytest.mark.parametrize("missing", ["RANK", "WORLD_SIZE"])
def test_incomplete_torchrun_variables_are_skipped(missing):
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    assert discover_ranks(env).source == "single"
    assert discover_ranks({**env, **SLURM}).source == "slurm"


def test_empty_values_are_ignored():
    env = {"RANK": "", "LOCAL_RANK": "", "WORLD_SIZE": "", **SLURM}
    assert discover_ranks(env) == RankInfo(3, 3, 4, "slurm")


def test_reads_os_environ_by_default(monkeypatch):
    for name in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert discover_ranks() == RankInfo(3, 0, 4, "torchrun")


def test_env_argument_is_not_modified():
    env = dict(TORCHRUN)
    discover_ranks(env)
    assert env == TORCHRUN
