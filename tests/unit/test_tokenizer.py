"""The tokenizer interface: LLM-jp-4 SentencePiece ids on real text, the Hugging Face backend
(a tokenizer directory built here), backend selection and pickling for worker processes."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from megatron_llmjp.data.tokenizer import (
    LLMJP4_VOCAB_SIZE,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
)

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "tokenizer" / "llm-jp-tokenizer-v4.0"
CORPUS = SHARED_DATA / "corpus"

if not TOKENIZER_DIR.is_dir():
    pytest.skip(f"shared data not found at {SHARED_DATA}", allow_module_level=True)

MODEL_FILE = next(TOKENIZER_DIR.glob("*.model"))
TEXTS = ["吾輩は猫である。名前はまだ無い。", "To be, or not to be: that is the question.", ""]


def corpus_lines(name: str, n: int) -> list[str]:
    with open(CORPUS / name, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for _, ln in zip(range(4 * n), f, strict=False)]
    return [ln for ln in lines if ln.strip()][:n]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_path(TOKENIZER_DIR)


# --- SentencePiece / LLM-jp-4 ------------------------------------------------------------------


def test_llmjp4_sentencepiece(tok: Tokenizer) -> None:
    assert isinstance(tok, SentencePieceTokenizer) and tok.backend == "sentencepiece"
    assert tok.is_llmjp4 and tok.vocab_size == LLMJP4_VOCAB_SIZE == 196_608
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eod_id) == (1, 2, 4, 6)
    # SentencePiece itself reports no pad id: the ids come from the table, by id.
    assert tok.sp.pad_id() == -1
    assert tok.model_file == str(MODEL_FILE) and "eod=6" in repr(tok)


def test_real_corpus_ids_equal_sentencepiece(tok: Tokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(MODEL_FILE))
    texts = corpus_lines("ja-jsts-v1.1-train.txt", 200) + corpus_lines(
        "en-tinyshakespeare.txt", 200
    )
    expected = [sp.encode(t) for t in texts]
    assert tok.encode_batch(texts) == expected
    assert tok.encode_batch(texts, num_threads=1) == expected
    assert [tok.encode(t) for t in texts[:20]] == expected[:20]
    assert all(tok.decode(ids) == t for ids, t in zip(expected, texts, strict=True))
    assert not any(i in (tok.bos_id, tok.eos_id, tok.eod_id) for ids in expected for i in ids)


def test_pickles_by_path(tok: Tokenizer) -> None:
    data = pickle.dumps(tok)
    assert len(data) < 1000  # the path, not the 3.4 MB model
    again = pickle.loads(data)
    assert type(again) is SentencePieceTokenizer and again.special_ids == tok.special_ids
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    with pytest.raises(TypeError, match="without a path"):
        pickle.dumps(SentencePieceTokenizer(tok.sp))


# --- Hugging Face backend ------------------------------------------------------------------------

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<eod>"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE trained on the corpus, saved as a transformers-style directory
    (tokenizer.json + tokenizer_config.json + special_tokens_map.json), with a post-processor
    that adds <s>: encoding through our interface must not apply it."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_lines("ja-jnli-v1.1-train.txt", 500) + corpus_lines(
        "en-tinyshakespeare.txt", 500
    )
    hf.train_from_iterator(lines, trainer)
    hf.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))]
    )
    d = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"})
    )
    # tokenizer_config.json wins over special_tokens_map.json; eod_token is LLM-jp's extra key.
    (d / "tokenizer_config.json").write_text(
        json.dumps({"eod_token": {"content": "<eod>", "special": True}, "pad_token": "<pad>"})
    )
    return d


def test_hf_directory(hf_dir: Path) -> None:
    from tokenizers import Tokenizer as RawHF

    raw = RawHF.from_file(str(hf_dir / "tokenizer.json"))
    tok = Tokenizer.from_path(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.backend == "hf" and not tok.is_llmjp4
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True) == 600
    expected_ids = tuple(raw.token_to_id(t) for t in SPECIALS[1:])  # bos, eos, pad, eod
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eod_id) == expected_ids
    texts = TEXTS + corpus_lines("ja-jcommonsenseqa-v1.1-train.txt", 50)
    expected = [raw.encode(t, add_special_tokens=False).ids for t in texts]
    assert raw.encode(texts[0]).ids[0] == tok.bos_id  # the library's default adds <s> ...
    assert tok.encode(texts[0]) == expected[0]  # ... ours does not
    assert tok.encode_batch(texts) == expected and tok.encode_batch([]) == []
    assert [tok.decode(e) for e in expected] == texts
    assert tok.id_to_piece(tok.eod_id) == "<eod>"
    with pytest.raises(IndexError):
        tok.id_to_piece(10_000)
    again = pickle.loads(pickle.dumps(tok))
    assert type(again) is HFTokenizer and again.encode_batch(texts) == expected


def test_hf_special_fallbacks(hf_dir: Path) -> None:
    from tokenizers import Tokenizer as RawHF

    raw = RawHF.from_file(str(hf_dir / "tokenizer.json"))
    eos = raw.token_to_id("</s>")
    only_eos = HFTokenizer(raw, config={"eos_token": "</s>"})
    assert (only_eos.bos_id, only_eos.eos_id, only_eos.pad_id, only_eos.eod_id) == (
        -1,
        eos,
        eos,
        eos,
    )
    nothing = HFTokenizer(raw, config={"eos_token": "<not-in-vocab>"})
    assert nothing.special_ids.eos == nothing.special_ids.eod == -1


def test_hf_llmjp4_ids_by_id() -> None:
    """A 196,608-entry HF vocabulary with the released names at ids 1/2/4/6 is LLM-jp-4: the ids
    are fixed even when the config names other tokens."""
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer as RawHF
    from tokenizers import models

    vocab = {f"t{i}": i for i in range(LLMJP4_VOCAB_SIZE)}
    names = {0: "<|unk|>", 1: "<|startoftext|>", 2: "<|return|>", 4: "<|endoftext|>", 6: "<|eod|>"}
    for i, name in names.items():
        del vocab[f"t{i}"]
        vocab[name] = i
    raw = RawHF(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok = HFTokenizer(raw, config={"eos_token": "<|endoftext|>", "pad_token": "t9"})
    assert tok.is_llmjp4 and tok.vocab_size == LLMJP4_VOCAB_SIZE
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eod_id) == (1, 2, 4, 6)


# --- backend selection and errors ----------------------------------------------------------------


def test_backend_selection(hf_dir: Path, tmp_path: Path) -> None:
    assert type(Tokenizer.from_path(hf_dir / "tokenizer.json")) is HFTokenizer
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (both / "m.model").symlink_to(MODEL_FILE)
    assert type(Tokenizer.from_path(both)) is SentencePieceTokenizer  # the original wins
    assert type(Tokenizer.from_path(both, backend="hf")) is HFTokenizer
    with pytest.raises(ValueError, match="backend"):
        Tokenizer.from_path(both, backend="tiktoken")  # type: ignore[arg-type]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"\.model.*tokenizer\.json"):
        Tokenizer.from_path(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path / "empty", backend="hf")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        Tokenizer.from_path(bad)


def test_hf_without_tokenizers_package(hf_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        Tokenizer.from_path(hf_dir)
