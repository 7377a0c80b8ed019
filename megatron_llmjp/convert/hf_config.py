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
    for name, expected in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if cfg.get(name, expected) != expected:
            raise ConversionError(f"{path}: {name}={cfg[name]!r} is not supported ({expected!r})")
    rope = cfg.get("rope_parameters") or {}
    if (cfg.get("rope_scaling") or {}).get("rope_type", "default") != "default" or rope.get(
        "rope_type", "default"
    ) != "default":
        raise ConversionError(f"{path}: RoPE scaling is not supported (rope_type must be default)")
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
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise ConversionError(
                f"{path}: dense layers inside the MoE model (mlp_only_layers="
                f"{cfg.get('mlp_only_layers')}, decoder_sparse_step="
                f"{cfg.get('decoder_sparse_step')}) are not supported"
            )
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
