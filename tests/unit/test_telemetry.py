"""GPU telemetry: off with one info line where NVML is missing (this machine), the cross-rank
summary, the per-rank TensorBoard series, and the gather over real gloo ranks. Reading an
actual GPU is covered by the ``gpu``-marked test (skipped without CUDA)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_llmjp.telemetry.gpu import (
    METRICS,
    GpuTelemetry,
    TelemetryLogger,
    gather_samples,
    summarize,
    write_per_rank,
)
from tests.helpers.spawn import spawn


def _nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


needs_no_nvml = pytest.mark.skipif(_nvml_available(), reason="NVML is available on this machine")


@needs_no_nvml
def test_without_nvml_telemetry_is_off_with_one_info_line(capsys):
    gpu = GpuTelemetry(0)
    out, err = capsys.readouterr()
    assert not gpu.enabled
    assert gpu.sample() == {}
    lines = out.splitlines()
    assert len(lines) == 1 and not err
    assert lines[0].startswith("[llmjp] GPU telemetry off: NVML is not available")
    assert "NVMLError_LibraryNotFound" in lines[0]
    gpu.close()


@needs_no_nvml
def test_quiet_ranks_print_nothing(capsys):
    assert not GpuTelemetry(3, verbose=False).enabled
    assert capsys.readouterr() == ("", "")


@needs_no_nvml
def test_logger_without_process_group_is_inactive(capsys, tmp_path):
    logger = TelemetryLogger.create(log_rank=0, tensorboard_dir=tmp_path)
    assert not logger.active
    assert logger.collect(step=10) == {}
    logger.close()
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert not list(tmp_path.iterdir()), "no TensorBoard file without samples"


def test_turned_off_in_config_probes_nothing(capsys):
    logger = TelemetryLogger.create(log_rank=0, enabled=False)
    assert not logger.active and logger.collect(1) == {}
    logger.close()
    assert capsys.readouterr().out == ""


SAMPLES = [
    {"util_pct": 98.0, "mem_used_gib": 70.5, "power_w": 640.0, "temp_c": 61.0,
     "sm_clock_mhz": 1980.0, "throttled": 0.0},
    {"util_pct": 41.0, "mem_used_gib": 71.25, "power_w": 380.0, "temp_c": 84.0,
     "sm_clock_mhz": 1410.0, "throttled": 1.0, "clock_event_reasons": 0x20},
    {},  # a rank without NVML
]  # fmt: skip


def test_summary_points_at_the_bad_rank():
    s = summarize(SAMPLES)
    assert s["gpu_util_pct_min"] == 41.0
    assert s["gpu_util_pct_mean"] == pytest.approx(69.5)
    assert s["gpu_mem_used_gib_max"] == 71.25
    assert s["gpu_power_w_mean"] == pytest.approx(510.0)
    assert s["gpu_temp_c_max"] == 84.0
    assert s["gpu_sm_clock_mhz_min"] == 1410.0
    assert s["gpu_throttled_ranks"] == 1.0
    assert summarize([{}, {}]) == {}
    assert all(isinstance(v, float) and math.isfinite(v) for v in s.values())


def test_per_rank_series_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path), filename_suffix=".gpu")
    write_per_rank(writer, 10, SAMPLES)
    write_per_rank(writer, 20, SAMPLES)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert "gpu/rank0000/util_pct" in tags and "gpu/rank0001/temp_c" in tags
    assert not any(t.startswith("gpu/rank0002/") for t in tags)
    assert not any(t.endswith("clock_event_reasons") for t in tags)
    events = acc.Scalars("gpu/rank0001/util_pct")
    assert [(e.step, e.value) for e in events] == [(10, 41.0), (20, 41.0)]
    assert set(SAMPLES[0]) <= set(METRICS)


def _gather(dst: int):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        return gather_samples({"util_pct": float(10 * rank), "temp_c": 50.0 + rank}, dst)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_gather_over_ranks():
    results = spawn(_gather, 3, 2, timeout=60)
    assert results[0] is None and results[1] is None
    assert results[2] == [
        {"util_pct": 0.0, "temp_c": 50.0},
        {"util_pct": 10.0, "temp_c": 51.0},
        {"util_pct": 20.0, "temp_c": 52.0},
    ]


def _logger_on_cpu_ranks(tmp):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        logger = TelemetryLogger.create(log_rank=1, tensorboard_dir=tmp)
        out = [logger.collect(step) for step in (1, 2)]
        logger.close()
        dist.barrier()  # every rank got here: collect() issued no unmatched collective
        return logger.active, out
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@needs_no_nvml
def test_no_collective_when_no_rank_has_nvml(tmp_path):
    assert spawn(_logger_on_cpu_ranks, 2, str(tmp_path), timeout=60) == [
        (False, [{}, {}]),
        (False, [{}, {}]),
    ]


@pytest.mark.gpu
def test_reads_this_ranks_gpu():
    torch.cuda.set_device(0)
    gpu = GpuTelemetry(0)
    assert gpu.enabled
    sample = gpu.sample()
    assert {"util_pct", "mem_used_gib", "power_w", "temp_c", "sm_clock_mhz"} <= set(sample)
    assert 0.0 <= sample["util_pct"] <= 100.0
    assert sample["power_w"] > 0 and 0 < sample["temp_c"] < 120
    gpu.close()
