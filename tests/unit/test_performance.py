"""The ``performance`` section: its resolution per machine, the mapping onto megatron-core's
``TransformerConfig`` for every shipped ABCI recipe (built on CPU from a description of an
H200 node with Transformer Engine), CPU defaults, and every refusal with its message."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch

from megatron_llmjp.config.loader import ConfigError, build_config
from megatron_llmjp.config.performance_checks import (
    PerformanceEnvironment,
    resolve_performance,
)
from megatron_llmjp.config.schema import RecomputeConfig

REPO = Path(__file__).resolve().parents[2]
# An ABCI 3.0 node as the container describes it: H200 (sm_90), Transformer Engine 2.10
# (containers/llmjp.def), DeepEP and apex's fused wgrad kernel installed.
H200 = PerformanceEnvironment(
    cuda=True, capability=(9, 0), te_version="2.10.0", deep_ep=True, fused_wgrad=True
)
CPU = PerformanceEnvironment()

# recipe -> (world size, expected TransformerConfig fields on H200): LLM-jp's settings from
# llm-jp/scripts (v4-8b/v4-32b params.sh: TE fused attention, no cross-entropy fusion;
# v4-32b-a3.8b: flash attention, native cross-entropy fusion, grouped GEMM, permute fusion,
# manual GC every 10 steps; 332B: the same plus DeepEP and VPP), written out by hand.
DENSE = dict(
    gradient_accumulation_fusion=True,
    cross_entropy_loss_fusion=False,
    tp_comm_overlap=False,
    overlap_p2p_comm=False,
    batch_p2p_comm=True,
    attention_backend="fused",
    moe_grouped_gemm=False,
)
MOE = dict(
    DENSE,
    cross_entropy_loss_fusion=True,
    cross_entropy_fusion_impl="native",
    attention_backend="flash",
    moe_grouped_gemm=True,
    moe_permute_fusion=True,
)
RECIPES = {
    "llm-jp-4-8b_32node_bf16.yaml": (256, DENSE, 0),
    "llm-jp-4-33b_32node_bf16.yaml": (256, DENSE, 0),
    "llm-jp-4-32b-a3b_32node_bf16.yaml": (
        256,
        {**MOE, "moe_token_dispatcher_type": "alltoall"},
        10,
    ),
    "llm-jp-4-332b-a31b_64node_bf16.yaml": (
        512,
        {
            **MOE,
            "overlap_p2p_comm": True,  # vpp 5: the interleaved schedule
            "batch_p2p_comm": False,
            "moe_token_dispatcher_type": "flex",
            "moe_flex_dispatcher_backend": "deepep",
            "virtual_pipeline_model_parallel_size": 5,
        },
        10,
    ),
}
TE_PERMUTE = (
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_unpermute",
)


def cfg(*overrides: str, config: Path | None = None):
    base = [] if config else ["data.synthetic=true"]
    return build_config(config, overrides=[*base, *overrides])


def recipe(name: str, monkeypatch):
    monkeypatch.chdir(REPO)
    return build_config(REPO / "configs" / "abci3" / name)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_transformer_config_on_h200(name, monkeypatch):
    """The TransformerConfig a recipe gets on an H200 node with TE, built here on CPU."""
    from megatron.core.transformer.enums import AttnBackend
    from megatron.core.transformer.moe import moe_utils

    from megatron_llmjp.models.build import transformer_config
    from megatron_llmjp.parallel.layout import make_layout

    c = recipe(name, monkeypatch)
    # With moe_permute_fusion, megatron-core's __post_init__ imports TE's permutation kernels
    # from moe_utils and checks they are not None; without TE here, any callable stands in.
    for fn in TE_PERMUTE:
        monkeypatch.setattr(moe_utils, fn, lambda *a, **k: None, raising=False)
    # Recompute is mapped and checked against this (CPU) machine by models/recompute.py; only
    # the performance fields are under test here.
    c.recompute = RecomputeConfig()
    world, expected, gc_interval = RECIPES[name]
    assert resolve_performance(c, H200).manual_gc_interval == gc_interval
    tcfg = transformer_config(c, make_layout(c.parallel, c.model, c.train, world), env=H200)
    for key, value in expected.items():
        got = getattr(tcfg, key)
        want = AttnBackend[value] if key == "attention_backend" else value
        assert got == want, (key, got, want)
    assert tcfg.bf16 and tcfg.tensor_model_parallel_size == c.parallel.tp
    # The DDP config as the trainer builds it: Megatron-LM aligns the parameter all-gathers
    # of all pipeline stages when overlapping them under the interleaved schedule (332B).
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_llmjp.models.performance import ddp_kwargs

    ddp = DistributedDataParallelConfig(
        overlap_grad_reduce=c.parallel.overlap_grad_reduce,
        overlap_param_gather=c.parallel.overlap_param_gather,
        use_distributed_optimizer=c.optim.use_distributed_optimizer,
        **ddp_kwargs(c),
    )
    assert ddp.overlap_param_gather  # every recipe overlaps it (LLM-jp v4)
    assert ddp.align_param_gather is (name == "llm-jp-4-332b-a31b_64node_bf16.yaml")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_on_cpu_resolves_off_or_is_refused(name, monkeypatch):
    """On CPU a recipe's explicit GPU switches are refused; with them unset (null, the
    device default) every switch is off and attention is megatron-core's local one."""
    c = recipe(name, monkeypatch)
    with pytest.raises(ConfigError, match=r"performance\.gradient_accumulation_fusion=true"):
        resolve_performance(c, CPU)
    c.performance = dataclasses.replace(
        c.performance,
        gradient_accumulation_fusion=None,
        cross_entropy_loss_fusion=None,
        moe_grouped_gemm=None,
        moe_permute_fusion=None,
        overlap_p2p_comm=None,  # 332B: on GPU with vpp, off on CPU
        attention_backend="auto",  # TE's kernels in the recipes; local on CPU
    )
    c.recompute = RecomputeConfig()  # moe_act recompute needs grouped GEMM (GPU)
    if c.parallel.moe_token_dispatcher == "flex":
        with pytest.raises(ConfigError, match=r"moe_token_dispatcher=flex.*no CUDA device"):
            resolve_performance(c, CPU)
        c.parallel.moe_token_dispatcher = "alltoall"
    r = resolve_performance(c, CPU)
    switches = (
        r.transformer_engine,
        r.gradient_accumulation_fusion,
        r.cross_entropy_loss_fusion,
        r.moe_permute_fusion,
        r.moe_grouped_gemm,
        r.tp_comm_overlap,
        r.batch_p2p_comm,
    )
    assert not any(switches), r
    assert r.attention_backend == "local" and r.overlap_p2p_comm is False


