"""``config.json`` / ``generation_config.json`` <-> the manifest's ``model`` section.

The fields are written in the names transformers 4.x reads (``rope_theta``, ``num_experts``,
``torch_dtype``) and, where transformers 5 renamed them, in its names too (``rope_parameters``,
``dtype``), so a release loads in both and in the serving stacks that read the 4.x names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_llmjp.config.schema import ModelConfig
from megatron_llmjp.convert.transforms import ConversionError
from megatron_llmjp.models.registry import MODELS

# LLM-jp-4 tokenizer ids (SPECS; the data.tokenizer module resolves them by id as well).
LLMJP4_TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 4}
_MODEL_TYPE = {"LlamaForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3_moe"}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


# config.json fields every export sets itself (the output dtype, --tokenizer's ids), never
# taken from a recorded release config.
_EXPORT_OWNED = ("torch_dtype", "dtype", "transformers_version")
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def to_hf_config(
    model: dict, dtype: torch.dtype, token_ids: dict[str, int], *, tokenizer_ids: bool = False
) -> dict:
    """``config.json`` for a manifest ``model`` section.

    The fields of the release the model was imported from (``model["hf_config"]``, see
    :func:`release_fields`) are written back when its architecture is this one, except the
    dtype and, when ``tokenizer_ids`` (the ids come from an exported tokenizer), the token ids.
    """
    cfg = _derived_config(model, dtype, token_ids)
    recorded = model.get("hf_config") or {}
    if recorded.get("architectures") == cfg["architectures"]:
        owned = (*_EXPORT_OWNED, *(_TOKEN_KEYS if tokenizer_ids else ()))
        cfg.update({k: v for k, v in recorded.items() if k not in owned})
    return cfg


def release_fields(hf_cfg: dict, model: dict) -> dict:
    """The fields of an input ``config.json`` that :func:`to_hf_config` would not reproduce
    from the manifest ``model`` section alone (e.g. a Qwen3-MoE ``intermediate_size`` of 96
    while the export derives the expert size), plus ``architectures`` as the guard that they
    belong to this architecture. Recorded at import (``ModelConfig.hf_config``)."""
    derived = _derived_config(model, torch.float32, LLMJP4_TOKEN_IDS)
    out = {
        k: v
        for k, v in hf_cfg.items()
        if k not in _EXPORT_OWNED and (k not in derived or derived[k] != v)
    }
    return {"architectures": derived["architectures"], **out} if out else {}


def _derived_config(model: dict, dtype: torch.dtype, token_ids: dict[str, int]) -> dict:
    arch = model["hf_architecture"]
    moe = model.get("moe")
    cfg = {
        "architectures": [arch],
        "model_type": _MODEL_TYPE[arch],
        "vocab_size": model["vocab_size"],
        "hidden_size": model["hidden_size"],
        "intermediate_size": model["ffn_hidden_size"] or moe["moe_ffn_hidden_size"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "num_key_value_heads": model["num_query_groups"],
        "head_dim": model["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": model["max_position_embeddings"],
        "rms_norm_eps": model["norm_epsilon"],
        "rope_theta": model["rope"]["base"],
        "rope_parameters": {"rope_theta": model["rope"]["base"], "rope_type": "default"},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": model["init_method_std"],
        "tie_word_embeddings": model["tie_word_embeddings"],
        "use_cache": True,
        "torch_dtype": DTYPE_NAMES[dtype],
        "dtype": DTYPE_NAMES[dtype],
        **token_ids,
    }
    if arch == "LlamaForCausalLM":
        cfg.update(mlp_bias=False, pretraining_tp=1)
    else:
        router = moe["router"]
        cfg.update(
            moe_intermediate_size=moe["moe_ffn_hidden_size"],
            num_experts=moe["num_experts"],
            num_experts_per_tok=moe["router_topk"],
            norm_topk_prob=router["norm_topk_prob"],
            router_aux_loss_coef=router["aux_loss_coeff"],
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            use_sliding_window=False,
            sliding_window=None,
        )
    return cfg


def generation_config(token_ids: dict[str, int], stop_ids: list[int]) -> dict:
    """``generation_config.json``: bos/pad as ``config.json``; ``eos_token_id`` lists
    ``config.json``'s EOS first, then ``stop_ids`` (the tokenizer's EOD and chat end tokens:
    ``hf_tokenizer.TokenizerExport.stop_ids``), so ``generate()`` stops at any of them."""
    eos = list(dict.fromkeys([token_ids["eos_token_id"], *stop_ids]))
    return {**token_ids, "eos_token_id": eos if len(eos) > 1 else eos[0]}


def read_hf_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory}: no config.json; not a Hugging Face model directory")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    return cfg


# -- the fields of an input config.json --------------------------------------------------------
# Every field transformers 4.57 and 5.x write for the two architectures (both spellings where
# they differ), and the fields mcore-to-hf writes, is in exactly one table: MAPPED (read into
# the model section), FIXED (only the value the trainer's model computes is accepted) or
# IGNORED (harmless, with the reason). Any other field is refused by name unless it is null,
# so a model feature the converter does not know (a new RoPE variant, a quantisation config,
# a bias) can never be dropped silently.

_MAPPED_COMMON = {
    "architectures": "model.family (LlamaForCausalLM: dense, Qwen3MoeForCausalLM: moe)",
    "vocab_size": "model.vocab_size",
    "hidden_size": "model.hidden_size",
    "num_hidden_layers": "model.num_layers",
    "num_attention_heads": "model.num_attention_heads",
    "num_key_value_heads": "model.num_query_groups",
    "head_dim": "model.kv_channels",
    "max_position_embeddings": "model.max_position_embeddings",
    "rms_norm_eps": "model.norm_epsilon",
    "rope_theta": "model.rotary_base (transformers 4.x spelling)",
    "tie_word_embeddings": "model.tie_word_embeddings",
    "initializer_range": "model.init_method_std",
    "torch_dtype": "the checkpoint dtype (transformers 4.x spelling)",
    "dtype": "the checkpoint dtype (transformers 5.x spelling)",
}
_MAPPED = {
    "LlamaForCausalLM": {**_MAPPED_COMMON, "intermediate_size": "model.ffn_hidden_size"},
    "Qwen3MoeForCausalLM": {
        **_MAPPED_COMMON,
        "moe_intermediate_size": "model.moe_ffn_hidden_size",
        "num_experts": "model.num_experts (transformers 4.x spelling)",
        "num_local_experts": "model.num_experts (transformers 5.x spelling)",
        "num_experts_per_tok": "model.moe_router_topk",
        "norm_topk_prob": "model.moe_norm_topk_prob",
        "router_aux_loss_coef": "model.moe_aux_loss_coeff",
    },
}


def _rope_problem(value) -> str | None:
    """Why a ``rope_scaling`` / ``rope_parameters`` value is not plain RoPE, or None. Both
    spellings of the type (``rope_type``; ``type`` before transformers 4.45) are read."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        return "expected a mapping"
    kind = value.get("rope_type", value.get("type", "default"))
    if kind != "default":
        return f"RoPE scaling {kind!r} is not supported (the trainer's RoPE is unscaled)"
    extra = sorted(set(value) - {"rope_type", "type", "rope_theta"})
    if extra:
        return f"RoPE parameters {extra} are not supported (the trainer's RoPE is unscaled)"
    return None


