"""``manifest.json``: what a checkpoint holds, in terms a converter can trust without megatron.

Written by rank 0 into the unpublished directory after every shard is on disk, so a published
checkpoint always has one. It records the architecture (with the conventions megatron-core uses
for fused tensors), the parallel layout at save time, the progress counters, the software
versions and the size of every file (a truncated copy is detected before loading).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from megatron_llmjp.checkpoint.store import CheckpointError, atomic_write_text
from megatron_llmjp.config.schema import ModelConfig, RunConfig
from megatron_llmjp.models.params import padded_vocab_size
from megatron_llmjp.parallel.layout import Layout

MANIFEST = "manifest.json"
FORMAT = "megatron-llmjp-checkpoint"
FORMAT_VERSION = 1

# Fields that fix tensor shapes: a checkpoint loads into a model only if these agree.
SHAPE_FIELDS = (
    "family",
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "head_dim",
    "vocab_size",
    "qk_layernorm",
    "tie_word_embeddings",
)
MOE_SHAPE_FIELDS = ("num_experts", "moe_ffn_hidden_size")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import torch

    import megatron_llmjp

    return {
        "megatron_core": _version("megatron-core"),
        "torch": torch.__version__,
        "transformer_engine": _version("transformer-engine") or _version("transformer_engine"),
        "megatron_llmjp": megatron_llmjp.__version__,
        "python": platform.python_version(),
    }


def model_section(m: ModelConfig, tp: int, experts_layout: str) -> dict:
    """The architecture with megatron-core's tensor conventions spelled out."""
    heads_per_group = m.num_attention_heads // m.num_query_groups
    out = {
        "name": m.name,
        "family": m.family,
        "hf_architecture": "Qwen3MoeForCausalLM" if m.is_moe else "LlamaForCausalLM",
        "num_layers": m.num_layers,
        "hidden_size": m.hidden_size,
        "ffn_hidden_size": m.ffn_hidden_size,
        "num_attention_heads": m.num_attention_heads,
        "num_query_groups": m.num_query_groups,
        "head_dim": m.kv_channels,
        "vocab_size": m.vocab_size,
        "padded_vocab_size": padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp),
        "make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        "max_position_embeddings": m.max_position_embeddings,
        "tie_word_embeddings": m.tie_word_embeddings,
        "normalization": "RMSNorm",
        "norm_epsilon": m.norm_epsilon,
        "qk_layernorm": m.qk_layernorm,
        "activation": "swiglu",
        "add_bias_linear": False,
        "init_method_std": m.init_method_std,
        "qkv_layout": {
            "fused": True,
            "order": "per_query_group",
            "heads_per_group": heads_per_group,
            "description": (
                "linear_qkv.weight has num_query_groups blocks of rows; block g holds "
                "heads_per_group*head_dim query rows, then head_dim key rows, then head_dim "
                "value rows of group g"
            ),
        },
        "mlp_layout": {
            "fused_gate_up": True,
            "description": "linear_fc1.weight rows: ffn gate rows first, then up rows (SwiGLU)",
        },
        "rope": {
            "type": "rope",
            "base": m.rotary_base,
            "rotary_percent": 1.0,
            "interleaved": False,
            "scaling": None,
        },
        "moe": None,
        "hf_config": json.loads(m.hf_config) if m.hf_config else None,
    }
    if m.is_moe:
        out["moe"] = {
            "num_experts": m.num_experts,
            "router_topk": m.moe_router_topk,
            "moe_ffn_hidden_size": m.moe_ffn_hidden_size,
            "layer_freq": 1,
            "shared_experts": 0,
            "experts_layout": experts_layout,
            "router": {
                "score_function": "softmax",
                "pre_softmax": not m.moe_norm_topk_prob,
                "norm_topk_prob": m.moe_norm_topk_prob,
                "dtype": m.moe_router_dtype,
                "bias": False,
                "aux_loss_coeff": m.moe_aux_loss_coeff,
                "z_loss_coeff": m.moe_z_loss_coeff,
            },
        }
    return out


