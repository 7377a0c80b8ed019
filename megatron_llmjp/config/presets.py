"""Named LLM-jp-4 models. Each entry is data: a ``ModelConfig`` and where its numbers come from."""

from __future__ import annotations

from dataclasses import replace

from megatron_llmjp.config.schema import ModelConfig

_CARD = "LLM-jp-4 model card / config.json on Hugging Face (llm-jp/{})"
_MOE_COMMON = dict(
    family="moe",
    ffn_hidden_size=None,
    qk_layernorm=True,
    moe_router_topk=8,
    moe_norm_topk_prob=True,
    moe_aux_loss_coeff=1e-2,
    moe_z_loss_coeff=1e-3,
    init_method_std=0.006,
)

MODELS: dict[str, ModelConfig] = {
    "llm-jp-4-8b": ModelConfig(
        name="llm-jp-4-8b",
        family="dense",
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=128,
        init_method_std=0.02,
        source=_CARD.format("llm-jp-4-8b") + "; 8,590,200,832 parameters",
    ),
    "llm-jp-4-33b": ModelConfig(
        name="llm-jp-4-33b",
        family="dense",
        num_layers=64,
        hidden_size=5120,
        ffn_hidden_size=27648,
        num_attention_heads=40,
        num_query_groups=8,
        kv_channels=128,
        init_method_std=0.02,
        source="llm-jp/scripts pretrain/scripts/v4-* params.sh (TP4, 64 layers, hidden 5120)",
    ),
    "llm-jp-4-32b-a3b": ModelConfig(
        name="llm-jp-4-32b-a3b",
        num_layers=32,
        hidden_size=2560,
        num_attention_heads=40,
        num_query_groups=4,
        kv_channels=128,
        num_experts=128,
        moe_ffn_hidden_size=960,
        source=_CARD.format("llm-jp-4-32b-a3b") + "; 32,139,028,992 total / 3,827,476,992 active",
        **_MOE_COMMON,
    ),
    "llm-jp-4-332b-a31b": ModelConfig(
        name="llm-jp-4-332b-a31b",
        num_layers=80,
        hidden_size=5120,
        num_attention_heads=80,
        num_query_groups=4,
        kv_channels=128,
        num_experts=128,
        moe_ffn_hidden_size=2048,
        source=_CARD.format("llm-jp-4-332b-a31b"),
        **_MOE_COMMON,
    ),
    # Tiny flavours for CPU: the same features (GQA, head_dim != hidden/heads, untied embeddings,
    # RoPE 500000, SwiGLU, qk-norm and normalised top-k routing for MoE) at a size that trains
    # in seconds. The vocabulary stays the real tokenizer's.
    "llm-jp-4-tiny-dense": ModelConfig(
        name="llm-jp-4-tiny-dense",
        family="dense",
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=192,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        init_method_std=0.02,
        source="tiny CPU flavour of llm-jp-4-8b",
    ),
    "llm-jp-4-tiny-moe": ModelConfig(
        name="llm-jp-4-tiny-moe",
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        num_experts=8,
        moe_ffn_hidden_size=64,
        source="tiny CPU flavour of llm-jp-4-32b-a3b",
        **{**_MOE_COMMON, "moe_router_topk": 2, "init_method_std": 0.02},
    ),
}


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        return f"unknown model.name {self.args[0]!r}; known: {', '.join(sorted(MODELS))}"


def get_model(name: str, **overrides) -> ModelConfig:
    """The registry entry ``name`` with ``overrides`` applied (a fresh copy)."""
    if name not in MODELS:
        raise UnknownModelError(name)
    return replace(MODELS[name], **overrides)