def _equals(*allowed):
    """A FIXED check: the value must equal one of ``allowed`` (a bool only a bool)."""

    def check(value) -> str | None:
        ok = any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)
        return None if ok else f"is not supported (only {' or '.join(map(repr, allowed))})"

    return check


_FIXED_COMMON = {
    "hidden_act": _equals("silu"),
    "attention_bias": _equals(False),
    "attention_dropout": _equals(0.0, 0),
    "rope_scaling": _rope_problem,
    "rope_parameters": _rope_problem,
}
_FIXED = {
    "LlamaForCausalLM": {
        **_FIXED_COMMON,
        "model_type": _equals("llama"),  # AutoConfig picks the config class by it
        "mlp_bias": _equals(False),
        "pretraining_tp": _equals(1),
    },
    "Qwen3MoeForCausalLM": {
        **_FIXED_COMMON,
        "model_type": _equals("qwen3_moe"),
        "decoder_sparse_step": _equals(1),
        "mlp_only_layers": _equals([]),
        "use_sliding_window": _equals(False),
    },
}
_SLIDING = "read only with use_sliding_window=true (refused)"
_IGNORED_COMMON = {
    "transformers_version": "the version of transformers that wrote the file",
    "_name_or_path": "where transformers loaded the model from",
    "use_cache": "an inference option (KV cache)",
    "bos_token_id": "a tokenizer id: kept for the export, no weight depends on it",
    "eos_token_id": "a tokenizer id: kept for the export, no weight depends on it",
    "pad_token_id": "a tokenizer id: kept for the export, no weight depends on it",
}
_IGNORED = {
    "LlamaForCausalLM": _IGNORED_COMMON,
    "Qwen3MoeForCausalLM": {
        **_IGNORED_COMMON,
        "intermediate_size": "no layer uses it without mlp_only_layers; kept for the export",
        "output_router_logits": "an output option of the HF model",
        "sliding_window": _SLIDING,
        "max_window_layers": _SLIDING,
    },
}


def field_table(arch: str) -> dict[str, str]:
    """Every ``config.json`` field hf-to-mcore accepts for ``arch``, with how it is used
    (``mapped: ...``, ``fixed``, ``ignored: <reason>``)."""
    return {
        **{k: f"mapped: {v}" for k, v in _MAPPED[arch].items()},
        **dict.fromkeys(_FIXED[arch], "fixed"),
        **{k: f"ignored: {v}" for k, v in _IGNORED[arch].items()},
    }