def parallel_section(layout: Layout) -> dict:
    """The layout as the manifest records it (every ``Layout`` field)."""
    return asdict(layout)


LAYER_SPECS = ("local", "transformer_engine")
"""megatron-core layer specs a model is built with (``models.build.layer_spec``)."""


def writer_section(cfg: RunConfig, *, from_model: bool = True) -> dict:
    """Where the tensors were written: ``device`` ("cpu" or "cuda", ``cpu_compat.device_type``)
    and ``layer_spec`` ("local" or "transformer_engine", as ``models.build`` chose for ``cfg``).

    RNG states restore only on the same device type; a load accepts the other spec's
    ``_extra_state`` entries (Transformer Engine layers store one per module, the local spec
    none). ``from_model=False``: tensors written without building a model (conversion,
    upcycling): device "cpu", layer_spec None."""
    from megatron_llmjp.parallel import cpu_compat

    if not from_model:
        return {"device": "cpu", "layer_spec": None}
    from megatron_llmjp.models.build import use_transformer_engine

    spec = "transformer_engine" if use_transformer_engine(cfg) else "local"
    return {"device": cpu_compat.device_type(), "layer_spec": spec}


OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
"""Forms of the distributed optimizer's state this package saves and resumes (megatron-core's
``distrib_optim_sharding_type``, ``checkpoint.optimizer_sharding``)."""


def optimizer_sharding(cfg: RunConfig) -> str | None:
    """The form a save of ``cfg`` writes the distributed optimizer's state in (one of
    ``OPTIMIZER_SHARDINGS``, from ``checkpoint.optimizer_sharding``); None without the
    distributed optimizer."""
    if not cfg.optim.use_distributed_optimizer:
        return None
    return cfg.checkpoint.optimizer_sharding


def ddp_bucket_size(cfg: RunConfig, layout: Layout) -> int | None:
    """Gradient-bucket size, in elements, of megatron-core's ``DistributedDataParallel`` for
    ``cfg`` on ``layout`` (pipeline rank 0, first chunk; ``planner.shards.bucket_size``, which
    the planner's grounding test checks against megatron-core's buffers): ``max(4e7, 1e6 *
    dp)`` with ``parallel.overlap_grad_reduce``, None (one bucket per buffer) without it. The
    ``dp_reshardable`` optimizer state is stored per bucket, so a resume must see the same
    buckets (checked by ``state.plan_resume``)."""
    from megatron_llmjp.planner.shards import bucket_size

    return bucket_size(layout, cfg.parallel.overlap_grad_reduce, pp_rank=0, chunk_index=0)


def build_manifest(
    cfg: RunConfig,
    layout: Layout,
    progress: dict,
    files: dict[str, int],
    *,
    optimizer_saved: bool,
    experts_layout: str,
    from_model: bool = True,
) -> dict:
    """The manifest of a checkpoint of ``cfg`` saved with ``layout``: ``progress`` counters,
    ``files`` (name -> bytes), the writer's device and layer spec (``writer_section``;
    ``from_model=False`` for tensors written without a model)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "checkpoint_format": "torch_dist",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **progress,
        "model": model_section(cfg.model, layout.tp, experts_layout),
        "parallel": parallel_section(layout),
        **writer_section(cfg, from_model=from_model),
        "precision": {"params_dtype": cfg.precision.dtype, "master_weights": "fp32"},
        "optimizer": {
            "saved": optimizer_saved,
            "type": "adamw",
            "distributed": cfg.optim.use_distributed_optimizer,
            "sharding": optimizer_sharding(cfg),
            "ddp_bucket_size": ddp_bucket_size(cfg, layout),
        },
        "versions": versions(),
        "files": files,
    }


def write_manifest(directory: Path, manifest: dict) -> None:
    atomic_write_text(Path(directory) / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def read_manifest(directory: str | Path) -> dict:
    """Parse and sanity-check ``directory/manifest.json``."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{directory}: no {MANIFEST}; not a complete checkpoint of this format"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {data.get('format_version')} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    for key in ("iteration", "model", "parallel", "files"):
        if key not in data:
            raise CheckpointError(f"{path}: missing field {key!r}")
    return data


