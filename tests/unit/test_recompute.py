"""The ``recompute`` section: checks against megatron-core 0.16.1's own rules, the mapping onto
``TransformerConfig``, and the planner reading the same section (``llmjp-plan``)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from megatron_llmjp.cli.plan import main as plan_main
from megatron_llmjp.config.errors import ConfigError
from megatron_llmjp.config.loader import build_config
from megatron_llmjp.config.validate import RECOMPUTE_MODULES
from megatron_llmjp.models.recompute import check_recompute_backend, recompute_kwargs
from megatron_llmjp.parallel.layout import make_layout
from megatron_llmjp.planner.activations import Recompute, activation_memory, layer_terms

REPO = Path(__file__).resolve().parents[2]
LLMJP_332B = REPO / "configs" / "abci3" / "llm-jp-4-332b-a31b_64node_bf16.yaml"
DENSE, MOE = "model.name=llm-jp-4-tiny-dense", "model.name=llm-jp-4-tiny-moe"
TINY = dict(num_layers=4, hidden_size=64, num_attention_heads=4, cuda_graph_scope=[])
"""A TransformerConfig without recompute settings (tiny-dense's sizes)."""


def _cfg(*overrides: str):
    return build_config(overrides=["data.synthetic=true", "model.num_layers=4", *overrides])


def _megatron(**kwargs):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**TINY, **kwargs)


def test_module_names_are_megatron_cores():
    with pytest.raises(AssertionError, match="Allowed modules are") as e:
        _megatron(recompute_granularity="selective", recompute_modules=["bogus"])
    allowed = ast.literal_eval(re.search(r"Allowed modules are: (\{.*\})", str(e.value))[1])
    assert allowed == set(RECOMPUTE_MODULES)


# (overrides, what our ConfigError says, megatron-core's TransformerConfig keywords for the same
# setting when it refuses it too, else None: then the setting is one megatron-core accepts but
# that recomputes nothing or fails later)
BAD = [
    (
        ["recompute.granularity=full", "recompute.num_layers=1"],
        "needs recompute.method",
        dict(recompute_granularity="full", recompute_num_layers=1),
    ),
    (
        ["recompute.granularity=full", "recompute.method=uniform"],
        "recompute.num_layers",
        dict(recompute_granularity="full", recompute_method="uniform"),
    ),
    (
        ["recompute.granularity=selective", "recompute.num_layers=1"],
        "recompute.num_layers applies to recompute.granularity=full",
        dict(recompute_granularity="selective", recompute_num_layers=1),
    ),
    (
        ["recompute.granularity=selective", "recompute.modules=[attn]"],
        "unknown module 'attn'",
        dict(recompute_granularity="selective", recompute_modules=["attn"]),
    ),
    (
        ["recompute.granularity=selective", "recompute.modules=[moe_act]"],
        "is dense",
        dict(recompute_granularity="selective", recompute_modules=["moe_act"]),
    ),
    (
        ["recompute.granularity=selective", "recompute.modules=[mla_up_proj]"],
        "no multi-latent attention",
        dict(recompute_granularity="selective", recompute_modules=["mla_up_proj"]),
    ),
    (["recompute.modules=[core_attn]"], "recompute.modules applies to", None),
    (["recompute.granularity=selective", "recompute.modules=[]"], "empty", None),
    (
        ["recompute.granularity=selective", "recompute.modules=[mlp,mlp]"],
        "listed twice",
        None,
    ),
    (
        [MOE, "recompute.granularity=selective", "recompute.modules=[mlp]"],
        "every layer here is MoE",
        None,
    ),
    (
        [MOE, "recompute.granularity=selective", "recompute.modules=[shared_experts]"],
        "no shared experts",
        None,
    ),
    (
        ["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=5"],
        r"must be in \[1, 4\]",
        None,
    ),
    (  # 4 layers on pp=2: 2 per stage
        [
            "parallel.pp=2",
            "recompute.granularity=full",
            "recompute.method=block",
            "recompute.num_layers=3",
        ],
        r"must be in \[1, 2\].*pp=2",
        None,
    ),
    (  # uniform groups must tile a chunk (megatron-core indexes past the last layer)
        ["recompute.granularity=full", "recompute.method=uniform", "recompute.num_layers=3"],
        "must divide the 4 layers",
        None,
    ),
    (
        [
            MOE,
            "precision.dtype=bf16",
            "precision.fp8=delayed",
            "recompute.granularity=selective",
            "recompute.modules=[layernorm]",
        ],
        "precision.fp8=delayed",
        None,
    ),
]


