"""One tokenizer interface for the trainer and the preprocessor.

:meth:`Tokenizer.from_path` loads either backend behind the same API (``vocab_size``,
``bos_id``/``eos_id``/``pad_id``/``eod_id``, ``encode``, ``encode_batch``, ``decode``):

- **SentencePiece**: a ``.model`` file, or a directory holding exactly one ``*.model``
  (the LLM-jp-4 release folder ``../shared/data/tokenizer/llm-jp-tokenizer-v4.0/``).
- **Hugging Face**: a ``tokenizer.json`` file, or a directory holding one (what
  ``PreTrainedTokenizerFast.save_pretrained`` writes). Loaded with the ``tokenizers`` library
  (optional dependency, ``pip install tokenizers``); ``transformers`` is not needed.

A directory with both prefers the SentencePiece model (the original, and faster); pass
``backend="hf"`` to choose the other. ``encode`` never adds BOS/EOS: document boundaries are the
caller's job (the preprocessor appends ``eod_id``).

LLM-jp-4 special tokens are resolved by id. The ``.model`` (196,608 pieces) still carries its
pre-release piece names for ids 0-13, while the released HF tokenizer renamed them by id:

====  ==============  ===================  ======  ==========================================
 id   .model piece    HF name              role    SentencePiece piece type
====  ==============  ===================  ======  ==========================================
 0    ``<unk>``       ``<|unk|>``          unk     UNKNOWN
 1    ``<s>``         ``<|startoftext|>``  bos     CONTROL (``sp.bos_id() == 1``)
 2    ``</s>``        ``<|return|>``       eos     CONTROL (``sp.eos_id() == 2``)
 4    ``<pad>``       ``<|endoftext|>``    pad     USER_DEFINED (``sp.pad_id() == -1``!)
 6    ``<EOD>``       ``<|eod|>``          eod     USER_DEFINED
====  ==============  ===================  ======  ==========================================

So neither name set can be looked up in the other file, and SentencePiece itself reports no pad
id: a tokenizer with 196,608 entries whose ids 1, 2, 4, 6 carry either name set gets the fixed
ids. Other tokenizers use what they declare (see :class:`SentencePieceTokenizer` and
:class:`HFTokenizer`); an undefined role is ``-1``, as in SentencePiece.

Ids 3-351 are USER_DEFINED pieces, which SentencePiece matches verbatim in raw text:
``encode("<EOD>")`` yields ``[609, 6]`` (609 is the ``▁`` dummy prefix). ``encode`` keeps that
behaviour (prompts and chat templates may spell control tokens on purpose). Corpus text goes
through ``encode_text`` / ``encode_text_batch`` instead, which never produce a control,
user-defined or special piece: ``"a <EOD> b"`` becomes the ordinary pieces of the characters
``<``, ``EOD``, ``>`` (decoding gives the text back), so a document boundary appears only where
the preprocessor or the text loader appends ``eod_id``. Text without such strings encodes
exactly as with ``encode``. The vocabulary is never padded here: the model pads its embedding
for tensor parallelism.

This module is torch-free.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sentencepiece as spm

LLMJP4_VOCAB_SIZE = 196_608
"""True vocabulary of the LLM-jp-4 tokenizer (never padded here; the model pads for TP)."""

# role -> (id, piece in the .model, name in the released HF tokenizer)
LLMJP4_SPECIAL_IDS: dict[str, tuple[int, str, str]] = {
    "bos": (1, "<s>", "<|startoftext|>"),
    "eos": (2, "</s>", "<|return|>"),
    "pad": (4, "<pad>", "<|endoftext|>"),
    "eod": (6, "<EOD>", "<|eod|>"),
}

Backend = Literal["auto", "sentencepiece", "hf"]
HF_TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the roles the trainer and preprocessor need; ``-1`` when undefined."""

    bos: int
    eos: int
    pad: int
    eod: int


