"""Conversion building blocks without megatron: transforms, tables, safetensors, HF config."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.checkpoint.tensors import TensorReader, TensorWriter
from megatron_llmjp.convert import hf_config, mappings
from megatron_llmjp.convert.safetensors_io import INDEX, Entry, HFReader, ShardedWriter, parse_size
from megatron_llmjp.convert.transforms import TRANSFORMS, ConversionError, Dims

DIMS = Dims(
    vocab_size=1000, padded_vocab_size=1024, num_query_groups=2, heads_per_group=3, head_dim=4
)


def test_qkv_split_follows_megatron_per_group_order():
    g, h, d, hidden = 2, 3, 4, 5
    # Row r of the fused weight is filled with a code: group*100 + slot*10 + dim.
    rows = [g_ * 100 + slot * 10 + i for g_ in range(g) for slot in range(h + 2) for i in range(d)]
    fused = torch.tensor(rows, dtype=torch.float32)[:, None].expand(-1, hidden).contiguous()
    q, k, v = TRANSFORMS["qkv"][0](fused, DIMS)
    assert q.shape == (g * h * d, hidden) and k.shape == v.shape == (g * d, hidden)
    # q heads of group 0 (slots 0..2), then group 1; k is slot h, v slot h+1 of each group.
    assert q[:, 0].tolist() == [
        g_ * 100 + s * 10 + i for g_ in range(g) for s in range(h) for i in range(d)
    ]
    assert k[:, 0].tolist() == [g_ * 100 + h * 10 + i for g_ in range(g) for i in range(d)]
    assert v[:, 0].tolist() == [g_ * 100 + (h + 1) * 10 + i for g_ in range(g) for i in range(d)]


@pytest.mark.parametrize(
    "name,shape", [("qkv", (40, 7)), ("gate_up", (12, 7)), ("copy", (3, 4)), ("vocab", (1024, 8))]
)
def test_merge_inverts_split_bitwise(name, shape):
    split, merge = TRANSFORMS[name]
    t = torch.randn(shape)
    if name == "vocab":
        t[1000:] = 0  # megatron's padding rows are dropped on export and come back as zeros
    assert torch.equal(merge(split(t, DIMS), DIMS), t)


def test_vocab_transform_unpads_and_pads():
    t = torch.randn(1024, 8)
    (hf,) = TRANSFORMS["vocab"][0](t, DIMS)
    assert hf.shape == (1000, 8) and torch.equal(hf, t[:1000])
    with pytest.raises(ConversionError, match="larger than the padded size"):
        TRANSFORMS["vocab"][1]([torch.zeros(1100, 8)], DIMS)


def test_qkv_shape_mismatch_is_explained():
    with pytest.raises(ConversionError, match=r"expected num_query_groups\*\(heads_per_group\+2\)"):
        TRANSFORMS["qkv"][0](torch.zeros(41, 7), DIMS)


def _model(arch="LlamaForCausalLM", **kw):
    m = {
        "hf_architecture": arch,
        "num_layers": 2,
        "hidden_size": 16,
        "ffn_hidden_size": 24,
        "num_attention_heads": 4,
        "num_query_groups": 2,
        "head_dim": 8,
        "vocab_size": 1000,
        "padded_vocab_size": 1024,
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "moe": None,
    }
    if arch == "Qwen3MoeForCausalLM":
        m.update(
            ffn_hidden_size=None,
            qk_layernorm=True,
            moe={"num_experts": 3, "moe_ffn_hidden_size": 6},
        )
    m.update(kw)
    return m


def test_tables_cover_every_hf_tensor_once():
    for arch, per_layer in (("LlamaForCausalLM", 9), ("Qwen3MoeForCausalLM", 9 + 3 * 3)):
        model = _model(arch)
        rules = mappings.rules_for(model)
        names = [
            n
            for r in rules
            for layer in ([None] if r.scope == "model" else [0])
            for i in mappings.indices(r, model, layer)
            for n in mappings.hf_names(r, i)
        ]
        assert len(names) == len(set(names)) == 3 + per_layer
        assert (
            "model.layers.0.mlp.experts.2.down_proj.weight" in names or arch == "LlamaForCausalLM"
        )


def test_tables_refuse_models_without_an_hf_equivalent():
    with pytest.raises(ConversionError, match="no LlamaForCausalLM equivalent"):
        mappings.rules_for(_model(qk_layernorm=True))
    with pytest.raises(ConversionError, match="always normalises queries and keys"):
        mappings.rules_for(_model("Qwen3MoeForCausalLM", qk_layernorm=False))
    with pytest.raises(ConversionError, match="no mapping table"):
        mappings.rules_for(_model("GPT2LMHeadModel"))
    tied = mappings.rules_for(_model(tie_word_embeddings=True))
    assert "output_layer.weight" not in [r.mcore for r in tied]


def test_sharded_writer_is_read_by_safetensors(tmp_path):
    from safetensors import safe_open

    tensors = {
        f"t{i}": torch.randn(i + 1, 5).to(torch.bfloat16 if i % 2 else torch.float32)
        for i in range(6)
    }
    entries = [Entry(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = ShardedWriter(tmp_path, entries, max_shard_bytes=60)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors) and len(w.files) > 1
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in entries)
    for n, t in tensors.items():
        with safe_open(str(tmp_path / index["weight_map"][n]), "pt") as f:
            assert torch.equal(f.get_tensor(n), t)
    r = HFReader(tmp_path)
    assert all(torch.equal(r.read(n), t) for n, t in tensors.items())


def test_sharded_writer_refuses_out_of_plan_tensors(tmp_path):
    w = ShardedWriter(tmp_path, [Entry("a", (2,), torch.float32)], 100)
    with pytest.raises(ConversionError, match="was planned"):
        w.write("b", torch.zeros(2))
    with pytest.raises(ConversionError, match="not written"):
        w.close()


def test_hf_reader_reports_damaged_directories(tmp_path):
    entries = [Entry(f"t{i}", (4, 4), torch.float32) for i in range(3)]
    w = ShardedWriter(tmp_path, entries, 64)
    for e in entries:
        w.write(e.name, torch.ones(e.shape))
    w.close()
    (tmp_path / INDEX).write_text("{not json")
    with pytest.raises(ConversionError, match="corrupted index"):
        HFReader(tmp_path)
    (tmp_path / INDEX).write_text(
        json.dumps(
            {"weight_map": {"t0": "model-00001-of-00003.safetensors", "t1": "gone.safetensors"}}
        )
    )
    with pytest.raises(ConversionError, match="gone.safetensors listed in .* is missing"):
        HFReader(tmp_path)
    single = tmp_path / "one"
    single.mkdir()
    (single / "model.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        HFReader(single)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1234") == 1234
    with pytest.raises(ConversionError, match="--max-shard-size"):
        parse_size("lots")


def _section(arch):
    from megatron_llmjp.checkpoint.manifest import model_section
    from megatron_llmjp.models.registry import get_model

    name = "llm-jp-4-32b-a3b" if arch == "moe" else "llm-jp-4-8b"
    return model_section(get_model(name), 4, "grouped")


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_hf_config_matches_the_model_card_and_reads_back(arch, tmp_path):
    transformers = pytest.importorskip("transformers")
    section = _section(arch)
    cfg = hf_config.to_hf_config(section, torch.bfloat16, hf_config.LLMJP4_TOKEN_IDS)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.vocab_size == 196608 and hf.head_dim == 128 and hf.tie_word_embeddings is False
    assert hf.rope_parameters["rope_theta"] == 500000 and hf.rms_norm_eps == 1e-6
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 4)
    assert hf.dtype == torch.bfloat16
    if arch == "moe":
        assert type(hf).__name__ == "Qwen3MoeConfig"
        assert (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == (128, 8, 960)
        assert hf.norm_topk_prob is True and hf.router_aux_loss_coef == 0.01
        assert (hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads) == (2560, 40, 4)
    else:
        assert (hf.intermediate_size, hf.num_key_value_heads) == (14336, 8)
    back, dtype = hf_config.model_config_from_hf(cfg, tmp_path)
    assert dtype == torch.bfloat16
    assert back.name == ("llm-jp-4-32b-a3b" if arch == "moe" else "llm-jp-4-8b")


def test_release_fields_come_back_on_export():
    """A Qwen3-MoE release declares a dense intermediate_size (96) no layer uses; the model
    section derives the expert size (48). The import records it; the export writes it back,
    but the dtype and a tokenizer's ids are the export's own."""
    from dataclasses import replace

    from megatron_llmjp.checkpoint.manifest import model_section
    from megatron_llmjp.models.registry import get_model

    model = get_model("llm-jp-4-tiny-moe")
    derived = hf_config.to_hf_config(
        model_section(model, 1, "sequential"), torch.float32, hf_config.LLMJP4_TOKEN_IDS
    )
    release = {**derived, "intermediate_size": 96, "max_window_layers": 28, "torch_dtype": "bf16"}
    release.update(eos_token_id=7)
    kept = hf_config.release_fields(release, model_section(model, 1, "sequential"))
    assert kept == {
        "architectures": ["Qwen3MoeForCausalLM"],
        "intermediate_size": 96,
        "max_window_layers": 28,
        "eos_token_id": 7,
    }
    section = model_section(replace(model, hf_config=json.dumps(kept)), 2, "sequential")
    assert section["hf_config"] == kept
    back = hf_config.to_hf_config(section, torch.bfloat16, hf_config.LLMJP4_TOKEN_IDS)
    assert {k: back[k] for k in kept} == kept and back["torch_dtype"] == "bfloat16"
    ids = hf_config.to_hf_config(
        section, torch.float32, hf_config.LLMJP4_TOKEN_IDS, tokenizer_ids=True
    )
    assert ids["eos_token_id"] == 2 and ids["intermediate_size"] == 96
    dense = replace(get_model("llm-jp-4-tiny-dense"), hf_config=json.dumps(kept))
    other = hf_config.to_hf_config(
        model_section(dense, 1, "none"), torch.float32, hf_config.LLMJP4_TOKEN_IDS
    )
    assert other["intermediate_size"] == 192  # recorded for another architecture: ignored
    assert hf_config.release_fields(derived, model_section(model, 1, "sequential")) == {}


def test_hf_config_refusals(tmp_path):
    base = hf_config.to_hf_config(_section("dense"), torch.float32, hf_config.LLMJP4_TOKEN_IDS)
    for change, match in (
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling"),
        ({"torch_dtype": "int8", "dtype": None}, "torch_dtype"),
    ):
        with pytest.raises(ConversionError, match=match):
            hf_config.model_config_from_hf({**base, **change}, tmp_path)


def test_tensor_writer_reader_roundtrip_and_holes(tmp_path):
    full = torch.randn(3, 4, 5)
    w = TensorWriter(tmp_path / "ok")
    w.declare("stack", full.shape, full.dtype)
    w.declare("flat", (7,), torch.float32)
    for layer in (2, 0, 1):
        w.write([("stack", (layer,), full[layer])])
    w.write([("flat", (), torch.arange(7.0))])
    w.finish({"x": 1})
    r = TensorReader(tmp_path / "ok")
    assert sorted(r.names()) == ["flat", "stack"]
    assert torch.equal(r.read("stack"), full) and torch.equal(r.read("stack", (1,)), full[1])
    assert r.common() == {"x": 1}
    w = TensorWriter(tmp_path / "holes")
    w.declare("stack", full.shape, full.dtype)
    w.write([("stack", (0,), full[0])])
    with pytest.raises(CheckpointError, match="not completely written"):
        w.finish()
    with pytest.raises(CheckpointError, match="shape"):
        w.write([("stack", (1,), torch.zeros(4, 6))])


_LLAMA_4_57 = {  # LlamaConfig.save_pretrained of transformers 4.57 (tiny sizes)
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "dtype": "float32",
    "eos_token_id": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "max_position_embeddings": 4096,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "pad_token_id": 4,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 1000,
}
_QWEN3_MOE_4_57 = {  # Qwen3MoeConfig.save_pretrained of transformers 4.57 (tiny sizes)
    **{k: v for k, v in _LLAMA_4_57.items() if k not in ("mlp_bias", "pretraining_tp", "dtype")},
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "torch_dtype": "bfloat16",
    "decoder_sparse_step": 1,
    "max_window_layers": 28,
    "mlp_only_layers": [],
    "moe_intermediate_size": 48,
    "norm_topk_prob": True,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "use_sliding_window": False,
}


def _transformers_export(arch: str, tmp_path) -> dict:
    transformers = pytest.importorskip("transformers")
    common = {k: _LLAMA_4_57[k] for k in ("vocab_size", "hidden_size", "head_dim", "rope_theta")}
    common.update(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    if arch == "dense":
        cfg = transformers.LlamaConfig(intermediate_size=96, **common)
    else:
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=96, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
            **common,
        )  # fmt: skip
    cfg.architectures = ["LlamaForCausalLM" if arch == "dense" else "Qwen3MoeForCausalLM"]
    cfg.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("source", ["dense-4.57", "moe-4.57", "dense-installed", "moe-installed"])
def test_real_exports_pass_the_field_table(source, tmp_path):
    arch, version = source.split("-")
    if version == "4.57":
        cfg = _LLAMA_4_57 if arch == "dense" else _QWEN3_MOE_4_57
    else:
        cfg = _transformers_export(arch, tmp_path)
    model, _ = hf_config.model_config_from_hf(cfg, tmp_path)
    assert model.family == arch and model.rotary_base == 500000.0
    if arch == "moe":
        assert (model.num_experts, model.moe_router_topk) == (4, 2)


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_exports_and_their_recorded_fields_pass_the_field_table(arch, tmp_path):
    """What mcore-to-hf writes (with a release's fields recorded at import) reads back."""
    from dataclasses import replace

    from megatron_llmjp.checkpoint.manifest import model_section

    section = _section(arch)
    release = _QWEN3_MOE_4_57 if arch == "moe" else _LLAMA_4_57
    kept = hf_config.release_fields(release, section)
    section = model_section(
        replace(hf_config.model_config_from_hf(release, tmp_path)[0], hf_config=json.dumps(kept)),
        1,
        "sequential",
    )
    for ids in (False, True):
        cfg = hf_config.to_hf_config(
            section, torch.bfloat16, hf_config.LLMJP4_TOKEN_IDS, tokenizer_ids=ids
        )
        table = hf_config.field_table(cfg["architectures"][0])
        assert set(cfg) <= set(table), sorted(set(cfg) - set(table))
        hf_config.model_config_from_hf(cfg, tmp_path)


@pytest.mark.parametrize("arch", ["dense", "moe"])
@pytest.mark.parametrize(
    "change,match",
    [
        # the pre-rope_type spelling transformers still reads
        ({"rope_scaling": {"type": "linear", "factor": 4}}, r"rope_scaling=.*'linear'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_scaling=.*'yarn'"),
        (
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}},
            r"rope_parameters=.*'llama3'",
        ),
        (
            {"rope_parameters": {"type": "dynamic", "factor": 2.0, "rope_theta": 500000.0}},
            r"rope_parameters=.*'dynamic'",
        ),
        ({"rope_scaling": {"type": "default", "factor": 4}}, r"rope_scaling=.*\['factor'\]"),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
            r"RoPE bases disagree",
        ),
        ({"quantization_config": {"quant_method": "fp8"}}, r"quantization_config=.*not a field"),
        ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0\.5: not a field"),
        ({"attention_dropout": 0.1}, r"attention_dropout=0\.1"),
        ({"attention_bias": 1}, r"attention_bias=1"),
        ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
        ({"model_type": "mistral"}, r"model_type='mistral'"),
    ],
)
def test_fields_the_converter_would_drop_are_refused_by_name(arch, change, match, tmp_path):
    base = _QWEN3_MOE_4_57 if arch == "moe" else _LLAMA_4_57
    with pytest.raises(ConversionError, match=match):
        hf_config.model_config_from_hf({**base, **change}, tmp_path)


