"""The learning-rate schedule: every shape at its start, middle and end, Megatron-LM's sample-based
semantics (iteration k applies the value for the samples consumed before it), the exact applied
values of Megatron-LM's own reference run, and resume overrides.

Expected values are derived by hand from Megatron-LM's formulas (megatron-core
``OptimizerParamScheduler.get_lr``): warmup ``max_lr * n / warmup``; decay ratio
``r = (n - warmup) / (decay - warmup)``; linear ``1 - r``, cosine ``(1 + cos(pi r)) / 2``; WSD decay
ratio ``r = (n - (decay - wsd_decay)) / wsd_decay`` with linear ``1 - r``, cosine
``(1 + cos(pi r)) / 2``, minus_sqrt ``1 - sqrt(r)``, exponential ``2 * 0.5**r - 1``; then
``lr = min_lr + coeff * (max_lr - min_lr)`` and ``min_lr`` past the decay.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from megatron_llmjp.config.schema import OptimConfig, ScheduleConfig
from megatron_llmjp.training.lr_schedule import ParamGroupSchedule, learning_rate

LR, MIN_LR = 1e-3, 1e-4
OPT = OptimConfig(lr=LR, min_lr=MIN_LR)
MID = (LR + MIN_LR) / 2
GBS = 4


def lr_at(
    iteration: int, sched: ScheduleConfig, iters: int = 200, optim: OptimConfig = OPT
) -> float:
    """LR applied by 1-based ``iteration`` with a constant global batch of GBS samples."""
    return learning_rate((iteration - 1) * GBS, optim, sched, iters, GBS)


def lr_of(coeff: float) -> float:
    return MIN_LR + coeff * (LR - MIN_LR)


def test_warmup_starts_at_zero_and_peaks_after_warmup_iters():
    sched = ScheduleConfig(style="cosine", warmup_iters=10, decay_iters=110)
    assert lr_at(1, sched) == 0.0  # a real step with lr 0, as in Megatron-LM
    assert lr_at(2, sched) == pytest.approx(LR / 10, rel=1e-15)
    assert lr_at(6, sched) == pytest.approx(LR / 2, rel=1e-15)  # middle of the warmup
    assert lr_at(11, sched) == LR  # n = warmup: the peak
    values = [lr_at(k, sched) for k in range(1, 12)]
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert steps == pytest.approx([LR / 10] * 10)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant", "wsd"])
def test_warmup_applies_to_every_style(style):
    sched = ScheduleConfig(style=style, warmup_iters=4, wsd_decay_iters=10)
    assert lr_at(1, sched) == 0.0
    assert lr_at(3, sched) == pytest.approx(LR * 2 / 4, rel=1e-15)
    assert lr_at(5, sched) == LR


@pytest.mark.parametrize(
    ("style", "coeff_at_quarter"),
    [("cosine", 0.5 * (1 + math.cos(math.pi / 4))), ("linear", 0.75)],
)
@pytest.mark.parametrize("warmup", [0, 10])
def test_decay_start_quarter_middle_end(style, coeff_at_quarter, warmup):
    decay = warmup + 100
    sched = ScheduleConfig(style=style, warmup_iters=warmup, decay_iters=decay)
    span = decay - warmup
    assert lr_at(warmup + 1, sched) == LR  # n = warmup: start of the decay
    assert lr_at(warmup + 1 + span // 4, sched) == pytest.approx(lr_of(coeff_at_quarter), rel=1e-12)
    assert lr_at(warmup + 1 + span // 2, sched) == pytest.approx(MID, rel=1e-12)
    # the last step of the decay (n = decay) applies exactly min_lr, and every later step too
    assert lr_at(decay, sched) > MIN_LR
    assert lr_at(decay + 1, sched) == MIN_LR
    assert lr_at(decay + 2, sched) == MIN_LR
    assert lr_at(1000, sched) == MIN_LR
    values = [lr_at(k, sched) for k in range(warmup + 1, decay + 2)]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))


def test_decay_end_defaults_to_train_iters():
    sched = ScheduleConfig(style="cosine")
    assert lr_at(51, sched, iters=100) == pytest.approx(MID, rel=1e-12)
    assert lr_at(101, sched, iters=100) == MIN_LR


def test_constant():
    sched = ScheduleConfig(style="constant")
    assert {lr_at(k, sched) for k in (1, 2, 50, 100, 101, 1000)} == {LR}
    sched = ScheduleConfig(style="constant", warmup_iters=5)
    assert lr_at(1, sched) == 0.0
    assert lr_at(4, sched) == pytest.approx(LR * 3 / 5, rel=1e-15)
    assert {lr_at(k, sched) for k in (6, 7, 50, 1000)} == {LR}


# WSD: warmup 10, stable until n = 80, decay over n = 80..100 (20 iterations)
def wsd(shape: str) -> ScheduleConfig:
    return ScheduleConfig(
        style="wsd", warmup_iters=10, decay_iters=100, wsd_decay_iters=20, wsd_decay_style=shape
    )


@pytest.mark.parametrize(
    ("shape", "coeff_quarter", "coeff_half"),
    [
        ("linear", 0.75, 0.5),
        ("cosine", 0.5 * (1 + math.cos(math.pi / 4)), 0.5),
        ("minus_sqrt", 0.5, 1 - math.sqrt(0.5)),
        ("exponential", 2 * 0.5**0.25 - 1, math.sqrt(2) - 1),
    ],
)
def test_wsd_stable_then_decay_to_min_lr(shape, coeff_quarter, coeff_half):
    sched = wsd(shape)
    # stable phase: exactly lr from the end of warmup to the decay start (n = 10..80)
    assert {lr_at(k, sched) for k in range(11, 82)} == {LR}
    assert lr_at(82, sched) < LR  # n = 81: the first decayed value
    assert lr_at(86, sched) == pytest.approx(lr_of(coeff_quarter), rel=1e-12)
    assert lr_at(91, sched) == pytest.approx(lr_of(coeff_half), rel=1e-12)
    assert lr_at(101, sched) == MIN_LR  # n = decay: exactly min_lr, whatever the shape
    assert lr_at(150, sched) == MIN_LR
    values = [lr_at(k, sched) for k in range(81, 102)]
    assert all(b < a for a, b in zip(values, values[1:], strict=False))


def test_wsd_decay_end_defaults_to_train_iters():
    sched = ScheduleConfig(style="wsd", wsd_decay_iters=40, wsd_decay_style="linear")
    assert lr_at(61, sched, iters=100) == LR
    assert lr_at(81, sched, iters=100) == pytest.approx(MID, rel=1e-12)
    assert lr_at(101, sched, iters=100) == MIN_LR


def test_position_is_in_samples():
    """A run whose global batch doubles at a resume keeps Megatron-LM's sample clock."""
    sched = ScheduleConfig(style="linear", warmup_iters=0, decay_iters=100)
    # 50 iterations of 4 samples, then iterations of 8: the decay ends at 400 samples
    assert learning_rate(200, OPT, sched, 100, 4) == pytest.approx(MID, rel=1e-12)
    assert learning_rate(200, OPT, sched, 100, 8) == pytest.approx(lr_of(0.75), rel=1e-12)


