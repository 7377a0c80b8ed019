"""Drop-Upcycling without process groups: the tensor functions (``upcycle/drop.py``) and the
checkpoint driver (``upcycle/driver.py``, ``llmjp-upcycle``) on small dense checkpoints written
directly with ``TensorWriter`` (no training).

Tensor functions: each expert's slice is a sorted subset of distinct dense units; R=0 copies;
with R=0.5 exactly round(R*F) units per expert are new, drawn with the mean and standard
deviation of the rows they replace, and the kept ones are exact copies; a seed fixes
everything. Driver: the written keys, shapes, manifest and config; vocabulary re-padding for
a new TP size; BF16 output; every validation error, each before anything is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.manifest import build_manifest, model_section, write_manifest
from megatron_llmjp.checkpoint.tensors import TensorReader, TensorWriter
from megatron_llmjp.cli.upcycle import main
from megatron_llmjp.config.loader import ConfigError, build_config, dump_yaml
from megatron_llmjp.convert import mappings
from megatron_llmjp.parallel.layout import make_layout
from megatron_llmjp.upcycle import drop
from megatron_llmjp.upcycle.driver import (
    DENSE_FC1,
    DENSE_FC2,
    DENSE_PRE_MLP_NORM,
    EXPERT_FC1,
    EXPERT_FC2,
    MOE_PRE_MLP_NORM,
    ROUTER,
    UpcycleSpec,
    _rules,
    upcycle,
)

# -- tensor functions ----------------------------------------------------------------------


def _dense_ffn(ffn: int = 192, hidden: int = 64, seed: int = 0):
    """A SwiGLU FFN whose rows differ in scale and offset, so the statistics of a block of
    rows depend on which rows it holds."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.01, 0.2, ffn).unsqueeze(1)
    offset = torch.linspace(-0.1, 0.1, ffn).unsqueeze(1)
    gate = torch.randn(ffn, hidden, generator=g) * scale + offset
    up = torch.randn(ffn, hidden, generator=g) * scale.flip(0) - offset
    down = (torch.randn(ffn, hidden, generator=g) * scale + 2 * offset).T.contiguous()
    return torch.cat([gate, up]), down


def _upcycle(fc1, fc2, experts=4, expert_ffn=96, ratio=0.5, seed=7):
    g = drop.layer_generator(seed, 0, "experts")
    plan = drop.plan_experts(fc2.shape[1], expert_ffn, experts, ratio, g)
    return plan, *drop.upcycle_ffn(fc1, fc2, plan, g)


def test_slices_are_sorted_subsets_of_distinct_dense_units():
    g = torch.Generator().manual_seed(0)
    plan = drop.plan_experts(192, 96, 8, 0.5, g)
    assert plan.slices.shape == (8, 96) and plan.dropped.shape == (8, 48)
    for idx, dropped in zip(plan.slices, plan.dropped, strict=True):
        assert idx.unique().numel() == 96 and idx.min() >= 0 and idx.max() < 192
        assert torch.equal(idx, idx.sort().values)
        assert dropped.unique().numel() == 48 and dropped.min() >= 0 and dropped.max() < 96
    assert len({tuple(s.tolist()) for s in plan.slices}) == 8  # experts differ
    full = drop.plan_experts(192, 192, 3, 0.0, g)
    assert all(torch.equal(s, torch.arange(192)) for s in full.slices)
    assert full.dropped.shape == (3, 0)


def test_zero_drop_ratio_copies_the_slices():
    fc1, fc2 = _dense_ffn()
    gate, up = fc1.chunk(2)
    plan, e1, e2 = _upcycle(fc1, fc2, ratio=0.0)
    assert e1.shape == (4, 192, 64) and e2.shape == (4, 64, 96)
    for e, idx in enumerate(plan.slices):
        assert torch.equal(e1[e], torch.cat([gate[idx], up[idx]]))
        assert torch.equal(e2[e], fc2[:, idx])
    _, f1, f2 = _upcycle(fc1, fc2, expert_ffn=192, ratio=0.0)
    assert all(torch.equal(f1[e], fc1) and torch.equal(f2[e], fc2) for e in range(4))


@pytest.mark.parametrize("ffn,ratio,expected", [(96, 0.5, 48), (10, 0.25, 3), (96, 1.0, 96)])
def test_number_of_reinitialised_units(ffn, ratio, expected):
    assert drop.num_dropped(ffn, ratio) == expected
    fc1, fc2 = _dense_ffn()
    gate, up = fc1.chunk(2)
    plan, e1, e2 = _upcycle(fc1, fc2, expert_ffn=ffn, ratio=ratio)
    for e, idx in enumerate(plan.slices):
        g, u = e1[e].chunk(2)
        new_gate = (g != gate[idx]).any(1)
        new_up = (u != up[idx]).any(1)
        new_down = (e2[e] != fc2[:, idx]).any(0)
        assert int(new_gate.sum()) == int(new_up.sum()) == int(new_down.sum()) == expected
        # One set of units, dropped in all three matrices.
        assert torch.equal(new_gate, new_up) and torch.equal(new_gate, new_down)
        assert torch.equal(new_gate.nonzero().flatten(), plan.dropped[e])