def _is_llmjp4(vocab_size: int, id_to_piece: Callable[[int], str]) -> bool:
    """196,608 entries and either name set at ids 1/2/4/6: the .model's own names (which a
    conversion of the .model to tokenizer.json keeps) or the released HF names."""
    if vocab_size != LLMJP4_VOCAB_SIZE:
        return False
    ids = [i for i, _, _ in LLMJP4_SPECIAL_IDS.values()]
    pieces = [id_to_piece(i) for i in ids]
    return pieces in (
        [sp for _, sp, _ in LLMJP4_SPECIAL_IDS.values()],
        [hf for _, _, hf in LLMJP4_SPECIAL_IDS.values()],
    )


LLMJP4_IDS = SpecialIds(*(i for i, _, _ in LLMJP4_SPECIAL_IDS.values()))


class Tokenizer(ABC):
    """Common interface of the SentencePiece and Hugging Face backends.

    Instances pickle by path (a worker process reloads the file instead of receiving a copy of
    the model), so they can be handed to ``multiprocessing`` with any start method.
    """

    backend: str
    """``"sentencepiece"`` or ``"hf"``."""

    def __init__(self, path: str | None, ids: SpecialIds, is_llmjp4: bool) -> None:
        self.path = path
        self.special_ids = ids
        self.is_llmjp4 = is_llmjp4

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], backend: Backend = "auto") -> Tokenizer:
        """Load a SentencePiece ``.model`` / HF ``tokenizer.json``, or a directory holding one.

        ``backend="auto"`` picks SentencePiece for a ``.model`` file or a directory with one,
        else Hugging Face for ``tokenizer.json``."""
        if backend not in ("auto", "sentencepiece", "hf"):
            raise ValueError(
                f"tokenizer backend must be auto, sentencepiece or hf, got {backend!r}"
            )
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(
                f"tokenizer not found: {str(path)!r} (expected a SentencePiece .model file, a "
                f"Hugging Face {HF_TOKENIZER_FILE}, or a directory containing one)"
            )
        if backend == "auto":
            if p.is_dir():
                has_model = any(p.glob("*.model"))
                backend = (
                    "hf" if not has_model and (p / HF_TOKENIZER_FILE).is_file() else "sentencepiece"
                )
            else:
                backend = "hf" if p.suffix == ".json" else "sentencepiece"
        if backend == "hf":
            return HFTokenizer.load(p)
        return SentencePieceTokenizer.load(p)

    # --- the interface ---------------------------------------------------------------------

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """True number of token ids (196,608 for LLM-jp-4), never padded."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added."""

    @abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in one call into the native library."""

    def encode_text(self, text: str) -> list[int]:
        """Token ids of corpus ``text``: like :meth:`encode`, but special and user-defined
        pieces spelled in the text are encoded as their literal characters, never as the
        control ids (see the module docstring)."""
        return self.encode_text_batch([text], num_threads=1)[0]

    @abstractmethod
    def encode_text_batch(
        self, texts: Sequence[str], num_threads: int | None = None
    ) -> list[list[int]]:
        """``[encode_text(t) for t in texts]``, computed in one call into the native library."""

    @abstractmethod
    def decode(self, ids: Iterable[int] | Any) -> str:
        """Text of ``ids`` (a sequence of ints, or anything with ``tolist()``)."""

    @abstractmethod
    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of id ``i``."""

    @property
    def bos_id(self) -> int:
        return self.special_ids.bos

    @property
    def eos_id(self) -> int:
        return self.special_ids.eos

    @property
    def pad_id(self) -> int:
        return self.special_ids.pad

    @property
    def eod_id(self) -> int:
        return self.special_ids.eod

    @property
    def model_file(self) -> str | None:
        """The loaded file (kept for callers of the SentencePiece-only interface)."""
        return self.path

    def __reduce__(self):
        if self.path is None:
            raise TypeError(f"{type(self).__name__} built without a path cannot be pickled")
        return Tokenizer.from_path, (self.path, self.backend)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id}, eod={self.eod_id})"
        )


