"""Precision recipes: the mapping onto megatron-core, validation, and the emulated FP8 numerics
(quantisation error against float64, delayed scaling, formats, FP8 wgrad)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_llmjp.config.loader import ConfigError, build_config
from megatron_llmjp.config.schema import PrecisionConfig
from megatron_llmjp.precision import emulated as em
from megatron_llmjp.precision import recipes
from megatron_llmjp.precision.peaks import compute_precision, gpu_kind, peak_tflops

BASE = ["data.synthetic=true", "model.name=llm-jp-4-tiny-dense"]  # 4 layers
BF16 = [*BASE, "precision.dtype=bf16"]
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MANTISSA_BITS = {E4M3: 3, E5M2: 2}
SMALLEST_SUBNORMAL = {E4M3: 2.0**-9, E5M2: 2.0**-16}


def cfg(*overrides: str):
    return build_config(overrides=[*BF16, *overrides])


# ---------------------------------------------------------------- mapping onto megatron-core


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_te_mapping_reaches_transformer_config(recipe):
    from megatron_llmjp.models.build import transformer_config
    from megatron_llmjp.parallel.layout import make_layout

    extra = [] if recipe == "delayed" else ["precision.bf16_first_layers=1"]
    if recipe == "delayed":
        extra += ["precision.fp8_margin=1", "precision.fp8_amax_compute_algo=most_recent"]
        extra += ["precision.fp8_amax_history_len=16", "precision.fp8_wgrad=false"]
    c = cfg(f"precision.fp8={recipe}", "precision.fp8_format=e4m3", *extra)
    kwargs = recipes.transformer_kwargs(c.precision)
    tcfg = transformer_config(c, make_layout(c.parallel, c.model, c.train, 1))
    for key, value in kwargs.items():
        assert getattr(tcfg, key) == value, key
    assert tcfg.fp8 == "e4m3" and tcfg.fp8_recipe == recipe and tcfg.bf16
    if recipe == "delayed":
        assert (tcfg.fp8_margin, tcfg.fp8_amax_history_len) == (1, 16)
        assert tcfg.fp8_amax_compute_algo == "most_recent" and tcfg.fp8_wgrad is False
        assert tcfg.first_last_layers_bf16 is False
    else:
        assert tcfg.first_last_layers_bf16 is True
        assert (tcfg.num_layers_at_start_in_bf16, tcfg.num_layers_at_end_in_bf16) == (1, 0)


def test_defaults_match_te_delayed_scaling_defaults():
    kw = recipes.transformer_kwargs(cfg("precision.fp8=delayed").precision)
    assert kw["fp8"] == "hybrid" and kw["fp8_amax_history_len"] == 1024
    assert kw["fp8_amax_compute_algo"] == "max" and kw["fp8_margin"] == 0
    assert kw["fp8_wgrad"] is True and kw["fp8_param"] is False


def test_param_gather_maps_to_transformer_ddp_and_optimizer_configs():
    p = cfg("precision.fp8=tensorwise", "precision.fp8_param_gather=true").precision
    assert recipes.transformer_kwargs(p)["fp8_param"] is True
    assert recipes.ddp_kwargs(p) == {"fp8_param_gather": True}
    assert recipes.optimizer_kwargs(p) == {"fp8_recipe": "tensorwise"}


@pytest.mark.parametrize(
    "overrides",
    [[], ["precision.fp8=delayed", "precision.fp8_backend=emulated"]],
    ids=["bf16", "emulated"],
)
def test_no_te_fields_without_te_fp8(overrides):
    p = cfg(*overrides).precision
    assert recipes.transformer_kwargs(p) == {}
    assert recipes.ddp_kwargs(p) == {} and recipes.optimizer_kwargs(p) == {}


def test_emulated_settings():
    p = cfg("precision.fp8=delayed", "precision.fp8_backend=emulated").precision
    assert recipes.emulated_fp8(p, 4).backward_dtype == E5M2  # hybrid: e5m2 gradients
    p = cfg("precision.fp8=delayed", "precision.fp8_backend=emulated", "precision.fp8_format=e4m3")
    fp8 = recipes.emulated_fp8(p.precision, 4)
    assert fp8.forward_dtype == fp8.backward_dtype == E4M3
    assert recipes.emulated_fp8(cfg("precision.fp8=delayed").precision, 4) is None  # te
    fp8 = recipes.EmulatedFP8(
        recipe="delayed",
        forward_dtype=E4M3,
        backward_dtype=E5M2,
        num_layers=6,
        bf16_first_layers=1,
        bf16_last_layers=2,
    )
    assert [fp8.layer_in_fp8(i) for i in range(6)] == [False, True, True, True, False, False]


# ---------------------------------------------------------------------------- validation

ERRORS = [
    ("fp8_with_fp32", ["precision.dtype=fp32", "precision.fp8=delayed"], ["precision.fp8", "bf16"]),
    (
        "history_lt_1",
        ["precision.fp8=delayed", "precision.fp8_amax_history_len=0"],
        ["history_len", ">= 1"],
    ),
    ("margin_lt_0", ["precision.fp8=delayed", "precision.fp8_margin=-1"], ["fp8_margin", ">= 0"]),
    (
        "interval_lt_1",
        ["precision.fp8=delayed", "precision.fp8_interval=0"],
        ["fp8_interval", ">= 1"],
    ),
    ("format_without_fp8", ["precision.fp8_format=e4m3"], ["precision.fp8_format=e4m3", "null"]),
    ("wgrad_without_fp8", ["precision.fp8_wgrad=false"], ["precision.fp8_wgrad", "null"]),
    ("bf16_layers_without_fp8", ["precision.bf16_first_layers=1"], ["bf16_first_layers", "null"]),
    (
        "history_not_delayed",
        ["precision.fp8=tensorwise", "precision.fp8_amax_history_len=16"],
        ["fp8_amax_history_len=16", "delayed scaling only"],
    ),
    (
        "algo_not_delayed",
        ["precision.fp8=blockwise", "precision.fp8_amax_compute_algo=most_recent"],
        ["fp8_amax_compute_algo", "delayed scaling only"],
    ),
    (
        "margin_not_delayed",
        ["precision.fp8=mxfp8", "precision.fp8_margin=2"],
        ["fp8_margin", "delayed scaling only"],
    ),
    (
        "bf16_layers_exceed_model",
        [
            "precision.fp8=tensorwise",
            "precision.bf16_first_layers=3",
            "precision.bf16_last_layers=2",
        ],
        ["3 + 2", "model.num_layers=4"],
    ),
    (
        "negative_bf16_layers",
        ["precision.fp8=tensorwise", "precision.bf16_last_layers=-1"],
        ["bf16_last_layers", ">= 0"],
    ),
    (
        "param_gather_without_distopt",
        [
            "precision.fp8=delayed",
            "precision.fp8_param_gather=true",
            "optim.use_distributed_optimizer=false",
        ],
        ["fp8_param_gather", "optim.use_distributed_optimizer"],
    ),
    (
        "param_gather_emulated",
        [
            "precision.fp8=delayed",
            "precision.fp8_param_gather=true",
            "precision.fp8_backend=emulated",
        ],
        ["fp8_param_gather", "fp8_backend=te"],
    ),
    (
        "te_delayed_bf16_layers",
        ["precision.fp8=delayed", "precision.bf16_first_layers=1"],
        ["fp8=delayed", "fp8_backend=emulated"],
    ),
    (
        "te_bf16_layers_beyond_a_stage",
        ["precision.fp8=tensorwise", "precision.bf16_last_layers=3", "parallel.pp=2"],
        ["bf16_last_layers=3", "pipeline stage (2)"],
    ),
]


@pytest.mark.parametrize("name,overrides,fragments", ERRORS, ids=[e[0] for e in ERRORS])
def test_validation_errors(name, overrides, fragments):
    with pytest.raises(ConfigError) as e:
        cfg(*overrides)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_valid_combinations_pass():
    cfg("precision.fp8=delayed", "precision.fp8_backend=emulated", "precision.bf16_first_layers=1")
    cfg("precision.fp8=mxfp8", "precision.bf16_first_layers=2", "precision.bf16_last_layers=2")
    cfg("precision.fp8_backend=emulated")  # picks an implementation only: allowed without FP8


def test_te_fp8_without_cuda_suggests_emulation(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"no CUDA.*precision\.fp8_backend=emulated"):
        recipes.check_precision_runtime(cfg("precision.fp8=delayed").precision)
    recipes.check_precision_runtime(
        cfg("precision.fp8=delayed", "precision.fp8_backend=emulated").precision
    )


@pytest.mark.parametrize(
    "recipe,capability,te,fragments",
    [
        ("mxfp8", (9, 0), "2.4.0", ["Blackwell", "compute capability >= 10.0", "sm_90"]),
        ("blockwise", (8, 9), "2.4.0", ["Hopper", "sm_89"]),
        ("delayed", (8, 0), "2.4.0", ["compute capability >= 8.9", "sm_80"]),
        ("blockwise", (9, 0), "2.2.0", ["Transformer Engine >= 2.3.0.dev0", "2.2.0"]),
        ("tensorwise", (9, 0), None, ["not importable", "fp8_backend=emulated"]),
    ],
)
def test_hardware_errors(recipe, capability, te, fragments):
    p = cfg(f"precision.fp8={recipe}").precision
    msg = recipes.fp8_hardware_error(p, capability, te)
    assert msg is not None
    for fragment in fragments:
        assert fragment in msg, msg


def test_supported_hardware_passes():
    p = cfg("precision.fp8=mxfp8").precision
    assert recipes.fp8_hardware_error(p, (10, 0), "2.8.0") is None
    assert recipes.fp8_hardware_error(cfg("precision.fp8=delayed").precision, (9, 0), "1.9") is None


# ------------------------------------------------------------ emulated FP8: quantisation


def _fp8(recipe: str, fmt: str = "hybrid", **kw) -> recipes.EmulatedFP8:
    e = recipes.emulated_fp8(
        PrecisionConfig(dtype="bf16", fp8=recipe, fp8_format=fmt, fp8_backend="emulated"), 4
    )
    return recipes.EmulatedFP8(**{**e.__dict__, **kw})


def _wide(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Float64 values spanning ~6 decades, with a few zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    x = x * torch.exp(2.0 * torch.randn(rows, cols, generator=g, dtype=torch.float64))
    x[0, :5] = 0.0
    return x


def _block_scales(x: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """Reference per-element power-of-two scales in float64 (edge blocks partial)."""
    scale = torch.empty_like(x)
    for i in range(0, x.shape[0], block[0]):
        for j in range(0, x.shape[1], block[1]):
            tile = x[i : i + block[0], j : j + block[1]]
            amax = tile.abs().max().item()
            s = 2.0 ** math.floor(math.log2(torch.finfo(dtype).max / amax)) if amax else 1.0
            scale[i : i + block[0], j : j + block[1]] = s
    return scale


def _assert_within_format_bound(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, dtype):
    """Round-to-nearest: relative error <= 2**-(m+1) for normals, and half the smallest
    subnormal (over the scale) in absolute terms; plus the float32 rounding of the input."""
    half_ulp = 2.0 ** -(MANTISSA_BITS[dtype] + 1)
    bound = half_ulp * x.abs() + 0.5 * SMALLEST_SUBNORMAL[dtype] / scale + 2e-7 * x.abs()
    err = (q.double() - x).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.max()) > 0  # something was rounded


@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_tensorwise_error_within_bound(dtype):
    x = _wide(64, 200)
    q = em.quantize(x.float(), em.scale_from_amax(x.abs().max().float(), dtype), dtype)
    scale = torch.finfo(dtype).max / x.abs().max()
    _assert_within_format_bound(q, x, torch.full_like(x, float(scale)), dtype)


@pytest.mark.parametrize(
    "recipe,role,block",
    [("blockwise", "x", (1, 128)), ("blockwise", "w", (128, 128)), ("mxfp8", "x", (1, 32))],
)
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_block_scaling_error_within_bound(recipe, role, block, dtype):
    x = _wide(300, 200)  # partial edge blocks in both dimensions
    fp8 = _fp8(recipe, forward_dtype=dtype)
    q = em.Scaling(fp8, role)(x.float())
    scale = _block_scales(x, block, dtype)
    _assert_within_format_bound(q, x, scale, dtype)
    # Columnwise copies use blocks down the columns.
    qc = em.Scaling(fp8, role)(x.float(), columnwise=True)
    _assert_within_format_bound(qc, x, _block_scales(x.t(), block, dtype).t(), dtype)


def test_finer_blocks_lose_less_on_wide_ranges():
    x = _wide(256, 256)
    err = {}
    for recipe in ("tensorwise", "blockwise", "mxfp8"):
        q = em.Scaling(_fp8(recipe), "x")(x.float())
        err[recipe] = float((q.double() - x).norm() / x.norm())
    assert err["mxfp8"] < err["blockwise"] < err["tensorwise"], err


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise", "mxfp8"])
def test_empty_inputs_pass_through(recipe):  # an expert with no tokens
    empty = torch.zeros(0, 64)
    for role in ("x", "g"):
        assert em.Scaling(_fp8(recipe), role)(empty).shape == (0, 64)
        assert em.Scaling(_fp8(recipe), role)(empty, columnwise=True).shape == (0, 64)


def test_saturates_instead_of_overflowing():
    t = torch.tensor([1e6, -1e6, 1.0])
    assert em.quantize(t, 1.0, E5M2).tolist() == [57344.0, -57344.0, 1.0]
    assert em.quantize(t, 1.0, E4M3).tolist() == [448.0, -448.0, 1.0]


# ------------------------------------------------------------------- delayed scaling


def _feed(s: em.Scaling, amaxes: list[float]) -> list[float]:
    """Quantise tensors with the given amaxes; returns the scale after each use."""
    scales = []
    for a in amaxes:
        s(torch.tensor([a, -a / 3, 0.0]))
        scales.append(float(s.scale))
    return scales


@pytest.mark.parametrize("algo", ["max", "most_recent"])
def test_delayed_scale_follows_the_amax_history(algo):
    amaxes = [2.0, 8.0, 1.0, 0.5, 0.25, 4.0, 0.125]
    s = em.Scaling(_fp8("delayed", history_len=3, compute_algo=algo, margin=1), "x")
    got = _feed(s, amaxes)
    for i, scale in enumerate(got):
        window = amaxes[max(0, i - 2) : i + 1]
        amax = max(window) if algo == "max" else window[-1]
        assert scale == pytest.approx(448.0 / amax / 2.0), (i, window)
    assert s.amax_history.tolist() == [0.125, 4.0, 0.25]  # newest first


def test_delayed_uses_the_previous_scale_then_updates():
    s = em.Scaling(_fp8("delayed"), "x")
    t = torch.tensor([1000.0, 3.3])
    first = s(t)  # initial scale 1: 1000 saturates at 448
    assert first.tolist() == em.quantize(t, 1.0, E4M3).tolist() and first[0] == 448.0
    second = s(t)  # scale 448 / 1000 from the first use: no saturation
    assert float(s.scale) == pytest.approx(0.448)
    assert second.tolist() == em.quantize(t, torch.tensor(0.448), E4M3).tolist()
    assert abs(float(second[0]) - 1000.0) <= 1000.0 / 16


def test_delayed_interval_and_zero_amax():
    s = em.Scaling(_fp8("delayed", interval=2, compute_algo="most_recent"), "x")
    assert _feed(s, [4.0, 2.0, 8.0, 1.0]) == [1.0, 224.0, 224.0, 448.0]
    s = em.Scaling(_fp8("delayed"), "x")
    assert _feed(s, [0.0]) == [1.0]  # an all-zero tensor keeps the previous scale


def test_delayed_update_only_in_training_and_state_round_trip():
    s = em.Scaling(_fp8("delayed", history_len=4), "g")
    _feed(s, [3.0, 5.0])
    s(torch.tensor([100.0]), update=False)  # evaluation: no history change
    assert s.uses == 2 and s.amax_history.tolist() == [5.0, 3.0, 0.0, 0.0]
    t = em.Scaling(_fp8("delayed", history_len=4), "g")
    t.load(s.state())
    assert torch.equal(t.amax_history, s.amax_history) and float(t.scale) == float(s.scale)
    assert t.uses == 2 and s.dtype == E5M2


# ---------------------------------------------------------- the emulated GEMM (autograd)


def _gemm(fp8: recipes.EmulatedFP8, seed: int = 0):
    """Run the emulated GEMM forward and backward on a stand-in layer (no process group)."""
    layer = SimpleNamespace(fp8=fp8, training=True)
    layer.q_x, layer.q_w, layer.q_g = (em.Scaling(fp8, r) for r in ("x", "w", "g"))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 64, generator=g).requires_grad_()
    w = (0.05 * torch.randn(48, 64, generator=g)).requires_grad_()
    grad = 1e-3 * torch.randn(4, 8, 48, generator=g)
    y = em._FP8Gemm.apply(x, w, layer, None)
    y.backward(grad)
    return x, w, grad, y


def test_gemm_quantises_forward_with_e4m3_and_grads_with_e5m2_for_hybrid():
    x, w, grad, y = _gemm(_fp8("tensorwise", "hybrid"))
    x2, g2 = x.detach().reshape(-1, 64), grad.reshape(-1, 48)

    def q(t, dtype):
        return em.quantize(t, em.scale_from_amax(t.abs().max(), dtype), dtype)

    qx, qw = q(x2, E4M3), q(w.detach(), E4M3)
    assert torch.equal(y.reshape(-1, 48), qx @ qw.t())
    assert torch.equal(x.grad.reshape(-1, 64), q(g2, E5M2) @ qw)
    assert torch.equal(w.grad, q(g2, E5M2).t() @ qx)
    assert not torch.equal(x.grad.reshape(-1, 64), q(g2, E4M3) @ qw)
    x, w, grad, _ = _gemm(_fp8("tensorwise", "e4m3"))
    assert torch.equal(x.grad.reshape(-1, 64), q(g2, E4M3) @ qw)


def test_wgrad_off_leaves_the_weight_gradient_exact():
    x, w, grad, _ = _gemm(_fp8("delayed", wgrad=False))
    x2, g2 = x.detach().reshape(-1, 64), grad.reshape(-1, 48)
    exact = g2.t() @ x2
    assert torch.equal(w.grad, exact)
    assert not torch.equal(x.grad.reshape(-1, 64), g2 @ w.detach())  # dgrad still quantised
    x, w, grad, _ = _gemm(_fp8("delayed", wgrad=True))
    assert not torch.equal(w.grad, exact)
    assert float((w.grad - exact).norm() / exact.norm()) < 0.1


@pytest.mark.parametrize("recipe", ["blockwise", "mxfp8"])
def test_block_recipes_gradients_are_close(recipe):
    x, w, grad, y = _gemm(_fp8(recipe, "e4m3"))
    x2, g2 = x.detach().reshape(-1, 64), grad.reshape(-1, 48)
    ref = x2 @ w.detach().t()
    assert 0 < float((y.reshape(-1, 48) - ref).norm() / ref.norm()) < 0.05
    assert float((w.grad - g2.t() @ x2).norm() / (g2.t() @ x2).norm()) < 0.05
    assert float((x.grad.reshape(-1, 64) - g2 @ w.detach()).norm()) > 0


# ------------------------------------------------------------------------- layer spec


@pytest.mark.parametrize("model", ["llm-jp-4-tiny-dense", "llm-jp-4-tiny-moe"])
def test_emulated_spec_swaps_every_local_linear(model):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_llmjp.models.build import layer_spec

    c = build_config(
        overrides=[
            "data.synthetic=true",
            f"model.name={model}",
            "precision.dtype=bf16",
            "precision.fp8=delayed",
            "precision.fp8_backend=emulated",
        ]
    )
    spec = layer_spec(c)
    found = []

    def walk(node):
        sub = getattr(node, "submodules", None)
        for name in getattr(sub, "__dataclass_fields__", {}):
            v = getattr(sub, name)
            assert v not in (ColumnParallelLinear, RowParallelLinear), name
            if isinstance(v, ModuleSpec):
                if v.module in (em.EmulatedColumnParallelLinear, em.EmulatedRowParallelLinear):
                    found.append(name)
                walk(v)

    walk(spec)
    assert spec.module is em.EmulatedFP8TransformerLayer
    assert {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"} <= set(found)
    plain = layer_spec(build_config(overrides=["data.synthetic=true", f"model.name={model}"]))
    assert plain.module is not em.EmulatedFP8TransformerLayer  # the source spec is untouched


# ----------------------------------------------------------------------------- peaks


def test_peak_table():
    assert gpu_kind("NVIDIA H100 80GB HBM3") == "H100 SXM"
    assert gpu_kind("NVIDIA H200") == "H200"
    assert gpu_kind("NVIDIA H100 PCIe") == "H100 PCIe"
    assert gpu_kind("Intel CPU") is None
    assert peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp8") == 1978.9
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert compute_precision(cfg().precision) == "bf16"
    assert compute_precision(cfg("precision.fp8=delayed").precision) == "fp8"
    emulated = cfg("precision.fp8=delayed", "precision.fp8_backend=emulated")
    assert compute_precision(emulated.precision) is None
    assert compute_precision(build_config(overrides=BASE).precision) is None  # fp32
