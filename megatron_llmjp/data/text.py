"""On-the-fly token streams and a layout-independent global-batch sampler (small CPU runs).

Data contract
-------------
Training data is one flat token stream. :class:`GlobalBatchSampler` cuts it into windows of
``seq_length + 1`` tokens at stride ``seq_length`` and defines, for every optimizer step, the
*global* batch as a pure function of ``(step, tokens, seq_length, global_batch_size, seed)``.
A data-parallel rank then takes a contiguous slice of those rows and splits it into
microbatches. Nothing depends on the TP/PP/DP/CP layout or on the micro-batch size, so every
parallel layout sees exactly the same tokens per optimizer step; the layout-parity tests (same
loss curve for e.g. tp=2 vs pp=2 vs dp=2) rely on this.

Only :meth:`GlobalBatchSampler.microbatches` needs torch, and imports it lazily.
"""

from __future__ import annotations

import codecs
import os
from itertools import chain
from pathlib import Path

import numpy as np

from megatron_llmjp.data.batches import SampleCursor, rank_rows
from megatron_llmjp.data.tokenizer import Tokenizer

TOKEN_DTYPE = np.int32
"""Token streams are int32 (LLM-jp-4 has 196,608 ids); batches are widened to int64."""


def _read_text(path: Path, max_bytes: int | None) -> str:
    """At most ``max_bytes`` bytes of ``path`` as text, cut after the last newline within the
    limit (the whole file when it fits or ``max_bytes`` is None/<= 0). Undecodable bytes become
    U+FFFD; a multi-byte character split by the limit is dropped, never half-decoded."""
    with open(path, "rb") as f:
        if max_bytes is None or max_bytes <= 0:
            data, truncated = f.read(), False
        else:
            data = f.read(max_bytes + 1)
            truncated = len(data) > max_bytes
            data = data[:max_bytes]
    if truncated:
        cut = data.rfind(b"\n")
        if cut >= 0:
            data = data[: cut + 1]
        # No newline within the limit: keep the (partial) first line, minus any split character.
        text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data, final=False)
    else:
        text = data.decode("utf-8", errors="replace")
    return text.removeprefix("\ufeff")


def _documents(text: str) -> list[str]:
    """One document per non-empty line (whitespace-only lines are empty; ``\\r\\n`` tolerated)."""
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


def load_token_stream(
    files: list[str],
    tokenizer: Tokenizer,
    max_bytes_per_file: int | None,
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Tokenise plain-text ``files`` into one int32 stream.

    Each file contributes at most ``max_bytes_per_file`` bytes (cut at the last newline before
    the limit; None or <= 0 reads it all); every non-empty line is a document, encoded without
    BOS/EOS (special-token text stays literal: ``Tokenizer.encode_text``) and followed by
    ``tokenizer.eod_id``. Files are concatenated in the given order.
    Relative paths are resolved against ``base_dir`` when given, else the working directory.
    """
    paths = []
    for name in files:
        p = Path(name)
        if base_dir is not None and not p.is_absolute():
            p = Path(base_dir) / p
        if not p.is_file():
            raise FileNotFoundError(
                f"text file not found: {str(name)!r} (resolved to {str(p.resolve())!r}); "
                "check the config key data.text_files"
            )
        paths.append(p)

    eod = tokenizer.eod_id
    parts: list[np.ndarray] = []
    for p in paths:
        docs = tokenizer.encode_text_batch(_documents(_read_text(p, max_bytes_per_file)))
        if not docs:
            continue
        lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
        n_text = int(lengths.sum())
        out = np.empty(n_text + len(docs), dtype=TOKEN_DTYPE)
        eod_pos = np.cumsum(lengths + 1) - 1
        is_text = np.ones(out.shape[0], dtype=bool)
        is_text[eod_pos] = False
        out[is_text] = np.fromiter(chain.from_iterable(docs), dtype=TOKEN_DTYPE, count=n_text)
        out[eod_pos] = eod
        parts.append(out)
    if not parts:
        return np.empty(0, dtype=TOKEN_DTYPE)
    return np.concatenate(parts)


def synthetic_token_stream(
    num_tokens: int, vocab_size: int, seed: int, *, period: int = 97, noise: float = 0.1
) -> np.ndarray:
    """Deterministic learnable random tokens: a random pattern of ``period`` tokens (distinct
    where the vocabulary allows) repeated over the stream, each position replaced by a uniform
    random token with probability ``noise``. A model can learn the pattern's bigrams (and, with
    context, copy it), so the loss falls well below ln(vocab_size)."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if period < 1 or not 0.0 <= noise <= 1.0:
        raise ValueError(f"need period >= 1 and 0 <= noise <= 1, got {period=}, {noise=}")
    rng = np.random.default_rng(seed)
    pattern = rng.choice(vocab_size, size=period, replace=vocab_size < period)
    stream = np.resize(pattern, num_tokens).astype(TOKEN_DTYPE)
    flip = rng.random(num_tokens) < noise
    stream[flip] = rng.integers(0, vocab_size, size=int(flip.sum()), dtype=TOKEN_DTYPE)
    return stream


