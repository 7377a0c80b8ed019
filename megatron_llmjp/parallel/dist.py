"""Rank discovery and process-group setup: the only module that touches ``parallel_state``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_llmjp.parallel.layout import Layout


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    source: str
    """Which launcher's variables were read (torchrun, openmpi, slurm, single)."""


def _env_int(env: dict, *names: str) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return None


def discover_ranks(env: dict | None = None) -> RankInfo:
    """Ranks from torchrun (RANK/WORLD_SIZE), OpenMPI (OMPI_COMM_WORLD_*), PMIx or SLURM (in that
    order); a plain ``python`` run is rank 0 of 1."""
    env = dict(os.environ if env is None else env)
    table = (
        ("torchrun", ("RANK",), ("LOCAL_RANK",), ("WORLD_SIZE",)),
        (
            "openmpi",
            ("OMPI_COMM_WORLD_RANK",),
            ("OMPI_COMM_WORLD_LOCAL_RANK",),
            ("OMPI_COMM_WORLD_SIZE",),
        ),
        ("pmix", ("PMIX_RANK",), ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID"), ("PMI_SIZE",)),
        ("slurm", ("SLURM_PROCID",), ("SLURM_LOCALID",), ("SLURM_NTASKS",)),
    )
    for source, rank_v, local_v, world_v in table:
        rank, world = _env_int(env, *rank_v), _env_int(env, *world_v)
        if rank is not None and world is not None:
            local = _env_int(env, *local_v)
            return RankInfo(rank, rank if local is None else local, world, source)
    return RankInfo(0, 0, 1, "single")


def init_distributed(info: RankInfo, layout: Layout, timeout_minutes: float) -> None:
    """Create the default process group (NCCL on GPU, gloo on CPU) and megatron's groups."""
    from megatron.core import parallel_state as ps

    cuda = torch.cuda.is_available()
    if cuda:
        # megatron-core's TP/SP communication overlap relies on one hardware queue keeping
        # kernels in issue order; it must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=timeout_minutes,  # a float works (timedelta)
        create_gloo_process_groups=True,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Python/numpy/torch seeds plus megatron's TP/EP-aware RNG tracker states."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
