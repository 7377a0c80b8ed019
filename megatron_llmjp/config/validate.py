"""Checks of a ``RunConfig`` that need no process group (world size comes from the environment).

A named mixture file is parsed and checked here too (``mixture_file.py``); whether its datasets
exist and agree with their index is checked before launch and before training
(``data/mixture.py``). ``config/`` imports nothing above it.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.mixture_file import load_mixture
from megatron_llmjp.config.precision_checks import validate_precision
from megatron_llmjp.config.schema import RunConfig


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


SECTIONS: tuple[str, ...] = (
    "model",
    "train",
    "optim",
    "schedule",
    "precision",
    "recompute",
    "performance",
    "logging",
    "checkpoint",
    "fault",
    "parallel",
    "data",
)
"""The sections of a ``RunConfig`` that :func:`validate_static` checks, in its order."""

WEIGHTS_ONLY: tuple[str, ...] = ("model", "train", "precision", "parallel")
"""What a command that reads or writes model weights outside training uses (conversion,
upcycling, the parity check): the model, its dtype and the layout it is sharded for (the
layout rules read ``train``'s batch and sequence sizes). Never the data, optimizer, schedule,
logging, checkpoint-policy or fault sections."""


def _check_model(cfg: RunConfig) -> None:
    """Sizes and structure of the model."""
    m = cfg.model
    for key in (
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "num_query_groups",
        "kv_channels",
        "vocab_size",
    ):
        _positive(getattr(m, key), f"model.{key}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not a multiple of "
            f"model.num_query_groups={m.num_query_groups}"
        )
    if m.is_moe:
        if not m.num_experts or not m.moe_ffn_hidden_size:
            raise ConfigError("model.family=moe needs model.num_experts and moe_ffn_hidden_size")
        if not 1 <= m.moe_router_topk <= m.num_experts:
            raise ConfigError(
                f"model.moe_router_topk={m.moe_router_topk} must be in [1, num_experts="
                f"{m.num_experts}]"
            )
    elif not m.ffn_hidden_size:
        raise ConfigError("model.family=dense needs model.ffn_hidden_size")


def _check_train(cfg: RunConfig) -> None:
    """Batch, sequence and evaluation sizes (the sequence against the model's positions)."""
    m, t = cfg.model, cfg.train
    _positive(t.iters, "train.iters", allow_zero=True)
    for key in ("micro_batch_size", "global_batch_size", "seq_length"):
        _positive(getattr(t, key), f"train.{key}")
    if t.seq_length > m.max_position_embeddings:
        raise ConfigError(
            f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
            f"{m.max_position_embeddings}"
        )
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    _positive(t.eval_interval, "train.eval_interval", allow_zero=True)
    _positive(t.eval_iters, "train.eval_iters")


def _check_optim(cfg: RunConfig) -> None:
    """Learning rates and clipping."""
    o = cfg.optim
    _positive(o.lr, "optim.lr")
    _positive(o.min_lr, "optim.min_lr", allow_zero=True)
    if o.min_lr > o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} is larger than optim.lr={o.lr}")
    _positive(o.clip_grad, "optim.clip_grad", allow_zero=True)


def _check_schedule(cfg: RunConfig) -> None:
    """Warmup and decay lengths against ``train.iters``."""
    t, s = cfg.train, cfg.schedule
    _positive(s.warmup_iters, "schedule.warmup_iters", allow_zero=True)
    decay_end = t.iters if s.decay_iters is None else s.decay_iters
    if t.iters and s.warmup_iters > decay_end:
        raise ConfigError(
            f"schedule.warmup_iters={s.warmup_iters} is longer than the schedule "
            f"(schedule.decay_iters or train.iters = {decay_end})"
        )
    if t.iters and s.style == "wsd" and not 0 <= s.wsd_decay_iters <= decay_end - s.warmup_iters:
        raise ConfigError(
            f"schedule.wsd_decay_iters={s.wsd_decay_iters} must lie in [0, decay_iters - "
            f"warmup_iters = {decay_end - s.warmup_iters}]"
        )


def _check_precision(cfg: RunConfig) -> None:
    """The precision recipe (checked by its own module)."""
    validate_precision(cfg)


def _check_logging(cfg: RunConfig) -> None:
    """Logging interval and W&B settings."""
    _positive(cfg.logging.interval, "logging.interval")
    lg = cfg.logging
    if lg.wandb_project is not None and lg.wandb_mode != "disabled":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"logging.wandb_project={lg.wandb_project!r} needs the wandb package "
                "(pip install 'megatron-llmjp[wandb]'), or set logging.wandb_mode=disabled"
            )
    elif lg.wandb_project is None and (lg.wandb_entity or lg.wandb_run_name):
        raise ConfigError("logging.wandb_entity / wandb_run_name are set but wandb_project is not")


