"""Tokenizer, token streams and the layout-independent global-batch sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_llmjp.data.text import (
    GlobalBatchSampler,
    load_token_stream,
    synthetic_token_stream,
)
from megatron_llmjp.data.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "tokenizer" / "llm-jp-tokenizer-v4.0"
CORPUS = SHARED_DATA / "corpus"

if not TOKENIZER_DIR.is_dir():
    pytest.skip(
        f"shared data not found at {SHARED_DATA} (expected ../shared/data next to the repo root "
        "with tokenizer/llm-jp-tokenizer-v4.0/)",
        allow_module_level=True,
    )

JA = "吾輩は猫である。名前はまだ無い。"
EN = "To be, or not to be: that is the question."


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_path(TOKENIZER_DIR)


# --- tokenizer -------------------------------------------------------------------------------


def test_special_ids_and_vocab(tok: Tokenizer) -> None:
    assert tok.vocab_size == 196_608
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eod_id) == (1, 2, 4, 6)
    assert [tok.id_to_piece(i) for i in (1, 2, 4, 6)] == ["<s>", "</s>", "<pad>", "<EOD>"]
    # The released HF tokenizer names the same ids differently.
    cfg = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    names = {int(k): v["content"] for k, v in cfg["added_tokens_decoder"].items()}
    assert cfg["bos_token"] == names[tok.bos_id] == "<|startoftext|>"
    assert cfg["eos_token"] == names[tok.eos_id] == "<|return|>"
    assert cfg["pad_token"] == names[tok.pad_id] == "<|endoftext|>"
    assert cfg["eod_token"] == names[tok.eod_id] == "<|eod|>"


def test_from_path_file_and_errors(tok: Tokenizer, tmp_path: Path) -> None:
    model = next(TOKENIZER_DIR.glob("*.model"))
    assert Tokenizer.from_path(str(model)).encode(EN) == tok.encode(EN)
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "a.model").write_bytes(b"")
    (tmp_path / "b.model").write_bytes(b"")
    with pytest.raises(ValueError, match="2 \\*.model"):
        Tokenizer.from_path(tmp_path)


@pytest.mark.parametrize("text", [JA, EN])
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and tok.bos_id not in ids[:1] and tok.eos_id not in ids[-1:]
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids)) == text


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    texts = [JA, EN, "", " spaced  out ", "混在 mixed テキスト 123"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch([]) == []


# --- token streams ---------------------------------------------------------------------------


def test_stream_documents_end_with_eod(tok: Tokenizer, tmp_path: Path) -> None:
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text(f"{JA}\n\n   \n{EN}\n", encoding="utf-8")
    b.write_text(f"{EN}\r\n{JA}", encoding="utf-8")  # CRLF, no trailing newline
    stream = load_token_stream([str(a), str(b)], tok, 0)
    eod = tok.eod_id
    expected = []
    for doc in (JA, EN, EN, JA):
        expected += tok.encode(doc) + [eod]
    assert stream.dtype in (np.int32, np.int64)
    assert stream.tolist() == expected


def test_stream_max_bytes(tok: Tokenizer, tmp_path: Path) -> None:
    f = tmp_path / "ja.txt"
    lines = [f"{i}番目の文です。" for i in range(50)]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first3 = sum(len((ln + "\n").encode()) for ln in lines[:3])
    # A limit inside line 4 (and inside a multi-byte character) keeps exactly 3 lines.
    for limit in (first3, first3 + 1, first3 + 5):
        stream = load_token_stream([str(f)], tok, limit)
        assert _split_docs(tok, stream) == lines[:3]
    # Real corpus: the limit bounds the text read, and documents are its first lines.
    real = CORPUS / "ja-jnli-v1.1-train.txt"
    docs = _split_docs(tok, load_token_stream([str(real)], tok, 20_000))
    head = real.read_bytes()[:20_000].decode("utf-8", errors="ignore").split("\n")
    assert docs and docs == [ln for ln in head[: len(docs)] if ln.strip()]
    assert len("\n".join(docs).encode()) < 20_000


def _split_docs(tok: Tokenizer, stream: np.ndarray) -> list[str]:
    """Decode a stream back into its EOD-terminated documents."""
    assert stream.size and stream[-1] == tok.eod_id
    ends = np.flatnonzero(stream == tok.eod_id)
    return [tok.decode(d[:-1]) for d in np.split(stream, ends + 1)[:-1]]


def test_missing_file_error_names_file(tok: Tokenizer, tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.txt"
    with pytest.raises(FileNotFoundError, match="does-not-exist.txt") as e:
        load_token_stream([str(missing)], tok, 1000)
    assert "data.text_files" in str(e.value)


def test_synthetic_stream() -> None:
    a = synthetic_token_stream(5000, 1000, seed=3)
    assert a.shape == (5000,) and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, synthetic_token_stream(5000, 1000, seed=3))
    assert not np.array_equal(a, synthetic_token_stream(5000, 1000, seed=4))
    # Learnable: most positions repeat the token one period earlier.
    assert np.mean(a[97:] == a[:-97]) > 0.7


# --- sampler ---------------------------------------------------------------------------------


def _stream(n: int = 1000) -> np.ndarray:
    return np.arange(n, dtype=np.int32)


def test_sampler_determinism_and_windows() -> None:
    s1 = GlobalBatchSampler(_stream(), seq_length=16, global_batch_size=8, seed=7)
    s2 = GlobalBatchSampler(_stream(), seq_length=16, global_batch_size=8, seed=7)
    for step in (0, 1, 5, 30):
        b = s1.global_batch(step)
        assert b.shape == (8, 17) and b.dtype == np.int64
        np.testing.assert_array_equal(b, s2.global_batch(step))
        # Each row is a contiguous window starting at a multiple of seq_length.
        assert np.all(np.diff(b, axis=1) == 1) and np.all(b[:, 0] % 16 == 0)
    # Steps are a pure function: querying out of order gives the same batch.
    np.testing.assert_array_equal(s2.global_batch(3), s1.global_batch(3))
    other = GlobalBatchSampler(_stream(), seq_length=16, global_batch_size=8, seed=8)
    assert not np.array_equal(other.global_batch(0), s1.global_batch(0))


@pytest.mark.parametrize("dp_size", [1, 2, 4])
@pytest.mark.parametrize("mbs", [1, 2])
def test_layout_independence(dp_size: int, mbs: int) -> None:
    import torch

    s = GlobalBatchSampler(_stream(), seq_length=16, global_batch_size=8, seed=1)
    for step in (0, 9):
        g = torch.from_numpy(s.global_batch(step))
        mbs_all = [mb for r in range(dp_size) for mb in s.microbatches(step, r, dp_size, mbs)]
        assert len(mbs_all) == 8 // mbs
        for mb in mbs_all:
            assert mb["tokens"].shape == mb["labels"].shape == (mbs, 16)
            assert mb["tokens"].dtype == mb["labels"].dtype == torch.int64
            assert mb["position_ids"].dtype == torch.int64
            assert torch.equal(mb["position_ids"], torch.arange(16).expand(mbs, 16))
            assert mb["loss_mask"].dtype == torch.float32 and bool((mb["loss_mask"] == 1).all())
            # Labels are the tokens shifted by one.
            assert torch.equal(mb["labels"][:, :-1], mb["tokens"][:, 1:])
        assert torch.equal(torch.cat([mb["tokens"] for mb in mbs_all]), g[:, :-1])
        assert torch.equal(torch.cat([mb["labels"] for mb in mbs_all]), g[:, 1:])


def test_microbatch_divisibility_errors() -> None:
    s = GlobalBatchSampler(_stream(), seq_length=16, global_batch_size=6, seed=1)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        s.microbatches(0, 0, 4, 1)
    with pytest.raises(ValueError, match="micro_batch_size=4"):
        s.microbatches(0, 0, 1, 4)


def test_epoch_wrap() -> None:
    # 161 tokens, seq 16 -> 10 windows; gbs 4 -> a batch straddles epochs at step 2.
    s = GlobalBatchSampler(_stream(161), seq_length=16, global_batch_size=4, seed=5)
    assert s.num_windows == 10
    idx = np.concatenate([s.window_indices(step) for step in range(5)])  # 20 samples
    epoch0, epoch1 = idx[:10], idx[10:]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10))
    np.testing.assert_array_equal(epoch0, np.random.default_rng(5).permutation(10))
    np.testing.assert_array_equal(epoch1, np.random.default_rng(6).permutation(10))
    assert s.global_batch(1000).shape == (4, 17)


def test_stream_too_short() -> None:
    with pytest.raises(ValueError, match="too short"):
        GlobalBatchSampler(_stream(16), seq_length=16, global_batch_size=1, seed=0)
    GlobalBatchSampler(_stream(17), seq_length=16, global_batch_size=1, seed=0)
