"""JSONL corpora -> megatron-core indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``).

Output contract
---------------
- One document per JSON line: the string under ``text_key``, encoded without BOS/EOS and
  followed by the tokenizer's ``eod_id`` (6 for LLM-jp-4). Each document is one sequence, so
  ``IndexedDataset(PREFIX)[i]`` is document ``i`` with its EOD, in input order; several inputs
  are concatenated in the order given.
- Token dtype: ``uint16`` when the vocabulary has fewer than 65,500 ids, else ``int32``; the
  same rule as megatron-core's ``DType.optimal_dtype``. The ``.idx`` format has no ``uint32``
  code, and ``int32`` covers LLM-jp-4's 196,608 ids.
- Blank lines are ignored. Empty and whitespace-only documents (``""``, ``" "``, ``"\u3000"``,
  ``"\n"``: nothing but Unicode whitespace) are skipped and counted as empty. An input without
  any document is an error (megatron-core cannot open an empty ``.bin``).
- EOD appears only at document ends: text is encoded with ``Tokenizer.encode_text``, so a
  special or user-defined piece spelled in a document (``<EOD>``, ``<pad>``, ``<|eod|>`` ...)
  becomes the ordinary pieces of its characters, never a control id.
- A malformed line (invalid JSON or UTF-8, not an object, missing or non-string text field)
  stops the run with ``FILE:LINE: reason`` (1-based line numbers), or with
  ``skip_malformed=True`` is skipped and counted.
- Inputs may be plain, ``.gz`` or ``.zst`` (the latter needs the ``zstandard`` package).
- Nothing appears under the final names until the run is complete: data goes to
  ``PREFIX.bin.tmp-PID`` / ``PREFIX.idx.tmp-PID``, which are renamed at the end and removed on
  any error or interrupt.

Parallelism: the main process reads the input in blocks of whole lines (~1 MiB) and hands the
raw bytes to worker processes, which parse, tokenise with the batch encoder and return one flat
token array plus document lengths per block. The main process writes the blocks in input order,
so the output is byte-identical for any number of workers. The ``.idx`` is written here, in the
format ``megatron.core.datasets.indexed_dataset`` reads (tests compare it byte for byte with
``IndexedDatasetBuilder``): importing megatron-core would cost seconds of torch import per run,
and its index writer walks the sequence pointers in Python.

This module is torch-free.
"""

from __future__ import annotations

import gc
import gzip
import json
import json.scanner
import multiprocessing as mp
import os
import signal
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import BinaryIO, TextIO

import numpy as np

from megatron_llmjp.data.tokenizer import Tokenizer

DEFAULT_BLOCK_BYTES = 1 << 20
"""Bytes of input per worker task: large enough to amortise the hand-off (~0.1 ms), small
enough that the last blocks balance across workers."""

MAX_REPORTED_MALFORMED = 10
"""How many skipped lines the summary names (all are counted)."""

# megatron-core's .idx layout (indexed_dataset._IndexWriter): magic, version, dtype code,
# sequence count, document-index count, int32 lengths, int64 byte pointers, int64 doc indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_VERSION = 1
_IDX_DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
"""``DType`` enum values of megatron-core for the two dtypes written here (tested against it)."""


class PreprocessError(Exception):
    """Bad input or arguments; the message names the file (and line) and is meant for users."""


class MalformedLineError(PreprocessError):
    """A JSONL line that cannot be turned into a document."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` below 65,500 ids, else ``int32`` (megatron-core's ``DType.optimal_dtype``)."""
    return np.dtype(np.uint16 if vocab_size < 65_500 else np.int32)


@dataclass
class PreprocessSummary:
    """What a run wrote; ``tokens`` counts the EOD tokens too."""

    inputs: list[str]
    bin_path: str
    idx_path: str
    dtype: str
    workers: int
    documents: int = 0
    tokens: int = 0
    empty_documents: int = 0
    malformed_lines: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return (
            f"{self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}), "
            f"{self.empty_documents:,} empty and {self.malformed_lines:,} malformed skipped, "
            f"{self.seconds:.2f} s, {self.tokens_per_second:,.0f} tokens/s, "
            f"{self.workers} worker(s) -> {self.bin_path}, {self.idx_path}"
        )


