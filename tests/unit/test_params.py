"""Registry shapes and parameter counts against the LLM-jp-4 model cards, and ``llmjp-params``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_llmjp.cli.params import main
from megatron_llmjp.models.params import count_parameters, padded_vocab_size
from megatron_llmjp.models.registry import MODELS, UnknownModelError, get_model

REPO = Path(__file__).resolve().parents[2]

# --- parameter counts (model cards) ------------------------------------------------------------


def test_8b_card_counts():
    c = count_parameters(MODELS["llm-jp-4-8b"])
    assert c.total == 8_590_200_832
    assert c.embedding == 805_306_368
    assert c.non_embedding == 7_784_894_464
    assert c.active == c.total


def test_32b_a3b_card_counts():
    c = count_parameters(MODELS["llm-jp-4-32b-a3b"])
    assert c.total == 32_139_028_992
    assert c.active == 3_827_476_992
    assert c.embedding == 503_316_480
    assert c.non_embedding == 31_635_712_512


def test_33b_total():
    c = count_parameters(MODELS["llm-jp-4-33b"])
    assert c.total == 33_219_548_160
    assert c.active == c.total


def test_332b_a31b_counts():
    c = count_parameters(MODELS["llm-jp-4-332b-a31b"])
    assert c.total == 332_997_125_120
    assert c.active == 31_007_237_120


@pytest.mark.parametrize("name", sorted(MODELS))
def test_counts_are_consistent(name):
    m = MODELS[name]
    c = count_parameters(m)
    assert c.embedding == m.vocab_size * m.hidden_size
    assert c.non_embedding == c.total - c.embedding
    per_layer = sum(c.per_layer.values())
    # input embedding + untied output layer + final norm + layers
    assert c.total == 2 * c.embedding + m.hidden_size + m.num_layers * per_layer
    assert 0 < c.active <= c.total
    assert (c.active < c.total) == m.is_moe


# --- registry shapes ---------------------------------------------------------------------------

# name: (layers, hidden, heads, kv heads, dense ffn, experts, top-k, moe ffn)
CARD_TABLE = {
    "llm-jp-4-8b": (32, 4096, 32, 8, 14336, None, None, None),
    "llm-jp-4-33b": (64, 5120, 40, 8, 27648, None, None, None),
    "llm-jp-4-32b-a3b": (32, 2560, 40, 4, None, 128, 8, 960),
    "llm-jp-4-332b-a31b": (80, 5120, 80, 4, None, 128, 8, 2048),
}


@pytest.mark.parametrize("name", sorted(CARD_TABLE))
def test_registry_shapes(name):
    layers, hidden, heads, kv, ffn, experts, topk, moe_ffn = CARD_TABLE[name]
    m = MODELS[name]
    assert m.name == name
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == (
        layers,
        hidden,
        heads,
        kv,
    )
    assert m.kv_channels == 128
    assert m.vocab_size == 196608
    assert m.rotary_base == 500000.0
    assert m.norm_epsilon == 1e-6
    assert m.tie_word_embeddings is False
    assert m.source
    if experts is None:
        assert m.family == "dense" and not m.is_moe
        assert m.ffn_hidden_size == ffn
        assert m.num_experts is None
        assert m.qk_layernorm is False
    else:
        assert m.family == "moe" and m.is_moe
        assert m.ffn_hidden_size is None
        assert (m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size) == (
            experts,
            topk,
            moe_ffn,
        )
        assert m.qk_layernorm is True
        assert m.moe_norm_topk_prob is True


@pytest.mark.parametrize("name", ["llm-jp-4-tiny-dense", "llm-jp-4-tiny-moe"])
def test_tiny_flavours_keep_the_features(name):
    m = MODELS[name]
    assert m.num_query_groups < m.num_attention_heads  # GQA
    assert m.num_attention_heads % m.num_query_groups == 0
    assert m.kv_channels != m.hidden_size // m.num_attention_heads
    assert m.tie_word_embeddings is False
    assert m.rotary_base == 500000.0
    assert m.norm_epsilon == 1e-6
    assert m.vocab_size == 196608
    assert count_parameters(m).total < 100_000_000


def test_tiny_moe_features():
    m = MODELS["llm-jp-4-tiny-moe"]
    assert m.is_moe
    assert m.qk_layernorm is True
    assert m.moe_norm_topk_prob is True
    assert 1 < m.moe_router_topk < m.num_experts
    assert MODELS["llm-jp-4-tiny-dense"].qk_layernorm is False


def test_get_model_returns_a_copy_with_overrides():
    m = get_model("llm-jp-4-tiny-dense", num_layers=2)
    assert m.num_layers == 2
    assert MODELS["llm-jp-4-tiny-dense"].num_layers != 2
    with pytest.raises(UnknownModelError, match="llm-jp-4-8b"):
        get_model("nope")


@pytest.mark.parametrize(
    ("vocab", "tp", "expected"),
    [
        (196608, 1, 196608),
        (196608, 2, 196608),
        (196608, 3, 196608),  # 196608 = 512 * 384 already
        (196608, 5, 197120),  # next multiple of 640
        (196609, 1, 196736),
        (196609, 3, 196992),  # next multiple of 384
        (50257, 1, 50304),
    ],
)
def test_padded_vocab_size(vocab, tp, expected):
    padded = padded_vocab_size(vocab, 128, tp)
    assert padded == expected
    assert padded % (128 * tp) == 0
    assert vocab <= padded < vocab + 128 * tp


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_json(capsys):
    assert main(["llm-jp-4-8b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name"] == "llm-jp-4-8b"
    assert out["family"] == "dense"
    assert out["total"] == 8_590_200_832
    assert out["embedding"] == 805_306_368
    assert out["non_embedding"] == 7_784_894_464
    assert out["active"] == 8_590_200_832
    assert out["padded_vocab_size"] == 196608
    assert set(out["per_layer"]) == {"attention", "mlp", "norms"}


def test_cli_json_moe_active(capsys):
    assert main(["llm-jp-4-32b-a3b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["total"], out["active"]) == (32_139_028_992, 3_827_476_992)


def test_cli_human_table(capsys):
    assert main(["llm-jp-4-32b-a3b"]) == 0
    out = capsys.readouterr().out
    assert "32,139,028,992" in out
    assert "3,827,476,992" in out
    assert "32.139B" in out
    assert "non-embedding" in out


def test_cli_list(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in MODELS:
        assert name in out


def test_cli_set_overrides(capsys):
    assert main(["llm-jp-4-tiny-moe", "--json", "--set", "model.num_layers=2"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = count_parameters(get_model("llm-jp-4-tiny-moe", num_layers=2))
    assert out["total"] == expected.total


def test_cli_bad_override(capsys):
    assert main(["llm-jp-4-tiny-moe", "--set", "model.num_layerz=2"]) == 2
    err = capsys.readouterr().err
    assert "model.num_layerz" in err and "num_layers" in err
    assert "Traceback" not in err


def test_cli_unknown_name(capsys):
    assert main(["llm-jp-4-nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("llmjp-params: unknown model 'llm-jp-4-nope'; known: ")
    assert "\n" not in err
    for name in MODELS:
        assert name in err


def test_light_modules_do_not_import_torch():
    code = (
        "import sys\n"
        "import megatron_llmjp.cli.params, megatron_llmjp.config.loader\n"
        "import megatron_llmjp.config.validate, megatron_llmjp.models.registry\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron')]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
