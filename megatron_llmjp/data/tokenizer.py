"""SentencePiece tokenizer wrapper with LLM-jp-4 special ids resolved by id.

The LLM-jp-4 ``.model`` (``llm-jp-tokenizer_ver4.0_alpha1.0.model``, 196,608 pieces) still carries
its pre-release piece names for ids 0-13, while the released Hugging Face tokenizer
(``tokenizer_config.json`` / ``special_tokens_map.json`` in the same folder) renamed them by id.
Verified against both:

====  ==============  ===================  ======  ==========================================
 id   .model piece    HF name              role    SentencePiece piece type
====  ==============  ===================  ======  ==========================================
 0    ``<unk>``       ``<|unk|>``          unk     UNKNOWN
 1    ``<s>``         ``<|startoftext|>``  bos     CONTROL (``sp.bos_id() == 1``)
 2    ``</s>``        ``<|return|>``       eos     CONTROL (``sp.eos_id() == 2``)
 4    ``<pad>``       ``<|endoftext|>``    pad     USER_DEFINED (``sp.pad_id() == -1``!)
 6    ``<EOD>``       ``<|eod|>``          eod     USER_DEFINED
====  ==============  ===================  ======  ==========================================

So special tokens must be mapped by id, never by name: neither HF name exists in the ``.model``,
and SentencePiece itself reports no pad id. Note that ids 3-351 are USER_DEFINED pieces, which
SentencePiece matches verbatim in raw text: ``encode("<EOD>")`` yields ``[609, 6]`` (609 is the
``▁`` dummy prefix). Plain corpora do not contain these strings; sanitise untrusted text if needed.

This module is torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm

LLMJP4_VOCAB_SIZE = 196_608
"""True vocabulary of the LLM-jp-4 tokenizer (never padded here; the model pads for TP)."""

# id -> (piece in the .model, name in the released HF tokenizer)
LLMJP4_SPECIAL_IDS: dict[str, tuple[int, str, str]] = {
    "bos": (1, "<s>", "<|startoftext|>"),
    "eos": (2, "</s>", "<|return|>"),
    "pad": (4, "<pad>", "<|endoftext|>"),
    "eod": (6, "<EOD>", "<|eod|>"),
}


def _resolve_model_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {str(path)!r} (expected a SentencePiece .model file or a "
            "directory containing exactly one *.model; config key data.tokenizer)"
        )
    if p.is_dir():
        models = sorted(p.glob("*.model"))
        if not models:
            raise FileNotFoundError(f"no *.model file in tokenizer directory {str(path)!r}")
        if len(models) > 1:
            names = ", ".join(m.name for m in models)
            raise ValueError(
                f"tokenizer directory {str(path)!r} holds {len(models)} *.model files ({names}); "
                "pass the file itself"
            )
        return models[0]
    if p.suffix != ".model":
        raise ValueError(f"tokenizer path {str(path)!r} is not a SentencePiece .model file")
    return p


class Tokenizer:
    """A loaded SentencePiece model plus its special-token ids.

    For the LLM-jp-4 model (196,608 pieces, ``<EOD>`` at id 6) the special ids are fixed by id as
    in the module docstring. Any other SentencePiece model falls back to what it declares:
    ``bos_id``/``eos_id``/``pad_id`` from the model (pad falls back to eos when undefined) and
    ``eod_id`` from an ``<EOD>`` piece if present, else eos.
    """

    def __init__(self, sp: spm.SentencePieceProcessor, model_file: str | None = None) -> None:
        self._sp = sp
        self.model_file = model_file
        n = sp.get_piece_size()
        self.is_llmjp4 = n == LLMJP4_VOCAB_SIZE and all(
            sp.id_to_piece(i) == piece for i, piece, _ in LLMJP4_SPECIAL_IDS.values()
        )
        if self.is_llmjp4:
            ids = {role: i for role, (i, _, _) in LLMJP4_SPECIAL_IDS.items()}
        else:
            eos = sp.eos_id()
            eod_piece = sp.piece_to_id("<EOD>")
            ids = {
                "bos": sp.bos_id(),
                "eos": eos,
                "pad": sp.pad_id() if sp.pad_id() >= 0 else eos,
                "eod": eod_piece if eod_piece != sp.unk_id() else eos,
            }
        self._bos, self._eos, self._pad, self._eod = (
            ids["bos"],
            ids["eos"],
            ids["pad"],
            ids["eod"],
        )

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a ``.model`` file or a directory containing exactly one ``*.model``."""
        model_file = _resolve_model_file(path)
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        return cls(sp, model_file=str(model_file))

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        return self._sp

    @property
    def vocab_size(self) -> int:
        """True number of pieces (196,608 for LLM-jp-4), never padded."""
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    @property
    def eod_id(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added."""
        return self._sp.encode(text, add_bos=False, add_eos=False)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts with SentencePiece's multithreaded batch encoder (same result as
        ``[encode(t) for t in texts]``). ``num_threads`` None lets SentencePiece choose."""
        if not texts:
            return []
        kwargs = {} if num_threads is None else {"num_threads": num_threads}
        return self._sp.encode(list(texts), add_bos=False, add_eos=False, **kwargs)

    def decode(self, ids) -> str:
        """Text of ``ids`` (a sequence of ints, or anything with ``tolist()``)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.model_file!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, eod={self.eod_id})"
        )