def test_half_drop_matches_the_statistics_of_the_replaced_block():
    fc1, fc2 = _dense_ffn(ffn=384, hidden=128)
    gate, up = fc1.chunk(2)
    plan, e1, e2 = _upcycle(fc1, fc2, experts=6, expert_ffn=256, ratio=0.5)
    for e, (idx, dropped) in enumerate(zip(plan.slices, plan.dropped, strict=True)):
        g, u = e1[e].chunk(2)
        kept = torch.ones(256, dtype=torch.bool)
        kept[dropped] = False
        replaced_units = idx[dropped]
        pairs = [
            (g[dropped], gate[replaced_units]),
            (u[dropped], up[replaced_units]),
            (e2[e][:, dropped], fc2[:, replaced_units]),
        ]
        for new, old in pairs:
            n = old.numel()  # 128 x 128 draws
            mu, sigma = old.double().mean().item(), old.double().std().item()
            assert abs(new.double().mean().item() - mu) < 5 * sigma / n**0.5
            assert abs(new.double().std().item() / sigma - 1) < 5 / (2 * n) ** 0.5
        # Kept units are exact copies.
        assert torch.equal(g[kept], gate[idx[kept]])
        assert torch.equal(u[kept], up[idx[kept]])
        assert torch.equal(e2[e][:, kept], fc2[:, idx[kept]])


def test_a_seed_fixes_everything():
    fc1, fc2 = _dense_ffn()
    a = _upcycle(fc1, fc2, seed=3)
    b = _upcycle(fc1, fc2, seed=3)
    c = _upcycle(fc1, fc2, seed=4)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    assert not torch.equal(a[1], c[1])
    # Streams differ per layer and per purpose, and do not touch torch's global RNG.
    state = torch.get_rng_state()
    x = torch.randn(4, generator=drop.layer_generator(3, 0, "experts"))
    y = torch.randn(4, generator=drop.layer_generator(3, 1, "experts"))
    z = torch.randn(4, generator=drop.layer_generator(3, 0, "router"))
    assert not torch.equal(x, y) and not torch.equal(x, z)
    assert torch.equal(state, torch.get_rng_state())


def test_router_is_fresh_normal():
    r = drop.init_router(64, 512, 0.02, drop.layer_generator(0, 0, "router"))
    assert r.shape == (64, 512) and r.dtype == torch.float32
    assert abs(r.std().item() - 0.02) < 0.001 and abs(r.mean().item()) < 0.001
    assert not drop.init_router(4, 8, 0.0, torch.Generator()).any()


def test_input_is_not_modified():
    fc1, fc2 = _dense_ffn()
    before = fc1.clone(), fc2.clone()
    _upcycle(fc1, fc2, ratio=1.0)
    assert torch.equal(fc1, before[0]) and torch.equal(fc2, before[1])


# -- the checkpoint driver -----------------------------------------------------------------

BASE = ["model.name=llm-jp-4-tiny-dense", "data.synthetic=true", "model.vocab_size=1000"]
SPEC = UpcycleSpec(num_experts=4, topk=2, expert_ffn=96, drop_ratio=0.5, seed=1)


def write_dense(
    root: Path, overrides: tuple[str, ...] = (), extra: dict | None = None, drop_key=None
) -> dict[str, torch.Tensor]:
    """A dense checkpoint root (iteration 5) with random weights; returns its tensors."""
    cfg = build_config(overrides=[*BASE, *overrides])
    layout = make_layout(cfg.parallel, cfg.model, cfg.train, 1)
    model = model_section(cfg.model, layout.tp, "none")
    dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    tensors = {
        r.mcore: (torch.randn(mappings.global_shape(r, model), generator=g) * 0.02).to(dtype)
        for r in _rules(model["hf_architecture"], model)
    }
    tensors.update(extra or {})
    tensors.pop(drop_key, None)
    ckpt = root / store.iter_name(5)
    writer = TensorWriter(ckpt)
    for k, t in tensors.items():
        writer.declare(k, t.shape, t.dtype)
    writer.write([(k, (), t) for k, t in tensors.items()])
    writer.finish({})
    dump_yaml(cfg, ckpt / "config.yaml")
    progress = {"iteration": 5, "consumed_samples": 40, "skipped_steps": 0}
    manifest = build_manifest(
        cfg,
        layout,
        progress,
        store.file_sizes(ckpt),
        optimizer_saved=False,
        experts_layout="sequential" if cfg.model.is_moe else "none",
    )
    write_manifest(ckpt, manifest)
    (root / store.LATEST).write_text("5\n")
    return tensors


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dense")
    return root, write_dense(root)


