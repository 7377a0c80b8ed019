"""The tokenizer files of a Hugging Face release, and what ``generation_config.json`` stops at.

:func:`export_tokenizer` writes, from a tokenizer folder (the LLM-jp-4 SentencePiece folder
``../shared/data/tokenizer/llm-jp-tokenizer-v4.0`` or any folder holding a ``*.model`` and/or a
``tokenizer.json``):

- ``tokenizer.json``: copied when the folder has one, else built from the SentencePiece model
  with transformers' own converter (``SpmConverter.build_tokenizer_from_spm_proto``, which
  follows the model's normalizer spec: Unigram with byte fallback, the dummy prefix, user-defined
  pieces emitted whole). The pieces keep their SentencePiece ids; the folder's
  ``tokenizer_config.json`` ``added_tokens_decoder`` renames them by id (LLM-jp-4: ``<s>`` ->
  ``<|startoftext|>``, ``<EOD>`` -> ``<|eod|>``, ...), and every UNKNOWN, CONTROL and
  USER_DEFINED piece becomes a special added token at its own id, so ``len(tokenizer)`` is the
  SentencePiece vocabulary (196,608) and nothing is appended after it.
- **BOS policy**: the built tokenizer adds no BOS (no post-processor; ``add_bos_token: false``).
  The trainer encodes every document without BOS and appends EOD (``data/preprocess.py``), so
  id 1 never appears in training data and its embedding is untrained; what the released model
  sees at inference is then what it saw in training. A copied ``tokenizer.json`` keeps its own
  post-processor.
- ``tokenizer_config.json``: the folder's, without ``auto_map``/``sp_model_kwargs`` (no remote
  code), ``tokenizer_class: PreTrainedTokenizerFast``, ``model_input_names: [input_ids,
  attention_mask]`` (transformers 4.57's ``generate()`` needs it), ``added_tokens_decoder``
  from ``tokenizer.json`` and the chat template; ``special_tokens_map.json``;
  ``chat_template.jinja``; the SentencePiece model as ``tokenizer.model``.

Stop tokens (:attr:`TokenizerExport.stop_ids`): the tokenizer's EOD (what ends every training
document), its EOS (``<|return|>``, which ends the final assistant message of the chat
template) and the pieces of :data:`CHAT_STOP_PIECES` that the vocabulary and the chat template
both contain (``<|call|>`` ends a tool-call turn). ``<|end|>`` is not one: in the LLM-jp-4 chat
template it ends a message after which the assistant continues.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_llmjp.convert.transforms import ConversionError
from megatron_llmjp.data.tokenizer import token_content

# Chat pieces that end an assistant turn besides EOS, looked up by name in the exported
# vocabulary (harmony-style chat template of LLM-jp-4: a tool call ends with <|call|>).
CHAT_STOP_PIECES = ("<|call|>",)
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
# tokenizer_config.json keys that name remote code or slow-tokenizer options: never exported.
DROPPED_CONFIG_KEYS = ("auto_map", "sp_model_kwargs", "legacy", "vocab_file", "tokenizer_file")
SPECIAL_ROLES = ("bos", "eos", "pad", "unk", "cls", "sep", "mask", "eod")
# SentencePiece piece types (sentencepiece_model.proto): 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED.
_SPECIAL_PIECE_TYPES = (2, 3, 4)


@dataclass(frozen=True)
class TokenizerExport:
    """What :func:`export_tokenizer` wrote and the ids ``config.json`` and
    ``generation_config.json`` take from it."""

    token_ids: dict[str, int]
    """``bos_token_id``/``eos_token_id``/``pad_token_id`` for ``config.json``."""
    eod_id: int
    stop_ids: list[int]
    """``generation_config.json``'s ``eos_token_id``: EOS first, then EOD and chat stops."""
    vocab_size: int
    """Ids the tokenizer can produce (``len(AutoTokenizer)``)."""
    built: bool
    """True when ``tokenizer.json`` was built from the SentencePiece model, False if copied."""