def test_megatron_lm_reference_applied_values(shared_data):
    """The lr each update of Megatron-LM's reference run applied (cosine, warmup 2, decay 10,
    3e-3 -> 3e-4, global batch 4), recorded from its optimizer's param groups."""
    ref_dir = shared_data / "megatron-lm" / "train-reference"
    ref = json.loads((ref_dir / "losses.json").read_text())
    args = json.loads((ref_dir / "args.json").read_text())
    optim = OptimConfig(lr=args["lr"], min_lr=args["min_lr"], weight_decay=args["weight_decay"])
    sched = ScheduleConfig(style=args["lr_decay_style"], warmup_iters=args["lr_warmup_iters"])
    gbs = args["global_batch_size"]
    for k, expected in zip(ref["iteration"], ref["lr_applied"], strict=True):
        got = learning_rate((k - 1) * gbs, optim, sched, args["train_iters"], gbs)
        assert got == pytest.approx(expected, rel=1e-12, abs=0), f"iteration {k}"


class _FakeOptimizer:
    def __init__(self, groups: list[dict]) -> None:
        self.param_groups = groups


def _groups() -> list[dict]:
    """megatron-core's groups: default, no weight decay (1-D), and a decoupled-LR group."""
    return [
        {"params": [], "max_lr": LR, "min_lr": MIN_LR, "wd_mult": 1.0, "lr_mult": 1.0},
        {"params": [], "max_lr": LR, "min_lr": MIN_LR, "wd_mult": 0.0, "lr_mult": 1.0},
        {"params": [], "max_lr": 4 * LR, "min_lr": 0.0, "wd_mult": 1.0, "lr_mult": 0.5},
    ]


