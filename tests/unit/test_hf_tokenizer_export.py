"""The tokenizer files of a Hugging Face release, built from the LLM-jp-4 SentencePiece folder:
AutoTokenizer (no remote code) gives SentencePiece's ids on real corpus lines and byte-fallback
strings, keeps the special pieces at their ids, adds no BOS, and the stop ids come from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from megatron_llmjp.convert import hf_config
from megatron_llmjp.convert.hf_tokenizer import export_tokenizer
from megatron_llmjp.convert.parity import BYTE_FALLBACK_TEXT

transformers = pytest.importorskip("transformers")


def corpus_lines(corpus: Path, name: str, n: int) -> list[str]:
    with open(corpus / name, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for _, ln in zip(range(4 * n), f, strict=False)]
    return [ln for ln in lines if ln.strip()][:n]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data_dir):
    out = tmp_path_factory.mktemp("release")
    source = shared_data_dir / "tokenizer" / "llm-jp-tokenizer-v4.0"
    return source, out, export_tokenizer(source, out)


@pytest.fixture(scope="module")
def shared_data_dir():
    root = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


def test_files_and_config(exported):
    source, out, result = exported
    names = {p.name for p in out.iterdir()}
    assert {
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    } <= names
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["model_input_names"] == ["input_ids", "attention_mask"]
    assert cfg["add_bos_token"] is False and cfg["chat_template"]
    assert len(cfg["added_tokens_decoder"]) == 352
    assert result.built and result.vocab_size == 196_608
    assert result.token_ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 4}
    # EOS (<|return|>), EOD (ends every training document), <|call|> (ends a tool call).
    assert result.eod_id == 6 and result.stop_ids == [2, 6, 13]
    gen = hf_config.generation_config(result.token_ids, result.stop_ids)
    assert gen == {"bos_token_id": 1, "eos_token_id": [2, 6, 13], "pad_token_id": 4}


def test_autotokenizer_equals_sentencepiece(exported, shared_data_dir):
    source, out, _ = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(next(source.glob("*.model"))))
    assert len(tok) == 196_608 == sp.get_piece_size()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 4)
    assert tok.convert_tokens_to_ids(["<|eod|>", "<|call|>", "<|end|>"]) == [6, 13, 11]
    corpus = shared_data_dir / "corpus"
    lines = (
        corpus_lines(corpus, "ja-jnli-v1.1-train.txt", 300)
        + corpus_lines(corpus, "ja-jcommonsenseqa-v1.1-train.txt", 200)
        + corpus_lines(corpus, "en-tinyshakespeare.txt", 200)
        + list(BYTE_FALLBACK_TEXT)
    )
    assert len(lines) == 704
    expected = sp.encode(lines)
    # The default encoding (what a user gets) is SentencePiece's: no BOS, as in training.
    assert tok(lines)["input_ids"] == expected
    assert tok(lines, add_special_tokens=False)["input_ids"] == expected
    byte_pieces = {i for ids in expected[-len(BYTE_FALLBACK_TEXT) :] for i in ids if i < 608}
    assert byte_pieces & set(range(352, 608))  # byte fallback is exercised
    assert [tok.decode(ids) for ids in expected] == [sp.decode(ids) for ids in expected]
    assert all(tok.decode(e) == t for e, t in zip(expected[:700], lines[:700], strict=True))
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "日本の首都は？"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.endswith("<|message|>日本の首都は？<|end|><|start|>assistant")
    ids = tok(chat)["input_ids"]
    assert ids.count(10) == ids.count(11) + 1 >= 3 and max(ids) < 196_608  # <|start|>, <|end|>


def test_copied_tokenizer_json_is_kept(exported, tmp_path):
    _, out, _ = exported
    src = tmp_path / "src"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (src / name).write_bytes((out / name).read_bytes())
    dst = tmp_path / "dst"
    dst.mkdir()
    result = export_tokenizer(src, dst)
    assert not result.built
    assert (dst / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert result.stop_ids == [2, 6, 13]  # the chat template travels in tokenizer_config.json
