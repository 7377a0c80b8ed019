"""Emulated FP8 through the real trainer on CPU/gloo at TP2: the emulated layers are in the
model, the loss falls, differs from BF16 (quantisation is on) but stays close, and a resume
restores the delayed-scaling state bitwise."""

from __future__ import annotations

import math

import pytest

from megatron_llmjp.checkpoint.store import read_latest
from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

BF16_TP2 = [
    "model.name=llm-jp-4-tiny-dense",
    "model.vocab_size=1000",
    "data.synthetic=true",
    "precision.dtype=bf16",
    "parallel.tp=2",
    "train.iters=6",
    "train.seq_length=64",
    "optim.lr=3e-3",
    "schedule.warmup_iters=2",
    "logging.tensorboard=false",
]
FP8 = ["precision.fp8=delayed", "precision.fp8_format=hybrid", "precision.fp8_backend=emulated"]


def _emulated_layers(overrides: list[str]) -> list[tuple[int, str, bool]]:
    """(global layer number, linear name, fp8 enabled) of each emulated linear on this rank."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_llmjp.models.build import build_model_chunks
    from megatron_llmjp.parallel import dist
    from megatron_llmjp.precision.emulated import _EmulatedLinear
    from megatron_llmjp.training.trainer import check_runtime

    cfg = build_config(overrides=overrides)
    info = dist.discover_ranks()
    layout = check_runtime(cfg, info).layout
    dist.init_distributed(info, layout, 5)
    try:
        found = []
        for chunk in build_model_chunks(cfg, layout):
            for layer in chunk.modules():
                if isinstance(layer, TransformerLayer):
                    for name, m in layer.named_modules():
                        if isinstance(m, _EmulatedLinear):
                            found.append((layer.layer_number, name, m.fp8_enabled))
        return found
    finally:
        dist.destroy_distributed()


def _train(overrides: list[str]) -> dict:
    from megatron_llmjp.training.trainer import run

    result = run(build_config(overrides=overrides))
    return {
        "loss": [r["loss"] for r in result.history],
        "grad_norm": [r["grad_norm"] for r in result.history],
        "records": result.history,
        "iteration": result.progress.iteration,
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict:
    """6-step TP2 runs, BF16 and emulated FP8 (delayed, hybrid), computed once."""
    runs = {}
    for name, extra in (("bf16", []), ("fp8", FP8)):
        out = tmp_path_factory.mktemp(name)
        runs[name] = spawn(_train, 2, [*BF16_TP2, *extra, f"output_dir={out}"])[-1]
    return runs


def test_emulated_layers_are_in_the_model():
    layers = spawn(_emulated_layers, 2, [*BF16_TP2, *FP8, "precision.bf16_last_layers=1"])
    for found in layers:  # both TP ranks
        names = {name for _, name, _ in found}
        assert {"self_attention.linear_qkv", "self_attention.linear_proj"} <= names
        assert {"mlp.linear_fc1", "mlp.linear_fc2"} <= names
        assert len(found) == 4 * 4  # 4 layers x (qkv, proj, fc1, fc2)
        assert {n for n, _, on in found if not on} == {4}  # the last layer stays BF16


def test_emulated_fp8_trains_close_to_bf16(straight):
    bf16, fp8 = straight["bf16"]["loss"], straight["fp8"]["loss"]
    assert all(math.isfinite(x) for x in fp8)
    assert all(math.isfinite(r["grad_norm"]) for r in straight["fp8"]["records"])
    assert sum(fp8[-3:]) / 3 < fp8[0] - 0.3, fp8
    diffs = [abs(a - b) for a, b in zip(fp8, bf16, strict=True)]
    assert max(diffs) > 1e-4, (fp8, bf16)  # quantisation is on
    assert diffs[0] < 0.01 and max(d / b for d, b in zip(diffs, bf16, strict=True)) < 0.02, (
        fp8,
        bf16,
    )
    for r in straight["fp8"]["records"]:
        assert r["tflops_per_gpu"] > 0 and "mfu" not in r  # CPU: FLOP/s only


@pytest.mark.slow
def test_emulated_fp8_resume_is_bitwise_exact(straight, tmp_path):
    """The amax histories and scales travel in the layers' ``_extra_state``: without them the
    resumed run would restart from scale 1 and its losses would differ."""
    ckpt = f"checkpoint.dir={tmp_path / 'ckpt'}"
    first = spawn(_train, 2, [*BF16_TP2, *FP8, ckpt, "train.iters=3", f"output_dir={tmp_path}"])
    assert read_latest(tmp_path / "ckpt") == 3
    second = spawn(_train, 2, [*BF16_TP2, *FP8, ckpt, f"output_dir={tmp_path / 'b'}"])
    ref = straight["fp8"]
    assert second[-1]["iteration"] == 6
    for key in ("loss", "grad_norm"):
        assert first[-1][key] + second[-1][key] == ref[key], key
