"""Parameter counts computed from a ``ModelConfig`` alone (no model is built).

Conventions follow the LLM-jp-4 model cards: "embedding" is the input embedding only; the
untied output layer is inside "non-embedding"; "active" counts what one token uses (all
non-expert weights, both embeddings and the top-k experts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megatron_llmjp.config.schema import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int
    non_embedding: int
    active: int
    per_layer: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: round up to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def count_parameters(m: ModelConfig, vocab_size: int | None = None) -> ParamCounts:
    """Count parameters of ``m``; ``vocab_size`` defaults to the true (unpadded) vocabulary."""
    v = m.vocab_size if vocab_size is None else vocab_size
    h, d = m.hidden_size, m.kv_channels
    q_out, kv_out = m.num_attention_heads * d, m.num_query_groups * d
    attn = h * q_out + 2 * h * kv_out + q_out * h + (2 * d if m.qk_layernorm else 0)
    norms = 2 * h
    if m.is_moe:
        expert = 3 * h * m.moe_ffn_hidden_size
        router = m.num_experts * h
        mlp, mlp_active = router + m.num_experts * expert, router + m.moe_router_topk * expert
    else:
        mlp = mlp_active = 3 * h * m.ffn_hidden_size
    embedding = v * h
    output = 0 if m.tie_word_embeddings else v * h
    final_norm = h
    layers = m.num_layers * (attn + mlp + norms)
    total = embedding + output + final_norm + layers
    active = embedding + output + final_norm + m.num_layers * (attn + mlp_active + norms)
    return ParamCounts(
        total=total,
        embedding=embedding,
        non_embedding=total - embedding,
        active=active,
        per_layer={"attention": attn, "mlp": mlp, "norms": norms},
    )