def check_fields(cfg: dict, path: Path) -> None:
    """Refuse, naming each, every field of ``cfg`` (a supported architecture's config) that
    the converter would drop: a field outside the tables with a non-null value, a FIXED field
    with another value, a RoPE scaling in either spelling, or two spellings that disagree."""
    arch = cfg["architectures"][0]
    fixed, known = _FIXED[arch], field_table(arch)
    problems = []
    for name, value in cfg.items():
        if name in fixed:
            why = None if value is None else fixed[name](value)
            if why:
                problems.append(f"{name}={value!r}: {why}")
        elif name not in known and value is not None:
            problems.append(
                f"{name}={value!r}: not a field the converter maps (refusing to drop it)"
            )
    for a, b in (("num_experts", "num_local_experts"), ("torch_dtype", "dtype")):
        if cfg.get(a) is not None and cfg.get(b) is not None and cfg[a] != cfg[b]:
            problems.append(f"{a}={cfg[a]!r} and {b}={cfg[b]!r} disagree")
    theta = [(k, v) for k, v in (("rope_theta", cfg.get("rope_theta")),) if v is not None]
    theta += [
        (f"{k}.rope_theta", v["rope_theta"])
        for k in ("rope_parameters", "rope_scaling")
        if isinstance(v := cfg.get(k), dict) and v.get("rope_theta") is not None
    ]
    if len({float(v) for _, v in theta}) > 1:
        problems.append(f"RoPE bases disagree: {dict(theta)}")
    if problems:
        raise ConversionError(f"{path}: {arch} fields not supported: {'; '.join(problems)}")


def _field(cfg: dict, path: Path, *names: str, default=None, required: bool = True):
    for n in names:
        if n in cfg and cfg[n] is not None:
            return cfg[n]
    if required and default is None:
        raise ConversionError(f"{path}: missing field {names[0]!r}")
    return default


def model_config_from_hf(cfg: dict, directory: Path) -> tuple[ModelConfig, torch.dtype]:
    """A ``ModelConfig`` for an HF config (and the dtype it declares); refuses what the
    trainer's models cannot express, naming the field."""
    path = Path(directory) / "config.json"
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in _MODEL_TYPE:
        raise ConversionError(
            f"{path}: architectures={archs!r}; supported: {sorted(_MODEL_TYPE)} "
            "(dense LLM-jp-4 models are LlamaForCausalLM, MoE ones Qwen3MoeForCausalLM)"
        )
    arch = archs[0]
    check_fields(cfg, path)
    rope = cfg.get("rope_parameters") or {}
    heads = _field(cfg, path, "num_attention_heads")
    hidden = _field(cfg, path, "hidden_size")
    fields = dict(
        num_layers=_field(cfg, path, "num_hidden_layers"),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=_field(cfg, path, "num_key_value_heads", default=heads),
        kv_channels=_field(cfg, path, "head_dim", default=hidden // heads),
        vocab_size=_field(cfg, path, "vocab_size"),
        max_position_embeddings=_field(cfg, path, "max_position_embeddings"),
        rotary_base=float(_field(cfg, path, "rope_theta", default=rope.get("rope_theta"))),
        norm_epsilon=_field(cfg, path, "rms_norm_eps"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_method_std=cfg.get("initializer_range", 0.02),
    )
    if arch == "LlamaForCausalLM":
        fields.update(family="dense", ffn_hidden_size=_field(cfg, path, "intermediate_size"))
        fields.update(qk_layernorm=False, num_experts=None, moe_ffn_hidden_size=None)
        base = "llm-jp-4-tiny-dense"
    else:
        fields.update(
            family="moe",
            ffn_hidden_size=None,
            qk_layernorm=True,
            num_experts=_field(cfg, path, "num_experts", "num_local_experts"),
            moe_ffn_hidden_size=_field(cfg, path, "moe_intermediate_size"),
            moe_router_topk=_field(cfg, path, "num_experts_per_tok"),
            moe_norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            moe_aux_loss_coeff=float(cfg.get("router_aux_loss_coef", 0.0)),
        )
        base = "llm-jp-4-tiny-moe"
    name = registry_name(fields, base)
    model = ModelConfig(**{**_registry_fields(name), **fields, "name": name})
    dtype_name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    dtypes = {v: k for k, v in DTYPE_NAMES.items()}
    if dtype_name not in dtypes:
        raise ConversionError(
            f"{path}: torch_dtype={dtype_name!r}; expected one of {sorted(dtypes)}"
        )
    return model, dtypes[dtype_name]


def registry_name(fields: dict, base: str) -> str:
    """The first registry entry whose architecture equals ``fields`` (training-only fields
    such as ``init_method_std`` aside), else ``base``."""
    ignore = ("init_method_std", "max_position_embeddings", "moe_aux_loss_coeff")
    return next(
        (
            n
            for n, m in MODELS.items()
            if all(getattr(m, k) == v for k, v in fields.items() if k not in ignore)
        ),
        base,
    )


def _registry_fields(name: str) -> dict:
    from dataclasses import asdict

    return asdict(MODELS[name])
