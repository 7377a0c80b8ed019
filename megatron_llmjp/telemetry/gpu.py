"""Per-rank GPU telemetry through NVML (nvidia-ml-py), logged at the logging interval.

A slow rank makes every rank slow: the step time says something is wrong, the per-rank GPU
utilisation, power, temperature and clock-throttle reasons say where. ``GpuTelemetry`` reads
this rank's GPU; ``TelemetryLogger`` gathers every rank's sample on the logging rank, writes
one TensorBoard series per rank (``gpu/rank0003/util_pct``) and returns a few cross-rank
summaries for the step's metrics record. Without NVML (CPU machines, no driver) telemetry is
off after one info line, and no collective is issued.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# Clock-event reasons that mean the GPU is slowed by something other than idling or a
# deliberate clock setting (NVML's nvmlClocksEventReason* bits).
_SLOWDOWN_BITS = {
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}

METRICS = (
    "util_pct",
    "mem_util_pct",
    "mem_used_gib",
    "power_w",
    "temp_c",
    "sm_clock_mhz",
    "throttled",
    "clock_event_reasons",
)
"""Keys of a sample (a key is missing when the GPU does not support that query)."""


MEMORY_FIELDS = ("gpu_mem_max_allocated_gib", "gpu_mem_max_reserved_gib")
"""Keys :func:`cuda_memory_fields` adds to a step's record: this rank's peak memory held by
tensors (``torch.cuda.max_memory_allocated``) and reserved by torch's caching allocator
(``torch.cuda.max_memory_reserved``) since the process started, in GiB (2**30 bytes)."""


def memory_fields(max_allocated_bytes: int, max_reserved_bytes: int) -> dict[str, float]:
    """The record fields for peak CUDA memory given in bytes, converted to GiB (2**30 bytes)
    under the names of :data:`MEMORY_FIELDS`."""
    return {
        "gpu_mem_max_allocated_gib": max_allocated_bytes / 2**30,
        "gpu_mem_max_reserved_gib": max_reserved_bytes / 2**30,
    }


def cuda_memory_fields() -> dict[str, float]:
    """Peak CUDA memory of this rank's current device for the metrics record (see
    :data:`MEMORY_FIELDS`); ``{}`` when this process has not initialised CUDA (a CPU run, which
    this asks nothing of CUDA), so CPU records carry no such fields. Local to the rank: no
    collective."""
    import torch

    if not torch.cuda.is_initialized():  # reads a flag; initialises nothing
        return {}
    return memory_fields(torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(f"[llmjp] {text}", flush=True)


class GpuTelemetry:
    """NVML reader for the GPU this rank uses; ``enabled`` is False without NVML."""

    def __init__(self, device_index: int | None = None, *, verbose: bool = True):
        self.enabled = False
        self._nvml = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded
            _say(verbose, f"GPU telemetry off: NVML is not available ({_reason(e)})")
            return
        try:
            self._handle = _handle_for(pynvml, device_index)
        except Exception as e:
            _say(verbose, f"GPU telemetry off: no NVML device for this rank ({_reason(e)})")
            pynvml.nvmlShutdown()
            return
        self._nvml = pynvml
        self.enabled = True

    @classmethod
    def disabled(cls) -> GpuTelemetry:
        """A reader that is off without probing NVML (telemetry turned off in the config)."""
        self = cls.__new__(cls)
        self.enabled, self._nvml, self._handle = False, None, None
        return self

    def sample(self) -> dict[str, float]:
        """One reading of this rank's GPU; ``{}`` when disabled."""
        if not self.enabled:
            return {}
        nv, h = self._nvml, self._handle
        out: dict[str, float] = {}

        def read(fn):
            try:
                return fn()
            except nv.NVMLError:  # e.g. NotSupported on some boards: leave the key out
                return None

        util = read(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            out["util_pct"] = float(util.gpu)
            out["mem_util_pct"] = float(util.memory)
        mem = read(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            out["mem_used_gib"] = mem.used / 2**30
        power = read(lambda: nv.nvmlDeviceGetPowerUsage(h))
        if power is not None:
            out["power_w"] = power / 1000.0
        temp = read(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))
        if temp is not None:
            out["temp_c"] = float(temp)
        clock = read(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        if clock is not None:
            out["sm_clock_mhz"] = float(clock)
        reasons = read(lambda: _clock_event_reasons(nv, h))
        if reasons is not None:
            out["clock_event_reasons"] = float(reasons)
            out["throttled"] = float(any(reasons & bit for bit in _SLOWDOWN_BITS))
        return out

    def close(self) -> None:
        if self.enabled:
            self._nvml.nvmlShutdown()
            self.enabled = False


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _clock_event_reasons(nv, handle) -> int:
    fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if fn is None:  # nvidia-ml-py before the 12.x rename
        fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(fn(handle))


def _handle_for(nv, device_index: int | None):
    """The NVML handle of the GPU torch uses on this rank.

    NVML numbers GPUs regardless of CUDA_VISIBLE_DEVICES, so the CUDA device is matched by UUID;
    without torch.cuda the index is mapped through CUDA_VISIBLE_DEVICES when it lists numbers.
    """
    try:
        import torch

        if torch.cuda.is_available():
            index = torch.cuda.current_device() if device_index is None else device_index
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except (ImportError, AttributeError, RuntimeError):
        pass
    index = 0 if device_index is None else device_index
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v for v in visible.split(",") if v.strip()]
    if ids and all(v.strip().isdigit() for v in ids) and index < len(ids):
        index = int(ids[index])
    return nv.nvmlDeviceGetHandleByIndex(index)


def summarize(samples: list[dict[str, float]]) -> dict[str, float]:
    """Cross-rank summaries for the metrics record: the numbers that show one bad rank."""
    out: dict[str, float] = {}

    def values(key: str) -> list[float]:
        return [s[key] for s in samples if key in s and math.isfinite(s[key])]

    util = values("util_pct")
    if util:
        out["gpu_util_pct_min"] = min(util)
        out["gpu_util_pct_mean"] = sum(util) / len(util)
    for key, name, fn in (
        ("mem_used_gib", "gpu_mem_used_gib_max", max),
        ("power_w", "gpu_power_w_mean", None),
        ("temp_c", "gpu_temp_c_max", max),
        ("sm_clock_mhz", "gpu_sm_clock_mhz_min", min),
    ):
        vals = values(key)
        if vals:
            out[name] = fn(vals) if fn else sum(vals) / len(vals)
    throttled = values("throttled")
    if throttled:
        out["gpu_throttled_ranks"] = float(sum(1 for t in throttled if t > 0))
    return out


def write_per_rank(writer, step: int, samples: list[dict[str, float]]) -> None:
    """One TensorBoard series per rank and metric, ``gpu/rank0003/util_pct``."""
    for rank, sample in enumerate(samples):
        for key, value in sample.items():
            if key != "clock_event_reasons" and math.isfinite(value):
                writer.add_scalar(f"gpu/rank{rank:04d}/{key}", value, step)
    writer.flush()


def gather_samples(sample: dict[str, float], dst: int) -> list[dict[str, float]] | None:
    """Every rank's sample on rank ``dst`` (in rank order), None elsewhere; a collective."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [sample]
    rank = dist.get_rank()
    out: list | None = [None] * dist.get_world_size() if rank == dst else None
    dist.gather_object(sample, out, dst=dst)
    return out


def _any_rank(flag: bool) -> bool:
    """True if ``flag`` is set on any rank (one small all-reduce; plain value without groups)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class TelemetryLogger:
    """What the trainer holds: sample on every rank, gather and write on the logging rank."""

    def __init__(self, gpu: GpuTelemetry, log_rank: int, rank: int, active: bool, writer=None):
        self.gpu = gpu
        self.log_rank = log_rank
        self.rank = rank
        self.active = active
        """Some rank has NVML: every rank joins the gather (ranks without it send ``{}``)."""
        self._writer = writer

    @classmethod
    def create(
        cls,
        log_rank: int,
        tensorboard_dir: str | Path | None = None,
        enabled: bool = True,
        device_index: int | None = None,
    ) -> TelemetryLogger:
        """Call on every rank after the process group exists (one all-reduce decides whether
        any rank has NVML, so ranks never disagree about joining the gather). The GPU read is
        the current CUDA device unless ``device_index`` names another."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        if not enabled:
            return cls(GpuTelemetry.disabled(), log_rank, rank, False)
        gpu = GpuTelemetry(device_index, verbose=rank == log_rank)
        active = _any_rank(gpu.enabled)
        writer = None
        if active and rank == log_rank and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(tensorboard_dir), filename_suffix=".gpu")
        return cls(gpu, log_rank, rank, active, writer)

    def collect(self, step: int) -> dict[str, float]:
        """Call on every rank at a logging step. Returns the cross-rank summary on the logging
        rank (merge it into the metrics record) and ``{}`` elsewhere or when inactive."""
        if not self.active:
            return {}
        samples = gather_samples(self.gpu.sample(), self.log_rank)
        if samples is None:
            return {}
        if self._writer is not None:
            write_per_rank(self._writer, step, samples)
        return summarize(samples)

    def close(self) -> None:
        self.gpu.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
