"""Learning rate and weight decay of every optimizer parameter group, as Megatron-LM applies them.

The formulas are megatron-core's own ``OptimizerParamScheduler`` (megatron/core/
optimizer_param_scheduler.py, 0.16.1); this module only decides *where* on the schedule a step
is and which values each parameter group gets:

- **Position in samples.** Megatron-LM's scheduler counts samples: ``--lr-warmup-iters``,
  ``--lr-decay-iters`` and ``--lr-wsd-decay-iters`` become ``iters * global_batch_size``
  samples, and the update of an iteration uses the value for the samples consumed *before* it.
  The first iteration of a warmup therefore applies lr 0 (a real AdamW step that advances the
  moments and the bias-correction step count but moves no weight), iteration 2 applies
  ``lr / warmup_iters``, and the peak is reached at iteration ``warmup_iters + 1``. A decay
  ends exactly at ``min_lr`` when ``decay_iters * global_batch_size`` samples have been
  consumed, i.e. on the step after the last decay step; any later step stays at ``min_lr``.
- **Per group.** megatron-core's ``get_megatron_optimizer`` puts norms, biases and every other
  1-D parameter in groups with ``wd_mult=0.0``; each group also carries ``max_lr``/``min_lr``
  (overrides such as a decoupled embedding LR) and ``lr_mult``. Each step sets
  ``lr = schedule(max_lr, min_lr) * lr_mult`` and ``weight_decay = optim.weight_decay * wd_mult``.
  (megatron-core 0.16.1's scheduler folds per-group LRs into ``max_lr``/``min_lr`` and keeps
  ``lr_mult`` at 1.0; Megatron-LM 0.12 multiplies by ``lr_mult``: both agree.)
- **No scheduler state.** The position comes from the consumed samples of the run, and the
  per-group values come from the optimizer as built from the *current* config, captured before
  any checkpoint is loaded (a loaded optimizer state would otherwise bring back the
  ``max_lr``/``min_lr`` of the run that saved it). So a changed ``optim.lr``, ``optim.min_lr``,
  ``optim.weight_decay`` or ``schedule.*`` takes effect on resume, as Megatron-LM's
  ``--override-opt-param-scheduler`` does.

One difference remains: a step skipped by the fault policy (``fault.*``) still counts its
samples here, while Megatron-LM does not advance its scheduler on an iteration whose update
was skipped.
"""

from __future__ import annotations

from megatron_llmjp.config.schema import OptimConfig, ScheduleConfig

# Our style names -> megatron-core's ``lr_decay_style``.
_DECAY_STYLE = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}
# Per-group fields that come from the config the optimizer was built with (never a checkpoint).
_GROUP_FIELDS = ("max_lr", "min_lr", "wd_mult", "lr_mult")


class _Groups:
    """The minimal optimizer interface ``OptimizerParamScheduler`` needs (``param_groups``)."""

    def __init__(self, param_groups: list[dict]) -> None:
        self.param_groups = param_groups


def _scheduler(
    optimizer,
    optim: OptimConfig,
    sched: ScheduleConfig,
    train_iters: int,
    global_batch_size: int,
):
    """megatron-core's ``OptimizerParamScheduler`` for the config, in samples; the arguments
    are the ones Megatron-LM's ``get_optimizer_param_scheduler`` passes for iteration-based
    training (``init_lr`` = ``--lr-warmup-init`` = 0, constant weight decay)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = train_iters if sched.decay_iters is None else sched.decay_iters
    # train.iters=0 (an initial checkpoint) never applies a value; megatron-core needs > 0.
    decay_samples = max(decay_iters, sched.warmup_iters + 1) * global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=sched.warmup_iters * global_batch_size,
        lr_decay_steps=decay_samples,
        lr_decay_style=_DECAY_STYLE[sched.style],
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_samples,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
        wsd_decay_steps=sched.wsd_decay_iters * global_batch_size,
        lr_wsd_decay_style=sched.wsd_decay_style,
    )


class ParamGroupSchedule:
    """Sets ``lr`` and ``weight_decay`` of every parameter group of a megatron-core optimizer.

    Build it right after ``get_megatron_optimizer`` (before loading a checkpoint): it captures
    each group's ``max_lr``, ``min_lr``, ``wd_mult`` and ``lr_mult`` from the current config.
    """

    def __init__(
        self,
        optimizer,
        optim: OptimConfig,
        sched: ScheduleConfig,
        train_iters: int,
        global_batch_size: int,
    ) -> None:
        self.optimizer = optimizer
        self.group_fields = [
            {k: g[k] for k in _GROUP_FIELDS if k in g} for g in optimizer.param_groups
        ]
        self._scheduler = _scheduler(optimizer, optim, sched, train_iters, global_batch_size)

    def apply(self, consumed_samples: int) -> float:
        """Set every group's values for the step that follows ``consumed_samples`` samples.

        Returns the learning rate applied to the default groups (``lr_mult`` 1, no LR override:
        the value Megatron-LM logs). Raises ``ValueError`` if the optimizer's groups changed
        since construction."""
        from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

        groups = self.optimizer.param_groups
        if len(groups) != len(self.group_fields):
            raise ValueError(
                f"the optimizer has {len(groups)} parameter groups, {len(self.group_fields)} "
                "when the schedule was built"
            )
        for group, fields in zip(groups, self.group_fields, strict=True):
            group.update(fields)
        self._scheduler.num_steps = consumed_samples
        self._scheduler.step(0)
        for group in groups:
            group["lr"] *= group.get("lr_mult", 1.0)
        lr = get_canonical_lr_for_logging(groups)
        return float(groups[0]["lr"] if lr is None else lr)


def learning_rate(
    consumed_samples: int,
    optim: OptimConfig,
    sched: ScheduleConfig,
    train_iters: int,
    global_batch_size: int,
) -> float:
    """The learning rate of a default parameter group for the step after ``consumed_samples``.

    A pure function (no optimizer needed): the value ``ParamGroupSchedule.apply`` sets on a
    group with the config's ``max_lr``/``min_lr`` and ``lr_mult`` 1. Iteration ``k`` (1-based)
    of a run with a constant global batch uses ``consumed_samples = (k - 1) * global_batch_size``.
    """
    group = {"max_lr": optim.lr, "min_lr": optim.min_lr, "wd_mult": 1.0, "lr_mult": 1.0}
    return ParamGroupSchedule(_Groups([group]), optim, sched, train_iters, global_batch_size).apply(
        consumed_samples
    )