def _as_int_list(ids: Iterable[int] | Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


# --- SentencePiece -----------------------------------------------------------------------------


def _resolve_model_file(p: Path) -> Path:
    if p.is_dir():
        models = sorted(p.glob("*.model"))
        if not models:
            raise FileNotFoundError(
                f"no *.model (SentencePiece) or {HF_TOKENIZER_FILE} (Hugging Face) in tokenizer "
                f"directory {str(p)!r}"
            )
        if len(models) > 1:
            names = ", ".join(m.name for m in models)
            raise ValueError(
                f"tokenizer directory {str(p)!r} holds {len(models)} *.model files ({names}); "
                "pass the file itself"
            )
        return models[0]
    if p.suffix != ".model":
        raise ValueError(f"tokenizer path {str(p)!r} is not a SentencePiece .model file")
    return p


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus its special-token ids.

    LLM-jp-4 gets the fixed ids of the module docstring. Any other model uses what it declares:
    ``bos_id``/``eos_id``/``pad_id`` (pad falls back to eos when undefined) and ``eod_id`` from
    an ``<EOD>`` piece if present, else eos.
    """

    backend = "sentencepiece"

    def __init__(self, sp: spm.SentencePieceProcessor, model_file: str | None = None) -> None:
        self._sp = sp
        is_llmjp4 = _is_llmjp4(sp.get_piece_size(), sp.id_to_piece)
        if is_llmjp4:
            ids = LLMJP4_IDS
        else:
            eos = sp.eos_id()
            eod_piece = sp.piece_to_id("<EOD>")
            ids = SpecialIds(
                bos=sp.bos_id(),
                eos=eos,
                pad=sp.pad_id() if sp.pad_id() >= 0 else eos,
                eod=eod_piece if eod_piece != sp.unk_id() else eos,
            )
        super().__init__(model_file, ids, is_llmjp4)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SentencePieceTokenizer:
        """Load from a ``.model`` file or a directory containing exactly one ``*.model``."""
        model_file = _resolve_model_file(Path(path))
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        return cls(sp, model_file=str(model_file))

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        return self._sp

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, add_bos=False, add_eos=False)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """SentencePiece's batch encoder; ``num_threads`` None lets SentencePiece choose."""
        if not texts:
            return []
        kwargs = {} if num_threads is None else {"num_threads": num_threads}
        return self._sp.encode(list(texts), add_bos=False, add_eos=False, **kwargs)

    def encode_text_batch(
        self, texts: Sequence[str], num_threads: int | None = None
    ) -> list[list[int]]:
        """The batch encoder of a copy of the model whose USER_DEFINED pieces are CONTROL
        pieces, which SentencePiece never matches in text (built once, on first use)."""
        if not texts:
            return []
        kwargs = {} if num_threads is None else {"num_threads": num_threads}
        return self._plain_sp().encode(list(texts), add_bos=False, add_eos=False, **kwargs)

    def _plain_sp(self) -> spm.SentencePieceProcessor:
        plain = getattr(self, "_plain", None)
        if plain is None:
            from sentencepiece import sentencepiece_model_pb2 as pb

            proto = pb.ModelProto()
            proto.ParseFromString(self._sp.serialized_model_proto())
            kind = pb.ModelProto.SentencePiece
            for piece in proto.pieces:
                if piece.type == kind.USER_DEFINED:
                    piece.type = kind.CONTROL
            plain = spm.SentencePieceProcessor()
            plain.LoadFromSerializedProto(proto.SerializeToString())
            self._plain = plain
        return plain

    def decode(self, ids: Iterable[int] | Any) -> str:
        return self._sp.decode(_as_int_list(ids))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


# --- Hugging Face ------------------------------------------------------------------------------


def token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json / special_tokens_map.json: a string
    or an ``AddedToken`` dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {str(path)!r}: {e}") from e
    return data if isinstance(data, dict) else {}


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``) loaded with the ``tokenizers`` library.

    Special tokens: LLM-jp-4 gets the fixed ids; otherwise ``bos_token``/``eos_token``/
    ``pad_token``/``eod_token`` from ``tokenizer_config.json`` (then ``special_tokens_map.json``)
    beside the file, looked up in the vocabulary; pad and eod fall back to eos. Encoding skips
    the post-processor (no BOS/EOS template), like ``encode(text, add_special_tokens=False)`` in
    ``transformers``. Batch encoding uses the library's own threads unless
    ``TOKENIZERS_PARALLELISM=false``.
    """

    backend = "hf"

    def __init__(self, tok: Any, path: str | None = None, config: dict | None = None) -> None:
        self._tok = tok
        n = self.vocab_size
        is_llmjp4 = _is_llmjp4(n, lambda i: tok.id_to_token(i) or "")
        if is_llmjp4:
            ids = LLMJP4_IDS
        else:
            config = config or {}

            def lookup(role: str) -> int:
                name = token_content(config.get(f"{role}_token"))
                i = tok.token_to_id(name) if name is not None else None
                return -1 if i is None else int(i)

            eos = lookup("eos")
            pad, eod = lookup("pad"), lookup("eod")
            ids = SpecialIds(
                bos=lookup("bos"),
                eos=eos,
                pad=pad if pad >= 0 else eos,
                eod=eod if eod >= 0 else eos,
            )
        super().__init__(path, ids, is_llmjp4)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Load ``tokenizer.json`` (or a directory holding it) and the special-token names from
        ``tokenizer_config.json`` / ``special_tokens_map.json`` next to it."""
        p = Path(path)
        file = p / HF_TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(
                f"no {HF_TOKENIZER_FILE} in tokenizer directory {str(p)!r} (a Hugging Face "
                "tokenizer directory must hold the fast tokenizer file; a slow-only one needs "
                "its SentencePiece .model instead)"
            )
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError as e:
            raise ImportError(
                f"loading the Hugging Face tokenizer {str(file)!r} needs the 'tokenizers' "
                "package: pip install tokenizers (or megatron-llmjp[hf])"
            ) from e
        try:
            tok = _HFTok.from_file(str(file))
        except Exception as e:  # the Rust library raises a bare Exception on a bad file
            raise ValueError(f"cannot load Hugging Face tokenizer {str(file)!r}: {e}") from e
        config = _read_json(file.parent / "special_tokens_map.json")
        config.update(_read_json(file.parent / "tokenizer_config.json"))
        return cls(tok, path=str(file), config=config)

    @property
    def hf(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        # Added tokens (special or not) are real ids the model must embed.
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """``num_threads`` is accepted for interface parity; the ``tokenizers`` thread pool is
        process-wide (``RAYON_NUM_THREADS``, ``TOKENIZERS_PARALLELISM``)."""
        if not texts:
            return []
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_text_batch(
        self, texts: Sequence[str], num_threads: int | None = None
    ) -> list[list[int]]:
        """The batch encoder of a copy of the tokenizer (built once) in which no added token
        is matched in text: every added token is special and ``encode_special_tokens`` is set,
        so their text is split like any other; in a Unigram model their vocabulary entries are
        also renamed to strings text cannot spell, so the model cannot choose them either."""
        if not texts:
            return []
        plain = getattr(self, "_plain", None)
        if plain is None:
            spec = json.loads(self._tok.to_str())
            added = spec.get("added_tokens") or []
            for t in added:
                t["special"] = True
            model = spec.get("model") or {}
            if model.get("type") == "Unigram":
                for t in added:
                    i = t.get("id")
                    if isinstance(i, int) and 0 <= i < len(model.get("vocab", [])):
                        model["vocab"][i][0] = f"\x00llmjp-added-{i}\x00"
                        t["content"] = model["vocab"][i][0]
            plain = type(self._tok).from_str(json.dumps(spec))
            plain.encode_special_tokens = True
            self._plain = plain
        return [e.ids for e in plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | Any) -> str:
        return self._tok.decode(_as_int_list(ids), skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        piece = self._tok.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"token id {i} out of range (vocab_size {self.vocab_size})")
        return piece
