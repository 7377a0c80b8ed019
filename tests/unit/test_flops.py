"""The model-FLOP counter against a hand count, and the TFLOP/s / MFU fields the trainer logs."""

from __future__ import annotations

import pytest

from megatron_llmjp.config.loader import build_config
from megatron_llmjp.planner.timing import model_flops_per_token
from megatron_llmjp.training.flops import ThroughputMeter, forward_flops, step_flops

RUN = ["data.synthetic=true", "model.vocab_size=1000", "train.seq_length=64"]
# train.global_batch_size defaults to 8: 8 x 64 = 512 tokens per step.


def test_dense_hand_count():
    # llm-jp-4-tiny-dense: hidden 64, 4 heads, 2 query groups, head dim 32 (not 64 / 4 = 16),
    # SwiGLU 192, 4 layers; vocab 1000, sequence 64.
    cfg = build_config(overrides=[*RUN, "model.name=llm-jp-4-tiny-dense"])
    qkv = 2 * 64 * (4 * 32 + 2 * 2 * 32)  # 32,768: Q 128 + K 64 + V 64 columns
    proj = 2 * (4 * 32) * 64  # 16,384
    core = 2 * (64 / 2) * (4 * 32) * 2  # 16,384: QK^T and AV, causal (32 keys on average)
    mlp = 3 * 2 * 64 * 192  # 73,728: gate, up, down
    output = 2 * 64 * 1000  # 128,000: true vocabulary
    per_token = 4 * (qkv + proj + core + mlp) + output
    assert per_token == 685_056
    f = forward_flops(cfg.model, 64)
    assert (f.attention_proj, f.attention_core, f.mlp, f.output) == (
        qkv + proj,
        core,
        mlp,
        output,
    )
    assert f.per_token == per_token
    assert step_flops(cfg) == 3 * per_token * 8 * 64
    # Full (non-causal) attention doubles the core only.
    assert forward_flops(cfg.model, 64, causal=False).per_token == per_token + 4 * core
    # The planner's estimate uses the same conventions.
    assert 3 * per_token == pytest.approx(model_flops_per_token(cfg.model, 64), rel=1e-12)


def test_moe_hand_count_counts_active_experts_and_router():
    # llm-jp-4-tiny-moe: attention as above, 8 experts of SwiGLU 64, top-2.
    cfg = build_config(overrides=[*RUN, "model.name=llm-jp-4-tiny-moe"])
    attention = 2 * 64 * 256 + 2 * 128 * 64 + 2 * 32 * 128 * 2  # 65,536
    router = 2 * 64 * 8  # 1,024
    experts = 2 * (3 * 2 * 64 * 64)  # 49,152: two of the eight experts
    per_token = 4 * (attention + router + experts) + 2 * 64 * 1000
    assert per_token == 590_848
    assert forward_flops(cfg.model, 64).per_token == per_token
    assert step_flops(cfg) == 3 * per_token * 512


def test_throughput_fields():
    meter = ThroughputMeter(step_flops=989.4e12 * 4, world_size=8, peak_tflops=989.4)
    fields = meter.fields(2.0)  # 3958 TFLOP over 8 GPUs in 2 s
    assert fields["tflops_per_gpu"] == pytest.approx(247.35)
    assert fields["mfu"] == pytest.approx(0.25)
    cpu = ThroughputMeter(step_flops=1e9, world_size=2, peak_tflops=None).fields(0.5)
    assert cpu == {"tflops_per_gpu": pytest.approx(1e-3)}  # no MFU without a known peak


def test_meter_on_cpu_reports_no_peak():
    cfg = build_config(overrides=[*RUN, "model.name=llm-jp-4-tiny-dense"])
    meter = ThroughputMeter.for_run(cfg, 2)
    assert meter.peak_tflops is None and meter.step_flops == step_flops(cfg)