@pytest.mark.parametrize(
    "name", ["llm-jp-4-8b_32node_bf16.yaml", "llm-jp-4-332b-a31b_64node_bf16.yaml"]
)
def test_models_built_outside_training_take_device_defaults(name, monkeypatch):
    """Conversion, parity and upcycling build a GPU run's model on CPU, in a layout of their
    own (here the parity check's: one rank, no VPP, alltoall): the model gets this machine's
    defaults, where training refuses the same section."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_llmjp.models.build import transformer_config
    from megatron_llmjp.models.performance import check_performance_runtime
    from megatron_llmjp.parallel.layout import make_layout

    c = recipe(name, monkeypatch)
    c.parallel = dataclasses.replace(
        c.parallel, tp=1, pp=1, vpp=None, ep=1, etp=None, moe_token_dispatcher="alltoall"
    )
    c.recompute = RecomputeConfig()  # recompute has rules of its own on CPU
    with pytest.raises(ConfigError, match=r"performance\."):
        check_performance_runtime(c)  # what llmjp-train runs first
    tcfg = transformer_config(c, make_layout(c.parallel, c.model, c.train, 1))
    assert tcfg.attention_backend == AttnBackend.local
    assert not (tcfg.gradient_accumulation_fusion or tcfg.cross_entropy_loss_fusion)
    assert not (tcfg.overlap_p2p_comm or tcfg.batch_p2p_comm or tcfg.moe_grouped_gemm)
    assert tcfg.moe_permute_fusion is False


def test_cpu_defaults_reach_transformer_config():
    """This machine (no CUDA) through the real probe: megatron-core's unfused paths."""
    from megatron.core.transformer.enums import AttnBackend

    from megatron_llmjp.models.build import transformer_config
    from megatron_llmjp.models.performance import probe_environment
    from megatron_llmjp.parallel.layout import make_layout

    assert probe_environment() == CPU  # no CUDA here
    c = cfg("model.name=llm-jp-4-tiny-moe")
    tcfg = transformer_config(c, make_layout(c.parallel, c.model, c.train, 1))
    assert tcfg.gradient_accumulation_fusion is False and tcfg.cross_entropy_loss_fusion is False
    assert tcfg.moe_grouped_gemm is False and tcfg.moe_permute_fusion is False
    assert tcfg.tp_comm_overlap is False and tcfg.overlap_p2p_comm is False
    assert tcfg.batch_p2p_comm is False and tcfg.attention_backend == AttnBackend.local


