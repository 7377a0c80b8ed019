"""Rank discovery and process-group setup: the only module that touches ``parallel_state``."""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.parallel import cpu_compat
from megatron_llmjp.parallel.layout import Layout


@dataclass(frozen=True)
class RankInfo:
    rank: int
    local_rank: int
    world_size: int
    source: str
    """Which launcher's variables were read (torchrun, openmpi, pmix, pmi, slurm, single)."""


def _env_int(env: dict, *names: str) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return None


# Launcher variables, first match wins: (source, rank, local rank, world size, ranks on this
# host). torchrun comes first because ``srun torchrun`` and ``mpirun torchrun`` leave the outer
# launcher's variables describing the wrapper, not the rank.
_RANK_TABLE = (
    ("torchrun", ("RANK",), ("LOCAL_RANK",), ("WORLD_SIZE",), ("LOCAL_WORLD_SIZE",)),
    (
        "openmpi",
        ("OMPI_COMM_WORLD_RANK",),
        ("OMPI_COMM_WORLD_LOCAL_RANK",),
        ("OMPI_COMM_WORLD_SIZE",),
        ("OMPI_COMM_WORLD_LOCAL_SIZE",),
    ),
    (
        "pmix",
        ("PMIX_RANK",),
        ("MPI_LOCALRANKID", "PALS_LOCAL_RANKID"),
        ("PMI_SIZE",),
        ("MPI_LOCALNRANKS", "PALS_LOCAL_SIZE"),
    ),
    # MPICH / Intel MPI (Hydra) export PMI-1 variables.
    ("pmi", ("PMI_RANK",), ("MPI_LOCALRANKID",), ("PMI_SIZE",), ("MPI_LOCALNRANKS",)),
    ("slurm", ("SLURM_PROCID",), ("SLURM_LOCALID",), ("SLURM_NTASKS",), ()),
)
_MPI_SOURCES = ("openmpi", "pmix", "pmi")
"""Launchers whose ranks can exchange MASTER_ADDR/PORT through MPI (mpi4py)."""


def discover_ranks(env: dict | None = None) -> RankInfo:
    """Ranks from torchrun (RANK/WORLD_SIZE), OpenMPI (OMPI_COMM_WORLD_*), PMIx, PMI (MPICH) or
    SLURM (in that order); a plain ``python`` run is rank 0 of 1."""
    env = dict(os.environ if env is None else env)
    for source, rank_v, local_v, world_v, _ in _RANK_TABLE:
        rank, world = _env_int(env, *rank_v), _env_int(env, *world_v)
        if rank is not None and world is not None:
            local = _env_int(env, *local_v)
            return RankInfo(rank, rank if local is None else local, world, source)
    return RankInfo(0, 0, 1, "single")


def init_distributed(info: RankInfo, layout: Layout, timeout_minutes: float) -> None:
    """Create the default process group (NCCL on GPU, gloo on CPU; ``cpu_compat.device_type``
    decides) and megatron's groups.

    Raises:
        ConfigError: ``LLMJP_DEVICE=cuda`` where torch sees no GPU (before any process group).
    """
    cuda = cpu_compat.device_type() == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError(
            f"{cpu_compat.DEVICE_ENV}=cuda but torch sees no GPU on this machine (torch "
            f"{torch.__version__}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
            f"); unset {cpu_compat.DEVICE_ENV} or set it to cpu"
        )
    from megatron.core import parallel_state as ps

    if cuda:
        # megatron-core's TP/SP communication overlap relies on one hardware queue keeping
        # kernels in issue order; it must be set before the CUDA context exists.
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        set_rendezvous(info)
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


def _ranks_on_this_host(info: RankInfo, env: dict) -> int | None:
    for source, _, _, _, local_world_v in _RANK_TABLE:
        if source == info.source:
            return _env_int(env, *local_world_v)
    return None


def set_rendezvous(info: RankInfo, env: dict | None = None) -> tuple[str, int, str]:
    """Fill MASTER_ADDR/MASTER_PORT for ``init_process_group``; returns (addr, port, origin).

    Set by the launcher (the job scripts derive them from the node file): used as they are.
    Under an MPI launch without them, rank 0's address and a free port are broadcast with
    mpi4py, so ``mpirun python -m ...`` needs no wrapper script. Otherwise 127.0.0.1:29500,
    which is only right when every rank is on this host; a multi-host MPI launch without
    mpi4py is refused instead of hanging in the rendezvous.
    """
    env = os.environ if env is None else env
    if env.get("MASTER_ADDR"):
        env.setdefault("MASTER_PORT", "29500")
        return env["MASTER_ADDR"], int(env["MASTER_PORT"]), "environment"
    if info.world_size > 1 and info.source in _MPI_SOURCES:
        exchanged = _exchange_with_mpi()
        if exchanged is not None:
            addr, port = exchanged
            env["MASTER_ADDR"], env["MASTER_PORT"] = addr, str(port)
            if info.rank == 0:
                print(
                    f"[llmjp] rendezvous at {addr}:{port} (rank 0, shared via mpi4py)", flush=True
                )
            return addr, port, "mpi4py"
        local = _ranks_on_this_host(info, env)
        if local is None or local < info.world_size:
            raise ConfigError(
                f"MASTER_ADDR is not set and mpi4py is not usable: {info.world_size} ranks "
                f"started by {info.source} (on more than one host, or an unknown number) cannot "
                "agree on a rendezvous address. Install mpi4py (pip install mpi4py), or export "
                "MASTER_ADDR (the first host of the allocation) and MASTER_PORT to every rank, "
                "as the llmjp-launch job scripts do"
            )
    env["MASTER_ADDR"] = "127.0.0.1"
    env.setdefault("MASTER_PORT", "29500")
    return env["MASTER_ADDR"], int(env["MASTER_PORT"]), "default"


def _exchange_with_mpi() -> tuple[str, int] | None:
    """Rank 0's address and a free port, broadcast over MPI_COMM_WORLD; None without mpi4py.

    MPI is finalised again right after (when this call initialised it): the trainer talks
    through torch.distributed only, and a live MPI library would be inherited by the processes
    the trainer starts (asynchronous checkpoint writers).
    """
    initialised_here = "mpi4py.MPI" not in sys.modules
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError):  # not installed, or no MPI library for it to load
        return None
    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    endpoint = None
    if comm.Get_rank() == 0:
        addr = _address_reachable_from(hosts)
        endpoint = (addr, _free_port(addr))
    endpoint = comm.bcast(endpoint, root=0)
    if initialised_here and not MPI.Is_finalized():
        MPI.Finalize()
    return endpoint


def _address_reachable_from(hosts: list[str]) -> str:
    """An address of this host (``hosts[0]``) that the other ranks' hosts can connect to."""
    me = hosts[0]
    peers = [h for h in hosts if h != me]
    if not peers:
        return "127.0.0.1"
    try:
        addr = socket.gethostbyname(me)
    except OSError:
        addr = ""
    if addr and not addr.startswith("127."):
        return addr
    # /etc/hosts maps the host name to a loopback address (common on Debian-style images): ask
    # the kernel which local address routes to a peer. A UDP connect sends no packet.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(peers[0]), 9))
        return s.getsockname()[0]


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def local_device() -> int | str:
    """This rank's device for tensors handed to collectives and the model: its GPU index, or
    "cpu" with gloo (``cpu_compat.device_type``; the CPU answer asks CUDA nothing)."""
    return torch.cuda.current_device() if cpu_compat.device_type() == "cuda" else "cpu"


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
