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


@pytest.mark.parametrize(
    "model,extra",
    [
        ("llm-jp-4-tiny-dense", []),
        ("llm-jp-4-tiny-moe", ["--set", "parallel.ep=2"]),
    ],
)
def test_bf16_training_on_gpus(tmp_path, model, extra):
    pytest.importorskip("transformer_engine")
    n = min(2, torch.cuda.device_count())
    if "parallel.ep=2" in extra and n < 2:
        pytest.skip("EP2 needs two GPUs")
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
