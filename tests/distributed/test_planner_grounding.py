"""The planner's weight, gradient and optimizer bytes against what megatron-core allocates.

Each case builds the trainer's model, DDP wrappers and optimizer on every rank of a real
layout (``trainer._build``), takes one optimizer step so Adam allocates its moments, and sums
the storage bytes of the parameters, the DDP gradient buffers and the optimizer's master
parameters and moments (each storage counted once). The planner must reproduce every rank's
figures exactly from the config alone, and its closed-form (search) figures must be exact for
weights and gradients and an upper bound, tight to the padding, for the optimizer.
"""

from __future__ import annotations

import pytest

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.parallel.layout import make_layout
from megatron_llmjp.planner.memory import static_memory
from megatron_llmjp.planner.shards import chunk_params, rank_chunks
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

_SMALL_VOCAB = "model.vocab_size=1000"  # padded to 1024: exercises the vocabulary padding


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def _measure(overrides: list[str]) -> dict:
    """Runs on every rank: real allocations after one optimizer step, and this rank's place."""
    from megatron.core import parallel_state as ps

    from megatron_llmjp.parallel import dist
    from megatron_llmjp.training.trainer import _build, check_runtime

    cfg = build_config(overrides=["data.synthetic=true", *overrides])
    info = dist.discover_ranks()
    layout = check_runtime(cfg, info).layout
    dist.init_distributed(info, layout, 5)
    try:
        dist.seed_everything(cfg.train.seed)
        state = _build(cfg, layout)
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        state.optimizer.step()  # torch Adam allocates its moments on the first step
        seen: set = set()
        weights = _storage_bytes((p for c in state.model for p in c.parameters()), seen)
        grads = _storage_bytes(
            (b.grad_data for c in state.model for b in [*c.buffers, *c.expert_parallel_buffers]),
            seen,
        )
        inner = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
        main, moments = [], []
        for opt in inner:
            for group in opt.optimizer.param_groups:
                for p in group["params"]:
                    main.append(p)
                    moments += [v for k, v in opt.optimizer.state[p].items() if k != "step"]
        # Main parameters that are views of the model's own (FP32) storage are not new memory.
        optimizer = _storage_bytes(main, seen) + _storage_bytes(moments, seen)
        names = []
        for c in state.model:
            names.append(
                [
                    (n.removeprefix("module.").removeprefix("module."), p.numel())
                    for n, p in c.named_parameters()
                ]
            )
        return {
            "pp_rank": ps.get_pipeline_model_parallel_rank(),
            "dp_rank": ps.get_data_parallel_rank(with_context_parallel=True),
            "expert_dp_rank": ps.get_expert_data_parallel_rank(),
            "weights": weights,
            "grads": grads,
            "optimizer": optimizer,
            "moment_tensors": len(moments),
            "names": names,
        }
    finally:
        dist.destroy_distributed()


CASES = {
    "dense tp2 pp2 bf16 dist-opt": (
        4,
        [
            "model.name=llm-jp-4-tiny-dense",
            "parallel.tp=2",
            "parallel.pp=2",
            "precision.dtype=bf16",
        ],
    ),
    "dense dp4 bf16 dist-opt (uneven shards)": (
        4,
        ["model.name=llm-jp-4-tiny-dense", _SMALL_VOCAB, "precision.dtype=bf16"],
    ),
    "dense pp2 vpp2 dp2 fp32 dist-opt overlap": (
        4,
        [
            "model.name=llm-jp-4-tiny-dense",
            _SMALL_VOCAB,
            "parallel.pp=2",
            "parallel.vpp=2",
            "parallel.overlap_grad_reduce=true",
        ],
    ),
    "moe tp2 ep2 bf16 dist-opt": (
        4,
        [
            "model.name=llm-jp-4-tiny-moe",
            _SMALL_VOCAB,
            "parallel.tp=2",
            "parallel.ep=2",
            "precision.dtype=bf16",
        ],
    ),
    "moe tp2 ep2 etp2 bf16 bf16-grads dist-opt": (
        4,
        [
            "model.name=llm-jp-4-tiny-moe",
            _SMALL_VOCAB,
            "parallel.tp=2",
            "parallel.ep=2",
            "parallel.etp=2",
            "precision.dtype=bf16",
            "precision.grad_reduce_in_fp32=false",
        ],
    ),
    "moe tp2 pp2 ep2 bf16 plain optimizer": (
        4,
        [
            "model.name=llm-jp-4-tiny-moe",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.ep=2",
            "precision.dtype=bf16",
            "optim.use_distributed_optimizer=false",
        ],
    ),
    "moe ep4 fp32 plain optimizer": (
        4,
        [
            "model.name=llm-jp-4-tiny-moe",
            _SMALL_VOCAB,
            "parallel.ep=4",
            "optim.use_distributed_optimizer=false",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_static_memory_matches_megatron_on_every_rank(case):
    world, overrides = CASES[case]
    results = spawn(_measure, world, overrides)
    cfg = build_config(overrides=["data.synthetic=true", *overrides])
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, world)
    overlap = cfg.parallel.overlap_grad_reduce
    for rank, r in enumerate(results):
        # The planner's tensor inventory is megatron's, name by name, in registration order.
        chunks = rank_chunks(cfg.model, layout, r["pp_rank"])
        predicted = [
            [(p.name, p.numel) for p in chunk_params(cfg.model, layout, c)] for c in chunks
        ]
        assert predicted == [[tuple(x) for x in chunk] for chunk in r["names"]], rank
        exact = static_memory(
            cfg.model,
            layout,
            cfg.precision,
            cfg.optim,
            overlap,
            r["pp_rank"],
            dp_rank=r["dp_rank"],
            expert_dp_rank=r["expert_dp_rank"],
        )
        measured = (r["weights"], r["grads"], r["optimizer"])
        assert (exact.weights, exact.grads, exact.optimizer) == measured, (rank, measured)
        assert r["moment_tensors"] > 0
        # The search's closed form: exact weights and gradients, optimizer at the slice size.
        fast = static_memory(cfg.model, layout, cfg.precision, cfg.optim, overlap, r["pp_rank"])
        assert (fast.weights, fast.grads) == (r["weights"], r["grads"])
        assert r["optimizer"] <= fast.optimizer
        n_tensors = sum(len(chunk) for chunk in predicted)
        opt_bytes = 12 if cfg.precision.dtype == "bf16" else 8
        # Ranks differ only by padding in their slice: < 64 elements per tensor plus the
        # end-of-bucket padding (< 128 elements per bucket, one bucket per buffer here).
        slack = (64 * n_tensors + 128 * 2 * len(chunks)) * opt_bytes
        assert fast.optimizer - r["optimizer"] <= slack


def test_uneven_distributed_optimizer_shards_are_predicted_per_rank():
    """With dp4 the slices hold different amounts of padding: ranks differ, and the exact
    per-rank figures (checked against megatron above) differ the same way."""
    world, overrides = CASES["dense dp4 bf16 dist-opt (uneven shards)"]
    cfg = build_config(overrides=["data.synthetic=true", *overrides])
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, world)
    per_rank = [
        static_memory(cfg.model, layout, cfg.precision, cfg.optim, False, 0, dp_rank=r).optimizer
        for r in range(world)
    ]
    assert len(set(per_rank)) > 1
    fast = static_memory(cfg.model, layout, cfg.precision, cfg.optim, False, 0).optimizer
    assert max(per_rank) <= fast
