"""The training loop: from a validated ``RunConfig`` to optimizer steps on megatron-core.

Read top to bottom: ``run()`` sets up process groups, model, optimizer and data, then
``train_step()`` does one optimizer step through megatron-core's pipeline schedule.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from megatron_llmjp.checkpoint.state import Progress, ResumePlan, plan_resume
from megatron_llmjp.config.loader import ConfigError, dump_yaml, to_dict
from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.parallel import cpu_compat
from megatron_llmjp.parallel.dist import RankInfo, discover_ranks, local_device
from megatron_llmjp.parallel.layout import Layout, make_layout
from megatron_llmjp.training import children
from megatron_llmjp.training.faults import (
    FaultMonitor,
    PeerFailure,
    is_comm_failure,
    local_grads_nonfinite,
    poison_grads,
)
from megatron_llmjp.training.lr_schedule import ParamGroupSchedule
from megatron_llmjp.training.metrics import MetricsWriter, open_wandb


@dataclass
class Preflight:
    layout: Layout
    resume: ResumePlan | None


def check_runtime(cfg: RunConfig, info: RankInfo) -> Preflight:
    """Checks that need the world size, the machine or the checkpoint on disk; before any
    process group exists, so bad input fails in seconds on every rank alike.

    The device is decided first (``cpu_compat.install``, from ``LLMJP_DEVICE``), so that on a
    GPU node forced to CPU no check asks CUDA anything."""
    cpu_compat.install()
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, info.world_size)
    from megatron_llmjp.precision.recipes import check_precision_runtime

    check_precision_runtime(cfg.precision)
    from megatron_llmjp.models.performance import check_performance_runtime

    check_performance_runtime(cfg)
    import importlib.util

    from megatron_llmjp.models.build import use_transformer_engine
    from megatron_llmjp.models.recompute import check_recompute_backend

    te = use_transformer_engine(cfg)
    te_installed = te or importlib.util.find_spec("transformer_engine") is not None
    check_recompute_backend(cfg, te, te_installed)
    if layout.cp > 1 and not te:
        raise ConfigError(
            f"parallel.cp={layout.cp}: context parallelism needs Transformer Engine "
            "attention (megatron-core's local attention refuses it), which needs CUDA and is "
            "not used with precision.fp8_backend=emulated; run it on GPU nodes with TE FP8 or BF16"
        )
    if cfg.data.mixture is not None:
        from megatron_llmjp.data.mixture import check_datasets

        check_datasets(cfg.data.mixture, cfg.data.stage)
    return Preflight(layout, plan_resume(cfg, layout))


@dataclass
class _State:
    model: list
    optimizer: object
    schedule: ParamGroupSchedule
    """Sets every parameter group's lr and weight decay each step (from the current config)."""
    data: object  # data.sampler.Data, built once the resume point is known
    layout: Layout
    forward_backward: object


def _build(cfg: RunConfig, layout: Layout) -> _State:
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_llmjp.models import performance
    from megatron_llmjp.models.build import build_model_chunks
    from megatron_llmjp.models.init import initialize_weights
    from megatron_llmjp.precision import recipes as precision_recipes

    # Expert layers with etp=1 inside a TP>1 model are plain (non-SP) linears by design.
    warnings.filterwarnings(
        "ignore", message=".*sequence_parallel.*tensor model parallel size is 1"
    )
    chunks = build_model_chunks(cfg, layout)
    initialize_weights(chunks, cfg.train.seed, cfg.model.init_method_std, cfg.model.num_layers)
    tcfg = chunks[0].config
    if tcfg.bf16:
        chunks = [Float16Module(tcfg, c) for c in chunks]
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
        **precision_recipes.ddp_kwargs(cfg.precision),
        **performance.ddp_kwargs(cfg),
    )
    model = [
        DDP(config=tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    o = cfg.optim
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=tcfg.bf16,
        params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=o.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        **precision_recipes.optimizer_kwargs(cfg.precision),
    )
    optimizer = get_megatron_optimizer(opt_cfg, model)
    schedule = ParamGroupSchedule(
        optimizer, o, cfg.schedule, cfg.train.iters, cfg.train.global_batch_size
    )
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.finalize_model_grads_func = finalize_model_grads
    if cfg.parallel.overlap_grad_reduce:
        no_sync = [m.no_sync for m in model]
        tcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        sync = [m.start_grad_sync for m in model]
        tcfg.grad_sync_func = sync[0] if len(sync) == 1 else sync
    if cfg.parallel.overlap_param_gather:
        sync = [m.start_param_sync for m in model]
        tcfg.param_sync_func = sync[0] if len(sync) == 1 else sync
    return _State(model, optimizer, schedule, None, layout, get_forward_backward_func())


def _forward_step(data_iterator, model, cp_split: bool, poison: bool = False):
    batch = next(data_iterator)
    if cp_split:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch)
    batch = {k: v.to(local_device(), non_blocking=True) for k, v in batch.items()}
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    return output, partial(_loss_func, batch["loss_mask"], poison)


