"""Checkpoints written by Megatron-LM itself (``pretrain_gpt.py --ckpt-format torch_dist``).

A Megatron-LM root holds ``latest_checkpointed_iteration.txt`` (an iteration number or
``release``) and ``iter_NNNNNNN/`` (or ``release/``) directories with the ``torch_dist`` shards,
``metadata.json`` and ``common.pt``; there is no ``manifest.json``. The tensors use the same
global, layer-stacked keys as this package's checkpoints, so what is missing is the model
description: this module derives it from the ``args`` namespace Megatron-LM pickles into
``common.pt``, refuses what neither the trainer's models nor the HF formats can express, and
returns it in the shape of a ``manifest.json`` (``format: "megatron-lm"``). Every reader
(``llmjp-convert``, ``llmjp-checkpoint``, ``checkpoint.load``, ``llmjp-upcycle``) goes through
``describe`` and nothing else decides how ``args`` map onto the model.

Unpickling ``common.pt`` could execute code: it is read with ``torch.load(weights_only=True)``
and an explicit allow-list: ``argparse.Namespace`` and inert stand-ins for the two megatron
enums ``args`` holds (``AttnBackend``, ``ModelType``; only their value is kept). Any other
global in the file makes the load fail with the global's name.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.store import CheckpointError

FORMAT = "megatron-lm"
COMMON = "common.pt"
METADATA_JSON = "metadata.json"
LEGACY_FILE = "model_optim_rng.pt"
_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


class MegatronLMError(CheckpointError):
    """A Megatron-LM checkpoint this package cannot use; the message names the argument."""


def is_optimizer_key(key: str) -> bool:
    """True for a key of Megatron-LM's or megatron-core's distributed-optimizer state
    (``optimizer.*``, or ``chained_N.optimizer.*`` when several optimizers are chained, e.g.
    dense and expert parameters of an MoE model)."""
    return bool(_OPTIMIZER_KEY.match(key))


def is_megatron_lm(directory: str | Path) -> bool:
    """A checkpoint directory written by Megatron-LM (no ``manifest.json``, but a
    ``common.pt`` or a legacy ``mp_rank_*`` subdirectory)."""
    from megatron_llmjp.checkpoint.manifest import MANIFEST

    d = Path(directory)
    if (d / MANIFEST).is_file():
        return False
    return (d / COMMON).is_file() or any(d.glob(f"mp_rank_*/{LEGACY_FILE}"))


# -- reading ``common.pt`` -----------------------------------------------------------------


class _EnumValue:
    """Inert stand-in for a megatron enum member pickled in ``args`` (its value only)."""

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.value!r}>"


class AttnBackend(_EnumValue):
    """``megatron.core.transformer.enums.AttnBackend`` (args.attention_backend)."""


class ModelType(_EnumValue):
    """``megatron.core.enums.ModelType`` (args.model_type)."""


SAFE_GLOBALS = [
    argparse.Namespace,
    (AttnBackend, "megatron.core.transformer.enums.AttnBackend"),
    (ModelType, "megatron.core.enums.ModelType"),
    (ModelType, "megatron.core.transformer.enums.ModelType"),
]


def load_common(path: str | Path) -> dict:
    """``common.pt`` read with ``torch.load(weights_only=True)`` and ``SAFE_GLOBALS``: no
    pickled code runs. Raises ``MegatronLMError`` naming the file (and a refused global)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MegatronLMError(
            f"{path.parent}: no {path.name}; not a Megatron-LM torch_dist checkpoint"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the restricted unpickler raises UnpicklingError / RuntimeError
        raise MegatronLMError(
            f"{path}: unreadable with the restricted loader (allowed globals: argparse.Namespace "
            f"and megatron's AttnBackend/ModelType enums): {str(e).splitlines()[-1]}"
        ) from e
    if not isinstance(data, dict):
        raise MegatronLMError(f"{path}: expected a dict, found {type(data).__name__}")
    return data


def common_load_strategy():
    """A megatron-core ``LoadCommonStrategy`` reading ``common.pt`` with ``load_common``
    (megatron-core's own uses ``torch.load``'s default, which refuses Megatron-LM's ``args``)."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class _Strategy(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return load_common(Path(checkpoint_dir) / COMMON)

    return _Strategy()


# -- the model description -----------------------------------------------------------------


@dataclass(frozen=True)
class VocabSource:
    """Where the true (unpadded) vocabulary came from, printed by every reader."""

    size: int
    source: str


def _refusals(a: dict) -> list[str]:
    """Every argument the trainer's models and the HF formats cannot express, as
    ``--flag value (why)`` strings (Megatron-LM's flag names,
    ``megatron/training/arguments.py``)."""
    out = []

    def refuse(cond: bool, flag: str, why: str) -> None:
        if cond:
            out.append(f"{flag} ({why})")

    norm = a.get("normalization", "LayerNorm")
    refuse(norm != "RMSNorm", f"--normalization {norm}", "only RMSNorm without biases")
    refuse(bool(a.get("apply_layernorm_1p")), "--apply-layernorm-1p", "zero-centred norm weights")
    refuse(
        bool(a.get("add_bias_linear", True)),
        "--add-bias-linear (Megatron-LM's default; pass --disable-bias-linear)",
        "linear biases",
    )
    refuse(bool(a.get("add_qkv_bias")), "--add-qkv-bias", "QKV biases")
    pos = a.get("position_embedding_type", "learned_absolute")
    refuse(pos != "rope", f"--position-embedding-type {pos}", "only RoPE positions")
    pct = a.get("rotary_percent", 1.0)
    refuse(pct is not None and pct < 1.0, f"--rotary-percent {pct}", "partial rotary embeddings")
    refuse(bool(a.get("rotary_interleaved")), "--rotary-interleaved", "interleaved RoPE")
    refuse(bool(a.get("use_rope_scaling")), "--use-rope-scaling", "RoPE scaling")
    factor = a.get("rotary_seq_len_interpolation_factor")
    refuse(
        factor not in (None, 1, 1.0),
        f"--rotary-seq-len-interpolation-factor {factor}",
        "RoPE position interpolation",
    )
    refuse(bool(a.get("mrope_section")), "--mrope-section", "multimodal RoPE")
    refuse(not a.get("swiglu"), "--swiglu absent", "only SwiGLU FFNs")
    refuse(bool(a.get("squared_relu")), "--squared-relu", "only SwiGLU FFNs")
    refuse(
        bool(a.get("apply_residual_connection_post_layernorm")),
        "--apply-residual-connection-post-layernorm",
        "pre-norm residuals only",
    )
    refuse(bool(a.get("multi_latent_attention")), "--multi-latent-attention", "MLA")
    refuse(bool(a.get("is_hybrid_model")), "--hybrid-override-pattern", "hybrid Mamba models")
    refuse(
        bool(
            a.get("heterogeneous_layers_config_path")
            or a.get("heterogeneous_layers_config_encoded_json")
        ),
        "--heterogeneous-layers-config-path",
        "layers of different shapes",
    )
    mtp = a.get("mtp_num_layers")
    refuse(bool(mtp), f"--mtp-num-layers {mtp}", "multi-token prediction layers")
    if a.get("num_experts"):
        freq = a.get("moe_layer_freq", 1)
        every = freq == 1 or (isinstance(freq, list | tuple) and set(freq) == {1})
        refuse(not every, f"--moe-layer-freq {freq}", "MoE in every layer only")
        shared = a.get("moe_shared_expert_intermediate_size")
        refuse(bool(shared), f"--moe-shared-expert-intermediate-size {shared}", "shared experts")
        score = a.get("moe_router_score_function", "softmax")
        refuse(score != "softmax", f"--moe-router-score-function {score}", "softmax router only")
        refuse(
            bool(a.get("moe_router_enable_expert_bias")),
            "--moe-router-enable-expert-bias",
            "router expert bias",
        )
        scale = a.get("moe_router_topk_scaling_factor")
        refuse(
            scale is not None,
            f"--moe-router-topk-scaling-factor {scale}",
            "scaled top-k probabilities",
        )
        groups = a.get("moe_router_num_groups") or a.get("moe_router_group_topk")
        refuse(
            bool(groups), "--moe-router-num-groups/--moe-router-group-topk", "group-limited routing"
        )
        dtype = a.get("moe_router_dtype")
        refuse(dtype not in (None, "fp32"), f"--moe-router-dtype {dtype}", "fp32 or native only")
        coeff = a.get("moe_aux_loss_coeff", 0.0)
        refuse(
            isinstance(coeff, list | tuple) and len(set(coeff)) > 1,
            f"--moe-aux-loss-coeff {coeff}",
            "one auxiliary-loss coefficient",
        )
    return out


def true_vocab(
    a: dict,
    *,
    vocab_size: int | None,
    tokenizer: str | None,
    default: VocabSource | None = None,
) -> VocabSource:
    """The unpadded vocabulary: ``vocab_size`` (an explicit flag) first, then ``tokenizer``'s
    size, then what ``args`` record (NullTokenizer: ``args.vocab_size`` + 1, its
    end-of-document id; ``megatron/training/tokenizer/tokenizer.py::_NullTokenizer``), then
    ``default`` (e.g. the run config's ``model.vocab_size``). Raises ``MegatronLMError`` when
    none is available or it does not fit ``args.padded_vocab_size``."""
    padded = a.get("padded_vocab_size")
    if vocab_size is not None:
        got = VocabSource(int(vocab_size), "given explicitly")
    elif tokenizer is not None:
        from megatron_llmjp.data.tokenizer import Tokenizer

        got = VocabSource(Tokenizer.from_path(tokenizer).vocab_size, f"--tokenizer {tokenizer}")
    elif a.get("tokenizer_type") == "NullTokenizer" and a.get("vocab_size"):
        got = VocabSource(
            int(a["vocab_size"]) + 1, "common.pt args (NullTokenizer: args.vocab_size + 1 EOD)"
        )
    elif default is not None:
        got = default
    else:
        raise MegatronLMError(
            f"common.pt's args record only the padded vocabulary ({padded} rows, tokenizer "
            f"{a.get('tokenizer_type')}); pass the tokenizer (--tokenizer DIR) or the true "
            "vocabulary size (--vocab-size N)"
        )
    if padded is not None and not 0 < got.size <= padded:
        raise MegatronLMError(
            f"vocabulary {got.size} ({got.source}) does not fit the checkpoint's "
            f"{padded} embedding rows (args.padded_vocab_size)"
        )
    return got


def _args_dict(common: dict, path: Path) -> dict:
    args = common.get("args")
    if not isinstance(args, argparse.Namespace):
        raise MegatronLMError(f"{path}: no 'args' namespace (saved without args?)")
    return vars(args)


def model_config(a: dict, vocab: VocabSource):
    """The ``ModelConfig`` of a Megatron-LM run (``a``: ``vars(args)``), with the registry
    name of an identical entry when there is one."""
    from megatron_llmjp.config.schema import ModelConfig
    from megatron_llmjp.convert.hf_config import registry_name

    heads = a["num_attention_heads"]
    moe = bool(a.get("num_experts"))
    coeff = a.get("moe_aux_loss_coeff") or 0.0
    if isinstance(coeff, list | tuple):
        coeff = coeff[0]
    f = dict(
        family="moe" if moe else "dense",
        num_layers=a["num_layers"],
        hidden_size=a["hidden_size"],
        ffn_hidden_size=None if moe else a["ffn_hidden_size"],
        num_attention_heads=heads,
        num_query_groups=a["num_query_groups"] if a.get("group_query_attention") else heads,
        kv_channels=a.get("kv_channels") or a["hidden_size"] // heads,
        vocab_size=vocab.size,
        make_vocab_size_divisible_by=a.get("make_vocab_size_divisible_by", 128),
        max_position_embeddings=a.get("max_position_embeddings") or a.get("seq_length"),
        rotary_base=float(a.get("rotary_base", 10000)),
        norm_epsilon=float(a.get("norm_epsilon", 1e-5)),
        qk_layernorm=bool(a.get("qk_layernorm")),
        tie_word_embeddings=not a.get("untie_embeddings_and_output_weights", False),
        init_method_std=float(a.get("init_method_std", 0.02)),
    )
    if moe:
        f.update(
            num_experts=a["num_experts"],
            moe_ffn_hidden_size=a.get("moe_ffn_hidden_size") or a["ffn_hidden_size"],
            moe_router_topk=a.get("moe_router_topk", 2),
            moe_norm_topk_prob=not a.get("moe_router_pre_softmax", False),
            moe_aux_loss_coeff=float(coeff),
            moe_z_loss_coeff=float(a.get("moe_z_loss_coeff") or 0.0),
            moe_router_dtype="fp32" if a.get("moe_router_dtype") == "fp32" else "native",
        )
    else:
        f.update(num_experts=None, moe_ffn_hidden_size=None)
    name = registry_name(f, "llm-jp-4-tiny-moe" if moe else "llm-jp-4-tiny-dense")
    from megatron_llmjp.models.registry import MODELS

    base = asdict(MODELS[name])
    known = {x.name for x in fields(ModelConfig)}
    return ModelConfig(**{**{k: v for k, v in base.items() if k in known}, **f, "name": name})


def _parallel(a: dict) -> dict:
    """The layout at save time, with the keys of ``manifest.parallel_section``."""
    tp = a.get("tensor_model_parallel_size", 1)
    ep = a.get("expert_model_parallel_size", 1)
    return {
        "world": a.get("world_size"),
        "tp": tp,
        "pp": a.get("pipeline_model_parallel_size", 1),
        "vpp": a.get("virtual_pipeline_model_parallel_size"),
        "cp": a.get("context_parallel_size", 1),
        "ep": ep,
        "etp": a.get("expert_tensor_parallel_size") or (1 if ep > 1 else tp),
        "dp": a.get("data_parallel_size"),
        "sequence_parallel": bool(a.get("sequence_parallel")),
    }


def _optimizer(a: dict, common: dict, keys: list[str]) -> dict:
    """What optimizer state the checkpoint holds and in which of megatron-core's forms."""
    stored = [k for k in keys if is_optimizer_key(k)]
    chained = sorted({k.split(".", 1)[0] for k in stored if k.startswith("chained_")})
    opt = common.get("optimizer")
    parts = [opt[k] for k in sorted(opt)] if isinstance(opt, dict) and 0 in opt else [opt]
    sharding = sorted(
        {p.get("param_state_sharding_type") for p in parts if isinstance(p, dict)} - {None}
    )
    return {
        "saved": bool(stored),
        "type": {"adam": "adamw"}.get(a.get("optimizer"), a.get("optimizer")),
        "distributed": bool(a.get("use_distributed_optimizer")),
        "sharding": sharding[0] if len(sharding) == 1 else (sharding or None),
        "chained": chained,
    }


def _legacy_message(directory: Path) -> str:
    return (
        f"{directory} is in Megatron-LM's legacy --ckpt-format torch layout (mp_rank_*/"
        f"{LEGACY_FILE}, per-rank tensor-parallel slices), which is not read here. Re-save it "
        "as torch_dist with Megatron-LM itself: run pretrain_gpt.py with the run's model and "
        "parallel arguments plus --load ROOT --ckpt-format torch --ckpt-convert-format "
        "torch_dist --ckpt-convert-save NEW_ROOT (it converts and exits), then use NEW_ROOT/"
        "torch_dist"
    )


def describe(
    directory: str | Path,
    *,
    vocab_size: int | None = None,
    tokenizer: str | None = None,
    default_vocab: VocabSource | None = None,
    require_vocab: bool = True,
) -> dict:
    """The manifest of a Megatron-LM checkpoint directory (``iter_*`` or ``release``),
    derived from ``common.pt``'s ``args`` and the stored keys; reads metadata only.

    ``vocab_size``/``tokenizer``/``default_vocab``: see ``true_vocab``; without
    ``require_vocab`` an unknown vocabulary is recorded as None (for ``llmjp-checkpoint info``)
    instead of refused. The result has ``manifest.json``'s
    fields plus ``source`` (where each value came from). Raises ``MegatronLMError`` naming
    every refused argument, the legacy format, or a missing file, before anything is written."""
    from megatron_llmjp.checkpoint.manifest import model_section
    from megatron_llmjp.checkpoint.tensors import TensorReader

    directory = Path(directory)
    if any(directory.glob(f"mp_rank_*/{LEGACY_FILE}")):
        raise MegatronLMError(_legacy_message(directory))
    meta_path = directory / METADATA_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MegatronLMError(f"{meta_path}: unreadable ({e})") from e
    if meta.get("sharded_backend") != "torch_dist":
        raise MegatronLMError(
            f"{meta_path}: sharded_backend {meta.get('sharded_backend')!r}; only torch_dist is "
            "read (re-save with --ckpt-format torch_dist)"
        )
    common = load_common(directory / COMMON)
    a = _args_dict(common, directory / COMMON)
    refused = _refusals(a)
    if refused:
        raise MegatronLMError(
            f"{directory}: the Megatron-LM model uses what neither the trainer nor the HF "
            "formats can express: " + "; ".join(refused)
        )
    unknown = None
    try:
        vocab = true_vocab(a, vocab_size=vocab_size, tokenizer=tokenizer, default=default_vocab)
    except MegatronLMError as e:
        if require_vocab or "padded vocabulary" not in str(e):
            raise MegatronLMError(f"{directory}: {e}") from e
        unknown = str(e)
        vocab = VocabSource(a["padded_vocab_size"], unknown)
    m = model_config(a, vocab)
    parallel = _parallel(a)
    model = model_section(
        m, parallel["tp"], "grouped" if a.get("moe_grouped_gemm") else "sequential"
    )
    if model["padded_vocab_size"] != a.get("padded_vocab_size", model["padded_vocab_size"]):
        raise MegatronLMError(
            f"{directory}: args.padded_vocab_size {a['padded_vocab_size']} but vocabulary "
            f"{vocab.size} ({vocab.source}) pads to {model['padded_vocab_size']} with "
            f"make_vocab_size_divisible_by {m.make_vocab_size_divisible_by} x tp {parallel['tp']}"
        )
    model["name"] = m.name
    if unknown is not None:
        model["vocab_size"] = None
    reader = TensorReader(directory)
    dtype = "bf16" if a.get("bf16") else "fp16" if a.get("fp16") else "fp32"
    return {
        "format": FORMAT,
        "format_version": None,
        "checkpoint_format": "torch_dist",
        "iteration": common.get("iteration"),
        "consumed_samples": a.get("consumed_train_samples"),
        "skipped_steps": None,
        "model": model,
        "model_config": None if unknown is not None else asdict(m),
        "parallel": parallel,
        "precision": {"params_dtype": dtype, "master_weights": "fp32"},
        "train": {
            k: a.get(k) for k in ("seq_length", "micro_batch_size", "global_batch_size", "seed")
        },
        "optimizer": _optimizer(a, common, reader.names()),
        "versions": {"megatron_lm_checkpoint_version": common.get("checkpoint_version")},
        "files": store.file_sizes(directory),
        "source": {
            "format": FORMAT,
            "model": f"{directory / COMMON}: args (restricted unpickler)",
            "vocab_size": vocab.source,
            "iteration": f"{directory / COMMON}: iteration",
            "consumed_samples": f"{directory / COMMON}: args.consumed_train_samples",
        },
    }


def verify(directory: str | Path) -> int:
    """Check that every byte range ``.metadata`` lists is present in its shard file (catches a
    truncated or missing shard) and that ``common.pt`` loads; returns the number of files.
    Raises ``CheckpointError`` naming the file."""
    from megatron_llmjp.checkpoint.tensors import TensorReader

    directory = Path(directory)
    load_common(directory / COMMON)
    return TensorReader(directory).check_files() + 2  # + common.pt, metadata.json


def model_from_manifest(manifest: dict):
    """The ``ModelConfig`` recorded by ``describe`` (Megatron-LM checkpoints only)."""
    from megatron_llmjp.config.schema import ModelConfig

    return ModelConfig(**manifest["model_config"])


def model_overrides(manifest: dict) -> list[str]:
    """``model.*=value`` overrides (``--set`` syntax) that give a run config the model of a
    Megatron-LM checkpoint described by ``describe``."""
    out = []
    for k, v in manifest["model_config"].items():
        if k in ("source", "hf_config"):  # descriptive; never set from a Megatron-LM checkpoint
            continue
        text = (
            "null"
            if v is None
            else str(v).lower()
            if isinstance(v, bool)
            else repr(v)
            if isinstance(v, float)
            else str(v)
        )
        out.append(f"model.{k}={text}")
    return out
