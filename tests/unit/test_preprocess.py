"""``llmjp-preprocess`` on real data: the dataset holds exactly SentencePiece's ids plus EOD per
document, reads back through megatron-core, is identical for any worker count, and bad input
fails with file:line and leaves nothing under the output names."""

from __future__ import annotations

import gzip
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from megatron_llmjp.cli import preprocess as cli
from megatron_llmjp.data import preprocess as pp
from megatron_llmjp.data.preprocess import (
    MalformedLineError,
    PreprocessError,
    preprocess,
    token_dtype,
)
from megatron_llmjp.data.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "tokenizer" / "llm-jp-tokenizer-v4.0"
CORPUS = SHARED_DATA / "corpus"

if not TOKENIZER_DIR.is_dir():
    pytest.skip(f"shared data not found at {SHARED_DATA}", allow_module_level=True)

EOD = 6


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_path(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    """The reference: SentencePiece itself, not our wrapper."""
    return spm.SentencePieceProcessor(model_file=str(next(TOKENIZER_DIR.glob("*.model"))))


def corpus_docs(name: str, n: int, skip: int = 0) -> list[str]:
    out: list[str] = []
    with open(CORPUS / name, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                if skip:
                    skip -= 1
                    continue
                out.append(line)
                if len(out) == n:
                    break
    return out


def mixed_docs(n: int) -> list[str]:
    """Japanese and English documents from the shared corpus, interleaved."""
    ja = corpus_docs("ja-jnli-v1.1-train.txt", n // 2)
    en = corpus_docs("en-tinyshakespeare.txt", n - n // 2)
    return [d for pair in zip(ja, en, strict=False) for d in pair] + ja[len(en) :] + en[len(ja) :]


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    body = "".join(
        json.dumps({"id": i, key: d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)
    )
    data = body.encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    elif path.suffix == ".zst":  # two frames, as concatenated .zst files have
        zc = pytest.importorskip("zstandard").ZstdCompressor()
        data = zc.compress(data[: len(data) // 2]) + zc.compress(data[len(data) // 2 :])
    path.write_bytes(data)
    return path


def read_dataset(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    assert ds.document_indices.tolist() == list(range(len(ds) + 1))  # one sequence per doc
    return [ds[i].tolist() for i in range(len(ds))]


def files_in(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


# --- content -------------------------------------------------------------------------------------


def test_ids_equal_sentencepiece_and_eod(tok: Tokenizer, sp, tmp_path: Path) -> None:
    ja = corpus_docs("ja-jsts-v1.1-train.txt", 300)
    en = corpus_docs("en-tinyshakespeare.txt", 300)
    a = write_jsonl(tmp_path / "ja.jsonl", ja)
    b = write_jsonl(tmp_path / "en.jsonl.gz", en)
    s = preprocess([a, b], tmp_path / "out" / "ds", tok)
    docs = read_dataset(tmp_path / "out" / "ds")
    texts = ja + en  # inputs concatenate in order
    assert len(docs) == len(texts) == s.documents == 600
    for d, t in zip(docs, texts, strict=True):
        assert d == sp.encode(t) + [EOD]
    assert s.tokens == sum(map(len, docs)) and s.dtype == "int32"
    assert s.empty_documents == s.malformed_lines == 0 and s.tokens_per_second > 0
    # EOD only at document ends: JGLUE/shakespeare text never encodes to id 6.
    flat = np.concatenate([np.asarray(d) for d in docs])
    ends = np.cumsum([len(d) for d in docs]) - 1
    assert np.flatnonzero(flat == EOD).tolist() == ends.tolist()


SPECIAL_TEXT = [
    "a <EOD> b <pad> c",
    "<s>start</s> <unk> <mask><CLS><SEP><RESERVED_000><RESERVED_343>",
    "released names: <|eod|> <|endoftext|> <|startoftext|> <|return|>",
    "<EOD>",
]


def _control_ids(sp) -> set[int]:
    """Every id SentencePiece does not treat as ordinary text (control, unknown, user-defined):
    for LLM-jp-4, ids 0-351."""
    return {
        i
        for i in range(sp.get_piece_size())
        if sp.is_control(i) or sp.is_unknown(i) or (i <= 351 and sp.id_to_piece(i).startswith("<"))
    }


def test_special_token_text_stays_text(tok: Tokenizer, sp, tmp_path: Path) -> None:
    """Special and user-defined piece names inside a document are encoded as their literal
    characters: EOD only where the pipeline puts one, the text decodes back unchanged, and text
    without such names encodes as SentencePiece does (checked with the corpus above)."""
    control = _control_ids(sp)
    assert {0, 1, 2, 3, 4, 6, 351} <= control
    docs = [*SPECIAL_TEXT, *corpus_docs("ja-jsts-v1.1-train.txt", 50)]
    s = preprocess([write_jsonl(tmp_path / "sp.jsonl", docs)], tmp_path / "ds", tok, workers=2)
    out = read_dataset(tmp_path / "ds")
    assert s.documents == len(docs)
    for d, text in zip(out, docs, strict=True):
        assert d[-1] == EOD and not control & set(d[:-1]), (text, d)
        assert sp.decode(d[:-1]) == text
    for d, text in zip(out[len(SPECIAL_TEXT) :], docs[len(SPECIAL_TEXT) :], strict=True):
        assert d == sp.encode(text) + [EOD]
    # The text loader of small runs (data.text_files) follows the same rule.
    from megatron_llmjp.data.text import load_token_stream

    (tmp_path / "t.txt").write_text("\n".join(SPECIAL_TEXT) + "\n")
    stream = load_token_stream([str(tmp_path / "t.txt")], tok, None)
    assert int((stream == EOD).sum()) == len(SPECIAL_TEXT) and stream[-1] == EOD
    assert not control & set(stream[stream != EOD].tolist())
    # ``encode`` still matches them (prompts may spell control tokens on purpose).
    assert EOD in tok.encode("a <EOD> b")


def test_special_token_text_stays_text_with_the_hf_tokenizer(tmp_path: Path) -> None:
    """The released HF tokenizer (built from the .model by the exporter, every control and
    user-defined piece a special added token, ids 4/6 renamed ``<|endoftext|>``/``<|eod|>``):
    neither name set in a document becomes a control id."""
    pytest.importorskip("transformers")
    from megatron_llmjp.convert.hf_tokenizer import export_tokenizer

    (tmp_path / "hf").mkdir()
    export_tokenizer(TOKENIZER_DIR, tmp_path / "hf")
    hf = Tokenizer.from_path(tmp_path / "hf" / "tokenizer.json")
    assert hf.backend == "hf" and hf.eod_id == EOD and EOD in hf.encode("x <|eod|> y")
    s = preprocess([write_jsonl(tmp_path / "sp.jsonl", SPECIAL_TEXT)], tmp_path / "ds", hf)
    for d, text in zip(read_dataset(tmp_path / "ds"), SPECIAL_TEXT, strict=True):
        assert d[-1] == EOD and not set(d[:-1]) & set(range(352)), (text, d)
        assert hf.decode(d[:-1]) == text
    assert s.documents == len(SPECIAL_TEXT)


def test_quickstart_code_documents_have_one_eod_each(tok: Tokenizer, tmp_path: Path) -> None:
    """The quickstart's ``code`` source (this repository's Python) spells ``<EOD>``, ``<pad>``
    and the released names in its docstrings: one EOD per document all the same."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "data"))
    try:
        import quickstart_corpus
    finally:
        sys.path.pop(0)
    _, docs = quickstart_corpus.documents("code", CORPUS)
    special = [d for d in docs if any(name in d for name in ("<EOD>", "<pad>", "<|eod|>"))]
    assert len(special) >= 3
    s = preprocess([write_jsonl(tmp_path / "code.jsonl", special)], tmp_path / "code", tok)
    flat = np.concatenate([np.asarray(d) for d in read_dataset(tmp_path / "code")])
    assert s.documents == len(special) == int((flat == EOD).sum())


def test_whitespace_only_documents_are_skipped_and_counted(tok: Tokenizer, tmp_path: Path) -> None:
    docs = ["kept", " ", "\u3000", "\n", "\t \r\n\u3000", "", "also kept"]
    s = preprocess([write_jsonl(tmp_path / "ws.jsonl", docs)], tmp_path / "ds", tok)
    assert s.documents == 2 and s.empty_documents == 5
    assert len(read_dataset(tmp_path / "ds")) == 2
    only = write_jsonl(tmp_path / "only.jsonl", [" ", "\u3000"])
    with pytest.raises(PreprocessError, match=r"no documents in .*\(2 empty"):
        preprocess([only], tmp_path / "none", tok)


def test_workers_identical_and_match_megatron_builder(tok: Tokenizer, sp, tmp_path: Path) -> None:
    """1 and 2 workers, many small blocks: byte-identical output, and byte-identical to what
    megatron-core's own IndexedDatasetBuilder writes for the same documents."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    texts = mixed_docs(2000)
    src = write_jsonl(tmp_path / "mix.jsonl", texts)
    for w in (1, 2):
        preprocess([src], tmp_path / f"w{w}", tok, workers=w, block_bytes=8 << 10)
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=DType.optimal_dtype(196_608))
    for t in texts:
        ref.add_document(sp.encode(t) + [EOD], [len(sp.encode(t)) + 1])
    ref.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        ref_bytes = (tmp_path / f"ref{ext}").read_bytes()
        assert (tmp_path / f"w1{ext}").read_bytes() == ref_bytes
        assert (tmp_path / f"w2{ext}").read_bytes() == ref_bytes


def test_dtype_rule_matches_megatron() -> None:
    from megatron.core.datasets.indexed_dataset import DType

    for n in (1_000, 32_000, 65_499, 65_500, 65_536, 196_608):
        assert token_dtype(n) == np.dtype(DType.optimal_dtype(n))
    assert token_dtype(196_608) == np.int32  # the .idx format has no uint32
    for dtype, code in pp._IDX_DTYPE_CODES.items():
        assert DType.code_from_dtype(dtype.type) == code


def test_uint16_with_hf_tokenizer(tmp_path: Path) -> None:
    """A small-vocabulary Hugging Face tokenizer directory gives a uint16 dataset."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    texts = mixed_docs(400)
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "</s>", "<eod>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    d = tmp_path / "hf"
    d.mkdir()
    hf.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "</s>", "eod_token": "<eod>"})
    )
    s = preprocess([write_jsonl(tmp_path / "in.jsonl", texts)], tmp_path / "ds", d, workers=2)
    assert s.dtype == "uint16" and s.documents == len(texts)
    eod = hf.token_to_id("<eod>")
    expected = [e.ids + [eod] for e in hf.encode_batch(texts, add_special_tokens=False)]
    assert read_dataset(tmp_path / "ds") == expected


def test_boundaries_blank_empty_crlf_bom_long_lines(tok: Tokenizer, sp, tmp_path: Path) -> None:
    long_doc = " ".join(corpus_docs("en-tinyshakespeare.txt", 300))  # > block_bytes
    lines = [
        json.dumps({"text": "first line\nsecond line of the same document"}),
        "",
        "   ",
        json.dumps({"text": ""}),  # empty: skipped and counted
        json.dumps({"text": "日本語の文書。", "extra": [1, {"a": None}]}),
        "  " + json.dumps({"text": long_doc}) + "  ",  # whitespace around the object
        json.dumps({"text": 'エスケープ\u3042 \\ "quoted" \t tab'}, ensure_ascii=True),
        json.dumps({"text": "no newline at the end"}),
    ]
    src = tmp_path / "edge.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())  # BOM, CRLF, no final \n
    s = preprocess([src], tmp_path / "ds", tok, block_bytes=1024)
    texts = [json.loads(ln)["text"] for ln in lines if ln.strip()]
    kept = [t for t in texts if t]
    assert s.documents == len(kept) == 5 and s.empty_documents == 1
    assert read_dataset(tmp_path / "ds") == [sp.encode(t) + [EOD] for t in kept]


def test_inputs_gz_zst_and_order(tok: Tokenizer, tmp_path: Path) -> None:
    docs = mixed_docs(300)
    plain = write_jsonl(tmp_path / "a.jsonl", docs)
    gz = write_jsonl(tmp_path / "a.jsonl.gz", docs)
    zst = write_jsonl(tmp_path / "a.jsonl.zst", docs)
    for name, src in (("plain", plain), ("gz", gz), ("zst", zst)):
        preprocess([src], tmp_path / name, tok)
    ref = (tmp_path / "plain.bin").read_bytes()
    assert (tmp_path / "gz.bin").read_bytes() == ref == (tmp_path / "zst.bin").read_bytes()
    other = write_jsonl(tmp_path / "b.jsonl", docs[:10])
    preprocess([other, zst], tmp_path / "both", tok, workers=2)
    both = read_dataset(tmp_path / "both")
    assert both == read_dataset(tmp_path / "plain")[:10] + read_dataset(tmp_path / "plain")


# --- bad input -----------------------------------------------------------------------------------

BAD_LINES = [
    ('{"text": "unterminated', "invalid JSON"),
    ('{"text": "a"} trailing', "invalid JSON"),
    ('["text", "a list"]', "expected a JSON object, got list"),
    ('{"content": "wrong key"}', "no 'text' field (fields: 'content')"),
    ('{"text": 42}', "field 'text' is int, expected a string"),
    ('{"text": null}', "field 'text' is NoneType"),
    ('{"text": "lone \\ud800 surrogate"}', "not valid Unicode"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
def test_malformed_line_names_file_and_line(
    tok: Tokenizer, tmp_path: Path, bad: str, reason: str
) -> None:
    good = [json.dumps({"text": t}) for t in corpus_docs("en-tinyshakespeare.txt", 4)]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([good[0], "", good[1], bad, good[2], bad, good[3]]) + "\n")
    with pytest.raises(MalformedLineError) as e:
        preprocess([src], tmp_path / "ds", tok)
    assert (e.value.path, e.value.line) == (str(src), 4)  # 1-based, blank lines counted
    assert str(e.value).startswith(f"{src}:4: ") and reason in str(e.value)
    assert files_in(tmp_path) == {"in.jsonl"}  # no output, no temporary files

    s = preprocess([src], tmp_path / "ds", tok, skip_malformed=True)
    assert (s.documents, s.malformed_lines) == (4, 2)
    assert [x.split(": ")[0] for x in s.malformed_examples] == [f"{src}:4", f"{src}:6"]


def test_invalid_utf8_and_first_error_wins_across_blocks(tok: Tokenizer, tmp_path: Path) -> None:
    good = [json.dumps({"text": t}, ensure_ascii=False) for t in mixed_docs(400)]
    src = tmp_path / "in.jsonl"
    body = "\n".join(good[:300]).encode() + b'\n{"text": "bad \xff byte"}\n'
    src.write_bytes(body + "\n".join(good[300:]).encode() + b'\n{"text": 1}\n')
    for workers in (1, 2):
        with pytest.raises(MalformedLineError, match=r"in\.jsonl:301: not valid UTF-8"):
            preprocess([src], tmp_path / "ds", tok, workers=workers, block_bytes=2048)
        assert files_in(tmp_path) == {"in.jsonl"}
    s = preprocess([src], tmp_path / "ds", tok, workers=2, block_bytes=2048, skip_malformed=True)
    assert (s.documents, s.malformed_lines) == (400, 2)
    assert s.malformed_examples[1].startswith(f"{src}:402: ")


def test_failure_midway_keeps_previous_output(tok: Tokenizer, tmp_path: Path) -> None:
    """A run that fails after writing many blocks leaves the previous dataset untouched."""
    docs = mixed_docs(1000)
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    preprocess([src], tmp_path / "ds", tok)
    before = {ext: (tmp_path / f"ds{ext}").read_bytes() for ext in (".bin", ".idx")}
    with open(src, "a") as f:
        f.write("not json\n")
    with pytest.raises(MalformedLineError, match="in.jsonl:1001:"):
        preprocess([src], tmp_path / "ds", tok, workers=2, block_bytes=4096, overwrite=True)
    assert files_in(tmp_path) == {"in.jsonl", "ds.bin", "ds.idx"}
    assert {ext: (tmp_path / f"ds{ext}").read_bytes() for ext in before} == before


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupt_leaves_nothing(
    tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", mixed_docs(600))
    real_write = pp._DatasetWriter.write
    calls = []

    def interrupted(self, tokens, lengths):
        calls.append(1)
        if len(calls) == 3:  # after two blocks reached the temporary .bin
            raise KeyboardInterrupt
        real_write(self, tokens, lengths)

    monkeypatch.setattr(pp._DatasetWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess([src], tmp_path / "ds", tok, workers=workers, block_bytes=4096)
    assert len(calls) == 3 and files_in(tmp_path) == {"in.jsonl"}


def test_argument_errors(tok: Tokenizer, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", ["a"])
    with pytest.raises(PreprocessError, match="input not found: .*missing.jsonl"):
        preprocess([src, tmp_path / "missing.jsonl"], tmp_path / "ds", tok)
    with pytest.raises(PreprocessError, match="no input"):
        preprocess([], tmp_path / "ds", tok)
    with pytest.raises(PreprocessError, match="tokenizer not found"):
        preprocess([src], tmp_path / "ds", tmp_path / "no-tokenizer")
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n\n{"text": 1}\n')
    with pytest.raises(PreprocessError, match=r"no documents .*\(1 empty, 1 malformed skipped\)"):
        preprocess([empty], tmp_path / "e", tok, skip_malformed=True)
    with pytest.raises(PreprocessError, match="workers"):
        preprocess([src], tmp_path / "ds", tok, workers=0)
    with pytest.raises(PreprocessError, match="directory"):
        preprocess([src], tmp_path, tok)
    preprocess([src], tmp_path / "ds", tok)
    with pytest.raises(PreprocessError, match=r"ds\.bin exists"):
        preprocess([src], tmp_path / "ds", tok)
    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress(src.read_bytes() * 50)[:-12])
    with pytest.raises(PreprocessError, match=r"t\.jsonl\.gz: cannot read"):
        preprocess([truncated], tmp_path / "t", tok)
    assert files_in(tmp_path) == {"in.jsonl", "ds.bin", "ds.idx", "empty.jsonl", "t.jsonl.gz"}


def test_zst_errors(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zst = tmp_path / "z.jsonl.zst"
    zst.write_bytes(b"")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "zstandard", None)  # as if not installed
        with pytest.raises(PreprocessError, match="pip install zstandard"):
            preprocess([zst], tmp_path / "z", tok)
    zstandard = pytest.importorskip("zstandard")
    body = "".join(json.dumps({"text": t}) + "\n" for t in mixed_docs(200)).encode()
    zst.write_bytes(zstandard.ZstdCompressor().compress(body)[:-5])  # truncated
    with pytest.raises(PreprocessError, match=r"z\.jsonl\.zst: cannot read"):
        preprocess([zst], tmp_path / "z", tok)
    assert files_in(tmp_path) == {"z.jsonl.zst"}


# --- progress and CLI ----------------------------------------------------------------------------


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line(tok: Tokenizer, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", mixed_docs(400))
    quiet = io.StringIO()  # not a terminal: nothing before the first minute
    preprocess([src], tmp_path / "a", tok, progress=quiet, block_bytes=2048)
    assert quiet.getvalue() == ""
    tty = _TTY()
    bar = pp._Progress(1000, tty, tty_every=0.0)
    bar.update(250, 10, 123)
    bar.update(1000, 40, 456, final=True)
    out = tty.getvalue()
    assert "\r[preprocess]:  25%" in out and "456 tokens" in out
    assert out.endswith("\n") and "\r" in out
    log = io.StringIO()  # a batch log: plain lines, no carriage returns
    bar = pp._Progress(1000, log, log_every=0.0)
    bar.update(500, 1, 2)
    bar.update(1000, 3, 4, final=True)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()
    assert lines[-1].startswith("[preprocess]: 100.0%") and "3 docs, 4 tokens" in lines[-1]
    assert any(line.startswith("[preprocess]:  50.0%") for line in lines)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", mixed_docs(50), key="body")
    base = ["--input", str(src), "--tokenizer", str(TOKENIZER_DIR), "--workers", "1"]
    rc, out, err = run_cli([*base, "--output-prefix", str(tmp_path / "ds")], capsys)
    assert rc == 2 and err.startswith("llmjp-preprocess: error: ") and err.count("\n") == 1
    assert f"{src}:1: no 'text' field (fields: 'id', 'body')" in err
    assert files_in(tmp_path) == {"in.jsonl"}

    rc, out, err = run_cli(
        [*base, "--text-key", "body", "--output-prefix", str(tmp_path / "ds")], capsys
    )
    assert rc == 0 and err == ""  # no progress spam when stderr is not a terminal
    assert out.startswith("llmjp-preprocess: 50 documents, ") and "tokens/s" in out
    assert f"{tmp_path / 'ds'}.bin" in out and len(read_dataset(tmp_path / "ds")) == 50

    bad_tok = ["--tokenizer", str(tmp_path / "nope")]
    rc, _, err = run_cli(["--input", str(src), "--output-prefix", "x", *bad_tok], capsys)
    assert rc == 2 and err.startswith("llmjp-preprocess: error: tokenizer not found")
    rc, _, err = run_cli(["--input", str(src)], capsys)
    assert rc == 2 and "--output-prefix" in err

    src.write_text(src.read_text() + "oops\n")
    args = [*base, "--text-key", "body", "--skip-malformed", "--overwrite"]
    rc, out, err = run_cli([*args, "--output-prefix", str(tmp_path / "ds")], capsys)
    assert rc == 0 and f"skipped {src}:51: invalid JSON" in err and "1 malformed skipped" in out