def _loss_func(loss_mask: torch.Tensor, poison: bool, output: torch.Tensor):
    """Per-token loss: (sum, token count); megatron divides by the global token count."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output.float().reshape(-1) * mask).sum()
    if poison:  # fault injection (LLMJP_FAULT=nan_loss@STEP)
        loss_sum = loss_sum * float("nan")
    n_tokens = mask.sum().to(torch.int)
    return loss_sum, n_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _schedule(
    state: _State, cfg: RunConfig, micro: list[dict], *, forward_only=False, poison=False
) -> list:
    """One pass of megatron-core's pipeline schedule over ``micro``; returns the per-microbatch
    loss dicts (on the last pipeline stage)."""
    n_chunks = len(state.model)
    iterators = [iter(micro) for _ in range(n_chunks)]
    return state.forward_backward(
        forward_step_func=partial(_forward_step, cp_split=state.layout.cp > 1, poison=poison),
        data_iterator=iterators if n_chunks > 1 else iterators[0],
        model=state.model if n_chunks > 1 else state.model[0],
        num_microbatches=len(micro),
        seq_length=cfg.train.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=forward_only,
    )


def _now() -> float:
    """Wall-clock seconds for the step timers, after the device's queued work (on CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def train_step(
    state: _State, cfg: RunConfig, step: int, consumed_samples: int, monitor: FaultMonitor
) -> dict:
    """One optimizer step; returns the step's scalars (meaningful on the last pipeline stage).

    ``step`` is the 0-based iteration and ``consumed_samples`` the samples trained on before
    it: the learning rate and weight decay of every parameter group follow from them
    (``lr_schedule``; iteration 1 of a warmup applies lr 0, as in Megatron-LM).

    Between the backward pass and the update, every rank reports non-finite losses/gradients
    and received exit signals in one all-reduce (``FaultMonitor.decide``), so a bad step is
    skipped or stopped on all ranks at once and the weights are never touched by it.

    The scalars include this rank's phase timers in seconds (``time_data``,
    ``time_forward_backward``, ``time_optimizer``; on CUDA measured after a synchronise)."""
    from megatron.core import parallel_state as ps

    lr = state.schedule.apply(consumed_samples)
    for m in state.model:
        m.zero_grad_buffer()
    state.optimizer.zero_grad()
    t_start = _now()
    micro = state.data.train.microbatches(step)
    t_data = _now()
    losses = _schedule(state, cfg, micro, poison=monitor.injected("nan_loss", step + 1))
    if monitor.injected("nan_grad", step + 1):
        poison_grads(state.model)
    totals = torch.zeros(2, dtype=torch.float64)
    last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
    if last_stage:
        for out in losses:
            totals += out["lm loss"].detach().to("cpu", torch.float64)
    t_fwd_bwd = _now()
    verdict = monitor.decide(
        step + 1,
        loss_bad=not bool(torch.isfinite(totals).all()),
        grad_bad=local_grads_nonfinite(state.model),
        device=local_device(),
    )
    grad_norm = None
    if verdict.apply_update:
        _, grad_norm, _ = state.optimizer.step()
    t_opt = _now()
    if last_stage:
        totals = totals.to(local_device())
        torch.distributed.all_reduce(
            totals, group=ps.get_data_parallel_group(with_context_parallel=True)
        )
    scalars = {
        "loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "skipped": int(not verdict.apply_update),
        "stop_signal": verdict.stop_for_signal,
        "time_data": t_data - t_start,
        "time_forward_backward": t_fwd_bwd - t_data,
        "time_optimizer": t_opt - t_fwd_bwd,
    }
    if cfg.model.is_moe:
        scalars.update(_moe_losses(cfg.model.num_layers, len(micro)))
    return scalars


def _moe_losses(num_layers: int, num_microbatches: int) -> dict:
    """Router losses (unscaled by their coefficients), averaged over layers and microbatches.

    megatron-core accumulates them per layer on each rank; the reduction is a collective over
    the pipeline, expert and data-parallel groups, so every rank calls this every step.
    """
    from megatron.core.transformer.moe import moe_utils

    moe_utils.reduce_aux_losses_tracker_across_ranks()
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    out = {
        f"moe_{name}": float(entry["values"].float().sum()) / (num_layers * num_microbatches)
        for name, entry in sorted(tracker.items())
    }
    moe_utils.clear_aux_losses_tracker()
    return out


