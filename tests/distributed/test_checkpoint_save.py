"""Saves that reuse megatron-core's save plan write what a fresh save writes.

A run saving at every step reuses its save strategy (plan, shard distribution, validation)
from the second save on; megatron-core itself flags when its cached plan was verified and
used (``TorchDistSaveShardedStrategy.validated_cache_reuse``). Its last checkpoint must hold
bitwise the tensors of a run that saves the same state once, with a fresh strategy; both runs
are the same deterministic training (the resume tests rely on that too). Both forms of the
distributed optimizer's state (``checkpoint.optimizer_sharding``) keep their structure from
save to save.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_llmjp.checkpoint.store import read_latest
from megatron_llmjp.checkpoint.tensors import TensorReader
from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BASE = [
    "model.name=llm-jp-4-tiny-dense",
    "data.synthetic=true",
    "model.vocab_size=1000",
    "train.seq_length=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.iters=4",
    "logging.tensorboard=false",
]


def _train(overrides: list[str]) -> tuple[list[tuple[bool, bool]], bool]:
    """Train; per save (validated the sharding?, the first save's strategy?), and whether
    megatron-core verified its cached plan by the end."""
    from megatron_llmjp.checkpoint import state
    from megatron_llmjp.training.trainer import run

    seen = []
    strategy_for = state.CheckpointSaver._strategy_for

    def spy(self, sd):
        strategy, validate = strategy_for(self, sd)
        seen.append((strategy, validate))
        return strategy, validate

    state.CheckpointSaver._strategy_for = spy
    result = run(build_config(overrides=BASE + overrides))
    assert result.progress.iteration == 4
    # megatron-core sets validated_cache_reuse once a save's plan matched the cached one; a
    # later save then skips planning.
    first = seen[0][0]
    return [(v, s is first) for s, v in seen], seen[-1][0].base_strategy.validated_cache_reuse


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    reader = TensorReader(directory)
    return {k: reader.read(k) for k in reader.names()}


@pytest.mark.parametrize(
    "mode,form",
    [("sync", "dp_reshardable"), ("async", "dp_reshardable"), ("sync", "fully_reshardable")],
)
def test_a_save_with_the_reused_plan_writes_what_a_fresh_save_writes(mode, form, tmp_path):
    sharding = f"checkpoint.optimizer_sharding={form}"
    every = [
        f"checkpoint.dir={tmp_path / 'every'}",
        "checkpoint.interval=1",
        f"checkpoint.async_save={mode == 'async'}",
        f"output_dir={tmp_path / 'a'}",
        sharding,
    ]
    saves, verified = spawn(_train, 2, every)[-1]
    once = [f"checkpoint.dir={tmp_path / 'once'}", f"output_dir={tmp_path / 'b'}", sharding]
    fresh, _ = spawn(_train, 2, once)[-1]
    # One strategy and one validation (the first save); megatron-core verified its cached
    # plan (the same central plan twice) and skipped planning in the later saves.
    assert saves == [(True, True), (False, True), (False, True), (False, True)]
    assert verified
    assert fresh == [(True, True)]
    assert read_latest(tmp_path / "every") == read_latest(tmp_path / "once") == 4
    got = _tensors(tmp_path / "every" / "iter_0000004")
    want = _tensors(tmp_path / "once" / "iter_0000004")
    assert sorted(got) == sorted(want) and any("exp_avg" in k for k in want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    # The earlier saves were published too (keep_last keeps them all by default).
    assert sorted(p.name for p in (tmp_path / "every").glob("iter_*")) == [
        f"iter_{i:07d}" for i in (1, 2, 3, 4)
    ]