def test_gpu_defaults_follow_the_machine():
    moe = cfg("model.name=llm-jp-4-tiny-moe")
    r = resolve_performance(moe, H200)
    assert r.transformer_engine and r.gradient_accumulation_fusion and r.cross_entropy_loss_fusion
    assert r.moe_grouped_gemm and r.moe_permute_fusion and r.attention_backend == "auto"
    assert not r.tp_comm_overlap and not r.overlap_p2p_comm and r.batch_p2p_comm
    # No apex kernel: no gradient-accumulation fusion by default; TE 2.0: no permute fusion.
    older = dataclasses.replace(H200, te_version="2.0.0", fused_wgrad=False)
    r = resolve_performance(moe, older)
    assert not r.gradient_accumulation_fusion and not r.moe_permute_fusion
    assert r.moe_grouped_gemm  # TEGroupedMLP needs 1.9
    # CUDA without TE (or with emulated FP8): megatron-core's local layers, all off.
    no_te = dataclasses.replace(H200, te_version=None)
    r = resolve_performance(moe, no_te)
    assert not (r.transformer_engine or r.moe_grouped_gemm or r.cross_entropy_loss_fusion)
    assert r.attention_backend == "local" and r.batch_p2p_comm
    fp8 = ["precision.dtype=bf16", "precision.fp8=delayed", "precision.fp8_backend=emulated"]
    emulated = cfg(*fp8)
    assert resolve_performance(emulated, H200).transformer_engine is False
    # Dense models never get the MoE switches.
    dense = resolve_performance(cfg("model.name=llm-jp-4-tiny-dense"), H200)
    assert not dense.moe_grouped_gemm and not dense.moe_permute_fusion


def test_interleaved_pipeline_overlaps_p2p_on_gpu_only():
    c = cfg("model.name=llm-jp-4-tiny-dense", "parallel.pp=2", "parallel.vpp=2")
    r = resolve_performance(c, H200)
    assert r.overlap_p2p_comm and not r.batch_p2p_comm  # megatron-core: mutually exclusive
    assert not resolve_performance(c, CPU).overlap_p2p_comm
    c.performance.overlap_p2p_comm = False
    r = resolve_performance(c, H200)
    assert not r.overlap_p2p_comm and r.batch_p2p_comm


@pytest.mark.parametrize(
    "key",
    [
        "gradient_accumulation_fusion",
        "cross_entropy_loss_fusion",
        "moe_permute_fusion",
        "moe_grouped_gemm",
        "tp_comm_overlap",
    ],
)
def test_gpu_switches_refused_on_cpu(key):
    extra = ["parallel.tp=2", "precision.dtype=bf16"] if key == "tp_comm_overlap" else []
    c = cfg("model.name=llm-jp-4-tiny-moe", f"performance.{key}=true", *extra)
    with pytest.raises(ConfigError, match=rf"performance\.{key}=true .*no CUDA device"):
        resolve_performance(c, CPU)


