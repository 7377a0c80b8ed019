"""Faults seen from outside, on the real ``llmjp-train`` processes: SIGKILL during a save,
SIGTERM from the scheduler, a crashed rank and a hung rank.

Each rank is its own ``python -m megatron_llmjp.cli.train`` process (tests/helpers/procs.py),
so exit codes, signals and logs are exactly what a batch scheduler would see.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from megatron_llmjp.checkpoint.store import read_latest
from tests.helpers.procs import Ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BASE = [
    "data.synthetic=true",
    "model.vocab_size=1000",
    "train.seq_length=32",
    "train.global_batch_size=4",
    "logging.tensorboard=false",
    "schedule.warmup_iters=0",
]


def args(tmp_path: Path, *overrides: str) -> list[str]:
    out = ["--output-dir", str(tmp_path / "out")]
    for o in (*BASE, *overrides):
        out += ["--set", o]
    return out


def metrics(tmp_path: Path) -> list[dict]:
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    common = ("train.iters=6", f"checkpoint.dir={ckpt}", "checkpoint.interval=2")
    # The save of iteration 4 is fully written but not yet published when the kill lands.
    ranks = Ranks(1, args(tmp_path, *common), tmp_path, {"LLMJP_FAULT": "stall_save@4"})
    try:
        ranks.wait_for(0, "injected stall before publishing iteration 4", 120)
        ranks.procs[0].send_signal(signal.SIGKILL)
        assert ranks.wait(30) == [-signal.SIGKILL]
    finally:
        ranks.kill()
    assert read_latest(ckpt) == 2
    assert (ckpt / "iter_0000004.tmp").is_dir() and not (ckpt / "iter_0000004").exists()
    first = {r["step"]: r["loss"] for r in metrics(tmp_path)}
    assert sorted(first) == [1, 2, 3, 4]

    resumed = Ranks(1, args(tmp_path, *common), tmp_path)
    try:
        assert resumed.wait(180) == [0], resumed.all_logs()
    finally:
        resumed.kill()
    log = resumed.log(0)
    assert "removing unpublished save" in log and "iter_0000004.tmp" in log
    assert "at iteration 2" in log
    assert read_latest(ckpt) == 6 and not (ckpt / "iter_0000004.tmp").exists()
    records = metrics(tmp_path)  # the resumed run appends to the same metrics file
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6]
    again = {r["step"]: r["loss"] for r in records[4:]}
    # Steps 3 and 4 are recomputed from the iteration-2 checkpoint: bitwise the same losses.
    assert again[3] == first[3] and again[4] == first[4]


def test_sigterm_to_one_rank_saves_on_all_ranks_and_exits_zero(tmp_path):
    ckpt = tmp_path / "ckpt"
    ranks = Ranks(2, args(tmp_path, "train.iters=100000", f"checkpoint.dir={ckpt}"), tmp_path)
    try:
        ranks.wait_for(1, "step=3 ", 120)
        ranks.procs[0].send_signal(signal.SIGTERM)  # rank 1 learns of it in the step's vote
        codes = ranks.wait(60)
    finally:
        ranks.kill()
    assert codes == [0, 0], ranks.all_logs()
    last = metrics(tmp_path)[-1]["step"]
    assert read_latest(ckpt) == last
    manifest = json.loads((ckpt / f"iter_{last:07d}" / "manifest.json").read_text())
    assert manifest["iteration"] == last and manifest["parallel"]["dp"] == 2
    assert f"stopped after step {last} on a signal on another rank" in ranks.log(1)


def test_crashed_rank_makes_the_others_exit_with_a_clear_message(tmp_path):
    ranks = Ranks(2, args(tmp_path, "train.iters=20"), tmp_path, {"LLMJP_FAULT": "crash@3:1"})
    try:
        codes = ranks.wait(90)
    finally:
        ranks.kill()
    assert codes == [4, 17], ranks.all_logs()
    assert "rank 0: a collective failed during step 3" in ranks.log(0)
    assert "another rank has probably crashed or hung" in ranks.log(0)


def test_hung_rank_times_out_instead_of_hanging(tmp_path):
    overrides = ("train.iters=20", "parallel.timeout_minutes=0.2")
    ranks = Ranks(2, args(tmp_path, *overrides), tmp_path, {"LLMJP_FAULT": "hang@3:1"})
    try:
        ranks.wait_for(0, "llmjp-train: error", 90)  # 12 s timeout plus start-up
        code = ranks.procs[0].wait(30)
    finally:
        ranks.kill()
    assert code == 4
    assert "a collective failed during step 3 (parallel.timeout_minutes=0.2)" in ranks.log(0)
