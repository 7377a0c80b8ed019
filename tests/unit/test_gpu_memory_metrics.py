"""Peak CUDA memory in the step records: the field names and GiB conversion, what the metrics
writer makes of them (``metrics.jsonl`` and TensorBoard), and their absence on CPU (also the
manual garbage collector in a real training loop)."""

from __future__ import annotations

import gc
import json

import pytest

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.telemetry.gpu import MEMORY_FIELDS, cuda_memory_fields, memory_fields
from megatron_llmjp.training.metrics import MetricsWriter
from tests.helpers.spawn import spawn

GIB = 2**30


def test_memory_fields_convert_bytes_to_gib():
    got = memory_fields(3 * GIB + GIB // 2, 80 * GIB)
    assert got == {"gpu_mem_max_allocated_gib": 3.5, "gpu_mem_max_reserved_gib": 80.0}
    assert tuple(got) == MEMORY_FIELDS


def test_no_memory_fields_without_cuda():
    import torch

    assert not torch.cuda.is_initialized()  # this process; the CUDA read needs a GPU
    assert cuda_memory_fields() == {}


def test_writer_records_memory_fields(tmp_path):
    """Fed values, the writer puts them in metrics.jsonl and under train/ in TensorBoard."""
    writer = MetricsWriter(tmp_path, tensorboard=True)
    for step, (alloc, reserved) in enumerate([(GIB, 2 * GIB), (3 * GIB, 4 * GIB)], start=1):
        writer.write({"step": step, "loss": 1.0, **memory_fields(alloc, reserved)})
    writer.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["gpu_mem_max_allocated_gib"] for r in records] == [1.0, 3.0]
    assert [r["gpu_mem_max_reserved_gib"] for r in records] == [2.0, 4.0]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for key, values in (
        ("gpu_mem_max_allocated_gib", [1.0, 3.0]),
        ("gpu_mem_max_reserved_gib", [2.0, 4.0]),
    ):
        events = acc.Scalars(f"train/{key}")
        assert [(e.step, e.value) for e in events] == list(zip([1, 2], values, strict=True))


def _train_counting_gc(overrides: list[str]) -> list[int]:
    """Train, recording the generation of every collection made while automatic GC is off."""
    from megatron_llmjp.training.trainer import run

    manual: list[int] = []

    def hook(phase: str, info: dict) -> None:
        if phase == "start" and not gc.isenabled():
            manual.append(info["generation"])

    gc.callbacks.append(hook)
    try:
        run(build_config(overrides=overrides))
    finally:
        gc.callbacks.remove(hook)
    return manual


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_run_has_no_memory_fields_and_collects_by_hand(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "model.name=llm-jp-4-tiny-dense",
        "data.synthetic=true",
        "train.iters=4",
        "train.seq_length=32",
        "train.global_batch_size=2",
        "logging.gpu_telemetry=false",
        "performance.manual_gc_interval=2",
        f"output_dir={out}",
    ]
    [manual] = spawn(_train_counting_gc, 1, overrides)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert not set(MEMORY_FIELDS) & set(r), r  # absent, not zero
    # Automatic GC off for the run: full collections only, one at the start and one after
    # steps 2 and 4 (Python calls the hooks for explicit gc.collect() too).
    assert manual == [2, 2, 2], manual
