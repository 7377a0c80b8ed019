"""``llmjp-plan``: buffer arithmetic, activation formulas, known LLM-jp runs, bad input."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_llmjp.cli.plan import main
from megatron_llmjp.config.loader import build_config
from megatron_llmjp.config.schema import ParallelConfig, TrainConfig
from megatron_llmjp.models.params import count_parameters, padded_vocab_size
from megatron_llmjp.models.registry import MODELS
from megatron_llmjp.parallel.layout import make_layout
from megatron_llmjp.planner.activations import (
    Recompute,
    activation_memory,
    in_flight_chunks,
    layer_terms,
)
from megatron_llmjp.planner.hardware import GPUS, GiB, get_gpu
from megatron_llmjp.planner.search import PlanOptions, SearchSpace, search
from megatron_llmjp.planner.shards import (
    Param,
    buffer_size,
    chunk_params,
    lay_out_buffer,
    rank_chunks,
    sums_of,
)
from megatron_llmjp.planner.timing import Cluster

REPO = Path(__file__).resolve().parents[2]
ABCI3 = REPO / "configs" / "abci3"
LLMJP_332B_RECOMPUTE = Recompute("selective", ("layernorm", "moe_act"))


def _layout(model: str, world: int, train: TrainConfig | None = None, **parallel):
    return make_layout(ParallelConfig(**parallel), MODELS[model], train or TrainConfig(), world)


# --- DDP buffer arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_closed_form_buffer_size_equals_the_layout_walk(seed):
    rng = random.Random(seed)
    params = [Param(f"p{i}", rng.randint(1, 5000), False) for i in range(rng.randint(1, 40))]
    if seed % 3 == 0:  # a tied embedding on pp > 1: a bucket of its own, first or last
        shared = Param("emb", rng.randint(1000, 9000), False, shared=True)
        params = [shared, *params] if seed % 2 else [*params, shared]
    dp = rng.choice([1, 2, 3, 4, 6, 8, 64, 96])
    for distributed in (True, False):
        walk = lay_out_buffer(params, dp, distributed, None)
        size = buffer_size(sums_of(params), dp, distributed, None)
        assert size.exact and size.numel == walk.numel
        if distributed:
            assert walk.numel % dp == 0
            # every parameter element is owned by exactly one DP rank
            assert sum(walk.owned(dp, r) for r in range(dp)) == sum(p.numel for p in params)
            assert max(walk.owned(dp, r) for r in range(dp)) <= walk.numel // dp
        else:
            assert walk.numel == sum(p.numel for p in params)


@pytest.mark.parametrize("seed", range(10))
def test_multi_bucket_closed_form_is_an_upper_bound(seed):
    rng = random.Random(100 + seed)
    params = [Param(f"p{i}", rng.randint(100, 5000), False) for i in range(60)]
    dp, bucket = rng.choice([2, 8, 256]), rng.randint(3000, 20000)
    walk = lay_out_buffer(params, dp, True, bucket)
    size = buffer_size(sums_of(params), dp, True, bucket)
    assert len(walk.buckets) > 1
    assert walk.numel <= size.numel
    assert all((end - start) % dp == 0 for start, end in walk.buckets)


def test_distributed_optimizer_alignment_rules():
    # Three tensors of 10 elements: each starts at a multiple of 64, the bucket ends at
    # lcm(dp, 128): 64 + 64 + 10 = 138 -> 256 with dp 2, -> lcm(3, 128) = 384 with dp 3.
    params = [Param(f"p{i}", 10, False) for i in range(3)]
    assert lay_out_buffer(params, 2, True, None).numel == 256
    assert lay_out_buffer(params, 3, True, None).numel == 384
    assert lay_out_buffer(params, 2, False, None).numel == 30
    # reverse order: the last registered tensor comes first in the buffer
    assert lay_out_buffer(params, 2, True, None).ranges == ((0, 10), (64, 74), (128, 138))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unsharded_inventory_matches_the_parameter_counter(name):
    m = MODELS[name]
    lay = _layout(name, 1)
    tensors = [p for c in rank_chunks(m, lay, 0) for p in chunk_params(m, lay, c)]
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, 1)
    assert sum(p.numel for p in tensors) == count_parameters(m, vocab_size=vocab).total


def test_expert_weights_live_in_the_expert_buffer_only_with_ep():
    m = MODELS["llm-jp-4-332b-a31b"]
    for ep, expect in ((1, False), (8, True)):
        lay = _layout("llm-jp-4-332b-a31b", 512, TrainConfig(global_batch_size=2048), ep=ep)
        experts = [
            p for p in chunk_params(m, lay, rank_chunks(m, lay, 0)[0]) if "experts" in p.name
        ]
        assert experts and all(p.expert is expect for p in experts)
        assert len(experts) == 2 * m.num_layers * m.num_experts // ep


# --- activation memory --------------------------------------------------------------------------


def test_8b_layer_activations_by_hand():
    """LLM-jp-4 8B, BF16, micro batch 1, seq 4096, no parallelism: per token, attention keeps
    the norm input (2h + 4), norm output (2h), Q/K/V (2(nq + 2ng)d), output (2 nq d) and the
    softmax statistics (4 nq); the MLP the norm input and output, fc1 output (4F), SwiGLU
    output (2F)."""
    m = MODELS["llm-jp-4-8b"]
    h, f, nq, ng, d = 4096, 14336, 32, 8, 128
    per_token = (2 * h + 4) + 2 * h + 2 * (nq + 2 * ng) * d + 2 * nq * d + 4 * nq
    per_token += (2 * h + 4) + 2 * h + 4 * f + 2 * f
    terms = layer_terms(m, _layout("llm-jp-4-8b", 1), 1, 4096, 2, Recompute())
    assert sum(terms.values()) == pytest.approx(per_token * 4096)
    # Comparable to Korthikanti et al.'s 34 sbh (their 4h GeLU MLP and dropout masks).
    assert 30 < per_token / h < 40


def test_kv_heads_replicated_beyond_the_query_groups():
    """TP8 on LLM-jp-4 332B-A31B (80 heads, 4 KV groups): megatron-core holds one whole KV
    group on each rank (each replicated on 2 ranks), not half a group."""
    m = MODELS["llm-jp-4-332b-a31b"]
    lay = _layout("llm-jp-4-332b-a31b", 8, tp=8)
    terms = layer_terms(m, lay, 1, 4096, 2, Recompute())
    assert terms["qkv"] == pytest.approx(2 * (80 / 8 + 2 * 1) * 128 * 4096)
    assert terms["qk_norm_in"] == pytest.approx(2 * (80 / 8 + 1) * 128 * 4096)
    four = layer_terms(m, _layout("llm-jp-4-332b-a31b", 4, tp=4), 1, 4096, 2, Recompute())
    assert four["qkv"] == pytest.approx(2 * (80 + 2 * 4) * 128 / 4 * 4096)  # no replication


def test_sequence_parallel_divides_every_term_by_tp():
    m = MODELS["llm-jp-4-8b"]
    one = sum(layer_terms(m, _layout("llm-jp-4-8b", 1), 1, 4096, 2, Recompute()).values())
    sp = sum(layer_terms(m, _layout("llm-jp-4-8b", 4, tp=4), 1, 4096, 2, Recompute()).values())
    no_sp_layout = _layout("llm-jp-4-8b", 4, tp=4, sequence_parallel=False)
    no_sp = sum(layer_terms(m, no_sp_layout, 1, 4096, 2, Recompute()).values())
    assert sp == pytest.approx(one / 4)
    # Without SP the norm inputs/outputs stay whole on every TP rank (the paper's 10 sbh term).
    assert no_sp == pytest.approx(sp + 3 / 4 * 4096 * (4 * (2 * 4096) + 2 * 4))


def test_recompute_reduces_activations():
    m = MODELS["llm-jp-4-332b-a31b"]
    lay = _layout(
        "llm-jp-4-332b-a31b",
        512,
        TrainConfig(global_batch_size=2048),
        tp=2,
        pp=4,
        vpp=5,
        ep=8,
        etp=1,
    )

    def saved(rc: Recompute) -> int:
        return activation_memory(m, lay, 1, 4096, 32, 2, rc, 0).saved

    none, sel, full = saved(Recompute()), saved(LLMJP_332B_RECOMPUTE), saved(Recompute("full"))
    assert full < sel < none
    # full recompute keeps each layer's (sequence-parallel) input: 2 * s * h / tp bytes
    per_layer = activation_memory(m, lay, 1, 4096, 32, 2, Recompute("full"), 0).per_layer
    assert per_layer == 2 * 4096 * 5120 // 2


def test_pipeline_in_flight_microbatches():
    lay = _layout("llm-jp-4-8b", 8, TrainConfig(global_batch_size=64), pp=4)
    # 1F1B: rank r holds pp - r microbatches (capped by the microbatch count)
    assert [in_flight_chunks(lay, r, 100) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_chunks(lay, 0, 2) == 2
    # Interleaved: the first rank holds L * (1 + (pp - 1) / (pp * vpp)) layer-microbatches.
    lay = _layout("llm-jp-4-8b", 8, TrainConfig(global_batch_size=64), pp=4, vpp=2)
    layers_per_chunk = 32 // (4 * 2)
    held = in_flight_chunks(lay, 0, 100) * layers_per_chunk
    assert held == pytest.approx(32 * (1 + 3 / (4 * 2)))


def test_last_stage_holds_fp32_logits():
    m = MODELS["llm-jp-4-8b"]
    lay = _layout("llm-jp-4-8b", 2, TrainConfig(global_batch_size=64), pp=2)
    first = activation_memory(m, lay, 1, 4096, 32, 2, Recompute(), 0)
    last = activation_memory(m, lay, 1, 4096, 32, 2, Recompute(), 1)
    assert last.saved - first.saved / 2 >= 4 * 4096 * 196608  # one microbatch's exp-logits


# --- the known LLM-jp runs fit on H200 -----------------------------------------------------------


NO_RECOMPUTE = Recompute()


def _plan_config(name: str, nodes: int, recompute: Recompute = NO_RECOMPUTE, **space):
    cfg = build_config(ABCI3 / name, ["data.synthetic=true"])
    opts = PlanOptions(
        world=nodes * 8,
        cluster=Cluster(get_gpu("h200")),
        space=SearchSpace(recompute=(recompute,), **space),
    )
    return cfg, search(cfg, opts)


@pytest.mark.parametrize(
    "config,nodes,layout,recompute",
    [
        ("llm-jp-4-8b_32node_bf16.yaml", 32, (1, 1, None, 1, 1, 1, 256), Recompute()),
        ("llm-jp-4-32b-a3b_32node_bf16.yaml", 32, (1, 1, None, 1, 4, 1, 256), Recompute()),
        ("llm-jp-4-33b_32node_bf16.yaml", 32, (4, 1, None, 1, 1, 1, 64), Recompute()),
        (
            "llm-jp-4-332b-a31b_64node_bf16.yaml",
            64,
            (2, 4, 5, 1, 8, 1, 64),
            LLMJP_332B_RECOMPUTE,
        ),
    ],
)
def test_llm_jp_production_layouts_fit_on_h200(config, nodes, layout, recompute):
    cfg, result = _plan_config(config, nodes, recompute)
    plan = result.config_plan
    lay = plan.layout
    assert (lay.tp, lay.pp, lay.vpp, lay.cp, lay.ep, lay.etp, lay.dp) == layout
    assert plan.fits, plan.memory
    assert plan in result.fitting
    assert plan.memory.total < get_gpu("h200").memory_bytes


def test_8b_recommendation_is_llm_jp_layout():
    _, result = _plan_config("llm-jp-4-8b_32node_bf16.yaml", 32)
    best = result.fitting[0]
    assert best.is_config_layout
    assert (best.layout.tp, best.layout.pp) == (1, 1)


def test_llm_jp_332b_static_memory_by_hand():
    """TP2 PP4 VPP5 EP8 on 512 GPUs, first pipeline rank: 20 layers plus the embedding."""
    cfg, result = _plan_config(
        "llm-jp-4-332b-a31b_64node_bf16.yaml",
        64,
        LLMJP_332B_RECOMPUTE,
        tp=(2,),
        pp=(4,),
        vpp=(5,),
        ep=(8,),
        etp=(1,),
        cp=(1,),
    )
    mem = result.config_plan.memory
    h, nq, ng, d, layers = 5120, 80, 4, 128, 20
    dense = layers * ((h * nq * d + (nq + 2 * ng) * d * h) // 2 + 128 * h + 2 * h + 2 * d)
    dense += 196608 * h // 2
    expert = layers * 16 * 3 * h * 2048
    assert mem.pp_rank == 0
    # BF16 weights, FP32 gradients: exact up to the 64-element alignment of each tensor
    assert mem.weights == pytest.approx(2 * (dense + expert), rel=1e-5)
    assert mem.grads == pytest.approx(4 * (dense + expert), rel=1e-5)
    # FP32 master + 2 moments over dp=64 (dense) and expert dp=16
    assert mem.optimizer == pytest.approx(12 * (dense / 64 + expert / 16), rel=1e-4)


# --- CLI: output and bad input --------------------------------------------------------------------


def test_cli_json_top(capsys):
    code = main(
        [
            "--config",
            str(ABCI3 / "llm-jp-4-8b_32node_bf16.yaml"),
            "--nodes",
            "32",
            "--json",
            "--top",
            "3",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["world"] == 256 and out["gpu"] == "h200"
    assert len(out["plans"]) == 3
    steps = [p["step_time_s"] for p in out["plans"]]
    assert steps == sorted(steps)
    assert all(p["fits"] and p["memory_gib"]["total"] <= out["usable_gib"] for p in out["plans"])
    assert out["config_layout"]["is_config_layout"]


def test_cli_table_for_a_model_name(capsys):
    code = main(["llm-jp-4-32b-a3b", "--nodes", "4", "--gpu", "h100", "--top", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "llm-jp-4-32b-a3b" in out and "4 nodes x 8 h100" in out
    assert len([line for line in out.splitlines() if line.startswith(("  1", "  2"))]) == 2


def test_cli_unknown_gpu(capsys):
    code = main(["llm-jp-4-8b", "--nodes", "1", "--gpu", "v100"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("llmjp-plan: error: unknown GPU type 'v100'")
    assert all(name in err for name in GPUS)


def test_cli_no_layout_fits_names_the_binding_constraint(capsys):
    code = main(["llm-jp-4-332b-a31b", "--nodes", "1", "--gpu", "h100"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "no layout fits llm-jp-4-332b-a31b on 1 node x 8 h100" in err
    assert "smallest per-GPU memory is" in err and "with tp=" in err
    assert "weights" in err and "gradients" in err and "The largest term is" in err


def test_no_fit_smallest_plan_is_reported_with_its_terms(capsys):
    code = main(["llm-jp-4-332b-a31b", "--nodes", "1", "--gpu", "h100", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and out["fitting_plans"] == 0
    closest = out["closest"]
    total = sum(v for k, v in closest["memory_gib"].items() if k != "total")
    assert closest["memory_gib"]["total"] == pytest.approx(total)
    assert closest["memory_gib"]["total"] > out["usable_gib"]


def test_cli_no_valid_layout_gives_the_layout_rules(capsys):
    # 7 GPUs: 32 heads, 32 layers and a global batch of 1024 are all indivisible by 7
    code = main(["llm-jp-4-8b", "--world", "7"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no valid layout" in err and "not divisible" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["llm-jp-4-8b"], "give --nodes N"),
        (["--config", str(ABCI3 / "llm-jp-4-8b_32node_bf16.yaml")], "give --nodes N"),
        (["llm-jp-4-8b", "--config", "x.yaml", "--nodes", "1"], "not both"),
        (["--nodes", "1"], "give a MODEL name or --config"),
        (["llm-jp-4-9b", "--nodes", "1"], "unknown model 'llm-jp-4-9b'"),
        (["llm-jp-4-8b", "--nodes", "1", "--tp", "two"], "--tp 'two'"),
        (["llm-jp-4-8b", "--nodes", "1", "--recompute", "some"], "--recompute 'some'"),
        (["llm-jp-4-8b", "--nodes", "1", "--recompute-modules", "attn"], "unknown 'attn'"),
        (["llm-jp-4-8b", "--nodes", "1", "--set", "train.seq_length=8192"], "seq_length"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("llmjp-plan: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_search_space_and_config_layout_outside_it():
    cfg, result = _plan_config("llm-jp-4-8b_32node_bf16.yaml", 32, tp=(2,), pp=(1,))
    assert {(p.layout.tp, p.layout.pp) for p in result.plans} == {(2, 1)}
    # the config's own layout (tp1) is still estimated and reported
    assert result.config_plan.layout.tp == 1 and result.config_plan.is_config_layout


def test_every_plan_is_a_layout_the_trainer_accepts():
    cfg, result = _plan_config("llm-jp-4-332b-a31b_64node_bf16.yaml", 64)
    assert result.plans and sum(result.rejected.values()) > 0
    for plan in result.plans[:200]:
        lay = plan.layout
        par = replace(
            cfg.parallel, tp=lay.tp, pp=lay.pp, vpp=lay.vpp, cp=lay.cp, ep=lay.ep, etp=lay.etp
        )
        train = replace(cfg.train, micro_batch_size=plan.micro_batch_size)
        assert make_layout(par, cfg.model, train, 512) == lay


def test_timing_bubble_and_interconnect():
    cfg, result = _plan_config("llm-jp-4-8b_32node_bf16.yaml", 32, tp=(1,), cp=(1,))
    by = {(p.layout.pp, p.layout.vpp): p for p in result.plans}
    p4, p4v2 = by[(4, None)], by[(4, 2)]
    t4, t4v2 = p4.time, p4v2.time
    # bubble = (pp - 1) / vpp microbatch times
    per_micro = (t4.step - t4.bubble - t4.dp_exposed - t4.optimizer) / p4.num_microbatches
    assert p4.num_microbatches == 512 // 64
    assert t4.bubble == pytest.approx(3 * per_micro)
    per_micro = (t4v2.step - t4v2.bubble - t4v2.dp_exposed - t4v2.optimizer) / 8
    assert t4v2.bubble == pytest.approx(3 / 2 * per_micro)
    # a faster inter-node network never makes a step slower
    slow = PlanOptions(world=256, cluster=Cluster(get_gpu("h200"), ib_gbps=12.5))
    fast = PlanOptions(world=256, cluster=Cluster(get_gpu("h200"), ib_gbps=50))
    s, f = search(cfg, slow).config_plan.time, search(cfg, fast).config_plan.time
    assert f.step <= s.step


def test_list_gpus(capsys):
    assert main(["--list-gpus"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in GPUS)
    assert GPUS["h200"].memory_bytes / GiB > GPUS["h100"].memory_bytes / GiB
