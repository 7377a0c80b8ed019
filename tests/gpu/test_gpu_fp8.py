"""FP8 through Transformer Engine on a GPU (skipped without CUDA): the recipe reaches TE, the
loss falls and MFU is logged against the FP8 peak."""

from __future__ import annotations

import json
import math
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


_FP8_INIT_MODEL = [
    "model.name=llm-jp-4-tiny-dense",
    "model.hidden_size=256",
    "model.ffn_hidden_size=512",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.kv_channels=64",
    "precision.dtype=bf16",
]


@torch.no_grad()
def _weights(chunks) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, bool]]:
    """name -> (value as FP32 on the CPU, TE's high-precision initial value or None, FP8?)."""
    from megatron.core.fp8_utils import is_float8tensor

    out = {}
    for name, p in chunks[0].named_parameters():
        fp8 = is_float8tensor(p)
        value = p.dequantize() if fp8 else p.detach()
        get_init = getattr(p, "get_high_precision_init_val", None)
        initial = get_init() if get_init is not None else None
        out[name] = (
            value.float().cpu(),
            None if initial is None else initial.float().cpu(),
            fp8,
        )
    return out


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_fp8_parameters_get_the_bf16_initial_weights(single_rank, recipe):
    """precision.fp8_param_gather: weights built under TE's fp8_model_init are wrapper tensors
    without a storage; the layout-independent init must still give them the BF16 model's
    values (up to FP8 rounding) and hand the exact values to the optimizer's master copy."""
    te = pytest.importorskip("transformer_engine")
    p = _precision(recipe)
    if recipes.fp8_hardware_error(p, torch.cuda.get_device_capability(), str(te.__version__)):
        pytest.skip(f"{recipe} is not supported on this GPU / TE")
    _, chunks = single_rank(_FP8_INIT_MODEL)
    ref = _weights(chunks)
    _, chunks = single_rank(
        [*_FP8_INIT_MODEL, f"precision.fp8={recipe}", "precision.fp8_param_gather=true"]
    )
    got = _weights(chunks)
    assert got.keys() == ref.keys()
    quantized = [n for n, (_, _, fp8) in got.items() if fp8]
    # Every linear weight of the transformer layers (qkv, proj, fc1, fc2 per layer) is FP8.
    assert len(quantized) >= 4 * 4, quantized
    for name, (value, initial, fp8) in got.items():
        want = ref[name][0]
        if not fp8:
            assert torch.equal(value, want), name
            continue
        # e4m3 keeps 3 mantissa bits: at most 1/16 relative rounding error per normal value
        # (current and block scaling map the amax to 448, so nearly all values are normal);
        # delayed scaling starts from scale 1, where values below 2**-6 are subnormal.
        bound = 0.2 if recipe == "delayed" else 1 / 16
        rel = (value - want).norm() / want.norm()
        assert rel < bound, (name, float(rel))
        if initial is not None:
            assert torch.equal(initial, want), name


def test_fp8_param_gather_training(tmp_path):
    """FP8 weights all-gathered in FP8 by the distributed optimizer: the loss falls."""
    te = pytest.importorskip("transformer_engine")
    p = _precision("tensorwise")
    if recipes.fp8_hardware_error(p, torch.cuda.get_device_capability(), str(te.__version__)):
        pytest.skip("tensorwise FP8 is not supported on this GPU / TE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1"]
    cmd += ["-m", "megatron_llmjp.cli.train", "--output-dir", str(tmp_path)]
    for o in (
        *_FP8_INIT_MODEL,
        "data.synthetic=true",
        "precision.fp8=tensorwise",
        "precision.fp8_param_gather=true",
        "optim.use_distributed_optimizer=true",
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
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
