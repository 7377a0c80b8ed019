"""Peak dense tensor-core throughput per GPU and precision, for MFU.

Figures are NVIDIA's datasheet numbers without 2:4 sparsity (the datasheets print the sparse
figure, twice these): H100 SXM and H200 SXM share the same compute, 989.4 TFLOP/s BF16 and
1,978.9 TFLOP/s FP8. A GPU or precision missing here gets no MFU (the trainer still logs the
achieved TFLOP/s).
"""

from __future__ import annotations

from megatron_llmjp.config.schema import PrecisionConfig
from megatron_llmjp.planner.hardware import GPU, GPUS


def _peaks(gpu: GPU) -> dict[str, float]:
    return {"bf16": gpu.bf16_tflops, **({"fp8": gpu.fp8_tflops} if gpu.fp8_tflops else {})}


# The planner's GPU table is the source for the boards it plans for; the PCIe and NVL H100
# boards are not planner targets (no node figures), so only their peaks live here.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": _peaks(GPUS["h200"]),
    "H100 SXM": _peaks(GPUS["h100"]),
    "H100 NVL": {"bf16": 835.5, "fp8": 1670.5},
    "H100 PCIe": {"bf16": 756.5, "fp8": 1513.0},
    "A100": _peaks(GPUS["a100-80gb"]),  # the 40 GB board has the same compute
}


def gpu_kind(device_name: str) -> str | None:
    """The ``PEAK_TFLOPS`` row of a ``torch.cuda.get_device_name()`` string, e.g.
    ``NVIDIA H100 80GB HBM3`` -> ``H100 SXM``."""
    name = device_name.upper()
    if "H200" in name:  # also GH200 with HBM3e
        return "H200"
    if "H100" in name:
        if "NVL" in name:
            return "H100 NVL"
        return "H100 PCIe" if "PCIE" in name else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def compute_precision(p: PrecisionConfig) -> str | None:
    """The tensor-core precision the GEMMs run in (None: no meaningful peak, e.g. FP32 or the
    emulated FP8 backend, which computes in FP32)."""
    if p.fp8 is not None:
        return "fp8" if p.fp8_backend == "te" else None
    return "bf16" if p.dtype == "bf16" else None


def peak_tflops(device_name: str, precision: str | None) -> float | None:
    """Peak dense TFLOP/s of this GPU in ``precision``, or None when unknown."""
    kind = gpu_kind(device_name)
    if kind is None or precision is None:
        return None
    return PEAK_TFLOPS[kind].get(precision)