def _build_data(cfg: RunConfig, progress: Progress, is_logger: bool):
    """Build this rank's data and position it where ``progress`` says (a new mixture stage
    starts at its own beginning); records the stage in ``progress``."""
    from megatron.core import parallel_state as ps

    from megatron_llmjp.data.sampler import build_data

    stage = None
    if cfg.data.mixture is not None:
        from megatron_llmjp.config.mixture_file import load_mixture

        stage = load_mixture(cfg.data.mixture).stage(cfg.data.stage).name
    if stage is None:
        start, position = 0, progress.consumed_samples
    elif progress.data_stage == stage:
        start, position = progress.stage_start_iteration, progress.stage_consumed_samples
    else:
        start, position = progress.iteration, 0
        if progress.iteration and is_logger:
            print(
                f"[llmjp] data stage {stage!r} starts at iteration {start} (the checkpoint was "
                f"in stage {progress.data_stage!r})",
                flush=True,
            )
    data = build_data(
        cfg,
        ps.get_data_parallel_rank(),
        ps.get_data_parallel_world_size(),
        stage_start=start,
        iteration=progress.iteration,
        stage_consumed=position,
    )
    data.train.resume_at(progress.iteration, position)
    progress.data_stage, progress.stage_start_iteration = stage, start
    progress.stage_consumed_samples = position
    return data


def evaluate(state: _State, cfg: RunConfig) -> float:
    """Mean per-token loss on the held-out batches (collective; the same samples each time)."""
    from megatron.core import parallel_state as ps

    totals = torch.zeros(2, dtype=torch.float64)
    for m in state.model:
        m.eval()
    try:
        for i in range(cfg.train.eval_iters):
            micro = state.data.valid.microbatches(i)
            losses = _schedule(state, cfg, micro, forward_only=True)
            if ps.is_pipeline_last_stage(ignore_virtual=True):
                for out in losses:
                    totals += out["lm loss"].detach().to("cpu", torch.float64)
    finally:
        for m in state.model:
            m.train()
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        totals = totals.to(local_device())
        torch.distributed.all_reduce(
            totals, group=ps.get_data_parallel_group(with_context_parallel=True)
        )
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")


@dataclass
class RunResult:
    history: list[dict]
    """Logged records (on the logging rank; empty elsewhere)."""
    progress: Progress
    stopped_by: str | None = None
    """The exit signal that ended the run early, if any."""


def _checkpointer(cfg: RunConfig, state: _State, monitor: FaultMonitor):
    """A ``save(progress)`` callable returning the seconds training was blocked, plus the
    ``CheckpointSaver`` to finalize and close (both None without a dir)."""
    if cfg.checkpoint.dir is None:
        return None, None
    from megatron_llmjp.checkpoint.state import CheckpointSaver

    saver = CheckpointSaver(
        cfg,
        state.layout,
        before_publish=monitor.before_publish,
        report=monitor.rank == monitor.world - 1,
    )
    saver.prepare()

    def save(progress: Progress) -> float:
        return saver.save(state.model, state.optimizer, progress)

    return save, saver


def _clean_stale_saves(cfg: RunConfig, rank: int) -> None:
    from megatron_llmjp.checkpoint import store

    if cfg.checkpoint.dir is None or rank != 0:
        return
    import shutil

    for stale in store.stale_tmp_dirs(Path(cfg.checkpoint.dir)):
        print(f"[llmjp] removing unpublished save {stale} (left by an interrupted run)")
        shutil.rmtree(stale, ignore_errors=True)