def test_every_group_gets_its_lr_and_weight_decay():
    sched = ScheduleConfig(style="linear", warmup_iters=0, decay_iters=100)
    optim = replace(OPT, weight_decay=0.1)
    opt = _FakeOptimizer(_groups())
    schedule = ParamGroupSchedule(opt, optim, sched, 100, GBS)
    lr = schedule.apply(50 * GBS)  # halfway
    assert lr == pytest.approx(MID, rel=1e-12)
    default, no_wd, decoupled = opt.param_groups
    assert default["lr"] == pytest.approx(MID, rel=1e-12)
    assert default["weight_decay"] == 0.1
    assert no_wd["lr"] == pytest.approx(MID, rel=1e-12)
    assert no_wd["weight_decay"] == 0.0
    assert decoupled["lr"] == pytest.approx(0.5 * (2 * LR), rel=1e-12)  # lr_mult * its schedule
    assert decoupled["weight_decay"] == 0.1


def test_config_wins_over_loaded_group_values():
    """A loaded optimizer state brings back the saving run's group fields; the config's lr,
    min_lr and weight decay still apply (resume with a new LR takes effect)."""
    sched = ScheduleConfig(style="constant")
    opt = _FakeOptimizer(_groups())
    schedule = ParamGroupSchedule(opt, replace(OPT, weight_decay=0.05), sched, 100, GBS)
    for g in opt.param_groups:  # what torch's Optimizer.load_state_dict does to the groups
        g.update(max_lr=9.0, min_lr=8.0, wd_mult=1.0, lr_mult=1.0, weight_decay=0.7)
    schedule.apply(0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR, LR, 2 * LR], rel=1e-12)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0, 0.05]


def test_schedule_is_pure():
    """Same inputs, same output, in any order; the configs are not mutated."""
    sched = wsd("minus_sqrt")
    before = (replace(OPT), replace(sched))
    forward = [lr_at(k, sched) for k in range(1, 120, 7)]
    backward = [lr_at(k, sched) for k in reversed(range(1, 120, 7))]
    assert forward == backward[::-1]
    assert (OPT, sched) == before


def test_resume_with_wsd_decay_branch_takes_effect():
    """A stable run resumed at iteration 900 with a decay branch follows the new config."""
    stable = ScheduleConfig(style="wsd", warmup_iters=100, decay_iters=2000, wsd_decay_iters=0)
    branch = replace(stable, decay_iters=1000, wsd_decay_iters=100, wsd_decay_style="minus_sqrt")
    for k in (1, 100, 500, 900, 901):
        assert lr_at(k, stable, 2000) == pytest.approx(lr_at(k, branch, 1000), rel=1e-15)
    assert lr_at(926, stable, 2000) == LR
    assert lr_at(926, branch, 1000) == pytest.approx(MID, rel=1e-12)  # r = 1/4: 1 - 1/2
    assert lr_at(1001, branch, 1000) == MIN_LR


def test_resume_with_new_lr_takes_effect():
    sched = ScheduleConfig(style="cosine", warmup_iters=10, decay_iters=110)
    new_opt = replace(OPT, lr=2 * LR, min_lr=2 * MIN_LR)
    assert lr_at(61, sched, optim=OPT) == pytest.approx(MID, rel=1e-12)
    assert lr_at(61, sched, optim=new_opt) == pytest.approx(2 * MID, rel=1e-12)
    low = replace(OPT, lr=5e-5, min_lr=0.0)
    assert lr_at(500, ScheduleConfig(style="constant"), optim=low) == 5e-5
