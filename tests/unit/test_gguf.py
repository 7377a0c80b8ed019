"""``llmjp-convert hf-to-gguf``: tiny HF exports of both families (the real 196,608-piece
LLM-jp-4 tokenizer) -> GGUF, read back with gguf's own reader and checked tensor by tensor,
bit for bit, against the safetensors export, and key by key against config.json and the
tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_llmjp.convert.gguf_export import hf_to_gguf, read_vocab
from megatron_llmjp.convert.hf_tokenizer import export_tokenizer
from megatron_llmjp.convert.transforms import ConversionError
from tests.conftest import SHARED_DATA

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

TOKENIZER = SHARED_DATA / "tokenizer" / "llm-jp-tokenizer-v4.0"
SP_MODEL = TOKENIZER / "llm-jp-tokenizer_ver4.0_alpha1.0.model"
VOCAB = 196_608
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,  # != hidden / heads, as in the MoE family
    rope_theta=500000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=4,
)


def _export(kind: str, out: Path) -> Path:
    """What ``mcore-to-hf --tokenizer llm-jp-tokenizer-v4.0`` writes: sharded safetensors and
    config.json (made with transformers), and the tokenizer files of the export's own writer."""
    torch.manual_seed(0)
    if kind == "dense":
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(intermediate_size=48, **COMMON)
        )
    else:
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=24,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=24,
            norm_topk_prob=True,
            **COMMON,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.15)
    model.save_pretrained(out, max_shard_size="8MB")
    export_tokenizer(TOKENIZER, out)  # the tokenizer files mcore-to-hf writes
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    if not SP_MODEL.is_file():
        pytest.skip(f"LLM-jp-4 tokenizer not found at {TOKENIZER}")
    root = tmp_path_factory.mktemp("hf")
    return {k: _export(k, root / k) for k in ("dense", "moe")}


def _safetensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
    return out


def _gguf_tensor(t) -> torch.Tensor:
    """A GGUFReader tensor as torch, in torch's (reversed GGUF) shape, bits untouched."""
    shape = tuple(int(x) for x in reversed(t.shape))
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    return torch.from_numpy(np.array(t.data)).reshape(shape)