def describe_checkpoint(
    directory: str | Path,
    *,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    default_vocab=None,
    require_vocab: bool = True,
    verify: bool = True,
) -> dict:
    """The manifest of any readable checkpoint directory: ``manifest.json`` when there is one,
    else the description ``megatron_lm.describe`` derives from a Megatron-LM checkpoint's
    ``common.pt`` (``vocab_size``/``tokenizer`` supply its true vocabulary when ``args`` lack
    it, ``default_vocab`` a ``megatron_lm.VocabSource`` used last; ``require_vocab=False``
    records an unknown one as None). With ``verify`` the files are checked too (sizes, or
    shard byte ranges). Raises ``CheckpointError``."""
    from megatron_llmjp.checkpoint import megatron_lm

    directory = Path(directory)
    if megatron_lm.is_megatron_lm(directory):
        manifest = megatron_lm.describe(
            directory,
            vocab_size=vocab_size,
            tokenizer=tokenizer,
            default_vocab=default_vocab,
            require_vocab=require_vocab,
        )
        if verify:
            megatron_lm.verify(directory)
        return manifest
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    return manifest


def verify_files(directory: str | Path, manifest: dict) -> None:
    """Every file the manifest lists exists with its recorded size (catches truncated copies)."""
    directory = Path(directory)
    for name, size in manifest["files"].items():
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{directory}: file {name} listed in {MANIFEST} is missing")
        actual = p.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"{directory}: file {name} has {actual} bytes but {MANIFEST} records {size}; "
                "the checkpoint is truncated or was modified"
            )


# model.* fields that do not change the function a checkpoint's weights compute: a difference
# from a Megatron-LM checkpoint's args is reported, not refused (RoPE has no position table;
# Megatron-LM sets max_position_embeddings to its sequence length).
TRAINING_ONLY_FIELDS = (
    "max_position_embeddings",
    "init_method_std",
    "moe_aux_loss_coeff",
    "moe_z_loss_coeff",
)


def check_model(manifest: dict, m: ModelConfig, directory: str | Path) -> list[str]:
    """Refuse a checkpoint whose tensors cannot have this model's shapes; name every field.

    For a Megatron-LM checkpoint (``megatron_lm.describe``) every ``model.*`` field is
    compared with the one derived from its args: a difference in ``TRAINING_ONLY_FIELDS`` is
    returned as a note, any other raises ``CheckpointError`` naming each field."""
    if manifest.get("model_config") is not None:
        saved_cfg = manifest["model_config"]
        current_cfg = asdict(m)
        errors, notes = [], []
        for k, v in current_cfg.items():
            if k in ("name", "source") or saved_cfg.get(k) == v:
                continue
            line = f"model.{k}: checkpoint {saved_cfg.get(k)!r}, config {v!r}"
            (notes if k in TRAINING_ONLY_FIELDS else errors).append(line)
        if errors:
            raise CheckpointError(
                f"{directory} (Megatron-LM, model from common.pt's args) holds a different model "
                "than model.*: " + "; ".join(errors)
            )
        return notes
    saved = manifest["model"]
    current = model_section(m, 1, "")
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r}, config {current[k]!r}"
        for k in SHAPE_FIELDS
        if saved.get(k) != current[k]
    ]
    for k in MOE_SHAPE_FIELDS:
        a = (saved.get("moe") or {}).get(k)
        b = (current.get("moe") or {}).get(k)
        if a != b:
            diffs.append(f"moe.{k}: checkpoint {a!r}, config {b!r}")
    if diffs:
        raise CheckpointError(
            f"{directory} holds a different model ({saved.get('name')}) than model.* "
            f"({m.name}): " + "; ".join(diffs)
        )
    return []