def _source_dir(tokenizer: str | Path) -> Path:
    src = Path(tokenizer)
    if not src.exists():
        raise ConversionError(f"--tokenizer {tokenizer}: does not exist")
    return src if src.is_dir() else src.parent


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def build_tokenizer_json(model_file: Path, names: dict[int, str]) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the SentencePiece ``model_file``.

    ``names``: id -> piece name replacing the SentencePiece piece at that id (the source
    folder's ``added_tokens_decoder``). Every UNKNOWN/CONTROL/USER_DEFINED piece is registered
    as a special added token at its own id. No post-processor (no BOS/EOS added).

    Raises ``ConversionError`` for a non-Unigram model or a transformers without the converter.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    if not hasattr(SpmConverter, "build_tokenizer_from_spm_proto"):
        raise ConversionError(
            "building tokenizer.json from a SentencePiece model needs a transformers with "
            "SpmConverter.build_tokenizer_from_spm_proto (pip install -U 'transformers>=5')"
        )
    proto = pb.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    if proto.trainer_spec.model_type != 1:
        raise ConversionError(
            f"{model_file}: SentencePiece model type {proto.trainer_spec.model_type} is not "
            "Unigram; pass a folder with its tokenizer.json instead"
        )
    vocab = [(names.get(i, p.piece), p.score) for i, p in enumerate(proto.pieces)]
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if tok is None:
        raise ConversionError(f"{model_file}: transformers could not convert this model")
    specials = [
        AddedToken(vocab[i][0], normalized=False, special=True)
        for i, p in enumerate(proto.pieces)
        if p.type in _SPECIAL_PIECE_TYPES
    ]
    tok.add_special_tokens(specials)
    if tok.get_vocab_size(with_added_tokens=True) != len(proto.pieces):
        raise ConversionError(
            f"{model_file}: the converted tokenizer has "
            f"{tok.get_vocab_size(with_added_tokens=True)} ids, the model {len(proto.pieces)} "
            "(duplicate piece names?)"
        )
    return tok


def _adds_bos(tokenizer_json: dict, bos: str | None) -> bool:
    """Whether the post-processor of ``tokenizer.json`` inserts the BOS piece ``bos``."""
    post = tokenizer_json.get("post_processor")
    return bool(bos and post and json.dumps(bos) in json.dumps(post))


def _stop_ids(vocab: dict[str, int], eos: int, eod: int, chat_template: str | None) -> list[int]:
    out = [i for i in (eos, eod) if i >= 0]
    for piece in CHAT_STOP_PIECES:
        if piece in vocab and chat_template and piece in chat_template:
            out.append(vocab[piece])
    return list(dict.fromkeys(out))


def export_tokenizer(tokenizer: str | Path, out: Path) -> TokenizerExport:
    """Write the tokenizer files of a release into ``out`` (see the module docstring).

    The ids for ``config.json`` come from :class:`megatron_llmjp.data.tokenizer.Tokenizer` (the
    trainer's view: LLM-jp-4 bos/eos/pad/eod 1/2/4/6, resolved by id); the role names in
    ``tokenizer_config.json`` are the folder's, so a ``tokenizer.json`` whose pieces sit at
    other ids than the trainer's shows as a bos/eos/pad mismatch in the parity check. Raises
    ``ConversionError`` when the folder has no tokenizer or unreadable JSON.
    """
    from tokenizers import Tokenizer as HFTok

    from megatron_llmjp.data.tokenizer import Tokenizer

    src = _source_dir(tokenizer)
    models = sorted(src.glob("*.model"))
    has_json = (src / "tokenizer.json").is_file()
    if not models and not has_json:
        raise ConversionError(
            f"--tokenizer {tokenizer}: no SentencePiece *.model or tokenizer.json found"
        )
    try:
        ours = Tokenizer.from_path(src)
    except (OSError, ValueError) as e:
        raise ConversionError(f"--tokenizer {tokenizer}: {e}") from e
    config = _read_json(src / "special_tokens_map.json")
    config.update(_read_json(src / "tokenizer_config.json"))
    chat_template = config.get("chat_template")
    if (src / "chat_template.jinja").is_file():
        chat_template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    if has_json:
        shutil.copy2(src / "tokenizer.json", out / "tokenizer.json")
    else:
        names = {
            int(i): token_content(v)
            for i, v in (config.get("added_tokens_decoder") or {}).items()
            if token_content(v) is not None
        }
        build_tokenizer_json(models[0], names).save(str(out / "tokenizer.json"))
    if models:
        shutil.copy2(models[0], out / "tokenizer.model")
    data = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    hf = HFTok.from_file(str(out / "tokenizer.json"))
    vocab = hf.get_vocab(with_added_tokens=True)
    id_to_name = {i: n for n, i in vocab.items()}
    ids = ours.special_ids
    roles = {"bos": ids.bos, "eos": ids.eos, "pad": ids.pad, "eod": ids.eod}
    cfg = {k: v for k, v in config.items() if k not in DROPPED_CONFIG_KEYS}
    for role in SPECIAL_ROLES:
        # The folder's name for a role wins (the parity check then compares its id in the
        # exported tokenizer with config.json's); a role it does not name gets the piece at
        # the trainer's id.
        name, i = token_content(cfg.get(f"{role}_token")), roles.get(role, -1)
        if name is not None and name in vocab:
            cfg[f"{role}_token"] = name
        elif i is not None and i >= 0 and i in id_to_name:
            cfg[f"{role}_token"] = id_to_name[i]
        else:
            cfg.pop(f"{role}_token", None)
    added = sorted(data.get("added_tokens", []), key=lambda t: t["id"])
    cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        model_input_names=MODEL_INPUT_NAMES,
        add_bos_token=_adds_bos(data, id_to_name.get(ids.bos)),
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        added_tokens_decoder={str(t["id"]): {k: t[k] for k in t if k != "id"} for t in added},
    )
    if chat_template:
        cfg["chat_template"] = chat_template
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(
        out / "special_tokens_map.json",
        {f"{r}_token": cfg[f"{r}_token"] for r in SPECIAL_ROLES if f"{r}_token" in cfg},
    )
    return TokenizerExport(
        token_ids={"bos_token_id": ids.bos, "eos_token_id": ids.eos, "pad_token_id": ids.pad},
        eod_id=ids.eod,
        stop_ids=_stop_ids(vocab, ids.eos, ids.eod, chat_template),
        vocab_size=hf.get_vocab_size(with_added_tokens=True),
        built=not has_json,
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