def _rope_rows(rows: int, heads: int) -> list[int]:
    """Hand-derived llama.cpp row order: within a head of size d, GGUF row 2*i + t holds HF row
    t*d/2 + i (HF rotates halves; llama.cpp rotates adjacent pairs)."""
    d = rows // heads
    return [h * d + t * (d // 2) + i for h in range(heads) for i in range(d // 2) for t in (0, 1)]


def _expected(kind: str, hf: dict[str, torch.Tensor], outtype: str) -> dict[str, torch.Tensor]:
    """GGUF name -> expected tensor, built independently of the exporter."""
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[outtype]
    exp: dict[str, torch.Tensor] = {
        "token_embd.weight": hf["model.embed_tokens.weight"],
        "output_norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "mlp.gate": "ffn_gate_inp",
    }
    for i in range(COMMON["num_hidden_layers"]):
        for src, dst in names.items():
            key = f"model.layers.{i}.{src}.weight"
            if key in hf:
                exp[f"blk.{i}.{dst}.weight"] = hf[key]
        if kind == "dense":
            q, k = exp[f"blk.{i}.attn_q.weight"], exp[f"blk.{i}.attn_k.weight"]
            exp[f"blk.{i}.attn_q.weight"] = q[_rope_rows(q.shape[0], COMMON["num_attention_heads"])]
            exp[f"blk.{i}.attn_k.weight"] = k[_rope_rows(k.shape[0], COMMON["num_key_value_heads"])]
        else:
            for w, dst in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
                exp[f"blk.{i}.ffn_{dst}_exps.weight"] = torch.stack(
                    [hf[f"model.layers.{i}.mlp.experts.{e}.{w}.weight"] for e in range(4)]
                )
    out = {}
    for name, t in exp.items():
        if t.dim() == 1 or name.endswith("ffn_gate_inp.weight"):
            out[name] = t.float()  # norms and the router stay F32, as in convert_hf_to_gguf.py
        elif cast == torch.float16:  # numpy's own f32 -> f16 rounding as the reference
            out[name] = torch.from_numpy(t.float().numpy().astype(np.float16))
        else:
            out[name] = t.to(cast)
    return out


def _fields(r) -> dict:
    return {k: f.contents() for k, f in r.fields.items()}


# auto = the export's dtype: F32 for the dense export, BF16 for the MoE one. GGUFReader takes
# seconds on a 196,608-entry vocabulary, so each file is converted and read once per module.
CASES = [("dense", "auto"), ("dense", "f16"), ("moe", "auto")]


@pytest.fixture(scope="module")
def converted(exports, tmp_path_factory):
    cache: dict[tuple[str, str], tuple] = {}

    def get(kind: str, outtype: str):
        if (kind, outtype) not in cache:
            d = tmp_path_factory.mktemp(f"gguf-{kind}-{outtype}")
            report = hf_to_gguf(exports[kind], d / "m.gguf", outtype=outtype)
            assert [p.name for p in d.iterdir()] == ["m.gguf"]  # no temporary left
            cache[kind, outtype] = (report, gguf.GGUFReader(d / "m.gguf"))
        return cache[kind, outtype]

    return get


@pytest.mark.parametrize("kind,outtype", CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_every_tensor_matches_the_export_bit_for_bit(exports, converted, kind, outtype):
    report, r = converted(kind, outtype)
    assert report.architecture == ("llama" if kind == "dense" else "qwen3moe")
    assert report.outtype == {"auto": "f32" if kind == "dense" else "bf16"}.get(outtype, outtype)
    expected = _expected(kind, _safetensors(exports[kind]), report.outtype)
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(expected)
    for name, exp in expected.items():
        t = _gguf_tensor(got[name])
        assert t.dtype == exp.dtype and t.shape == exp.shape, name
        bits = {2: torch.int16, 4: torch.int32}
        assert torch.equal(t.view(bits[t.itemsize]), exp.view(bits[exp.itemsize])), name
    assert report.tensors == len(expected)


def test_metadata_matches_config_and_tokenizer(exports, converted):
    for kind, src in exports.items():
        cfg = json.loads((src / "config.json").read_text())
        f = _fields(converted(kind, "auto")[1])
        arch = "llama" if kind == "dense" else "qwen3moe"
        assert f["general.architecture"] == arch
        assert f["general.file_type"] == (0 if kind == "dense" else 32)  # auto: F32 / BF16
        want = {
            "context_length": cfg["max_position_embeddings"],
            "embedding_length": cfg["hidden_size"],
            "block_count": cfg["num_hidden_layers"],
            "feed_forward_length": cfg["intermediate_size"],
            "attention.head_count": cfg["num_attention_heads"],
            "attention.head_count_kv": cfg["num_key_value_heads"],
            "attention.key_length": cfg["head_dim"],
            "attention.value_length": cfg["head_dim"],
            "rope.dimension_count": cfg["head_dim"],
            "rope.freq_base": cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"],
            "vocab_size": VOCAB,
        }
        if kind == "moe":
            want.update(
                expert_count=cfg.get("num_experts") or cfg["num_local_experts"],
                expert_used_count=cfg["num_experts_per_tok"],
                expert_feed_forward_length=cfg["moe_intermediate_size"],
                expert_weights_norm=True,
            )
        for key, value in want.items():
            assert f[f"{arch}.{key}"] == value, key
        assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
        assert f["tokenizer.ggml.model"] == "llama"
        assert f["tokenizer.ggml.bos_token_id"] == cfg["bos_token_id"] == 1
        assert f["tokenizer.ggml.eos_token_id"] == cfg["eos_token_id"] == 2
        assert f["tokenizer.ggml.padding_token_id"] == cfg["pad_token_id"] == 4
        assert f["tokenizer.ggml.unknown_token_id"] == 0
        assert f["tokenizer.ggml.eot_token_id"] == 6  # end of document: where generation stops
        # The export's policy (tokenizer_config.json): no BOS, as in training.
        assert f["tokenizer.ggml.add_bos_token"] is False
        assert f["tokenizer.ggml.add_eos_token"] is False
        assert f["tokenizer.chat_template"] == (TOKENIZER / "chat_template.jinja").read_text()

    tokens, scores, types = (
        f["tokenizer.ggml.tokens"],
        f["tokenizer.ggml.scores"],
        f["tokenizer.ggml.token_type"],
    )
    assert len(tokens) == len(scores) == len(types) == VOCAB
    sp = spm.SentencePieceProcessor(model_file=str(SP_MODEL))
    # Special pieces carry the released names (tokenizer_config.json), as CONTROL tokens.
    for i, name in (
        (0, "<|unk|>"),
        (1, "<|startoftext|>"),
        (2, "<|return|>"),
        (4, "<|endoftext|>"),
    ):
        assert tokens[i] == name and types[i] == gguf.TokenType.CONTROL
    assert (
        tokens[6] == "<|eod|>" and tokens[10] == "<|start|>" and tokens[351] == "<|reserved_343|>"
    )
    # Byte-fallback pieces: <0xXX> at 352 + XX, type BYTE.
    for b in (0x00, 0x0A, 0xE3, 0xFF):
        assert tokens[352 + b] == f"<0x{b:02X}>" and types[352 + b] == gguf.TokenType.BYTE
    # Every ordinary piece, score and type as SentencePiece has it.
    for i in (352, 609, 1000, 50_000, VOCAB - 1):
        if i >= 352:
            assert tokens[i] == sp.id_to_piece(i)
            assert scores[i] == pytest.approx(sp.get_score(i), rel=1e-7)
    assert tokens[sp.piece_to_id("▁日本")] == "▁日本" and types[sp.piece_to_id("▁日本")] == 1
    assert sum(t == gguf.TokenType.NORMAL for t in types) == VOCAB - 352 - 256


def test_vocab_from_the_sentencepiece_model_alone(tmp_path):
    """Without tokenizer_config.json the piece types are SentencePiece's own."""
    if not SP_MODEL.is_file():
        pytest.skip("LLM-jp-4 tokenizer not found")
    shutil.copy(SP_MODEL, tmp_path / "tokenizer.model")
    v = read_vocab(tmp_path, {"vocab_size": VOCAB + 8}, VOCAB + 8)
    assert v.tokens[:3] == ["<unk>", "<s>", "</s>"] and v.types[:3] == [2, 3, 3]
    assert set(v.types[3:352]) == {4}  # USER_DEFINED, matched verbatim like SentencePiece
    assert v.tokens[VOCAB:] == [f"[PAD{i}]" for i in range(VOCAB, VOCAB + 8)]
    assert set(v.types[VOCAB:]) == {5}
    assert (v.bos, v.eos, v.pad, v.unk, v.eot, v.add_bos) == (1, 2, 4, 0, 6, False)


def test_bad_inputs_fail_clearly_and_write_nothing(exports, tmp_path, capsys):
    from megatron_llmjp.cli.convert import main

    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        shutil.copytree(exports["moe"], d)
        edit(d)
        return d

    def cfg_edit(**kw):
        def edit(d: Path) -> None:
            cfg = json.loads((d / "config.json").read_text())
            cfg.update(kw)
            (d / "config.json").write_text(json.dumps(cfg))

        return edit

    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (variant("notok", lambda d: (d / "tokenizer.model").unlink()), "no tokenizer.model"),
        (variant("arch", cfg_edit(architectures=["GPT2LMHeadModel"])), "GGUF export supports"),
        (variant("small", cfg_edit(vocab_size=1000)), "196608 pieces but config.json"),
        (variant("shape", cfg_edit(moe_intermediate_size=32)), "config.json implies"),
        (variant("bos", cfg_edit(bos_token_id=7)), "bos_token_id=7"),
        (variant("norm", cfg_edit(norm_topk_prob=False)), "norm_topk_prob=false"),
        (
            variant("shard", lambda d: next(d.glob("model-00002-*.safetensors")).unlink()),
            "missing",
        ),
        (tmp_path / "absent", "not a directory"),
    ]
    for src, match in cases:
        assert main(["hf-to-gguf", "--input", str(src), "--output", str(out / "m.gguf")]) == 2
        err = capsys.readouterr().err
        assert match in err and "nothing written" in err, (src.name, err)
        assert list(out.iterdir()) == []
    with pytest.raises(ConversionError, match="exists"):
        (out / "m.gguf").write_bytes(b"")
        hf_to_gguf(exports["moe"], out / "m.gguf")
    assert (
        main(
            [
                "hf-to-gguf",
                "--input",
                str(exports["dense"]),
                "--output",
                str(out / "m.gguf"),
                "--force",
                "--outtype",
                "bf16",
            ]
        )
        == 0
    )
    assert "llama, bf16" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["m.gguf"]
