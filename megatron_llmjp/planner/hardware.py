"""GPU and interconnect figures the planner uses, one row per GPU type.

Memory is the total the driver reports (``nvidia-smi``), not the marketing figure; bandwidths
are per GPU and per direction. The inter-node figure belongs to the reference node named in
``node``: check it against your cluster and change it with ``--ib-gbps``.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    """Total device memory as reported by the driver."""
    bf16_tflops: float
    """Peak dense BF16 tensor-core throughput (no sparsity)."""
    fp8_tflops: float | None
    """Peak dense FP8 tensor-core throughput (None: no FP8 tensor cores)."""
    hbm_gbps: float
    """Memory bandwidth, GB/s (bounds the optimizer step)."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU per direction, GB/s (all GPUs of a node on NVSwitch)."""
    ib_gbps: float
    """Inter-node bandwidth per GPU per direction, GB/s, of the reference ``node``."""
    node: str
    source: str


# NVLink 4 (H100/H200 SXM): 900 GB/s total = 450 GB/s per direction; NVLink 3 (A100 SXM):
# 600 GB/s total = 300 GB/s per direction (NVIDIA H100, H200 and A100 datasheets).
# InfiniBand: NDR400 = 400 Gb/s = 50 GB/s, NDR200 / HDR200 = 200 Gb/s = 25 GB/s per port, one
# port per GPU on all three reference nodes.
GPUS: dict[str, GPU] = {
    "h200": GPU(
        name="h200",
        memory_bytes=143771 * MiB,
        bf16_tflops=989.4,
        fp8_tflops=1978.9,
        hbm_gbps=4800.0,
        nvlink_gbps=450.0,
        ib_gbps=25.0,
        node="ABCI 3.0 (8x H200 SXM, InfiniBand NDR200 x 8 per node)",
        source="NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s, 1,979 TFLOP/s BF16 with "
        "sparsity); ABCI 3.0 system overview (Takano et al. 2024, arXiv:2411.09134)",
    ),
    "h100": GPU(
        name="h100",
        memory_bytes=81559 * MiB,
        bf16_tflops=989.4,
        fp8_tflops=1978.9,
        hbm_gbps=3350.0,
        nvlink_gbps=450.0,
        ib_gbps=50.0,
        node="DGX H100 (8x H100 SXM, ConnectX-7 NDR400 x 8 per node)",
        source="NVIDIA H100 SXM datasheet (80 GB HBM3, 3.35 TB/s, 1,979 TFLOP/s BF16 with "
        "sparsity); DGX H100 user guide",
    ),
    "a100-80gb": GPU(
        name="a100-80gb",
        memory_bytes=81920 * MiB,
        bf16_tflops=312.0,
        fp8_tflops=None,
        hbm_gbps=2039.0,
        nvlink_gbps=300.0,
        ib_gbps=25.0,
        node="DGX A100 (8x A100 SXM 80GB, ConnectX-6 HDR200 x 8 per node)",
        source="NVIDIA A100 datasheet (80 GB HBM2e, 2,039 GB/s, 312 TFLOP/s BF16 dense); "
        "DGX A100 user guide",
    ),
}

COMM_EFFICIENCY = 0.8
"""Fraction of the nominal link bandwidth a large NCCL collective reaches (assumed; NCCL bus
bandwidth on NVLink and InfiniBand is typically 75-90% of line rate for large messages)."""

HBM_EFFICIENCY = 0.7
"""Fraction of the HBM bandwidth the memory-bound optimizer step reaches (assumed)."""


class UnknownGPUError(ValueError):
    pass


def get_gpu(name: str) -> GPU:
    """The table row for ``name`` (case-insensitive), or an error listing the known types."""
    key = name.lower()
    if key not in GPUS:
        raise UnknownGPUError(
            f"unknown GPU type {name!r}; known: {', '.join(sorted(GPUS))} "
            "(add a row to megatron_llmjp/planner/hardware.py for another GPU)"
        )
    return GPUS[key]