def _check_checkpoint(cfg: RunConfig) -> None:
    """Checkpoint interval, retention and directory."""
    c = cfg.checkpoint
    _positive(c.interval, "checkpoint.interval", allow_zero=True)
    if c.keep_last is not None:
        _positive(c.keep_last, "checkpoint.keep_last")
    if c.dir is None and (c.interval or c.async_save):
        raise ConfigError(
            "checkpoint.interval / checkpoint.async_save are set but checkpoint.dir is not: "
            "say where checkpoints go"
        )


def _check_fault(cfg: RunConfig) -> None:
    """Non-finite and loss-spike policies and exit signals."""
    f = cfg.fault
    if f.nonfinite not in ("stop", "skip"):
        raise ConfigError(f"fault.nonfinite must be 'stop' or 'skip', got {f.nonfinite!r}")
    _positive(f.max_skipped_steps, "fault.max_skipped_steps", allow_zero=True)
    if f.loss_spike_factor and f.loss_spike_factor <= 1:
        raise ConfigError(
            f"fault.loss_spike_factor must be 0 (off) or > 1, got {f.loss_spike_factor}"
        )
    _positive(f.loss_spike_window, "fault.loss_spike_window")
    import signal

    for name in f.exit_signals:
        if not isinstance(getattr(signal, str(name), None), signal.Signals) or name in (
            "SIGKILL",
            "SIGSTOP",
        ):
            raise ConfigError(
                f"fault.exit_signals: {name!r} is not a catchable signal name (e.g. SIGTERM)"
            )


RECOMPUTE_MODULES: tuple[str, ...] = (
    "core_attn",
    "moe_act",
    "layernorm",
    "mla_up_proj",
    "mlp",
    "moe",
    "shared_experts",
)
"""megatron-core 0.16.1's accepted ``recompute_modules`` (``TransformerConfig.__post_init__``)."""


def _check_recompute(cfg: RunConfig) -> None:
    """Activation recompute settings (see ``RecomputeConfig``): the constraints megatron-core
    0.16.1's ``TransformerConfig`` enforces, checked first so the error names our field, plus
    modules that would recompute nothing in these models. Backend-dependent checks (grouped
    GEMM, Transformer Engine) are in ``models/recompute.py``."""
    r, m, p = cfg.recompute, cfg.model, cfg.parallel
    if r.granularity != "full":
        for key in ("method", "num_layers"):
            if getattr(r, key) is not None:
                raise ConfigError(
                    f"recompute.{key} applies to recompute.granularity=full only "
                    f"(got granularity={r.granularity})"
                )
    if r.granularity != "selective" and r.modules is not None:
        raise ConfigError(
            f"recompute.modules applies to recompute.granularity=selective only "
            f"(got granularity={r.granularity}, modules={r.modules})"
        )
    if r.granularity == "selective" and r.modules is not None:
        _check_recompute_modules(cfg, list(r.modules))
    if r.granularity == "full":
        if r.method is None or r.num_layers is None:
            raise ConfigError(
                "recompute.granularity=full needs recompute.method (uniform or block) and "
                f"recompute.num_layers (got method={r.method}, num_layers={r.num_layers})"
            )
        chunks = p.pp * (p.vpp or 1)
        if m.num_layers % chunks:
            return  # the layout check names the indivisible layer count
        per_chunk = m.num_layers // chunks
        where = f"model.num_layers={m.num_layers} / (pp={p.pp} x vpp={p.vpp or 1})"
        if not 1 <= r.num_layers <= per_chunk:
            raise ConfigError(
                f"recompute.num_layers={r.num_layers} must be in [1, {per_chunk}], the layers "
                f"of one pipeline stage (chunk): {where}"
            )
        if r.method == "uniform" and per_chunk % r.num_layers:
            # megatron-core's uniform method steps through a chunk's layers num_layers at a
            # time and indexes past the last layer when they do not divide.
            raise ConfigError(
                f"recompute.method=uniform: recompute.num_layers={r.num_layers} must divide "
                f"the {per_chunk} layers of a pipeline stage (chunk) ({where})"
            )


