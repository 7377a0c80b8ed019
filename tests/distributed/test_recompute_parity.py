"""Activation recompute changes memory, never numbers: every setting trains like no recompute.

On CPU/gloo, FP32, tiny models, with each recompute setting the local (CPU) spec can run
(``core_attn``, ``mlp``/``moe`` and full recompute by both methods; ``layernorm`` and
``moe_act`` need Transformer Engine), at TP2 and PP2 (dense) and EP2 (MoE). Each run is
compared on the same rank with the no-recompute run of its layout: the per-step losses and
gradient norms, and every parameter of the rank's shard after the last step.

The expected difference is zero: recompute replays the same kernels on the same inputs
(megatron-core restores the RNG state; dropout is 0), so the gradients are the same
floating-point values. The test asserts bitwise equality; a failure prints the largest
difference.

One fork of two ranks trains all the settings one after another: each run builds and tears
down megatron-core's model-parallel groups for its layout over one default process group that
lives for the whole fork, so the test pays megatron-core's import and one rendezvous.
"""

from __future__ import annotations

import pytest
import torch

from megatron_llmjp.config.loader import build_config
from tests.helpers.spawn import spawn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 3
BASE = [
    "data.synthetic=true",
    "model.vocab_size=1000",
    f"train.iters={STEPS}",
    "train.seq_length=32",
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "schedule.warmup_iters=1",
    "logging.tensorboard=false",
]
DENSE, MOE = "model.name=llm-jp-4-tiny-dense", "model.name=llm-jp-4-tiny-moe"
SEL = "recompute.granularity=selective"
FULL = "recompute.granularity=full"


def _full(method: str, n: int) -> list[str]:
    return [FULL, f"recompute.method={method}", f"recompute.num_layers={n}"]


# (model and layout, [recompute settings]); the first setting of each is the reference.
CASES = [
    (
        [DENSE, "parallel.tp=2"],
        [
            [],
            [SEL, "recompute.modules=[core_attn]"],
            [SEL, "recompute.modules=[mlp]"],
            _full("uniform", 1),
            _full("block", 1),
        ],
    ),
    (
        [DENSE, "parallel.pp=2"],  # 2 layers per stage
        [
            [],
            [SEL, "recompute.modules=[core_attn,mlp]"],
            _full("uniform", 2),
            _full("block", 1),
        ],
    ),
    (
        [MOE, "parallel.ep=2"],
        [
            [],
            [SEL, "recompute.modules=[moe]"],
            [SEL, "recompute.modules=[core_attn,moe]"],
            _full("uniform", 1),
        ],
    ),
]


def _train_all(cases: list) -> list[list[dict]]:
    """Every case's settings on this rank: losses, gradient norms and the final parameters'
    difference from the case's first setting (max |a - b| and whether all are bitwise equal)."""
    from megatron.core import parallel_state as ps

    from megatron_llmjp.parallel import dist
    from megatron_llmjp.training import trainer

    # A run ends by destroying its groups; keep the default one for the next run (the
    # trainer creates it only when none exists). This fork ends with the test.
    dist.destroy_distributed = ps.destroy_model_parallel

    built: list = []
    build = trainer._build

    def capture(cfg, layout):
        state = build(cfg, layout)
        built.append(state)
        return state

    trainer._build = capture
    out: list[list[dict]] = []
    for layout, settings in cases:
        runs: list[dict] = []
        ref_params: dict[str, torch.Tensor] | None = None
        for setting in settings:
            cfg = build_config(overrides=BASE + layout + setting)
            history = trainer.run(cfg).history
            state = built.pop()
            params = {
                f"{i}.{name}": p.detach().clone()
                for i, chunk in enumerate(state.model)
                for name, p in chunk.named_parameters()
            }
            assert params, "no parameters on this rank"
            if ref_params is None:
                ref_params = params
            assert params.keys() == ref_params.keys()
            diffs = [(params[k] - ref_params[k]).abs().max().item() for k in params]
            tcfg = state.model[0].config  # the TransformerConfig megatron-core ran with
            runs.append(
                {
                    "setting": setting,
                    "recompute": cfg.recompute.granularity,
                    "megatron": (
                        tcfg.recompute_granularity,
                        sorted(tcfg.recompute_modules or []),
                        tcfg.recompute_method,
                        tcfg.recompute_num_layers,
                    ),
                    "loss": [r["loss"] for r in history],
                    "grad_norm": [r["grad_norm"] for r in history],
                    "param_max_diff": max(diffs),
                    "param_bitwise": all(torch.equal(params[k], ref_params[k]) for k in params),
                }
            )
        out.append(runs)
    return out


def _expected_megatron(setting: list[str]) -> tuple:
    """megatron-core's recompute fields for a setting, derived from the overrides by hand
    (megatron-core fills ``recompute_modules`` with its default ``[core_attn]`` when unset)."""
    values = dict(x.split("=", 1) for x in setting)
    granularity = values.get("recompute.granularity")
    modules = values.get("recompute.modules", "[core_attn]").strip("[]").split(",")
    if granularity != "selective":
        modules = ["core_attn"]
    num_layers = values.get("recompute.num_layers")
    return (
        granularity,
        sorted(modules),
        values.get("recompute.method"),
        None if num_layers is None else int(num_layers),
    )


def test_every_recompute_setting_trains_bitwise_like_none():
    ranks = spawn(_train_all, 2, CASES, timeout=300)
    for rank, cases in enumerate(ranks):
        for (layout, settings), runs in zip(CASES, cases, strict=True):
            ref = runs[0]
            assert ref["recompute"] == "none"
            assert len(ref["loss"]) == STEPS
            for setting, run in zip(settings, runs, strict=True):
                where = f"rank {rank} {layout} {setting}"
                assert run["megatron"] == _expected_megatron(setting), where
                assert run["param_bitwise"], (where, run["param_max_diff"])
                if rank == 1:  # the last pipeline stage of pp=2 holds the losses
                    assert run["loss"] == ref["loss"], where
                    assert run["grad_norm"] == ref["grad_norm"], where
            # the settings are different runs, not one run reported several times
            assert {r["recompute"] for r in runs[1:]} <= {"selective", "full"}
    # training moved the weights: the runs compared are not all at initialisation
    assert ranks[1][0][0]["loss"][0] != ranks[1][0][0]["loss"][-1]