# --- reading -----------------------------------------------------------------------------------


@dataclass
class _Block:
    """Whole lines of one input file, as raw bytes (cheap to pass to a worker)."""

    file_index: int
    first_line: int  # 1-based number of the block's first line
    data: bytes
    done_bytes: int  # input bytes (compressed, all files) consumed up to this block


class _ZstdReader:
    """A multi-frame ``.zst`` stream that reports truncation: zstandard's ``stream_reader``
    silently ends at a cut-off frame, which could drop documents without an error."""

    def __init__(self, raw: BinaryIO, decompressor) -> None:
        self._raw, self._dctx = raw, decompressor
        self._obj = decompressor.decompressobj()
        self._in_frame = False

    def read(self, size: int) -> bytes:
        while True:
            data = self._raw.read(size)
            if not data:
                if self._in_frame:
                    raise EOFError("compressed file ended in the middle of a zstd frame")
                return b""
            out = []
            while data:
                out.append(self._obj.decompress(data))
                self._in_frame = not self._obj.eof
                if self._in_frame:
                    break
                data = self._obj.unused_data  # the next frame starts here
                self._obj = self._dctx.decompressobj()
            if any(out):
                return b"".join(out)

    def close(self) -> None:
        pass


def _open_input(path: Path) -> tuple[BinaryIO, BinaryIO, tuple[type[BaseException], ...]]:
    """(decompressed stream, raw file, errors that mean a corrupt file): the raw file's position
    drives the progress bar."""
    raw = open(path, "rb")  # noqa: SIM115 - closed by the caller
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        if path.suffix == ".gz":
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw, errors
        if path.suffix == ".zst":
            import zstandard

            return (
                _ZstdReader(raw, zstandard.ZstdDecompressor()),
                raw,
                (*errors, zstandard.ZstdError),
            )
    except BaseException:
        raw.close()
        raise
    return raw, raw, errors


def _check_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    if not inputs:
        raise PreprocessError("no input files given")
    paths = []
    for name in inputs:
        p = Path(name)
        if not p.is_file():
            raise PreprocessError(f"input not found: {str(name)!r}")
        if p.suffix == ".zst":
            try:
                import zstandard  # noqa: F401
            except ImportError:
                raise PreprocessError(
                    f"{str(name)!r}: reading .zst needs the 'zstandard' package "
                    "(pip install zstandard)"
                ) from None
        paths.append(p)
    return paths


def _read_blocks(paths: list[Path], block_bytes: int) -> Iterator[_Block]:
    """Blocks of whole lines from each file in order; a UTF-8 BOM at a file's start is dropped."""
    offset = 0
    for fi, path in enumerate(paths):
        stream, raw, errors = _open_input(path)
        line = 1
        partial: list[bytes] = []  # the start of a line that continues in the next read
        try:
            while True:
                try:
                    data = stream.read(block_bytes)
                except errors as e:
                    raise PreprocessError(
                        f"{path}: cannot read (corrupt or truncated?): {e}"
                    ) from e
                if not data:
                    break
                if line == 1 and not partial:
                    data = data.removeprefix(b"\xef\xbb\xbf")
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # a line longer than a block: keep reading
                    partial.append(data)
                    continue
                chunk = b"".join([*partial, data[:cut]]) if partial else data[:cut]
                partial = [data[cut:]] if cut < len(data) else []
                yield _Block(fi, line, chunk, offset + raw.tell())
                line += chunk.count(b"\n")
            offset += os.fstat(raw.fileno()).st_size
            if partial:
                yield _Block(fi, line, b"".join(partial), offset)
        finally:
            stream.close()
            raw.close()


# --- encoding (runs in the workers) ------------------------------------------------------------


@dataclass
class _Encoded:
    tokens: np.ndarray  # all documents of the block, each followed by EOD
    lengths: np.ndarray  # int32 length (EOD included) of each document
    empty: int
    malformed: list[tuple[int, str]]  # (line offset in the block, reason)


@dataclass
class _EncodeSpec:
    tokenizer: Tokenizer
    text_key: str
    dtype: np.dtype
    skip_malformed: bool


