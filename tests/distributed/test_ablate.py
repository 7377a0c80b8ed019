"""``llmjp-ablate`` end to end on CPU: the shipped tiny ablation (BF16 against emulated FP8,
2 gloo processes, TP2) makes one initial checkpoint, runs both variants from it under torchrun,
writes the report, and a second invocation reruns nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ABLATION = "configs/ablations/tiny_cpu_bf16_vs_fp8.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def ablate(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_llmjp.cli.ablate", ABLATION, "--output-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=500
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_ablation_bf16_vs_emulated_fp8(tmp_path):
    out = tmp_path / "ablation"
    first = ablate(out, "--set", "train.iters=6")
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    names = ("bf16", "fp8-delayed-hybrid")
    init = out / "init" / "checkpoints"
    assert (init / "iter_0000000" / "manifest.json").is_file()

    metrics = {}
    for name in names:
        run = out / "variants" / name
        log = (run / "train.log").read_text()
        # Both started from the shared initial weights, not from their own initialisation.
        loaded = f"loaded {init / 'iter_0000000'} (checkpoint.load, weights only) at iteration 0"
        assert loaded in log, log[-2000:]
        assert json.loads((run / "status.json").read_text())["state"] == "done"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, 7))
        metrics[name] = records
    cfg = (out / "variants" / "fp8-delayed-hybrid" / "config.yaml").read_text()
    assert "fp8: delayed" in cfg and "fp8_backend: emulated" in cfg
    # Same weights and the same first batch: the first losses differ only by FP8 rounding.
    first_losses = [metrics[n][0]["loss"] for n in names]
    assert abs(first_losses[0] - first_losses[1]) < 0.05, first_losses
    assert first_losses[0] != first_losses[1]  # FP8 emulation is really on

    report = out / "report"
    md = (report / "report.md").read_text()
    assert "| bf16 (baseline) | done | 6 |" in md
    assert "| fp8-delayed-hybrid | done | 6 |" in md
    for png in ("loss.png", "loss_delta.png", "grad_norm.png"):
        assert (report / png).read_bytes().startswith(PNG_MAGIC), png
    summary = json.loads((report / "summary.json").read_text())
    fp8 = summary["variants"]["fp8-delayed-hybrid"]
    deltas = [b["loss"] for b in metrics["fp8-delayed-hybrid"]]
    base = [b["loss"] for b in metrics["bf16"]]
    assert fp8["final_delta"] == pytest.approx(deltas[-1] - base[-1])
    assert fp8["mean_delta"] == pytest.approx(
        sum(d - b for d, b in zip(deltas, base, strict=True)) / 6
    )
    assert fp8["diverged"] in (True, False) and fp8["tokens_per_sec"] > 0

    # Resumable: the second invocation skips both variants and reuses the init checkpoint.
    stamps = {n: (out / "variants" / n / "metrics.jsonl").stat().st_mtime_ns for n in names}
    second = ablate(out, "--set", "train.iters=6")
    assert second.returncode == 0, second.stdout + second.stderr[-3000:]
    assert "init: checkpoint" in second.stdout and "reused" in second.stdout
    for name in names:
        assert f"{name}: done, skipped" in second.stdout
        assert (out / "variants" / name / "metrics.jsonl").stat().st_mtime_ns == stamps[name]
    assert "torch.distributed.run" not in second.stdout
