"""Overhead of the trainer's loop against a bare megatron-core loop on the same model, data
and layout.

Both loops run under torchrun on the same config (``--set`` overrides on top of the
quickstart's model and layout with synthetic tokens):

* ``trainer``: ``megatron_llmjp.training.trainer.run`` as ``llmjp-train`` runs it;
* ``bare``: only megatron-core around the same GPTModel (built by
  ``megatron_llmjp.models.build``, i.e. megatron-core's GPTModel with its local spec on CPU):
  megatron-core's DistributedDataParallel, ``get_megatron_optimizer`` and the pipeline
  schedule from ``get_forward_backward_func``, with a Megatron-LM-style loss function; no
  fault checks, metrics, logging or schedule of our own.

A step's time is the wall clock between the starts of consecutive optimizer steps on the last
rank, so everything the loop does between steps counts; the first ``--warmup`` steps are left
out. The runs alternate (bare, trainer, bare, ...); the script prints each run's median, the
median of the runs per loop with min-max, the ratio trainer/bare (of those medians and
within each adjacent pair of runs), and the machine with its load average at the start and
the end.

    .venv/bin/python tools/bench/loop_overhead.py [--runs 3] [--iters 12] [--set key=value]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from _train import REPO, load_average, machine, spread

QUICKSTART = [
    "model.name=llm-jp-4-tiny-moe",
    "parallel.tp=2",
    "parallel.pp=2",
    "parallel.ep=2",
    "precision.dtype=fp32",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.seq_length=128",
    "model.vocab_size=32768",
    "data.synthetic=true",
    "logging.tensorboard=false",
    "logging.gpu_telemetry=false",
]


def _loss(loss_mask, output_tensor):
    """Megatron-LM's pretrain_gpt loss: (masked sum, token count, reporting dict)."""
    import torch

    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"]
    )
    return output, partial(_loss, batch["loss_mask"])


def bare_loop(overrides: list[str], out: Path) -> None:
    """One rank of the bare megatron-core loop; the last rank writes its step start times."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.data.sampler import build_data
    from megatron_llmjp.models.build import build_model_chunks
    from megatron_llmjp.parallel import cpu_compat
    from megatron_llmjp.parallel.dist import discover_ranks, init_distributed, seed_everything
    from megatron_llmjp.parallel.layout import make_layout

    cfg = build_config(overrides=overrides)
    info = discover_ranks()
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, info.world_size)
    cpu_compat.install()
    init_distributed(info, layout, cfg.parallel.timeout_minutes)
    seed_everything(cfg.train.seed)
    chunks = build_model_chunks(cfg, layout)
    tcfg = chunks[0].config
    ddp_cfg = DistributedDataParallelConfig(
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer
    )
    model = [
        DDP(config=tcfg, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    o = cfg.optim
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2,
            adam_eps=o.adam_eps,
            clip_grad=o.clip_grad,
            use_distributed_optimizer=o.use_distributed_optimizer,
        ),
        model,
    )
    tcfg.grad_scale_func = optimizer.scale_loss
    tcfg.finalize_model_grads_func = finalize_model_grads
    data = build_data(cfg, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    forward_backward = get_forward_backward_func()
    starts = []
    for step in range(cfg.train.iters):
        starts.append(time.perf_counter())
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        micro = data.train.microbatches(step)
        iterators = [iter(micro) for _ in model]
        forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iterators if len(model) > 1 else iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(micro),
            seq_length=cfg.train.seq_length,
            micro_batch_size=cfg.train.micro_batch_size,
        )
        optimizer.step()
    starts.append(time.perf_counter())
    torch.distributed.barrier()
    if info.rank == info.world_size - 1:
        (out / "starts.json").write_text(json.dumps(starts))
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def trainer_loop(overrides: list[str], out: Path) -> None:
    """One rank of ``trainer.run``; the last rank writes its step start times."""
    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.parallel.dist import discover_ranks
    from megatron_llmjp.training import trainer

    starts: list[float] = []
    step = trainer.train_step

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        return step(*args, **kwargs)

    trainer.train_step = timed
    info = discover_ranks()
    trainer.run(build_config(overrides=[*overrides, f"output_dir={out}"]), info)
    starts.append(time.perf_counter())  # after the last step (and the end of the run)
    if info.rank == info.world_size - 1:
        (out / "starts.json").write_text(json.dumps(starts))


def run(loop: str, world: int, overrides: list[str], out: Path, warmup: int) -> list[float]:
    """Step times (s) of one run after the warm-up; the last step (followed by the run's own
    shutdown in the trainer) is left out too."""
    out.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(world),
        "--master-port",
        "29737",
        str(Path(__file__).resolve()),
        "--worker",
        loop,
        "--out",
        str(out),
    ]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{loop} run failed:\n{proc.stderr[-3000:]}")
    starts = json.loads((out / "starts.json").read_text())
    steps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return steps[warmup:-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=3, help="runs per loop, alternated")
    p.add_argument("--set", action="append", default=[], help="extra override, repeatable")
    p.add_argument("--worker", choices=["bare", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = [*QUICKSTART, f"train.iters={args.iters}", *args.set]
    if args.worker == "bare":
        bare_loop(args.set, args.out)
        return 0
    if args.worker == "trainer":
        trainer_loop(args.set, args.out)
        return 0
    print(f"machine at start: {machine()}", flush=True)
    medians: dict[str, list[float]] = {"bare": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.runs):
            for loop in ("bare", "trainer") if k % 2 == 0 else ("trainer", "bare"):
                steps = run(loop, args.world, overrides, Path(tmp) / f"{loop}{k}", args.warmup)
                medians[loop].append(statistics.median(steps))
                print(
                    f"  run {k + 1} {loop:<7}: step {spread(steps)}, load {load_average()}",
                    flush=True,
                )
    bare, ours = (statistics.median(medians[k]) for k in ("bare", "trainer"))
    print(f"overrides: {' '.join(overrides)} (world {args.world})")
    print(f"bare megatron-core loop  median step {spread(medians['bare'])} over run medians")
    print(f"llmjp trainer            median step {spread(medians['trainer'])} over run medians")
    print(f"trainer/bare {ours / bare:.3f} (medians over runs)")
    # The load changes between runs: the ratio within each adjacent pair is the steadier one.
    pairs = [t / b for t, b in zip(medians["trainer"], medians["bare"], strict=True)]
    print(
        "trainer/bare per adjacent pair of runs: "
        + ", ".join(f"{r:.3f}" for r in pairs)
        + f"; median {statistics.median(pairs):.3f}"
    )
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