class GlobalBatchSampler(SampleCursor):
    """Global batches of ``seq_length + 1``-token windows, a pure function of the step.

    Window ``i`` is ``tokens[i * seq_length : i * seq_length + seq_length + 1]`` (consecutive
    windows share one token, so each stream token is a label exactly once per epoch). The order
    is a permutation of the window indices drawn with ``np.random.default_rng(seed + epoch)``;
    sample ``k`` of the run (``k = step * global_batch_size + row``) is window
    ``perm[epoch][k % num_windows]`` with ``epoch = k // num_windows``, so exhausting the windows
    wraps into a fresh permutation (a batch may straddle two epochs).

    Why: the global batch of step ``s`` never depends on the data-parallel size, the rank, the
    micro-batch size or the TP/PP layout, so every layout trains on exactly the same tokens per
    optimizer step — the layout-parity tests rely on this.
    """

    def __init__(
        self, tokens: np.ndarray, seq_length: int, global_batch_size: int, seed: int
    ) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tokens.shape}")
        if seq_length < 1 or global_batch_size < 1:
            raise ValueError(
                f"seq_length and global_batch_size must be >= 1, got {seq_length}, "
                f"{global_batch_size}"
            )
        if tokens.shape[0] < seq_length + 1:
            raise ValueError(
                f"token stream too short: {tokens.shape[0]} tokens, but one window needs "
                f"train.seq_length + 1 = {seq_length + 1}; add text (data.text_files, "
                "data.max_bytes_per_file) or lower train.seq_length"
            )
        super().__init__(global_batch_size)
        self.tokens = tokens
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.num_windows = (tokens.shape[0] - 1) // self.seq_length
        self._perms: dict[int, np.ndarray] = {}
        self._offsets = np.arange(self.seq_length + 1, dtype=np.int64)

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 4:  # steps advance monotonically; keep a few epochs
                self._perms.pop(next(iter(self._perms)))
            perm = np.random.default_rng(self.seed + epoch).permutation(self.num_windows)
            self._perms[epoch] = perm
        return perm

    def window_indices(self, step: int) -> np.ndarray:
        """Window index of each row of the global batch of ``step``."""
        if step < 0 or self.first_sample(step) < 0:
            raise ValueError(f"step must be >= 0 and not before the resume point, got {step}")
        k = self.first_sample(step) + np.arange(self.global_batch_size, dtype=np.int64)
        epochs, pos = np.divmod(k, self.num_windows)
        out = np.empty_like(k)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[pos[sel]]
        return out

    def epoch_at(self, step: int) -> float:
        """Epochs completed after ``step`` (fractional): samples seen / windows per epoch."""
        return self.first_sample(step + 1) / self.num_windows

    def global_batch(self, step: int) -> np.ndarray:
        """``[global_batch_size, seq_length + 1]`` int64 windows for optimizer step ``step``."""
        starts = self.window_indices(step) * self.seq_length
        return self.tokens[starts[:, None] + self._offsets].astype(np.int64)

    def microbatches(
        self, step: int, dp_rank: int, dp_size: int, micro_batch_size: int
    ) -> list[dict]:
        """This data-parallel rank's microbatches for ``step``, as torch tensors.

        The rank takes rows ``[dp_rank * per_rank, (dp_rank + 1) * per_rank)`` of the global
        batch (``per_rank = global_batch_size // dp_size``) and splits them in order into
        ``per_rank // micro_batch_size`` dicts with ``tokens``/``labels``/``position_ids``
        ``[mbs, seq]`` int64 and ``loss_mask`` ``[mbs, seq]`` float32 ones.
        """
        import torch

        own = rank_rows(self.global_batch_size, dp_rank, dp_size, micro_batch_size)
        rows = self.global_batch(step)[own.start : own.stop]
        seq = self.seq_length
        position_ids = torch.arange(seq, dtype=torch.int64)
        out = []
        for i in range(0, len(own), micro_batch_size):
            mb = torch.from_numpy(np.ascontiguousarray(rows[i : i + micro_batch_size]))
            out.append(
                {
                    "tokens": mb[:, :-1].contiguous(),
                    "labels": mb[:, 1:].contiguous(),
                    "loss_mask": torch.ones(micro_batch_size, seq, dtype=torch.float32),
                    "position_ids": position_ids.expand(micro_batch_size, seq).clone(),
                }
            )
        return out
