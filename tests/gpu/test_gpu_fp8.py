"""FP8 through Transformer Engine on a GPU (skipped without CUDA): the recipe reaches TE, the
loss falls and MFU is logged against the FP8 peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_llmjp.config.loader import ConfigError, build_config
from megatron_llmjp.precision import recipes

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def _precision(recipe: str):
    overrides = ["data.synthetic=true", "precision.dtype=bf16", f"precision.fp8={recipe}"]
    return build_config(overrides=overrides).precision


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_fp8_training_with_transformer_engine(tmp_path, recipe):
    te = pytest.importorskip("transformer_engine")
    capability = torch.cuda.get_device_capability()
    if recipes.fp8_hardware_error(_precision(recipe), capability, str(te.__version__)):
        with pytest.raises(ConfigError):  # refused up front, not deep inside TE
            recipes.check_precision_runtime(_precision(recipe))
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    cmd += ["-m", "megatron_llmjp.cli.train", "--output-dir", str(tmp_path)]
    for o in (
        "model.name=llm-jp-4-tiny-dense",
        "data.synthetic=true",
        "precision.dtype=bf16",
        f"precision.fp8={recipe}",
        "train.iters=20",
        "train.seq_length=256",
        "optim.lr=3e-3",
    ):
        cmd += ["--set", o]
    proc = subprocess.run(
        cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert all(r["tflops_per_gpu"] > 0 for r in records)
    from megatron_llmjp.precision.peaks import gpu_kind

    if gpu_kind(torch.cuda.get_device_name()) in ("H100 SXM", "H200"):
        assert all(0 < r["mfu"] < 1 for r in records)


def test_emulated_backend_uses_local_layers_on_gpu():
    from megatron_llmjp.models.build import use_transformer_engine

    cfg = build_config(
        overrides=[
            "data.synthetic=true",
            "precision.dtype=bf16",
            "precision.fp8=delayed",
            "precision.fp8_backend=emulated",
        ]
    )
    assert not use_transformer_engine(cfg)