def _read_all(root: Path) -> tuple[dict, dict, dict]:
    ckpt = store.resolve(root, "test")
    reader = TensorReader(ckpt)
    names = reader.names()
    tensors = dict(zip(names, reader.read_many([(k, ()) for k in names]), strict=True))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    return tensors, manifest, config


def test_plain_upcycling_copies_everything(dense, tmp_path):
    root, src = dense
    spec = UpcycleSpec(num_experts=4, topk=1, expert_ffn=192, drop_ratio=0.0, router_std=0.0)
    report = upcycle(root, tmp_path / "moe", spec, progress=False)
    out, manifest, config = _read_all(tmp_path / "moe")
    assert (tmp_path / "moe" / "latest").read_text().strip() == "0"
    for key in (
        "embedding.word_embeddings.weight",
        "output_layer.weight",
        "decoder.final_layernorm.weight",
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.self_attention.linear_qkv.weight",
        "decoder.layers.self_attention.linear_proj.weight",
    ):
        assert torch.equal(out[key], src[key]), key
    assert torch.equal(out[MOE_PRE_MLP_NORM], src[DENSE_PRE_MLP_NORM])
    assert out[EXPERT_FC1].shape == (4, 4, 384, 64) and out[EXPERT_FC2].shape == (4, 4, 64, 192)
    for e in range(4):
        assert torch.equal(out[EXPERT_FC1][:, e], src[DENSE_FC1])
        assert torch.equal(out[EXPERT_FC2][:, e], src[DENSE_FC2])
    assert out[ROUTER].shape == (4, 4, 64) and not out[ROUTER].any()
    assert set(out) == {r.mcore for r in _rules("Qwen3MoeForCausalLM", manifest["model"])}
    assert report.tensors == len(out)
    m = manifest["model"]
    assert m["family"] == "moe" and m["hf_architecture"] == "Qwen3MoeForCausalLM"
    assert m["ffn_hidden_size"] is None and not m["qk_layernorm"]
    assert m["moe"]["num_experts"] == 4 and m["moe"]["router_topk"] == 1
    assert m["moe"]["moe_ffn_hidden_size"] == 192
    # Top-1: the softmax comes before the top-k (megatron-core needs it for a router gradient).
    assert not m["moe"]["router"]["norm_topk_prob"] and m["moe"]["router"]["pre_softmax"]
    assert m["moe"]["router"]["aux_loss_coeff"] == 0.01
    assert manifest["iteration"] == 0 and not manifest["optimizer"]["saved"]
    assert manifest["source"]["method"] == "drop-upcycling"
    assert manifest["source"]["dense_iteration"] == 5
    store.resolve(tmp_path / "moe", "x")  # a loadable root
    assert config["model"]["family"] == "moe" and config["checkpoint"]["dir"] is None
    assert config["checkpoint"]["load_optimizer"] is False
    assert "Drop-Upcycled" in config["model"]["source"]
    assert report.notes and "qk_layernorm=false" in report.notes[0]


def test_drop_upcycling_is_reproducible_and_layer_streams_differ(dense, tmp_path):
    root, _ = dense
    upcycle(root, tmp_path / "a", SPEC, progress=False)
    upcycle(root, tmp_path / "b", SPEC, progress=False)
    upcycle(root, tmp_path / "c", UpcycleSpec(**{**asdict(SPEC), "seed": 2}), progress=False)
    a, b, c = (_read_all(tmp_path / n)[0] for n in "abc")
    for key in (EXPERT_FC1, EXPERT_FC2, ROUTER):
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a[key], c[key])
    assert not torch.equal(a[ROUTER][0], a[ROUTER][1])
    assert abs(a[ROUTER].std().item() - 0.02) < 0.004


