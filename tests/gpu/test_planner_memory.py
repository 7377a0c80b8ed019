"""The planner's memory estimate against what one GPU really allocates (skipped without CUDA).

One rank, Transformer Engine layers, BF16, the distributed optimizer: after one optimizer step
(Adam's moments exist) ``memory_allocated`` must match the planner's weights + gradients +
optimizer figure, and the peak of the real training loop (``trainer.run``) above that must
match the activation estimate (saved tensors plus the largest transient, here the logits).
Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import pytest
import torch

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.parallel.layout import make_layout
from megatron_llmjp.planner.activations import Recompute, activation_memory
from megatron_llmjp.planner.hardware import GiB
from megatron_llmjp.planner.memory import static_memory

pytestmark = pytest.mark.gpu

OVERRIDES = [
    "model.name=llm-jp-4-tiny-dense",
    "model.num_layers=8",
    "model.hidden_size=1024",
    "model.ffn_hidden_size=4096",
    "model.num_attention_heads=8",
    "model.num_query_groups=4",
    "model.kv_channels=128",
    "precision.dtype=bf16",
    "train.seq_length=2048",
    "train.micro_batch_size=2",
    "train.global_batch_size=2",
    "train.iters=2",
    "data.synthetic=true",
    "logging.tensorboard=false",
]


def _static_bytes(cfg, layout) -> int:
    """Bytes allocated by the model, DDP buffers and optimizer (after one step, so Adam's
    moments exist), measured with the caching allocator."""
    import gc

    from megatron_llmjp.parallel import dist
    from megatron_llmjp.training.trainer import _build

    dist.init_distributed(dist.RankInfo(0, 0, 1, "single"), layout, 5)
    try:
        dist.seed_everything(cfg.train.seed)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        state = _build(cfg, layout)
        for chunk in state.model:
            chunk.zero_grad_buffer()
        state.optimizer.zero_grad()
        state.optimizer.step()
        torch.cuda.synchronize()
        measured = torch.cuda.memory_allocated() - base
        del state
        gc.collect()
        torch.cuda.empty_cache()
        return measured
    finally:
        dist.destroy_distributed()


def test_estimate_matches_measured_peak(tmp_path, monkeypatch):
    pytest.importorskip("transformer_engine")
    from megatron_llmjp.training.trainer import run
    from tests.helpers.spawn import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    cfg = build_config(overrides=[*OVERRIDES, f"output_dir={tmp_path}"])
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, 1)
    static_measured = _static_bytes(cfg, layout)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(cfg)  # the real training loop: 2 steps on one GPU
    peak = torch.cuda.max_memory_allocated() - base
    activations_measured = peak - static_measured

    t = cfg.train
    n_micro = t.global_batch_size // t.micro_batch_size
    st = static_memory(cfg.model, layout, cfg.precision, cfg.optim, False, 0, dp_rank=0, te=True)
    act = activation_memory(
        cfg.model, layout, t.micro_batch_size, t.seq_length, n_micro, 2, Recompute(), 0
    )
    print(
        f"\nstatic: measured {static_measured / GiB:.3f} GiB, estimated {st.total / GiB:.3f} GiB "
        f"(weights {st.weights / GiB:.3f}, grads {st.grads / GiB:.3f}, optimizer "
        f"{st.optimizer / GiB:.3f}); peak of a training step above it: measured "
        f"{activations_measured / GiB:.3f} GiB, estimated {(act.saved + act.transient) / GiB:.3f}"
        f" GiB (saved {act.saved / GiB:.3f}, transient {act.transient / GiB:.3f}; per layer "
        f"{act.per_layer / GiB:.4f})"
    )
    # Static tensors: exact up to the caching allocator's 512-byte rounding and small buffers.
    assert static_measured == pytest.approx(st.total, rel=0.02)
    # Activations: the published per-tensor accounting, within 25% of the measured peak.
    assert activations_measured == pytest.approx(act.saved + act.transient, rel=0.25)