# (overrides, environment, message) for every refusal on a machine
REFUSALS = {
    "wgrad-without-apex": (
        ["performance.gradient_accumulation_fusion=true"],
        dataclasses.replace(H200, fused_wgrad=False),
        r"gradient_accumulation_fusion=true needs NVIDIA apex's fused_weight_gradient_mlp_cuda",
    ),
    "permute-old-te": (
        ["model.name=llm-jp-4-tiny-moe", "performance.moe_permute_fusion=true"],
        dataclasses.replace(H200, te_version="2.0.0"),
        r"moe_permute_fusion=true needs Transformer Engine >= 2\.1\.0 .*found 2\.0\.0",
    ),
    "grouped-gemm-without-te": (
        ["model.name=llm-jp-4-tiny-moe", "performance.moe_grouped_gemm=true"],
        dataclasses.replace(H200, te_version=None),
        r"moe_grouped_gemm=true needs TE's grouped linear layers, and Transformer Engine is "
        r"not importable",
    ),
    "tp-overlap-without-te": (
        ["parallel.tp=2", "precision.dtype=bf16", "performance.tp_comm_overlap=true"],
        dataclasses.replace(H200, te_version=None),
        r"tp_comm_overlap=true needs TE's userbuffers",
    ),
    "p2p-overlap-on-cpu": (
        ["parallel.pp=2", "parallel.vpp=2", "performance.overlap_p2p_comm=true"],
        CPU,
        r"overlap_p2p_comm=true needs NCCL \(a CUDA device\): with gloo",
    ),
    "flash-on-cpu": (
        ["performance.attention_backend=flash"],
        CPU,
        r"attention_backend=flash is a Transformer Engine attention kernel, and this machine "
        r"has no CUDA device",
    ),
    "local-with-te": (
        ["performance.attention_backend=local"],
        H200,
        r"attention_backend=local is megatron-core's own attention, which the Transformer "
        r"Engine layer spec",
    ),
    "flex-on-ampere": (
        ["model.name=llm-jp-4-tiny-moe", "parallel.ep=2", "parallel.moe_token_dispatcher=flex"],
        dataclasses.replace(H200, capability=(8, 0)),
        r"moe_token_dispatcher=flex \(DeepEP\) needs compute capability >= 9\.0 .*sm_80",
    ),
    "flex-without-deepep": (
        ["model.name=llm-jp-4-tiny-moe", "parallel.ep=2", "parallel.moe_token_dispatcher=flex"],
        dataclasses.replace(H200, deep_ep=False),
        r"moe_token_dispatcher=flex needs DeepEP \(the deep_ep package, .* not importable here",
    ),
    "moe-act-without-grouped-gemm": (
        [
            "model.name=llm-jp-4-tiny-moe",
            "recompute.granularity=selective",
            "recompute.modules=[moe_act]",
            "performance.moe_grouped_gemm=false",
        ],
        H200,
        r"recompute\.modules contains moe_act, which megatron-core supports only with grouped",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_machine_refusals_name_the_field(case):
    overrides, env, message = REFUSALS[case]
    with pytest.raises(ConfigError, match=message):
        resolve_performance(cfg(*overrides), env)


# Static refusals: the config alone decides, at load time (validate_static).
STATIC = {
    "gc-negative": (["performance.manual_gc_interval=-1"], r"manual_gc_interval must be >= 0"),
    "moe-switch-on-dense": (
        ["model.name=llm-jp-4-tiny-dense", "performance.moe_grouped_gemm=true"],
        r"performance\.moe_grouped_gemm=true applies to MoE models only",
    ),
    "p2p-overlap-without-vpp": (
        ["parallel.pp=2", "performance.overlap_p2p_comm=true"],
        r"overlap_p2p_comm=true needs the interleaved pipeline schedule .*pp=2 vpp=None",
    ),
    "tp-overlap-tp1": (
        ["precision.dtype=bf16", "performance.tp_comm_overlap=true"],
        r"tp_comm_overlap=true .* needs parallel\.tp > 1 and parallel\.sequence_parallel",
    ),
    "tp-overlap-fp32": (
        ["parallel.tp=2", "performance.tp_comm_overlap=true"],
        r"tp_comm_overlap=true needs precision\.dtype=bf16",
    ),
    "flex-single-rank": (
        ["model.name=llm-jp-4-tiny-moe", "parallel.moe_token_dispatcher=flex"],
        r"moe_token_dispatcher=flex .* parallel\.tp \* parallel\.ep > 1, got tp=1 ep=1",
    ),
    "flex-bf16-router": (
        [
            "model.name=llm-jp-4-tiny-moe",
            "parallel.ep=2",
            "parallel.moe_token_dispatcher=flex",
            "model.moe_router_dtype=native",
        ],
        r"flex \(DeepEP\) takes FP32 routing probabilities only: set model\.moe_router_dtype=fp32",
    ),
}


@pytest.mark.parametrize("case", sorted(STATIC))
def test_static_refusals_at_load(case):
    overrides, message = STATIC[case]
    with pytest.raises(ConfigError, match=message):
        cfg(*overrides)


def test_runtime_check_refuses_before_any_process_group():
    """``check_runtime`` (what ``llmjp-train`` runs first) refuses a CUDA switch on this CPU
    machine without creating a process group."""
    from megatron_llmjp.parallel.dist import RankInfo
    from megatron_llmjp.training.trainer import check_runtime

    c = cfg("performance.cross_entropy_loss_fusion=true")
    info = RankInfo(rank=0, local_rank=0, world_size=1, source="single")
    with pytest.raises(ConfigError, match=r"performance\.cross_entropy_loss_fusion=true"):
        check_runtime(c, info)
    assert not torch.distributed.is_initialized()


def test_context_parallel_with_emulated_fp8_on_gpu_is_refused(monkeypatch):
    """On a GPU with Transformer Engine, emulated FP8 builds megatron-core's local layers,
    whose attention refuses context parallelism: ``check_runtime`` says so before any process
    group. (The GPU is imitated: the device switch says cuda and ``transformer_engine``
    imports; the machine checks that would ask CUDA are stubbed.)"""
    import importlib.machinery
    import sys
    import types

    from megatron_llmjp.models import performance
    from megatron_llmjp.parallel import cpu_compat
    from megatron_llmjp.parallel.dist import RankInfo
    from megatron_llmjp.precision import recipes
    from megatron_llmjp.training.trainer import check_runtime

    monkeypatch.setattr(cpu_compat, "install", lambda: None)
    monkeypatch.setattr(cpu_compat, "device_type", lambda: "cuda")
    te = types.ModuleType("transformer_engine")
    te.__spec__ = importlib.machinery.ModuleSpec("transformer_engine", None)
    monkeypatch.setitem(sys.modules, "transformer_engine", te)
    monkeypatch.setattr(recipes, "check_precision_runtime", lambda precision: None)
    monkeypatch.setattr(performance, "check_performance_runtime", lambda c: None)
    info = RankInfo(rank=0, local_rank=0, world_size=2, source="single")
    c = cfg(
        "parallel.cp=2",
        "precision.dtype=bf16",
        "precision.fp8=tensorwise",
        "precision.fp8_backend=emulated",
    )
    with pytest.raises(ConfigError, match=r"parallel\.cp=2: .*fp8_backend=emulated"):
        check_runtime(c, info)
    assert not torch.distributed.is_initialized()
    check_runtime(cfg("parallel.cp=2"), info)  # TE layers: context parallelism is fine


def test_manual_gc_collects_every_interval():
    """Megatron-LM's manual GC: automatic collection off, one full collection at start and
    one after every N-th step (seen through Python's gc callbacks), restored at close."""
    from megatron_llmjp.models.performance import PerformanceRuntime

    assert gc.isenabled()
    manual: list[int] = []  # generations collected while automatic GC is off

    def hook(phase: str, info: dict) -> None:
        if phase == "start" and not gc.isenabled():
            manual.append(info["generation"])

    gc.callbacks.append(hook)
    try:
        # Each full collection walks the whole heap (seconds late in a suite): two of them.
        rt = PerformanceRuntime.start(cfg("performance.manual_gc_interval=3"), layout=None)
        try:
            assert not gc.isenabled()
            assert manual == [2]
            done = [rt.after_step(i) for i in range(1, 5)]
            assert done == [False, False, True, False]
            assert manual == [2, 2]
        finally:
            rt.close()
        assert gc.isenabled()
        rt = PerformanceRuntime.start(cfg(), layout=None)  # 0: automatic GC stays on
        assert gc.isenabled() and rt.after_step(3) is False
        rt.close()
        assert manual == [2, 2]
    finally:
        gc.callbacks.remove(hook)