def test_fields_of_the_other_architecture_are_refused(tmp_path):
    with pytest.raises(ConversionError, match=r"num_experts=4: not a field"):
        hf_config.model_config_from_hf({**_LLAMA_4_57, "num_experts": 4}, tmp_path)
    with pytest.raises(ConversionError, match=r"mlp_bias=True"):
        hf_config.model_config_from_hf({**_QWEN3_MOE_4_57, "mlp_bias": True}, tmp_path)
    for change, match in (
        ({"num_local_experts": 8}, "num_experts=4 and num_local_experts=8 disagree"),
        ({"use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window=True"),
        ({"mlp_only_layers": [1]}, r"mlp_only_layers=\[1\]"),
    ):
        with pytest.raises(ConversionError, match=match):
            hf_config.model_config_from_hf({**_QWEN3_MOE_4_57, **change}, tmp_path)
    # An unknown field that is null is absent in effect.
    hf_config.model_config_from_hf({**_LLAMA_4_57, "quantization_config": None}, tmp_path)


@pytest.mark.parametrize("command", ["hf-to-mcore", "hf-to-gguf"])
def test_cli_refuses_legacy_rope_scaling_before_writing(command, tmp_path, capsys):
    """The fault: ``{"type": "linear", "factor": 4}`` passed the check and, with
    ``--skip-parity``, an unscaled model was written. Refused from config.json alone."""
    from megatron_llmjp.cli.convert import main

    src = tmp_path / "hf"
    src.mkdir()
    cfg = {**_LLAMA_4_57, "rope_scaling": {"type": "linear", "factor": 4}}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / ("out.gguf" if command == "hf-to-gguf" else "out")
    extra = ["--skip-parity", "--no-progress"] if command == "hf-to-mcore" else []
    if command == "hf-to-gguf":
        pytest.importorskip("gguf")
    assert main([command, "--input", str(src), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert "rope_scaling=" in err and "'linear'" in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("enabled", [True, False])
def test_import_driver_restores_the_garbage_collector(enabled):
    """``llmjp-convert`` imports the driver with the collector off and leaves it as it was."""
    import gc

    from megatron_llmjp.cli.convert import import_driver
    from megatron_llmjp.convert import driver

    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        assert import_driver() is driver
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


@pytest.mark.parametrize(
    "flag,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32), (None, None)]
)
def test_cli_dtype_reaches_the_driver(flag, dtype, monkeypatch, tmp_path):
    """``--dtype`` names the torch dtype the export writes (none: the checkpoint's own)."""
    from megatron_llmjp.cli.convert import main
    from megatron_llmjp.convert import driver

    seen = {}

    def export(src, output, **kwargs):
        seen.update(kwargs)
        return driver.Report(output, 0, 0, 0.0)

    monkeypatch.setattr(driver, "mcore_to_hf", export)
    argv = ["mcore-to-hf", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    argv += ["--skip-parity", "--no-progress"] + (["--dtype", flag] if flag else [])
    assert main(argv) == 0
    assert seen["dtype"] is dtype