_SCAN = json.scanner.make_scanner(json.JSONDecoder())
"""The JSON decoder's C scanner called on each line directly: ``json.loads`` adds ~1 us of
Python per call (encoding sniffing, whitespace regexes), more than parsing a short line costs."""


def _parse_line(line: str, text_key: str) -> str:
    """The document text of one JSONL line; ValueError with the reason otherwise."""
    try:
        obj, end = _SCAN(line, 0)
        if end != len(line) and not line[end:].isspace():
            raise ValueError
    except (StopIteration, ValueError):
        # Slow path for leading whitespace and for a precise message.
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if type(obj) is not dict:
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    try:
        text = obj[text_key]
    except KeyError:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        raise ValueError(
            f"no {text_key!r} field (fields: {keys}); pick the field with --text-key / text_key"
        ) from None
    if type(text) is not str:
        raise ValueError(f"field {text_key!r} is {type(text).__name__}, expected a string")
    return text


def _split_lines(data: bytes) -> list[str | None]:
    """The block's lines as text; None for a line that is not valid UTF-8 (decoding the whole
    block at once is the fast path)."""
    try:
        return data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        pass
    out: list[str | None] = []
    for raw in data.split(b"\n"):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
    return out


def _encode_texts(
    tok: Tokenizer, texts: list[str], lines: list[int], bad: list[tuple[int, str]]
) -> list[list[int] | None]:
    """Batch-encode; on a text the native encoder rejects (lone surrogates from ``\\ud800``
    escapes), encode one by one to name the offending lines."""
    try:
        return tok.encode_text_batch(texts, num_threads=1)
    except (TypeError, RuntimeError, UnicodeError):
        pass
    out: list[list[int] | None] = []
    for text, ln in zip(texts, lines, strict=True):
        try:
            out.append(tok.encode_text(text))
        except (TypeError, RuntimeError, UnicodeError):
            bad.append((ln, "text is not valid Unicode (lone surrogate escape?)"))
            out.append(None)
    return out


def _encode_block(spec: _EncodeSpec, data: bytes) -> _Encoded:
    texts: list[str] = []
    text_lines: list[int] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(_split_lines(data)):
        try:
            if line is None:
                raise ValueError("not valid UTF-8")
            if not line or line.isspace():
                continue
            text = _parse_line(line, spec.text_key)
            if text.isspace():  # whitespace only: no content, counted with the empty ones
                text = ""
            texts.append(text)
        except ValueError as e:
            bad.append((i, str(e)))
            if not spec.skip_malformed:
                break
            continue
        text_lines.append(i)
    # Without skipping, ``texts`` stops at the first bad line; encoding them still finds an
    # earlier text the encoder rejects, so the error reported is the first in the input.
    encoded = _encode_texts(spec.tokenizer, texts, text_lines, bad)
    if bad and not spec.skip_malformed:
        return _Encoded(np.empty(0, spec.dtype), np.empty(0, np.int32), 0, [min(bad)])
    docs = [ids for ids in encoded if ids]
    empty = sum(1 for ids in encoded if ids is not None and not ids)
    eod = spec.tokenizer.eod_id
    for ids in docs:
        ids.append(eod)
    lengths = np.fromiter(map(len, docs), dtype=np.int32, count=len(docs))
    n = int(lengths.sum(dtype=np.int64))
    tokens = np.fromiter(chain.from_iterable(docs), dtype=spec.dtype, count=n)
    return _Encoded(tokens, lengths, empty, sorted(bad))


_WORKER_SPEC: _EncodeSpec | None = None


def _init_worker(spec: _EncodeSpec) -> None:
    global _WORKER_SPEC
    _WORKER_SPEC = spec
    # Ctrl-C reaches the whole process group; the main process alone handles it and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the CLI's handler, inherited by fork
    # Parallelism comes from the processes; a per-process thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_encode(data: bytes) -> _Encoded:
    assert _WORKER_SPEC is not None
    return _encode_block(_WORKER_SPEC, data)


# --- writing -----------------------------------------------------------------------------------