def _check_recompute_modules(cfg: RunConfig, modules: list[str]) -> None:
    """Names megatron-core accepts and that recompute something in an LLM-jp-4 model."""
    m, pr = cfg.model, cfg.precision
    key = f"recompute.modules={modules}"
    if not modules:
        raise ConfigError(f"{key}: empty (use recompute.granularity=none to recompute nothing)")
    for name in modules:
        if not isinstance(name, str) or name not in RECOMPUTE_MODULES:
            raise ConfigError(
                f"{key}: unknown module {name!r}; megatron-core 0.16.1 accepts "
                f"{', '.join(RECOMPUTE_MODULES)}"
            )
    if len(set(modules)) != len(modules):
        raise ConfigError(f"{key}: a module is listed twice")
    noop = {
        "mla_up_proj": "the model has no multi-latent attention",
        "shared_experts": "the model has no shared experts",
    }
    if m.is_moe:
        noop["mlp"] = "it recomputes dense MLPs; every layer here is MoE (use moe_act or moe)"
    else:
        for name in ("moe", "moe_act"):
            noop[name] = f"model {m.name} is dense (model.family=dense)"
    for name in modules:
        if name in noop:
            raise ConfigError(f"{key}: {name} recomputes nothing here: {noop[name]}")
    if pr.fp8 == "delayed" and pr.fp8_backend == "te":
        bad = sorted({"moe_act", "layernorm"} & set(modules))
        if bad:
            raise ConfigError(
                f"{key}: {', '.join(bad)} recompute does not work with precision.fp8=delayed "
                "in megatron-core 0.16.1 (use another FP8 recipe, or drop them)"
            )


def _check_performance(cfg: RunConfig) -> None:
    """Performance switches that the config alone decides (``config/performance_checks.py``);
    availability on this machine is checked before any process group exists."""
    from megatron_llmjp.config.performance_checks import validate_performance

    validate_performance(cfg)


def _check_parallel(cfg: RunConfig) -> None:
    """What a config alone can check of the parallel section (the layout itself is checked
    against the world size by ``parallel.layout.make_layout``)."""
    if cfg.parallel.timeout_minutes <= 0:
        raise ConfigError(
            f"parallel.timeout_minutes must be > 0, got {cfg.parallel.timeout_minutes}"
        )


def _check_data(cfg: RunConfig) -> None:
    """The training data: mixture or text files and tokenizer, which must exist."""
    d, t = cfg.data, cfg.train
    if d.mixture is not None:
        if d.synthetic:
            raise ConfigError("data.mixture and data.synthetic=true are exclusive")
        load_mixture(d.mixture).stage(d.stage)  # the datasets are checked at launch
    elif d.stage is not None:
        raise ConfigError(f"data.stage={d.stage!r} needs data.mixture")
    elif t.eval_interval:
        raise ConfigError("train.eval_interval needs data.mixture (validation uses its split)")
    if d.null_tokenizer_vocab_size is not None:
        _positive(d.null_tokenizer_vocab_size, "data.null_tokenizer_vocab_size")
        if d.mixture is None:
            raise ConfigError("data.null_tokenizer_vocab_size needs data.mixture")
        if d.null_tokenizer_vocab_size + 1 > cfg.model.vocab_size:
            raise ConfigError(
                f"data.null_tokenizer_vocab_size={d.null_tokenizer_vocab_size} means "
                f"{d.null_tokenizer_vocab_size + 1} token ids (with EOD) but model.vocab_size "
                f"is {cfg.model.vocab_size}"
            )
    elif not cfg.data.synthetic:
        tok = Path(cfg.data.tokenizer)
        if not tok.exists():
            raise ConfigError(f"data.tokenizer: {tok} does not exist (cwd: {Path.cwd()})")
        if d.mixture is None and not cfg.data.text_files:
            raise ConfigError("data.text_files is empty (or set data.synthetic=true)")
        for f in cfg.data.text_files if d.mixture is None else []:
            if not Path(f).is_file():
                raise ConfigError(f"data.text_files: {f} does not exist (cwd: {Path.cwd()})")


_CHECKS = {name: globals()[f"_check_{name}"] for name in SECTIONS}


def validate_static(cfg: RunConfig, uses: Collection[str] = SECTIONS) -> None:
    """Everything checkable from the config alone; raises ``ConfigError`` naming the field.

    ``uses``: the sections the calling command reads (default: all, as training does). A
    command checks only those, so e.g. a conversion never requires the training data to
    exist; see :data:`WEIGHTS_ONLY`."""
    unknown = sorted(set(uses) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config sections {unknown}; known: {list(SECTIONS)}")
    for name in SECTIONS:
        if name in uses:
            _CHECKS[name](cfg)
