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

from megatron_llmjp.config.loader import ConfigError, dump_yaml
from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.parallel import cpu_compat
from megatron_llmjp.parallel.dist import RankInfo, discover_ranks
from megatron_llmjp.parallel.layout import Layout, make_layout
from megatron_llmjp.training.lr_schedule import learning_rate
from megatron_llmjp.training.metrics import MetricsWriter


def check_runtime(cfg: RunConfig, info: RankInfo) -> Layout:
    """Checks that need the world size and the machine; before any process group exists."""
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, info.world_size)
    if layout.cp > 1:
        from megatron_llmjp.models.build import use_transformer_engine

        if not use_transformer_engine():
            raise ConfigError(
                f"parallel.cp={layout.cp}: context parallelism needs Transformer Engine "
                "attention, which needs CUDA (run it on GPU nodes)"
            )
    return layout


@dataclass
class _State:
    model: list
    optimizer: object
    sampler: object
    layout: Layout
    forward_backward: object


def _build(cfg: RunConfig, layout: Layout) -> _State:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from megatron_llmjp.data.sampler import build_sampler
    from megatron_llmjp.models.build import build_model_chunks
    from megatron_llmjp.models.init import initialize_weights

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
    )
    optimizer = get_megatron_optimizer(opt_cfg, model)
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
    sampler = build_sampler(cfg, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    return _State(model, optimizer, sampler, layout, get_forward_backward_func())


def _forward_step(data_iterator, model, cp_split: bool):
    batch = next(data_iterator)
    if cp_split:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(batch)
    batch = {k: v.to(_device(), non_blocking=True) for k, v in batch.items()}
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token loss: (sum, token count); megatron divides by the global token count."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output.float().reshape(-1) * mask).sum()
    n_tokens = mask.sum().to(torch.int)
    return loss_sum, n_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def train_step(state: _State, cfg: RunConfig, step: int) -> dict:
    """One optimizer step; returns the step's scalars (meaningful on the last pipeline stage)."""
    from megatron.core import parallel_state as ps

    lr = learning_rate(step, cfg.optim, cfg.schedule, cfg.train.iters)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    for m in state.model:
        m.zero_grad_buffer()
    state.optimizer.zero_grad()
    micro = state.sampler.microbatches(step)
    n_chunks = len(state.model)
    iterators = [iter(micro) for _ in range(n_chunks)]
    losses = state.forward_backward(
        forward_step_func=partial(_forward_step, cp_split=state.layout.cp > 1),
        data_iterator=iterators if n_chunks > 1 else iterators[0],
        model=state.model if n_chunks > 1 else state.model[0],
        num_microbatches=len(micro),
        seq_length=cfg.train.seq_length,
        micro_batch_size=cfg.train.micro_batch_size,
        forward_only=False,
    )
    _, grad_norm, _ = state.optimizer.step()
    totals = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for out in losses:
            totals += out["lm loss"].detach().to("cpu", torch.float64)
        totals = totals.to(_device())
        torch.distributed.all_reduce(
            totals, group=ps.get_data_parallel_group(with_context_parallel=True)
        )
    scalars = {
        "loss": float(totals[0] / totals[1]) if totals[1] > 0 else float("nan"),
        "lr": lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
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


def _device():
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def run(cfg: RunConfig, info: RankInfo | None = None) -> list[dict]:
    """Train ``cfg`` on this process; returns the logged metrics (on the logging rank)."""
    from megatron_llmjp.parallel.dist import destroy_distributed, init_distributed, seed_everything

    info = info or discover_ranks()
    layout = check_runtime(cfg, info)
    cpu_compat.install()
    init_distributed(info, layout, cfg.parallel.timeout_minutes)
    try:
        seed_everything(cfg.train.seed)
        state = _build(cfg, layout)
        is_logger = info.rank == info.world_size - 1  # a last-pipeline-stage rank
        out = Path(cfg.output_dir)
        if info.rank == 0:
            dump_yaml(cfg, out / "config.yaml")
        writer = MetricsWriter(out, tensorboard=cfg.logging.tensorboard) if is_logger else None
        if is_logger:
            print(f"[llmjp] {layout.describe()} model={cfg.model.name}", flush=True)
        history = []
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        for step in range(cfg.train.iters):
            t0 = time.perf_counter()
            scalars = train_step(state, cfg, step)
            dt = time.perf_counter() - t0
            record = {
                "step": step + 1,
                **scalars,
                "step_time": dt,
                "tokens_per_sec": tokens_per_step / dt,
            }
            history.append(record)
            if writer and ((step + 1) % cfg.logging.interval == 0 or step + 1 == cfg.train.iters):
                writer.write(record)
        if writer:
            writer.close()
        return history
    finally:
        destroy_distributed()