class _DatasetWriter:
    """Streams token blocks into ``PREFIX.bin.tmp-PID`` and publishes ``PREFIX.bin``/``.idx``
    only in :meth:`commit`; :meth:`discard` removes the temporary files."""

    def __init__(self, prefix: str, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.bin_path, self.idx_path = f"{prefix}.bin", f"{prefix}.idx"
        self._bin_tmp = f"{self.bin_path}.tmp-{os.getpid()}"
        self._idx_tmp = f"{self.idx_path}.tmp-{os.getpid()}"
        self._lengths: list[np.ndarray] = []
        self._file = open(self._bin_tmp, "wb")  # noqa: SIM115 - closed in commit/discard

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        try:
            self._file.write(memoryview(tokens.astype(self.dtype, copy=False)))
        except OSError as e:  # disk full, quota: one line for the user, not a traceback
            raise PreprocessError(f"cannot write {self._bin_tmp}: {e}") from e
        self._lengths.append(lengths)

    def commit(self) -> None:
        try:
            self._commit()
        except OSError as e:
            raise PreprocessError(f"cannot write {self.bin_path}/.idx: {e}") from e

    def _commit(self) -> None:
        lengths = np.concatenate([np.empty(0, np.int32), *self._lengths]).astype(np.int32)
        n = lengths.shape[0]
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(_IDX_MAGIC)
            f.write(struct.pack("<Q", _IDX_VERSION))
            f.write(struct.pack("<B", _IDX_DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        # Drop a previous .idx first: at every instant the final names hold either the old
        # pair, a .bin without .idx (not a dataset), or the new pair, never a mixed pair.
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)

    def discard(self) -> None:
        self._file.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)


# --- progress ----------------------------------------------------------------------------------


class _Progress:
    """The preprocessing progress bar (``megatron_llmjp.progress``): bytes read, with documents
    and tokens so far; plain lines at most every ``log_every`` s when ``stream`` is not a
    terminal."""

    def __init__(
        self,
        total_bytes: int,
        stream: TextIO | None,
        tty_every: float = 0.2,
        log_every: float = 60.0,
    ) -> None:
        from megatron_llmjp.progress import progress_bar

        self.total = max(total_bytes, 1)
        self.bar = progress_bar(
            self.total,
            "[preprocess]",
            unit="B",
            unit_scale=True,
            enabled=stream is not None,
            stream=stream,
            tty_every=tty_every,
            log_every=log_every,
        )

    def update(self, done: int, docs: int, tokens: int, final: bool = False) -> None:
        self.bar.set_postfix_str(f"{docs:,} docs, {tokens:,} tokens", refresh=False)
        self.bar.update(min(done, self.total) - self.bar.n)
        if final:
            self.bar.close()

    def abort(self) -> None:
        """End the bar so an error message starts on its own line."""
        self.bar.close()


# --- the entry point ---------------------------------------------------------------------------


def preprocess(
    inputs: Sequence[str | os.PathLike[str]],
    output_prefix: str | os.PathLike[str],
    tokenizer: str | os.PathLike[str] | Tokenizer,
    *,
    text_key: str = "text",
    workers: int = 1,
    skip_malformed: bool = False,
    overwrite: bool = False,
    progress: TextIO | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> PreprocessSummary:
    """Tokenise JSONL ``inputs`` into ``output_prefix``.bin/.idx (see the module docstring).

    ``tokenizer`` is a :class:`Tokenizer` or a path for :meth:`Tokenizer.from_path`.
    ``workers`` > 1 tokenises in that many processes (1 runs in this process). ``progress`` is a
    stream for the progress line (None: silent). Raises :class:`PreprocessError` (with
    :class:`MalformedLineError` for bad lines) and leaves no output under the final names on
    any error or interrupt.
    """
    t0 = time.perf_counter()
    if workers < 1:
        raise PreprocessError(f"workers must be >= 1, got {workers}")
    if block_bytes < 1:
        raise PreprocessError(f"block_bytes must be >= 1, got {block_bytes}")
    paths = _check_inputs(inputs)
    try:
        tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_path(tokenizer)
    except (OSError, ValueError, ImportError) as e:
        raise PreprocessError(str(e)) from e
    if tok.eod_id < 0:
        raise PreprocessError(f"tokenizer {tok.path!r} defines neither an EOD nor an EOS token")
    prefix = os.fspath(output_prefix)
    if not prefix or prefix.endswith(os.sep) or Path(prefix).is_dir():
        raise PreprocessError(f"output prefix {prefix!r} must name files, not a directory")
    for suffix in (".bin", ".idx"):
        if os.path.exists(prefix + suffix) and not overwrite:
            raise PreprocessError(f"{prefix}{suffix} exists; remove it or allow overwriting")
    bar = _Progress(sum(p.stat().st_size for p in paths), progress)
    try:
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        writer = _DatasetWriter(prefix, token_dtype(tok.vocab_size))
    except OSError as e:
        raise PreprocessError(f"cannot create output {prefix}.bin: {e}") from e
    dtype = writer.dtype
    tok.encode_text_batch(["."], num_threads=1)  # build the text encoder once, before any fork
    spec = _EncodeSpec(tok, text_key, dtype, skip_malformed)
    summary = PreprocessSummary(
        inputs=[str(p) for p in paths],
        bin_path=writer.bin_path,
        idx_path=writer.idx_path,
        dtype=dtype.name,
        workers=workers,
    )

    def consume(block: _Block, enc: _Encoded) -> None:
        path = summary.inputs[block.file_index]
        for offset, reason in enc.malformed:
            if not skip_malformed:
                raise MalformedLineError(path, block.first_line + offset, reason)
            if len(summary.malformed_examples) < MAX_REPORTED_MALFORMED:
                summary.malformed_examples.append(f"{path}:{block.first_line + offset}: {reason}")
        summary.malformed_lines += len(enc.malformed)
        summary.empty_documents += enc.empty
        summary.documents += enc.lengths.shape[0]
        summary.tokens += enc.tokens.shape[0]
        writer.write(enc.tokens, enc.lengths)
        bar.update(block.done_bytes, summary.documents, summary.tokens)

    pool: ProcessPoolExecutor | None = None
    blocks = _read_blocks(paths, block_bytes)
    # Encoding allocates millions of small lists, which triggers full garbage collections;
    # freezing the objects alive now keeps those collections from walking the caller's whole
    # heap, and keeps forked workers from copying it page by page (in a process that had
    # imported torch, that cost 0.2-0.3 s per collection and per worker).
    gc.freeze()
    try:
        if workers == 1:
            for block in blocks:
                consume(block, _encode_block(spec, block.data))
        else:
            # fork shares the loaded tokenizer with the workers; elsewhere it pickles by path.
            method = "fork" if "fork" in mp.get_all_start_methods() else None
            pool = ProcessPoolExecutor(
                workers, mp.get_context(method), initializer=_init_worker, initargs=(spec,)
            )
            # A bounded window keeps memory flat on inputs of any size (Pool.imap would read
            # the whole input ahead of the workers).
            window: deque[tuple[_Block, Future[_Encoded]]] = deque()
            for block in blocks:
                window.append((block, pool.submit(_worker_encode, block.data)))
                if len(window) >= 2 * workers + 2:
                    b, fut = window.popleft()
                    consume(b, fut.result())
            while window:
                b, fut = window.popleft()
                consume(b, fut.result())
            pool.shutdown(wait=True)
            pool = None
        bar.update(bar.total, summary.documents, summary.tokens, final=True)
        if summary.documents == 0:  # megatron-core cannot even open an empty .bin (mmap)
            raise PreprocessError(
                f"no documents in {', '.join(summary.inputs)} ({summary.empty_documents} empty, "
                f"{summary.malformed_lines} malformed skipped); nothing written"
            )
        writer.commit()
    except BaseException as e:
        gc.unfreeze()
        blocks.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        writer.discard()
        bar.abort()
        if isinstance(e, BrokenProcessPool):
            raise PreprocessError(f"a worker process died ({e}); out of memory?") from e
        raise
    gc.unfreeze()
    summary.seconds = time.perf_counter() - t0
    return summary


def default_workers() -> int:
    """CPUs this process may run on (the job's allocation, not the node's core count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


__all__ = [
    "DEFAULT_BLOCK_BYTES",
    "MalformedLineError",
    "PreprocessError",
    "PreprocessSummary",
    "default_workers",
    "preprocess",
    "token_dtype",
]
