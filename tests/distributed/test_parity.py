"""Layout parity: every parallel layout reproduces the single-process losses (FP32, gloo).

All layouts start from the same weights (layout-independent init) and read the same tokens per
optimizer step, so the per-step losses must agree up to float reduction order. MoE aux and
z-losses are switched off here: megatron-core computes them over each rank's local tokens, so
they legitimately differ between layouts (they are covered by the BF16/MoE training tests).
"""

from __future__ import annotations

import math

import pytest

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed

STEPS = 5
BASE = [
    "data.synthetic=true",
    "model.vocab_size=1000",
    f"train.iters={STEPS}",
    "train.seq_length=64",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "schedule.warmup_iters=2",
    "logging.tensorboard=false",
    "model.moe_aux_loss_coeff=0",
    "model.moe_z_loss_coeff=0",
]


def _losses(overrides: list[str], out_dir: str) -> dict[str, list[float]]:
    from megatron_llmjp.training.trainer import run

    cfg = build_config(overrides=BASE + overrides + [f"output_dir={out_dir}"])
    history = run(cfg).history
    return {key: [r[key] for r in history] for key in ("loss", "grad_norm")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cache: dict[str, list[float]] = {}

    def get(model: str) -> dict[str, list[float]]:
        if model not in cache:
            out = tmp_path_factory.mktemp(f"ref-{model}")
            cache[model] = spawn(_losses, 1, [f"model.name={model}"], str(out))[0]
        return cache[model]

    return get


LAYOUTS = [
    # (model, world, overrides)
    ("llm-jp-4-tiny-dense", 2, ["parallel.tp=2"]),
    ("llm-jp-4-tiny-dense", 2, ["parallel.pp=2"]),
    ("llm-jp-4-tiny-dense", 2, ["parallel.pp=2", "parallel.vpp=2"]),
    ("llm-jp-4-tiny-dense", 4, ["parallel.pp=2", "parallel.vpp=2"]),
    ("llm-jp-4-tiny-dense", 2, ["optim.use_distributed_optimizer=true"]),
    ("llm-jp-4-tiny-dense", 2, ["optim.use_distributed_optimizer=false"]),
    ("llm-jp-4-tiny-dense", 4, ["parallel.tp=2", "parallel.pp=2"]),
    ("llm-jp-4-tiny-dense", 4, ["parallel.tp=2"]),
    (
        "llm-jp-4-tiny-dense",
        4,
        ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"],
    ),
    ("llm-jp-4-tiny-moe", 2, ["parallel.ep=2"]),
    ("llm-jp-4-tiny-moe", 2, ["parallel.tp=2"]),
    ("llm-jp-4-tiny-moe", 2, ["parallel.ep=2", "parallel.moe_token_dispatcher=allgather"]),
    ("llm-jp-4-tiny-moe", 4, ["parallel.ep=2", "parallel.tp=2"]),
    ("llm-jp-4-tiny-moe", 4, ["parallel.ep=2", "parallel.pp=2"]),
    ("llm-jp-4-tiny-moe", 4, ["parallel.ep=4"]),
]


@pytest.mark.parametrize(
    "model,world,overrides", LAYOUTS, ids=[f"{m[12:]}-w{w}-" + "-".join(o) for m, w, o in LAYOUTS]
)
def test_layout_matches_single_process(model, world, overrides, reference, tmp_path):
    ref = reference(model)
    got = spawn(_losses, world, [f"model.name={model}", *overrides], str(tmp_path))[-1]
    # The gradient norm is compared too: Adam is nearly invariant to a wrong gradient scale, so
    # the losses alone would not reveal a norm (and clipping threshold) that is off.
    for key in ("loss", "grad_norm"):
        assert len(got[key]) == STEPS
        assert all(math.isfinite(x) for x in got[key])
        rel = [abs(a - b) / abs(b) for a, b in zip(got[key], ref[key], strict=True)]
        assert max(rel) < 1e-5, (
            f"{key} {got[key]} vs single-process {ref[key]}: max rel diff {max(rel):.2e}"
        )
    # The losses must move: identical constant curves would hide a broken optimizer step.
    assert ref["loss"][-1] < ref["loss"][0]
