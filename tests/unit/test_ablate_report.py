"""The ablation report (``megatron_llmjp/ablate/report.py``) from synthetic ``metrics.jsonl``
files: deltas, the divergence rule, the table, ``summary.json`` and the PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_llmjp.ablate.report import (
    DivergenceRule,
    VariantRun,
    compute_stats,
    read_metrics,
    smooth,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = range(1, 21)


def base_loss(step: int) -> float:
    return 10.0 - 0.2 * step


def records(loss, **extra) -> list[dict]:
    return [
        {
            "step": s,
            "loss": loss(s),
            "grad_norm": 1.0 + 1.0 / s,
            "lr": 1e-3,
            "step_time": 0.5,
            "tokens_per_sec": 1000.0 * s if s == 1 else 2000.0 + s,
            **extra,
        }
        for s in STEPS
    ]


def write_metrics(path: Path, recs: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def runs() -> list[VariantRun]:
    nan_at_15 = records(lambda s: math.nan if s >= 15 else base_loss(s))
    return [
        VariantRun("bf16", records(base_loss)),
        VariantRun("close", records(lambda s: base_loss(s) + 0.01, tflops_per_gpu=400.0, mfu=0.4)),
        VariantRun("drift", records(lambda s: base_loss(s) + 0.01 * s)),  # delta = 0.01 s
        VariantRun("nan", nan_at_15, state="stopped"),
    ]


def test_read_metrics_dedupes_resumed_steps_and_skips_a_torn_line(tmp_path):
    first = records(base_loss)[:5]
    resumed = [{**r, "loss": 1.0} for r in records(base_loss)[3:8]]  # steps 4-8 again
    path = write_metrics(tmp_path / "metrics.jsonl", first + resumed, tail='{"step": 9, "lo')
    got = read_metrics(path)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in got[3:]] == [1.0] * 5  # the later record of a step wins
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_deltas_and_divergence_absolute():
    rule = DivergenceRule(threshold=0.1, mode="absolute", smoothing=1)
    stats = {s.name: s for s in compute_stats(runs(), "bf16", rule)}
    base = stats["bf16"]
    assert base.final_delta is None and base.diverged is False
    assert base.final_loss == pytest.approx(base_loss(20))
    close = stats["close"]
    assert close.final_delta == pytest.approx(0.01)
    assert close.mean_delta == pytest.approx(0.01)
    assert close.max_abs_delta == pytest.approx(0.01)
    assert close.diverged is False and close.diverged_at is None
    drift = stats["drift"]
    assert drift.final_delta == pytest.approx(0.2)
    assert drift.mean_delta == pytest.approx(0.01 * 10.5)  # mean of 0.01 * (1..20)
    assert drift.max_abs_delta == pytest.approx(0.2)
    assert drift.diverged and drift.diverged_at == 11  # first step with 0.01 s > 0.1
    nan = stats["nan"]
    assert nan.diverged and nan.diverged_at == 15 and math.isnan(nan.final_loss)
    # Throughput: median over the steps after the first (the warm-up step is left out).
    assert close.tokens_per_sec == pytest.approx(2000.0 + 11)  # median of steps 2..20
    assert close.tflops_per_gpu == 400.0 and close.mfu == 0.4
    assert drift.tflops_per_gpu is None and drift.mfu is None


def test_smoothing_and_relative_mode():
    # A one-step spike of +1.0 at step 10: raw it exceeds 0.3, smoothed over 5 steps (0.2) not.
    spike = [
        VariantRun("bf16", records(base_loss)),
        VariantRun("spike", records(lambda s: base_loss(s) + (1.0 if s == 10 else 0.0))),
    ]
    raw = compute_stats(spike, "bf16", DivergenceRule(0.3, "absolute", smoothing=1))[1]
    smoothed = compute_stats(spike, "bf16", DivergenceRule(0.3, "absolute", smoothing=5))[1]
    assert raw.diverged and raw.diverged_at == 10
    assert not smoothed.diverged and smoothed.max_abs_delta == pytest.approx(0.2)
    # Relative: drift of 0.01 s against a baseline loss of 10 - 0.2 s; 5% first at step 24/...
    rel = compute_stats(runs()[:3], "bf16", DivergenceRule(0.02, "relative", smoothing=1))
    drift = rel[2]
    first = next(s for s in STEPS if 0.01 * s / base_loss(s) > 0.02)
    assert drift.diverged_at == first
    assert drift.max_abs_delta == pytest.approx(0.2 / base_loss(20))


def test_steps_logged_by_only_one_run_are_not_compared():
    base = records(base_loss)
    sparse = [r for r in records(lambda s: base_loss(s) + 0.05) if r["step"] % 5 == 0]
    stats = compute_stats([VariantRun("b", base), VariantRun("v", sparse)], "b", DivergenceRule())
    assert stats[1].steps == 4 and stats[1].final_delta == pytest.approx(0.05)
    # An unfinished variant is compared up to where it got.
    short = compute_stats([VariantRun("b", base), VariantRun("v", base[:7])], "b", DivergenceRule())
    assert short[1].last_step == 7 and short[1].final_delta == 0.0


def test_skipped_steps_are_counted():
    recs = records(base_loss)
    recs[3]["skipped"] = 1
    recs[7]["skipped"] = 1
    stats = compute_stats(
        [VariantRun("b", records(base_loss)), VariantRun("v", recs)], "b", DivergenceRule()
    )
    assert stats[1].skipped_steps == 2 and stats[0].skipped_steps == 0


def test_write_report_files(tmp_path):
    rule = DivergenceRule(threshold=0.1, mode="absolute", smoothing=1)
    out = tmp_path / "report"
    write_report(out, runs(), "bf16", rule, title="unit", notes=["a note"])
    for name in ("loss.png", "loss_delta.png", "grad_norm.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    assert sorted(p.name for p in out.iterdir()) == [
        "grad_norm.png",
        "loss.png",
        "loss_delta.png",
        "report.md",
        "summary.json",
    ]  # no temporary files left
    md = (out / "report.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| variant |"))
    for col in (
        "final loss",
        "Δ final",
        "mean Δ",
        "max abs Δ",
        "diverged",
        "tokens/s",
        "TFLOP/s/GPU",
        "MFU",
        "skipped steps",
    ):
        assert col in header
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("| ")}
    assert row["bf16 (baseline)"].startswith(
        "| bf16 (baseline) | done | 20 | 6.0000 | - | - | - | no |"
    )
    assert "| +0.0100 | +0.0100 | 0.0100 | no | 2,011 | 400.0 | 40.0% | 0 |" in row["close"]
    assert "| +0.2000 | +0.1050 | 0.2000 | **yes** (step 11) |" in row["drift"]
    assert "n/a | n/a" in row["drift"]  # no tflops_per_gpu / mfu in its records
    assert "| stopped |" in row["nan"] and "**yes** (step 15)" in row["nan"]
    assert "a note" in md and "![loss](loss.png)" in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "bf16" and summary["divergence"]["threshold"] == 0.1
    v = summary["variants"]
    assert v["drift"]["diverged"] is True and v["drift"]["diverged_at"] == 11
    assert v["close"]["final_delta"] == pytest.approx(0.01)
    assert v["nan"]["final_loss"] is None  # NaN is written as null (valid JSON)


def test_report_with_missing_runs(tmp_path):
    """A pending variant (no metrics yet) and even a baseline without metrics still report."""
    rule = DivergenceRule()
    out = tmp_path / "r"
    stats = write_report(
        out, [VariantRun("b", []), VariantRun("v", [], state="submitted")], "b", rule
    )
    assert stats[1].final_delta is None and stats[1].diverged is None
    md = (out / "report.md").read_text()
    assert "| v | pending | 0 | n/a |" in md
    assert (out / "loss.png").read_bytes().startswith(PNG_MAGIC)
