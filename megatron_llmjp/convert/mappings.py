"""Declarative mapping tables: megatron-core checkpoint keys <-> Hugging Face tensor names.

A rule names one global megatron-core key, the HF names it becomes (``{l}`` is the layer,
``{e}`` the expert), its scope (the leading axes megatron stacks: none, the layer, or the
layer and the expert), the transform between them and the megatron slice shape in symbolic
sizes. Nothing else in the converter knows a key name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_llmjp.convert.transforms import ConversionError, Dims

Scope = Literal["model", "layer", "expert"]
_L = "model.layers.{l}."
_E = "model.layers.{l}.mlp.experts.{e}."


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    scope: Scope
    shape: tuple[str, ...]
    """The megatron slice (without the stacked axes) in sizes of ``sizes()``."""
    transform: str = "copy"
    when: str | None = None
    """A model feature the rule needs: ``qk_layernorm`` or ``untied``."""


_ATTENTION = (
    Rule(
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
        (_L + "input_layernorm.weight",),
        "layer",
        ("hidden",),
    ),
    Rule(
        "decoder.layers.self_attention.linear_qkv.weight",
        (
            _L + "self_attn.q_proj.weight",
            _L + "self_attn.k_proj.weight",
            _L + "self_attn.v_proj.weight",
        ),
        "layer",
        ("qkv", "hidden"),
        "qkv",
    ),
    Rule(
        "decoder.layers.self_attention.linear_proj.weight",
        (_L + "self_attn.o_proj.weight",),
        "layer",
        ("hidden", "attn"),
    ),
    Rule(
        "decoder.layers.self_attention.q_layernorm.weight",
        (_L + "self_attn.q_norm.weight",),
        "layer",
        ("head_dim",),
        when="qk_layernorm",
    ),
    Rule(
        "decoder.layers.self_attention.k_layernorm.weight",
        (_L + "self_attn.k_norm.weight",),
        "layer",
        ("head_dim",),
        when="qk_layernorm",
    ),
)
_EMBEDDING = Rule(
    "embedding.word_embeddings.weight",
    ("model.embed_tokens.weight",),
    "model",
    ("vocab", "hidden"),
    "vocab",
)
_HEAD = (
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "model", ("hidden",)),
    Rule(
        "output_layer.weight",
        ("lm_head.weight",),
        "model",
        ("vocab", "hidden"),
        "vocab",
        when="untied",
    ),
)

TABLES: dict[str, tuple[Rule, ...]] = {
    "LlamaForCausalLM": (
        _EMBEDDING,
        *_ATTENTION,
        Rule(
            "decoder.layers.mlp.linear_fc1.layer_norm_weight",
            (_L + "post_attention_layernorm.weight",),
            "layer",
            ("hidden",),
        ),
        Rule(
            "decoder.layers.mlp.linear_fc1.weight",
            (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
            "layer",
            ("ffn2", "hidden"),
            "gate_up",
        ),
        Rule(
            "decoder.layers.mlp.linear_fc2.weight",
            (_L + "mlp.down_proj.weight",),
            "layer",
            ("hidden", "ffn"),
        ),
        *_HEAD,
    ),
    "Qwen3MoeForCausalLM": (
        _EMBEDDING,
        *_ATTENTION,
        Rule(
            "decoder.layers.pre_mlp_layernorm.weight",
            (_L + "post_attention_layernorm.weight",),
            "layer",
            ("hidden",),
        ),
        Rule(
            "decoder.layers.mlp.router.weight",
            (_L + "mlp.gate.weight",),
            "layer",
            ("experts", "hidden"),
        ),
        Rule(
            "decoder.layers.mlp.experts.experts.linear_fc1.weight",
            (_E + "gate_proj.weight", _E + "up_proj.weight"),
            "expert",
            ("moe_ffn2", "hidden"),
            "gate_up",
        ),
        Rule(
            "decoder.layers.mlp.experts.experts.linear_fc2.weight",
            (_E + "down_proj.weight",),
            "expert",
            ("hidden", "moe_ffn"),
        ),
        *_HEAD,
    ),
}

# Older checkpoints of the CPU (local) spec stored the MoE pre-MLP norm under the dense key.
ALIASES = {
    "decoder.layers.pre_mlp_layernorm.weight": ("decoder.layers.mlp.linear_fc1.layer_norm_weight",),
}


def rules_for(model: dict) -> list[Rule]:
    """The rules that apply to a manifest ``model`` section."""
    arch = model["hf_architecture"]
    if arch not in TABLES:
        raise ConversionError(
            f"no mapping table for architecture {arch!r}; known: {sorted(TABLES)}"
        )
    if arch == "LlamaForCausalLM" and model.get("qk_layernorm"):
        raise ConversionError(
            "a dense model with qk_layernorm=true has no LlamaForCausalLM equivalent (Llama has "
            "no q/k norm)"
        )
    if arch == "Qwen3MoeForCausalLM" and not model.get("qk_layernorm"):
        raise ConversionError(
            "Qwen3MoeForCausalLM always normalises queries and keys; this MoE model has "
            "qk_layernorm=false and no HF equivalent"
        )
    features = {
        "qk_layernorm": bool(model.get("qk_layernorm")),
        "untied": not model["tie_word_embeddings"],
    }
    return [r for r in TABLES[arch] if r.when is None or features[r.when]]


def dims_of(model: dict) -> Dims:
    return Dims(
        vocab_size=model["vocab_size"],
        padded_vocab_size=model["padded_vocab_size"],
        num_query_groups=model["num_query_groups"],
        heads_per_group=model["num_attention_heads"] // model["num_query_groups"],
        head_dim=model["head_dim"],
    )


def sizes(model: dict) -> dict[str, int]:
    """Symbolic sizes used in the rules' ``shape``."""
    d, moe = model["head_dim"], model.get("moe") or {}
    out = {
        "vocab": model["padded_vocab_size"],
        "hidden": model["hidden_size"],
        "head_dim": d,
        "attn": model["num_attention_heads"] * d,
        "qkv": (model["num_attention_heads"] + 2 * model["num_query_groups"]) * d,
    }
    if model.get("ffn_hidden_size"):
        out.update(ffn=model["ffn_hidden_size"], ffn2=2 * model["ffn_hidden_size"])
    if moe:
        out.update(
            experts=moe["num_experts"],
            moe_ffn=moe["moe_ffn_hidden_size"],
            moe_ffn2=2 * moe["moe_ffn_hidden_size"],
        )
    return out


def stacked(rule: Rule, model: dict) -> tuple[int, ...]:
    """The leading axes megatron-core stacks for this rule's key."""
    if rule.scope == "model":
        return ()
    if rule.scope == "layer":
        return (model["num_layers"],)
    return (model["num_layers"], model["moe"]["num_experts"])


def global_shape(rule: Rule, model: dict) -> tuple[int, ...]:
    s = sizes(model)
    return (*stacked(rule, model), *(s[n] for n in rule.shape))


def indices(rule: Rule, model: dict, layer: int | None) -> list[tuple[int, ...]]:
    """The stacked indices of this rule for one layer (or the whole tensor for model scope)."""
    if rule.scope == "model":
        return [()]
    if rule.scope == "layer":
        return [(layer,)]
    return [(layer, e) for e in range(model["moe"]["num_experts"])]


def hf_names(rule: Rule, index: tuple[int, ...]) -> list[str]:
    fields = dict(zip(("l", "e"), index, strict=False))
    return [n.format(**fields) for n in rule.hf]
