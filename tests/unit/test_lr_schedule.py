"""``learning_rate``: warmup, cosine/linear/constant, WSD shapes, and purity (resume overrides)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from megatron_llmjp.config.schema import OptimConfig, ScheduleConfig
from megatron_llmjp.training.lr_schedule import learning_rate

LR, MIN_LR = 1e-3, 1e-4
OPT = OptimConfig(lr=LR, min_lr=MIN_LR)
MID = (LR + MIN_LR) / 2


def lr_at(step: int, sched: ScheduleConfig, iters: int = 100, optim: OptimConfig = OPT) -> float:
    return learning_rate(step, optim, sched, iters)


def test_warmup_is_linear_and_reaches_lr_at_last_warmup_step():
    sched = ScheduleConfig(style="cosine", warmup_iters=10)
    values = [lr_at(s, sched) for s in range(10)]
    assert values[0] == pytest.approx(LR / 10)
    assert values[-1] == pytest.approx(LR)  # step warmup-1
    diffs = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert diffs == pytest.approx([LR / 10] * 9)  # constant increments: linear
    # the first step after warmup starts the decay at the peak
    assert lr_at(10, sched) == pytest.approx(LR)


def test_warmup_applies_to_every_style():
    for style in ("cosine", "linear", "constant", "wsd"):
        sched = ScheduleConfig(style=style, warmup_iters=4, wsd_decay_iters=10)
        assert lr_at(1, sched) == pytest.approx(LR * 2 / 4), style
        assert lr_at(3, sched) == pytest.approx(LR), style


@pytest.mark.parametrize("warmup", [0, 10])
def test_cosine_midpoint_and_end(warmup):
    sched = ScheduleConfig(style="cosine", warmup_iters=warmup, decay_iters=110)
    mid = warmup + (110 - warmup) // 2
    assert (110 - warmup) % 2 == 0
    assert lr_at(mid, sched) == pytest.approx(MID)
    assert lr_at(110, sched) == pytest.approx(MIN_LR)
    assert lr_at(500, sched) == pytest.approx(MIN_LR)  # stays at min_lr past the end
    # monotonically non-increasing after warmup
    values = [lr_at(s, sched) for s in range(warmup, 120)]
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:], strict=False))


def test_cosine_decay_end_defaults_to_train_iters():
    sched = ScheduleConfig(style="cosine")
    assert lr_at(50, sched, iters=100) == pytest.approx(MID)
    assert lr_at(100, sched, iters=100) == pytest.approx(MIN_LR)
    assert lr_at(25, sched, iters=100) == pytest.approx(
        MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi / 4))
    )


def test_linear_decay():
    sched = ScheduleConfig(style="linear", decay_iters=100)
    assert lr_at(0, sched) == pytest.approx(LR)
    assert lr_at(25, sched) == pytest.approx(MIN_LR + (LR - MIN_LR) * 0.75)
    assert lr_at(50, sched) == pytest.approx(MID)
    assert lr_at(100, sched) == pytest.approx(MIN_LR)


def test_constant():
    sched = ScheduleConfig(style="constant")
    assert {lr_at(s, sched) for s in (0, 1, 50, 99, 100, 1000)} == {LR}
    sched = ScheduleConfig(style="constant", warmup_iters=5)
    assert lr_at(0, sched) == pytest.approx(LR / 5)
    assert {lr_at(s, sched) for s in (4, 5, 50, 1000)} == {LR}


# WSD: warmup 10, stable until 80, decay 80..100 (20 iterations)
def wsd(shape: str) -> ScheduleConfig:
    return ScheduleConfig(
        style="wsd", warmup_iters=10, decay_iters=100, wsd_decay_iters=20, wsd_decay_style=shape
    )


@pytest.mark.parametrize(
    ("shape", "remaining_at_quarter"),
    [
        ("linear", 0.75),
        ("cosine", 0.5 * (1 + math.cos(math.pi / 4))),
        ("minus_sqrt", 1 - math.sqrt(0.25)),  # = 0.5: the midpoint
    ],
)
def test_wsd_stable_then_decay(shape, remaining_at_quarter):
    sched = wsd(shape)
    # stable phase: exactly lr from the end of warmup up to the decay start
    assert {lr_at(s, sched) for s in range(9, 81)} == {LR}
    # decay phase
    assert lr_at(85, sched) == pytest.approx(MIN_LR + (LR - MIN_LR) * remaining_at_quarter)
    assert lr_at(100, sched) == pytest.approx(MIN_LR)
    assert lr_at(150, sched) == pytest.approx(MIN_LR)
    values = [lr_at(s, sched) for s in range(80, 101)]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))


def test_wsd_minus_sqrt_quarter_is_midpoint():
    assert lr_at(85, wsd("minus_sqrt")) == pytest.approx(MID)


def test_wsd_decay_end_defaults_to_train_iters():
    sched = ScheduleConfig(style="wsd", wsd_decay_iters=40, wsd_decay_style="linear")
    assert lr_at(59, sched, iters=100) == LR
    assert lr_at(60, sched, iters=100) == pytest.approx(LR)
    assert lr_at(80, sched, iters=100) == pytest.approx(MID)
    assert lr_at(100, sched, iters=100) == pytest.approx(MIN_LR)


def test_schedule_is_pure():
    """Same inputs, same output, in any order; the configs are not mutated."""
    sched = wsd("minus_sqrt")
    before = (replace(OPT), replace(sched))
    forward = [lr_at(s, sched) for s in range(0, 120, 7)]
    backward = [lr_at(s, sched) for s in reversed(range(0, 120, 7))]
    assert forward == backward[::-1]
    assert (OPT, sched) == before


def test_resume_with_wsd_decay_branch_takes_effect():
    """A stable run "resumed" at step 900 with a decay branch added follows the new config."""
    stable = ScheduleConfig(style="wsd", warmup_iters=100, decay_iters=2000, wsd_decay_iters=0)
    branch = replace(stable, decay_iters=1000, wsd_decay_iters=100, wsd_decay_style="minus_sqrt")
    iters_old, iters_new = 2000, 1000
    # identical before the branch point
    for step in (0, 99, 500, 899, 900):
        assert lr_at(step, stable, iters_old) == pytest.approx(lr_at(step, branch, iters_new))
    # after it, the resumed run decays while the original stays flat
    assert lr_at(925, stable, iters_old) == LR
    assert lr_at(925, branch, iters_new) == pytest.approx(MID)
    assert lr_at(1000, branch, iters_new) == pytest.approx(MIN_LR)


def test_resume_with_new_lr_takes_effect():
    sched = ScheduleConfig(style="cosine", warmup_iters=10, decay_iters=110)
    new_opt = replace(OPT, lr=2 * LR, min_lr=2 * MIN_LR)
    assert lr_at(60, sched, optim=OPT) == pytest.approx(MID)
    assert lr_at(60, sched, optim=new_opt) == pytest.approx(2 * MID)
    const = ScheduleConfig(style="constant")
    assert lr_at(500, const, optim=replace(OPT, lr=5e-5)) == 5e-5


def test_unknown_decay_style_raises():
    sched = ScheduleConfig(style="wsd", wsd_decay_iters=10, wsd_decay_style="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nope"):
        lr_at(95, sched)