@pytest.mark.parametrize("overrides,message,megatron", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_recompute_is_a_config_error_first(overrides, message, megatron):
    with pytest.raises(ConfigError, match=message) as e:
        _cfg(*overrides)
    assert "recompute." in str(e.value)
    if megatron is not None:  # megatron-core refuses it too, later and in its own terms
        with pytest.raises((ValueError, AssertionError)):
            _megatron(**megatron)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["recompute.granularity=selective"],
        ["recompute.granularity=selective", "recompute.modules=[core_attn,mlp]"],
        ["recompute.granularity=full", "recompute.method=uniform", "recompute.num_layers=2"],
        ["recompute.granularity=full", "recompute.method=block", "recompute.num_layers=4"],
    ],
)
def test_mapping_onto_transformer_config(overrides):
    cfg = _cfg(*overrides)
    kwargs = recompute_kwargs(cfg, te=False)
    tc = _megatron(**kwargs)  # megatron-core accepts what we pass
    r = cfg.recompute
    assert tc.recompute_granularity == (None if r.granularity == "none" else r.granularity)
    assert tc.recompute_method == r.method and tc.recompute_num_layers == r.num_layers
    if r.granularity == "selective":
        assert tc.recompute_modules == (r.modules or ["core_attn"])


def test_layernorm_and_moe_act_need_transformer_engine():
    """megatron-core 0.16.1's CheckpointWithoutOutput (layernorm and moe_act recompute) calls
    Transformer Engine even without FP8; so we refuse both without TE, by name."""
    torch = pytest.importorskip("torch")
    from megatron.core.tensor_parallel import CheckpointWithoutOutput
    from megatron.core.tensor_parallel import random as mcore_random

    if not mcore_random.HAVE_TE:
        with pytest.raises(NameError, match="FP8GlobalStateManager"):
            CheckpointWithoutOutput().checkpoint(torch.nn.Identity(), torch.ones(2))
    for modules in ("[layernorm]", "[moe_act]", "[core_attn,layernorm]"):
        cfg = _cfg(MOE, "recompute.granularity=selective", f"recompute.modules={modules}")
        with pytest.raises(ConfigError, match="needs Transformer Engine") as e:
            check_recompute_backend(cfg, te=False)
        assert "recompute.modules" in str(e.value)
        if not mcore_random.HAVE_TE:  # the path model building takes, on this machine
            with pytest.raises(ConfigError, match="needs Transformer Engine"):
                recompute_kwargs(cfg)
        check_recompute_backend(cfg, te=True)  # the GPU spec runs them
    # the local spec on a GPU with TE installed (emulated FP8) runs layernorm too
    ln = _cfg(MOE, "recompute.granularity=selective", "recompute.modules=[layernorm]")
    check_recompute_backend(ln, te=False, te_installed=True)
    for model, modules in ((DENSE, "[core_attn,mlp]"), (MOE, "[core_attn,moe]")):
        cfg = _cfg(model, "recompute.granularity=selective", f"recompute.modules={modules}")
        check_recompute_backend(cfg, te=False)
    # With TE a dense layer's norms are fused into linear_qkv / linear_fc1: nothing to redo.
    dense_ln = _cfg("recompute.granularity=selective", "recompute.modules=[layernorm]")
    with pytest.raises(ConfigError, match="recomputes nothing"):
        check_recompute_backend(dense_ln, te=True)
    # moe_act without grouped GEMM: refused by the performance resolution (test_performance).


# --- the planner reads the same section ----------------------------------------------------------

SETTINGS = [
    Recompute(),
    Recompute("selective", ("moe_act", "layernorm")),
    Recompute("selective", ("core_attn",)),
    Recompute("full", (), "uniform", 2),
    Recompute("full", (), "block", 1),
]


@pytest.mark.parametrize("rc", SETTINGS, ids=lambda r: r.label())
def test_planner_settings_apply_verbatim_to_a_config(rc):
    # onto a config whose own section differs (the 332B recipe's selective recompute)
    cfg = build_config(LLMJP_332B, ["data.synthetic=true", *rc.overrides()])
    assert Recompute.from_config(cfg.recompute) == rc
    assert Recompute.from_config(rc.to_config()) == rc


