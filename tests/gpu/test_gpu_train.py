"""GPU path: NCCL + Transformer Engine layer spec. Skipped on machines without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def test_transformer_engine_spec_is_selected():
    pytest.importorskip("transformer_engine")
    from megatron_llmjp.models.build import use_transformer_engine

    assert use_transformer_engine()


@pytest.mark.parametrize("model", ["llm-jp-4-tiny-dense", "llm-jp-4-tiny-moe"])
def test_bf16_training_on_gpus(tmp_path, model):
    """On one GPU the MoE model runs EP1 (all experts on the rank, TE grouped GEMM); with two
    GPUs it runs EP2 (the all-to-all dispatcher between them)."""
    pytest.importorskip("transformer_engine")
    n = min(2, torch.cuda.device_count())
    extra = ["--set", f"parallel.ep={n}"] if "moe" in model else []
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "-m",
        "megatron_llmjp.cli.train",
        "--output-dir",
        str(tmp_path),
        "--set",
        f"model.name={model}",
        "--set",
        "data.synthetic=true",
        "--set",
        "precision.dtype=bf16",
        "--set",
        "train.iters=20",
        "--set",
        "train.seq_length=256",
        "--set",
        "optim.lr=3e-3",
        *extra,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5


def test_moe_experts_are_te_grouped_gemm_on_one_gpu(single_rank):
    """EP1 on one GPU: every expert of a layer lives on the rank, in one TE grouped GEMM per
    projection (megatron-core's TEGroupedMLP), and the layout-independent init covers them."""
    pytest.importorskip("transformer_engine")
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    cfg, chunks = single_rank(
        ["model.name=llm-jp-4-tiny-moe", "precision.dtype=bf16", "parallel.ep=1"]
    )
    layers = chunks[0].decoder.layers
    assert len(layers) == cfg.model.num_layers
    for layer in layers:
        experts = layer.mlp.experts
        assert isinstance(experts, TEGroupedMLP)
        assert experts.num_local_experts == cfg.model.num_experts
        # fc1 of each expert is [2 * moe_ffn, hidden] (SwiGLU), one weight per expert.
        w = experts.linear_fc1.weight0
        assert tuple(w.shape) == (2 * cfg.model.moe_ffn_hidden_size, cfg.model.hidden_size)
        assert torch.isfinite(w).all() and w.float().std() > 0
