"""Hugging Face export directory -> one GGUF file for llama.cpp (``llmjp-convert hf-to-gguf``).

Input: what ``llmjp-convert mcore-to-hf`` writes (``config.json``, safetensors shards, the
tokenizer with its SentencePiece ``tokenizer.model``). Output: a GGUF v3 file written with the
``gguf`` package (llama.cpp's own Python writer; key names from ``gguf.Keys``, tensor names from
``gguf.get_tensor_name_map``), laid out as llama.cpp's ``convert_hf_to_gguf.py`` lays out these
two architectures:

- ``LlamaForCausalLM`` -> GGUF architecture ``llama``. ``attn_q``/``attn_k`` rows are permuted
  per head from Hugging Face's rotate-half RoPE order to llama.cpp's interleaved (GPT-J) order:
  ``w.reshape(heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(w.shape)`` with the query heads
  for ``q_proj`` and the key-value heads for ``k_proj`` (``LlamaModel.permute`` there).
- ``Qwen3MoeForCausalLM`` -> ``qwen3moe``. No permutation (llama.cpp applies NeoX RoPE to this
  architecture); ``attn_q_norm``/``attn_k_norm`` kept; the per-expert
  ``mlp.experts.E.{gate,up,down}_proj`` matrices are stacked, expert-major, into
  ``ffn_gate_exps``/``ffn_up_exps``/``ffn_down_exps`` of torch shape ``(experts, out, in)``;
  the router ``mlp.gate`` is ``ffn_gate_inp``.

Tensor types: ``f32``, ``f16`` or ``bf16`` for the matrices (``auto``: the export's
``torch_dtype``, float32 -> f32); as in ``convert_hf_to_gguf.py`` 1-D tensors (the RMSNorm
weights) and the MoE router stay F32 whatever the choice. Casts are torch's ``Tensor.copy_``
(round to nearest even); bf16 -> f32 and f32 -> f32 are exact.

Vocabulary: llama.cpp's SentencePiece vocabulary (``tokenizer.ggml.model = "llama"``) from
``tokenizer.model``: every piece, its score and its SentencePiece type (NORMAL, UNKNOWN,
CONTROL, USER_DEFINED, UNUSED, BYTE, the numbering of ``gguf.TokenType``); then, as llama.cpp's
converter does, the entries of ``tokenizer_config.json``'s ``added_tokens_decoder`` replace the
text at their ids (``special: true`` -> CONTROL, else USER_DEFINED; score -1000), so the special
pieces carry the names the chat template uses (LLM-jp-4: ``<|startoftext|>`` at id 1, ...).
A vocabulary shorter than ``config.json``'s ``vocab_size`` is padded with ``[PAD<id>]`` UNUSED
entries; a longer one is refused. bos/eos/pad ids come from ``config.json`` (checked against the
tokenizer's), unknown from the SentencePiece model, EOT from the tokenizer's end-of-document
piece (so llama.cpp stops where training documents end), add-BOS/add-EOS from
``tokenizer_config.json`` (``add_bos_token`` absent: false, the trainer's policy: documents
are encoded without BOS; llama.cpp would otherwise assume true for this vocabulary type, so the
key is always written), the chat template from ``tokenizer_config.json`` or ``chat_template.jinja``.

Streaming: tensor by tensor, each read in blocks of rows straight into the output array, so the
peak memory is about the largest output tensor (the embedding, or one layer's stacked experts).
Written to ``.NAME.tmp-PID`` beside the output and renamed at the end; on any error nothing is
left.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_llmjp.convert.hf_config import check_fields, read_hf_config
from megatron_llmjp.convert.safetensors_io import HFReader
from megatron_llmjp.convert.transforms import ConversionError

OUTTYPES = ("auto", "f32", "f16", "bf16")
BLOCK_BYTES = 64 << 20
"""Rows are read in blocks of at most this many bytes of source tensor."""
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3moe"}
"""HF architecture -> GGUF architecture name (``gguf.MODEL_ARCH_NAMES``)."""
_AUTO = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - the extra is installed in tests
        raise ConversionError(
            "GGUF export needs the gguf package: pip install 'megatron-llmjp[gguf]'"
        ) from e
    return gguf


@dataclass
class GGUFReport:
    """What :func:`hf_to_gguf` wrote."""

    output: Path
    architecture: str
    outtype: str
    tensors: int
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Tensor:
    """One GGUF tensor: its name, torch-order shape, storage, and the HF tensors it is made of
    (several: experts stacked along a new first axis)."""

    name: str
    shape: tuple[int, ...]
    f32: bool
    sources: tuple[str, ...]
    permute_heads: int | None = None


@dataclass(frozen=True)
class Vocab:
    """llama.cpp's SentencePiece-style vocabulary and special ids (-1: undefined)."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    pad: int
    unk: int
    eot: int
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def llama_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q/k projection ``(heads * head_dim, in)`` from HF's rotate-half order to
    llama.cpp's interleaved RoPE order (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``):
    within each head, row ``t * head_dim/2 + i`` moves to ``2 * i + t``."""
    rows = w.shape[0]
    if rows % (2 * heads):
        raise ConversionError(f"cannot permute {tuple(w.shape)} for {heads} RoPE heads")
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _cfg(cfg: dict, path: Path, *names: str):
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    raise ConversionError(f"{path}: missing field {names[0]!r}")


def _plan(cfg: dict, path: Path, gguf, arch_name: str) -> list[_Tensor]:
    """Every GGUF tensor in llama.cpp's order (embedding, per layer, final norm, output)."""
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    layers = _cfg(cfg, path, "num_hidden_layers")
    names = gguf.get_tensor_name_map(arch, layers)
    hidden = _cfg(cfg, path, "hidden_size")
    heads = _cfg(cfg, path, "num_attention_heads")
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or hidden // heads
    vocab = _cfg(cfg, path, "vocab_size")
    moe = arch_name == "qwen3moe"

    def t(hf: str, shape: tuple[int, ...], permute: int | None = None) -> _Tensor:
        name = names.get_name(hf, try_suffixes=(".weight",))
        if name is None:  # pragma: no cover - gguf's table covers both architectures
            raise ConversionError(f"gguf has no {arch_name} tensor for {hf}")
        return _Tensor(name, shape, len(shape) == 1, (hf,), permute)

    plan = [t("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [
            t(p + "input_layernorm.weight", (hidden,)),
            t(p + "self_attn.q_proj.weight", (heads * hd, hidden), None if moe else heads),
            t(p + "self_attn.k_proj.weight", (kv * hd, hidden), None if moe else kv),
            t(p + "self_attn.v_proj.weight", (kv * hd, hidden)),
            t(p + "self_attn.o_proj.weight", (hidden, heads * hd)),
        ]
        if moe:
            plan += [
                t(p + "self_attn.q_norm.weight", (hd,)),
                t(p + "self_attn.k_norm.weight", (hd,)),
            ]
        plan.append(t(p + "post_attention_layernorm.weight", (hidden,)))
        if not moe:
            ffn = _cfg(cfg, path, "intermediate_size")
            plan += [
                t(p + "mlp.gate_proj.weight", (ffn, hidden)),
                t(p + "mlp.up_proj.weight", (ffn, hidden)),
                t(p + "mlp.down_proj.weight", (hidden, ffn)),
            ]
            continue
        n_exp = _cfg(cfg, path, "num_experts", "num_local_experts")
        ffn = _cfg(cfg, path, "moe_intermediate_size")
        router = t(p + "mlp.gate.weight", (n_exp, hidden))
        plan.append(_Tensor(router.name, router.shape, True, router.sources))  # F32 as llama.cpp
        for w, shape in (
            ("gate_proj", (ffn, hidden)),
            ("up_proj", (ffn, hidden)),
            ("down_proj", (hidden, ffn)),
        ):
            stacked = names.get_name(f"{p}mlp.experts.{w}.weight", try_suffixes=(".weight",))
            srcs = tuple(f"{p}mlp.experts.{e}.{w}.weight" for e in range(n_exp))
            plan.append(_Tensor(stacked, (n_exp, *shape), False, srcs))
    plan.append(t("model.norm.weight", (hidden,)))
    if not cfg.get("tie_word_embeddings", False):
        plan.append(t("lm_head.weight", (vocab, hidden)))
    return plan


def _check_sources(plan: list[_Tensor], reader: HFReader, directory: Path) -> None:
    """Every planned source present with its shape; no stored tensor left unused."""
    wanted = {s: (t.shape[1:] if len(t.sources) > 1 else t.shape) for t in plan for s in t.sources}
    stored = set(reader.names())
    missing = sorted(set(wanted) - stored)
    if missing:
        raise ConversionError(
            f"{directory}: {len(missing)} tensor(s) that config.json implies are missing, "
            f"e.g. {missing[:3]}"
        )
    extra = sorted(stored - set(wanted))
    if extra:
        raise ConversionError(
            f"{directory}: tensor(s) with no GGUF counterpart (never dropped silently): {extra[:3]}"
        )
    for name, shape in wanted.items():
        got = reader.entry(name).shape
        if tuple(got) != tuple(shape):
            raise ConversionError(
                f"{directory}: {name} has shape {tuple(got)}, config.json implies {tuple(shape)}"
            )


def read_vocab(directory: Path, cfg: dict, vocab_size: int) -> Vocab:
    """The vocabulary of ``directory/tokenizer.model`` (plus ``tokenizer_config.json``) as
    llama.cpp's SentencePiece-style vocabulary of exactly ``vocab_size`` entries.

    Raises :class:`ConversionError` without ``tokenizer.model``, with more pieces than
    ``vocab_size``, or when ``config.json``'s bos/eos/pad disagree with the tokenizer's."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from megatron_llmjp.data.tokenizer import Tokenizer

    directory = Path(directory)
    model_path = directory / "tokenizer.model"
    if not model_path.is_file():
        raise ConversionError(
            f"{directory}: no tokenizer.model; GGUF export writes llama.cpp's SentencePiece "
            "vocabulary from it (export with --tokenizer pointing at the SentencePiece tokenizer)"
        )
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as e:  # protobuf's DecodeError
        raise ConversionError(f"{model_path}: not a SentencePiece model ({e})") from e
    pieces = list(proto.pieces)
    if not pieces:
        raise ConversionError(f"{model_path}: not a SentencePiece model (no pieces)")
    if len(pieces) > vocab_size:
        raise ConversionError(
            f"{model_path}: {len(pieces)} pieces but config.json's vocab_size is {vocab_size}; "
            "the model cannot embed every token id"
        )
    tokens = [p.piece for p in pieces] + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)]
    scores = [float(p.score) for p in pieces] + [-1000.0] * (vocab_size - len(pieces))
    # SentencePiece's ModelProto.SentencePiece.Type uses gguf.TokenType's numbering (1..6).
    types = [int(p.type) for p in pieces] + [5] * (vocab_size - len(pieces))
    tok_cfg_path = directory / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8")) if tok_cfg_path.is_file() else {}
    for key, entry in (tok_cfg.get("added_tokens_decoder") or {}).items():
        i = int(key)
        if i >= vocab_size:
            continue
        text = entry["content"]
        special = bool(entry.get("special"))
        tokens[i] = text if special else text.replace("\u2581", " ")
        types[i] = 3 if special else 4
        scores[i] = -1000.0

    sp = Tokenizer.from_path(model_path).special_ids
    ids = {}
    for role, tok_id in (("bos", sp.bos), ("eos", sp.eos), ("pad", sp.pad)):
        declared = cfg.get(f"{role}_token_id")
        if isinstance(declared, list):
            declared = declared[0] if declared else None
        if declared is not None and tok_id >= 0 and declared != tok_id:
            raise ConversionError(
                f"{directory}: config.json {role}_token_id={declared} but the tokenizer's "
                f"{role} id is {tok_id}"
            )
        ids[role] = declared if declared is not None else tok_id
    unk = next(
        (i for i, p in enumerate(pieces) if p.type == pb.ModelProto.SentencePiece.UNKNOWN), -1
    )
    eot = sp.eod if sp.eod not in (ids["eos"], -1) else -1
    for role, i in (*ids.items(), ("unk", unk), ("eot", eot)):
        if i >= vocab_size:
            raise ConversionError(f"{directory}: {role} id {i} is outside the vocabulary")
    template = tok_cfg.get("chat_template")
    if not isinstance(template, str) and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return Vocab(
        tokens=tokens,
        scores=scores,
        types=types,
        bos=ids["bos"],
        eos=ids["eos"],
        pad=ids["pad"],
        unk=unk,
        eot=eot,
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        add_eos=bool(tok_cfg.get("add_eos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )


def _metadata(w, cfg: dict, path: Path, arch_name: str, vocab: Vocab, file_type, name: str) -> None:
    """Model and tokenizer keys (names: ``gguf.Keys``, written by ``GGUFWriter.add_*``)."""
    gguf = _gguf()
    hidden = _cfg(cfg, path, "hidden_size")
    heads = _cfg(cfg, path, "num_attention_heads")
    hd = cfg.get("head_dim") or hidden // heads
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta")
    if rope is None:
        raise ConversionError(f"{path}: missing field 'rope_theta'")
    w.add_type("model")
    w.add_name(name)
    w.add_vocab_size(_cfg(cfg, path, "vocab_size"))
    w.add_context_length(_cfg(cfg, path, "max_position_embeddings"))
    w.add_embedding_length(hidden)
    w.add_block_count(_cfg(cfg, path, "num_hidden_layers"))
    w.add_feed_forward_length(_cfg(cfg, path, "intermediate_size"))
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(_cfg(cfg, path, "rms_norm_eps")))
    if arch_name == "qwen3moe":
        w.add_expert_count(_cfg(cfg, path, "num_experts", "num_local_experts"))
        w.add_expert_used_count(_cfg(cfg, path, "num_experts_per_tok"))
        w.add_expert_feed_forward_length(_cfg(cfg, path, "moe_intermediate_size"))
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    for role, add in (
        ("bos", w.add_bos_token_id),
        ("eos", w.add_eos_token_id),
        ("pad", w.add_pad_token_id),
        ("unk", w.add_unk_token_id),
        ("eot", w.add_eot_token_id),
    ):
        if getattr(vocab, role) >= 0:
            add(getattr(vocab, role))
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def _fill(reader: HFReader, src: str, out: torch.Tensor, permute: int | None) -> None:
    """Copy HF tensor ``src`` into ``out`` (cast by ``copy_``), in blocks of rows."""
    if permute is not None:  # q/k projections: small enough to permute whole
        out.copy_(llama_permute(reader.read(src), permute))
        return
    e = reader.entry(src)
    rows = e.shape[0]
    row_bytes = max(1, e.nbytes // max(rows, 1))
    step = max(1, BLOCK_BYTES // row_bytes)
    for a in range(0, rows, step):
        b = min(rows, a + step)
        out[a:b].copy_(reader.read(src, rows=(a, b)))


def hf_to_gguf(
    input_dir: str | os.PathLike[str],
    output: str | os.PathLike[str],
    outtype: str = "auto",
    force: bool = False,
    progress: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> GGUFReport:
    """Write ``output`` (a GGUF file) from the HF export ``input_dir``.

    ``outtype``: ``auto`` | ``f32`` | ``f16`` | ``bf16`` (matrices; norms and the router stay
    F32). Raises :class:`ConversionError` (CLI exit 2, nothing written) for an unknown
    architecture, a missing ``config.json``/``tokenizer.model``/shard, a tensor set or shape
    that disagrees with ``config.json``, or an existing ``output`` without ``force``."""
    gguf = _gguf()
    t0 = time.monotonic()
    src, out = Path(input_dir), Path(output)
    if not src.is_dir():
        raise ConversionError(f"--input {src}: not a directory")
    cfg = read_hf_config(src)
    path = src / "config.json"
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConversionError(
            f"{path}: architectures={archs!r}; GGUF export supports {sorted(ARCHITECTURES)}"
        )
    check_fields(cfg, path)  # e.g. a RoPE scaling llama.cpp would not be told about
    arch_name = ARCHITECTURES[archs[0]]
    if arch_name == "qwen3moe" and cfg.get("norm_topk_prob") is False:
        raise ConversionError(
            f"{path}: norm_topk_prob=false; llama.cpp's qwen3moe always renormalises the top-k "
            "routing weights, so the GGUF would compute a different model"
        )
    if outtype not in OUTTYPES:
        raise ConversionError(f"outtype {outtype!r}; expected one of {OUTTYPES}")
    if outtype == "auto":
        outtype = _AUTO.get(cfg.get("torch_dtype") or cfg.get("dtype") or "float32", "f32")
    if out.exists() and not force:
        raise ConversionError(f"--output {out} exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise ConversionError(f"--output {out}: directory {out.parent} does not exist")
    vocab_size = _cfg(cfg, path, "vocab_size")
    vocab = read_vocab(src, cfg, vocab_size)
    reader = HFReader(src)
    plan = _plan(cfg, path, gguf, arch_name)
    _check_sources(plan, reader, src)

    Q = gguf.GGMLQuantizationType
    mat = {
        "f32": (Q.F32, np.float32, torch.float32, gguf.LlamaFileType.ALL_F32),
        "f16": (Q.F16, np.float16, torch.float16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (Q.BF16, np.int16, torch.bfloat16, gguf.LlamaFileType.MOSTLY_BF16),
    }
    f32 = mat["f32"]
    w = gguf.GGUFWriter(path=None, arch=arch_name)
    _metadata(w, cfg, path, arch_name, vocab, mat[outtype][3], src.resolve().name)
    total = 0
    for t in plan:
        qtype, np_dtype, _, _ = f32 if t.f32 else mat[outtype]
        nbytes = int(np.prod(t.shape)) * np.dtype(np_dtype).itemsize
        w.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), nbytes, raw_dtype=qtype)
        total += nbytes
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            _, np_dtype, torch_dtype, _ = f32 if t.f32 else mat[outtype]
            arr = np.empty(t.shape, dtype=np_dtype)
            view = torch.from_numpy(arr).view(torch_dtype)
            if len(t.sources) == 1:
                _fill(reader, t.sources[0], view, t.permute_heads)
            else:
                for e, s in enumerate(t.sources):
                    _fill(reader, s, view[e], None)
            w.write_tensor_data(arr)
            del arr, view
            if on_tensor is not None:
                on_tensor(t.name)
            if progress:
                print(f"  {t.name} {t.shape}", flush=True)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFReport(
        output=out,
        architecture=arch_name,
        outtype=outtype,
        tensors=len(plan),
        bytes=total,
        seconds=time.monotonic() - t0,
    )
