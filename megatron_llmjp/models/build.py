"""Build megatron-core GPT models for a ``RunConfig``: TransformerConfig, layer spec, chunks.

One place decides the backend: the Transformer Engine spec when CUDA and TE are present, the
megatron-core local spec otherwise (CPU). Everything else is megatron-core's own GPTModel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_llmjp.config.performance_checks import PerformanceEnvironment
from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.models.params import padded_vocab_size
from megatron_llmjp.parallel import cpu_compat
from megatron_llmjp.parallel.dist import local_device
from megatron_llmjp.parallel.layout import Layout


def use_transformer_engine(cfg: RunConfig | None = None) -> bool:
    """TE layers whenever the device is CUDA (``cpu_compat.device_type``) and Transformer
    Engine imports (and ``cfg`` does not ask for emulated FP8, which needs megatron-core's local
    layers). On CPU, CUDA is never queried."""
    if cfg is not None and cfg.precision.fp8 and cfg.precision.fp8_backend == "emulated":
        return False
    if cpu_compat.device_type() != "cuda":
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class RMSNorm(torch.nn.Module):
    """RMSNorm for the local (CPU) spec.

    megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism, which MoE with TP > 1
    requires. Marking the weight ``sequence_parallel`` makes megatron all-reduce its gradient
    over the TP group, exactly as it does for TE's norm on GPU.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def transformer_config(cfg: RunConfig, layout: Layout, env: PerformanceEnvironment | None = None):
    """Map our config onto megatron-core's ``TransformerConfig``. ``env``: a
    ``PerformanceEnvironment`` describing another machine for the ``performance`` switches
    (default: this one; see ``models/performance.py``)."""
    from megatron.core.transformer import TransformerConfig

    from megatron_llmjp.models.performance import performance_kwargs
    from megatron_llmjp.models.recompute import recompute_kwargs
    from megatron_llmjp.precision.recipes import transformer_kwargs

    m, te = cfg.model, use_transformer_engine(cfg)
    bf16 = cfg.precision.dtype == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    moe: dict = {}
    if m.is_moe:
        moe = dict(
            num_moe_experts=m.num_experts,
            moe_ffn_hidden_size=m.moe_ffn_hidden_size,
            moe_router_topk=m.moe_router_topk,
            # Top-k of the logits, then softmax over those k, equals softmax -> top-k ->
            # renormalise (HF norm_topk_prob=True); pre-softmax keeps the raw probabilities.
            moe_router_pre_softmax=not m.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=m.moe_aux_loss_coeff,
            moe_z_loss_coeff=m.moe_z_loss_coeff or None,
            moe_router_dtype="fp32" if m.moe_router_dtype == "fp32" else None,
            moe_token_dispatcher_type=cfg.parallel.moe_token_dispatcher,
        )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size or m.moe_ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # Weights are filled by models.init (layout-independent), not at construction.
        perform_initialization=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        calculate_per_token_loss=True,
        attention_softmax_in_fp32=True,
        bias_dropout_fusion=te,
        apply_rope_fusion=te,
        masked_softmax_fusion=te,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        cuda_graph_scope=[],  # megatron's default "full" is deprecated and warns
        **moe,
        **transformer_kwargs(cfg.precision),
        **recompute_kwargs(cfg),
        **performance_kwargs(cfg, env),  # also batch_p2p_comm
    )


def layer_spec(cfg: RunConfig):
    """The GPT layer spec: Transformer Engine on GPU, megatron-core local modules on CPU."""
    m = cfg.model
    if use_transformer_engine(cfg):
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        from megatron_llmjp.models.performance import resolved_performance

        return get_gpt_layer_with_transformer_engine_spec(
            num_experts=m.num_experts,
            moe_grouped_gemm=resolved_performance(cfg).moe_grouped_gemm,
            qk_layernorm=m.qk_layernorm,
        )
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(
        num_experts=m.num_experts, qk_layernorm=m.qk_layernorm, normalization="RMSNorm"
    )
    sub = spec.submodules
    if m.is_moe:
        # The TE spec keeps the MoE layer's pre-MLP norm as its own module (there is no
        # dense linear_fc1 to fuse it into); store it under the same key so checkpoints move
        # between CPU and GPU.
        sub.sharded_state_dict_keys_map = {
            k: v for k, v in sub.sharded_state_dict_keys_map.items() if k != "pre_mlp_layernorm."
        }
    sub.input_layernorm = RMSNorm
    sub.pre_mlp_layernorm = RMSNorm
    if m.qk_layernorm:
        sub.self_attention.submodules.q_layernorm = RMSNorm
        sub.self_attention.submodules.k_layernorm = RMSNorm
    from megatron_llmjp.precision.recipes import emulated_fp8

    fp8 = emulated_fp8(cfg.precision, m.num_layers)
    if fp8 is not None:
        from megatron_llmjp.precision.emulated import emulated_layer_spec

        spec = emulated_layer_spec(spec, fp8)
    return spec


def block_spec(cfg: RunConfig, tcfg, vp_stage: int | None):
    """The decoder-block spec of one model chunk. On CPU the final norm must be our RMSNorm as
    well (the block's default is ``WrappedTorchNorm``, which refuses sequence parallelism)."""
    spec = layer_spec(cfg)
    if use_transformer_engine(cfg):
        return spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    n = get_num_layers_to_build(tcfg, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=RMSNorm)


def model_vocab_size(cfg: RunConfig, layout: Layout) -> int:
    """Embedding rows: the true vocabulary padded for TP (never the tokenizer's size)."""
    return padded_vocab_size(
        cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, layout.tp
    )


def build_model_chunks(cfg: RunConfig, layout: Layout) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks (one per virtual stage), uninitialised, on the device."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tcfg = transformer_config(cfg, layout)
    vocab = model_vocab_size(cfg, layout)
    chunks = []
    n_chunks = layout.vpp or 1
    for vp_stage in range(n_chunks):
        vp = vp_stage if layout.vpp else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp)
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=block_spec(cfg, tcfg, vp),
            vocab_size=vocab,
            max_sequence_length=cfg.train.seq_length,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(cfg.model.rotary_base),
            vp_stage=vp,
        )
        _mark_tensor_parallel_weights(model)
        chunks.append(model.to(local_device()))
    return chunks


def _mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag split weights as megatron's own initialisation would.

    With ``perform_initialization=False`` (weights come from ``models/init.py``), megatron's
    local linear and embedding layers never set ``tensor_model_parallel``/``partition_dim``. The
    gradient norm then counts a split weight on TP rank 0 only, as if it were a replicated
    one, which under-reports the norm by about sqrt(tp) and clips at the wrong threshold."""
    from megatron.core.tensor_parallel import layers

    dims = (
        (layers.VocabParallelEmbedding, 0),
        (layers.ColumnParallelLinear, 0),
        (layers.RowParallelLinear, 1),
    )
    for module in model.modules():
        for cls, dim in dims:
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, cls)
                and isinstance(weight, torch.nn.Parameter)
                and not getattr(weight, "tensor_model_parallel", False)
            ):
                layers.set_tensor_model_parallel_attributes(weight, True, dim, 1)
