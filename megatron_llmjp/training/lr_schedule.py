"""Learning rate as a pure function of the iteration and the config.

Keeping no scheduler state means a resumed run always follows the schedule in its *current*
config: extending a WSD run with a decay branch from iteration 900k just works (upstream
Megatron restores the stored scheduler and can silently ignore the new values).
"""

from __future__ import annotations

import math

from megatron_llmjp.config.schema import OptimConfig, ScheduleConfig


def _decay_shape(style: str, progress: float) -> float:
    """Fraction of (lr - min_lr) that remains at ``progress`` in [0, 1] of a decay phase."""
    progress = min(max(progress, 0.0), 1.0)
    if style == "linear":
        return 1.0 - progress
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(progress)
    if style == "exponential":
        return 0.5 ** (progress * 10.0)  # 10 half-lives over the phase
    raise ValueError(f"unknown decay style {style!r}")


def learning_rate(step: int, optim: OptimConfig, sched: ScheduleConfig, train_iters: int) -> float:
    """LR for 0-based optimizer ``step``: linear warmup, then the chosen decay."""
    lr, min_lr = optim.lr, optim.min_lr
    warmup = sched.warmup_iters
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    end = train_iters if sched.decay_iters is None else sched.decay_iters
    if sched.style == "constant":
        return lr
    if sched.style == "wsd":
        decay_start = end - sched.wsd_decay_iters
        if step < decay_start:
            return lr
        progress = (step - decay_start) / max(1, sched.wsd_decay_iters)
        return min_lr + (lr - min_lr) * _decay_shape(sched.wsd_decay_style, progress)
    progress = (step - warmup) / max(1, end - warmup)
    return min_lr + (lr - min_lr) * _decay_shape(sched.style, progress)