def run(cfg: RunConfig, info: RankInfo | None = None) -> RunResult:
    """Train ``cfg`` on this process: resume if a checkpoint is there, save at the configured
    interval, on an exit signal and at the end."""
    from megatron_llmjp.checkpoint.state import load_checkpoint
    from megatron_llmjp.parallel.dist import destroy_distributed, init_distributed, seed_everything

    info = info or discover_ranks()
    pre = check_runtime(cfg, info)
    layout = pre.layout
    cpu_compat.install()
    children.install()
    started = children.ChildProcesses()  # whatever starts from here on ends with the run
    init_distributed(info, layout, cfg.parallel.timeout_minutes)
    monitor = FaultMonitor.create(cfg.fault, info.rank, info.world_size)
    queue = None
    writer = None
    perf = None
    try:
        from megatron_llmjp.models.performance import PerformanceRuntime

        perf = PerformanceRuntime.start(cfg, layout)  # TE userbuffers, manual GC
        if cfg.parallel.preflight:
            from megatron_llmjp.parallel.preflight import run_preflight

            run_preflight(
                min_busbw_gbps=cfg.parallel.preflight_min_busbw_gbps,
                rel_tolerance=cfg.parallel.preflight_rel_tolerance,
            )
        seed_everything(cfg.train.seed)
        state = _build(cfg, layout)
        progress = Progress()
        if pre.resume is not None:
            progress = load_checkpoint(state.model, state.optimizer, cfg, layout, pre.resume)
        state.data = _build_data(cfg, progress, info.rank == info.world_size - 1)
        monitor.skipped_steps = progress.skipped_steps
        _clean_stale_saves(cfg, info.rank)
        save, queue = _checkpointer(cfg, state, monitor)
        is_logger = info.rank == info.world_size - 1  # a last-pipeline-stage rank
        out = Path(cfg.output_dir)
        if info.rank == 0:
            dump_yaml(cfg, out / "config.yaml")
        if is_logger:
            writer = MetricsWriter(
                out,
                tensorboard=cfg.logging.tensorboard,
                wandb_run=open_wandb(cfg.logging, out, to_dict(cfg)),
            )
        from megatron_llmjp.telemetry.gpu import TelemetryLogger, cuda_memory_fields

        telemetry = TelemetryLogger.create(  # every rank samples its GPU; one rank writes
            log_rank=info.world_size - 1,
            tensorboard_dir=out / "tensorboard" if cfg.logging.tensorboard else None,
            enabled=cfg.logging.gpu_telemetry,
        )
        if is_logger:
            print(f"[llmjp] {layout.describe()} model={cfg.model.name}", flush=True)
        history: list[dict] = []
        result = RunResult(history, progress)
        gbs = cfg.train.global_batch_size
        tokens_per_step = gbs * cfg.train.seq_length
        from megatron_llmjp.training.flops import ThroughputMeter

        throughput = ThroughputMeter.for_run(cfg, info.world_size)
        last_saved = progress.iteration if pre.resume is not None and pre.resume.full else None
        if progress.iteration >= cfg.train.iters and is_logger:
            print(
                f"[llmjp] the checkpoint is at iteration {progress.iteration} >= train.iters="
                f"{cfg.train.iters}: nothing to train (raise train.iters to continue)",
                flush=True,
            )
        monitor.install_signal_handlers()
        checkpoint_time = 0.0
        for step in range(progress.iteration, cfg.train.iters):
            monitor.at_step_start(step + 1)
            t0 = _now()
            try:
                scalars = train_step(state, cfg, step, progress.consumed_samples, monitor)
            except Exception as e:
                if info.world_size > 1 and is_comm_failure(e):
                    raise PeerFailure(
                        f"rank {info.rank}: a collective failed during step {step + 1} "
                        f"(parallel.timeout_minutes={cfg.parallel.timeout_minutes}); another "
                        f"rank has probably crashed or hung, see its log. Cause: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    ) from e
                raise
            dt = _now() - t0
            progress.iteration = step + 1
            progress.consumed_samples += gbs
            progress.stage_consumed_samples += gbs
            progress.skipped_steps = monitor.skipped_steps
            stop = scalars.pop("stop_signal")
            record = {
                "step": step + 1,
                **scalars,
                "step_time": dt,
                "tokens_per_sec": tokens_per_step / dt,
                **throughput.fields(dt),
            }
            if is_logger and monitor.observe_loss(step + 1, scalars["loss"]):
                record["loss_spike"] = 1
            every = cfg.train.eval_interval
            if every and ((step + 1) % every == 0 or step + 1 == cfg.train.iters):
                record["valid_loss"] = evaluate(state, cfg)
            history.append(record)
            # Seconds training was blocked by saves since the previous logged record (a save
            # follows its step's record, so that the record is written before a long save).
            record["time_checkpoint"] = checkpoint_time
            log_now = (step + 1) % cfg.logging.interval == 0 or step + 1 == cfg.train.iters
            if log_now or stop:
                record.update(telemetry.collect(step + 1))  # collective: every rank calls it
                record.update(cuda_memory_fields())  # absent without CUDA
                checkpoint_time = 0.0
            if writer and (log_now or stop):
                writer.write(record)
            interval = cfg.checkpoint.interval
            if save and (stop or (interval and progress.iteration % interval == 0)):
                checkpoint_time += save(progress)
                last_saved = progress.iteration
            if queue is not None:
                checkpoint_time += queue.finalize_ready()
            perf.after_step(step + 1)
            if stop:
                result.stopped_by = monitor.signal_name or "a signal on another rank"
                break
        if save and cfg.checkpoint.save_at_end and last_saved != progress.iteration:
            save(progress)
        if queue is not None:
            queue.close()
            queue = None
        if writer:
            writer.close()
            writer = None
        telemetry.close()
        if result.stopped_by and is_logger:
            print(
                f"[llmjp] stopped after step {progress.iteration} on {result.stopped_by}",
                flush=True,
            )
        return result
    finally:
        monitor.restore_signal_handlers()
        if perf is not None:
            perf.close()
        if writer is not None:  # a failed run: its W&B run is marked failed
            writer.close(exit_code=1)
        if queue is not None:
            queue.close(abort=True)
        try:
            destroy_distributed()
        finally:
            started.end()