def test_llmjp_plan_uses_the_config_recompute_and_the_332b_recipe_fits(capsys):
    """LLM-jp's 332B recipe (TP2 PP4 VPP5 EP8, selective moe_act + layernorm) fits on H200."""
    cfg = build_config(LLMJP_332B, ["data.synthetic=true"])
    assert cfg.recompute.granularity == "selective"
    assert sorted(cfg.recompute.modules) == ["layernorm", "moe_act"]
    argv = ["--config", str(LLMJP_332B), "--nodes", "64", "--top", "3"]
    assert plan_main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    mine = out["config_layout"]
    assert mine["fits"] and mine["memory_gib"]["total"] <= out["usable_gib"]
    assert mine["recompute_config"] == {
        "granularity": "selective",
        "modules": ["moe_act", "layernorm"],
        "method": None,
        "num_layers": None,
    }
    assert (mine["tp"], mine["pp"], mine["vpp"], mine["ep"], mine["etp"]) == (2, 4, 5, 8, 1)
    # without --recompute every plan uses the config's setting
    assert {p["recompute"] for p in out["plans"]} == {"sel:moe_act+ln"}
    # the best plan's overrides, applied verbatim, give a config the planner marks as its own
    best = out["plans"][0]
    applied = build_config(LLMJP_332B, ["data.synthetic=true", *best["overrides"]])
    layout = make_layout(applied.parallel, applied.model, applied.train, 512)
    assert (layout.tp, layout.pp, layout.vpp, layout.ep) == (
        best["tp"],
        best["pp"],
        best["vpp"],
        best["ep"],
    )
    assert plan_main(argv) == 0
    text = capsys.readouterr().out
    assert "the config's layout (tp=2 pp=4 vpp=5" in text and ") fits and ranks" in text
    assert "--set recompute.granularity=selective" in text


def test_llmjp_plan_explores_settings_by_config_names(capsys):
    argv = ["llm-jp-4-8b", "--nodes", "32", "--tp", "1", "--pp", "1", "--json", "--all"]
    assert plan_main([*argv, "--recompute", "none,selective,full,full:block:8"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    got = {p["recompute"] for p in plans}
    assert got == {"none", "sel:attn", "full:u1", "full:b8"}
    block = next(p for p in plans if p["recompute"] == "full:b8")
    assert block["recompute_config"] == {
        "granularity": "full",
        "modules": None,
        "method": "block",
        "num_layers": 8,
    }
    # less memory than none, more than recomputing every layer; more compute than none
    by = {p["recompute"]: p for p in plans}
    act = {k: p["memory_gib"]["activations"] for k, p in by.items()}
    assert act["full:u1"] < act["full:b8"] < act["none"]
    assert by["none"]["time_s"]["compute"] < by["full:b8"]["time_s"]["compute"]
    assert by["full:b8"]["time_s"]["compute"] < by["full:u1"]["time_s"]["compute"]
    # a block larger than a pipeline chunk (32 layers) is refused by the config rules
    assert plan_main([*argv, "--recompute", "full:block:33"]) == 2
    assert "recompute.num_layers=33 must be in [1, 32]" in capsys.readouterr().err
    # settings the config rules refuse for this model are not offered
    code = plan_main([*argv, "--recompute", "selective", "--recompute-modules", "moe_act"])
    assert code == 2
    assert "is dense" in capsys.readouterr().err


def test_full_recompute_arithmetic_by_hand():
    """8B on one GPU (32 layers in one chunk), seq 4096, BF16: full uniform keeps one layer
    input per group of num_layers, block keeps num_layers inputs and full layers elsewhere;
    both also keep RoPE's FP32 table once."""
    cfg = build_config(overrides=["data.synthetic=true", "model.name=llm-jp-4-8b"])
    m = cfg.model
    lay = make_layout(cfg.parallel, m, cfg.train, 1)
    layer_input = 2 * 4096 * 4096
    table = 4 * 4096 * 128
    full_layer = sum(layer_terms(m, lay, 1, 4096, 2, Recompute()).values())

    def saved(rc: Recompute) -> int:
        return activation_memory(m, lay, 1, 4096, 1, 2, rc, 0).saved

    last_stage = saved(Recompute()) - 32 * full_layer  # final norm and logits
    assert saved(Recompute("full", (), "uniform", 1)) == pytest.approx(
        32 * layer_input + table + last_stage
    )
    assert saved(Recompute("full", (), "uniform", 4)) == pytest.approx(
        8 * layer_input + table + last_stage
    )
    assert saved(Recompute("full", (), "block", 8)) == pytest.approx(
        8 * layer_input + 24 * full_layer + table + last_stage
    )


def test_training_refuses_te_only_modules_before_any_process_group():
    """``check_runtime`` (what ``llmjp-train`` runs on every rank first) refuses layernorm
    recompute on this CPU machine (no Transformer Engine) without a process group."""
    import torch

    from megatron_llmjp.parallel.dist import RankInfo
    from megatron_llmjp.training.trainer import check_runtime

    c = _cfg(MOE, "recompute.granularity=selective",
             "recompute.modules=[layernorm]")  # fmt: skip
    info = RankInfo(rank=0, local_rank=0, world_size=1, source="single")
    with pytest.raises(ConfigError, match=r"recompute\.modules=\['layernorm'\].*Transformer"):
        check_runtime(c, info)
    assert not torch.distributed.is_initialized()