def test_target_layout_repads_the_vocabulary_and_sets_the_dtype(tmp_path):
    # 1100 tokens: padded to 1152 for TP1, 1280 for TP2.
    src = write_dense(tmp_path / "dense", ("model.vocab_size=1100", "model.qk_layernorm=true"))
    overrides = ["parallel.tp=2", "parallel.ep=2", "precision.dtype=bf16"]
    report = upcycle(tmp_path / "dense", tmp_path / "moe", SPEC, overrides=overrides)
    out, manifest, config = _read_all(tmp_path / "moe")
    emb = out["embedding.word_embeddings.weight"]
    assert emb.shape == (1280, 64) and emb.dtype == torch.bfloat16
    assert torch.equal(emb[:1100], src["embedding.word_embeddings.weight"][:1100].bfloat16())
    assert not emb[1100:].any()
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert torch.equal(
        out["decoder.layers.self_attention.q_layernorm.weight"],
        src["decoder.layers.self_attention.q_layernorm.weight"].bfloat16(),
    )
    assert manifest["model"]["padded_vocab_size"] == 1280 and manifest["model"]["qk_layernorm"]
    assert manifest["parallel"]["tp"] == 2 and manifest["parallel"]["ep"] == 2
    assert manifest["model"]["moe"]["router"]["norm_topk_prob"]  # top-2: LLM-jp's default
    assert manifest["precision"]["params_dtype"] == "bf16"
    assert config["parallel"]["ep"] == 2 and not report.notes


BAD_SPECS = [
    ({"num_experts": 0, "topk": 1}, "--experts 0"),
    ({"topk": 0}, "--topk 0"),
    ({"topk": 5}, "--topk 5: must be in [1, --experts=4]"),
    ({"topk": 1, "norm_topk_prob": True}, "--norm-topk-prob with --topk 1"),
    ({"drop_ratio": -0.1}, "--drop-ratio -0.1"),
    ({"drop_ratio": 1.5}, "--drop-ratio 1.5"),
    ({"expert_ffn": 193}, "--expert-ffn 193: larger than the dense FFN (192)"),
    ({"expert_ffn": 0}, "--expert-ffn 0"),
    ({"router_std": -1.0}, "--router-std -1.0"),
    ({"aux_loss_coeff": -1.0}, "--aux-loss-coeff -1.0"),
]


@pytest.mark.parametrize("change,message", BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_bad_flags_are_refused_before_writing(dense, tmp_path, change, message):
    spec = UpcycleSpec(**{**asdict(SPEC), **change})
    with pytest.raises(ConfigError, match=re.escape(message)):
        upcycle(dense[0], tmp_path / "moe", spec, progress=False)
    assert not any(tmp_path.iterdir())


def test_bad_inputs_are_refused_before_writing(dense, tmp_path):
    out = tmp_path / "out"

    def refused(src, match, overrides=()):
        with pytest.raises(ConfigError, match=match):
            upcycle(src, out, SPEC, overrides=list(overrides), progress=False)
        assert not out.exists()

    refused(tmp_path / "nothing", "--input")
    refused(
        dense[0],
        "--set model.num_experts: not settable here \\(use --experts\\)",
        ["model.num_experts=8"],
    )
    refused(dense[0], "--set model.hidden_size: not settable", ["model.hidden_size=32"])
    refused(dense[0], "parallel", ["parallel.ep=3"])
    write_dense(tmp_path / "extra", extra={"decoder.layers.mlp.bias": torch.zeros(4, 3)})
    refused(tmp_path / "extra", r"refusing to drop them\): \['decoder.layers.mlp.bias'\]")
    write_dense(tmp_path / "short", drop_key=DENSE_FC2)
    refused(tmp_path / "short", "lacks tensors")
    write_dense(tmp_path / "moe", ("model.name=llm-jp-4-tiny-moe",))
    refused(tmp_path / "moe", "holds a 'moe' model")
    with pytest.raises(ConfigError, match="would replace or sit inside"):
        upcycle(dense[0], dense[0] / "latest", SPEC, force=True, progress=False)
    with pytest.raises(ConfigError, match="would replace or sit inside"):
        upcycle(dense[0] / "iter_0000005", dense[0].parent, SPEC, force=True, progress=False)
    assert store.read_latest(dense[0]) == 5
    out.mkdir()
    with pytest.raises(ConfigError, match="--output .* already exists"):
        upcycle(dense[0], out, SPEC, progress=False)
    upcycle(dense[0], out, SPEC, force=True, progress=False)
    assert store.read_latest(out) == 0


def test_cli(dense, tmp_path, capsys):
    def args(ffn: int = 96, *more: str) -> list[str]:
        return [
            *("--input", str(dense[0]), "--output", str(tmp_path / "moe")),
            *("--experts", "4", "--topk", "2", "--expert-ffn", str(ffn)),
            *("--quiet", "--set", "parallel.ep=2", *more),
        ]

    assert main(args()) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "4 experts (ffn 96, top-2)" in out and "note:" in out
    assert "checkpoint.load_optimizer=false" in out
    assert main(args()) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmjp-upcycle: error: --output")
    assert main(args(500, "--force")) == 2
    assert "--expert-ffn 500" in capsys.readouterr().err
