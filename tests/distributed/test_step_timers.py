"""Step timers: every logged step records its data, forward-backward and optimizer time, and the
checkpoint time since the previous record, in ``metrics.jsonl`` and TensorBoard."""

from __future__ import annotations

import json

import pytest

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
TIMERS = ("time_data", "time_forward_backward", "time_optimizer", "time_checkpoint")


def _train(overrides: list[str]) -> None:
    from megatron_llmjp.training.trainer import run

    run(build_config(overrides=overrides))


def test_step_timers_in_metrics_and_tensorboard(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "model.name=llm-jp-4-tiny-dense",
        "data.synthetic=true",
        "train.iters=3",
        "train.seq_length=32",
        "train.global_batch_size=2",
        "logging.gpu_telemetry=false",
        f"checkpoint.dir={tmp_path / 'ckpt'}",
        "checkpoint.interval=2",
        f"output_dir={out}",
    ]
    spawn(_train, 1, overrides)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert all(r[k] >= 0.0 for k in TIMERS), r
        phases = r["time_data"] + r["time_forward_backward"] + r["time_optimizer"]
        assert phases <= r["step_time"] + 1e-6, r
        assert r["time_forward_backward"] > 0.0
    # time_checkpoint: saves since the previous record. The save of step 2 (interval) follows
    # step 2's record, so it shows in step 3's.
    assert [r["time_checkpoint"] > 0.0 for r in records] == [False, False, True]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in TIMERS} <= tags, tags
