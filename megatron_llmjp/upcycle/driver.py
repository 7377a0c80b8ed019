"""Dense training checkpoint -> MoE training checkpoint, layer by layer.

Reads the dense checkpoint's global tensors with ``TensorReader`` (so whatever TP/PP/VPP
layout wrote it), copies attention, embeddings, norms and the output layer, turns each
layer's FFN into experts (``upcycle.drop``), draws a fresh router, and writes a checkpoint root
(``iter_0000000`` + ``latest``) in the same sequence as ``convert.driver.hf_to_mcore``: tensors,
``config.yaml``, then ``manifest.json``, all under a temporary name renamed at the end. The
trainer starts from it with ``checkpoint.load=OUTPUT checkpoint.load_optimizer=false``.
Everything that can be checked (flags, the dense manifest and config, every stored key and
shape, the target layout) is checked before the output directory is created.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.manifest import describe_checkpoint, model_section
from megatron_llmjp.checkpoint.tensors import TensorReader, TensorWriter
from megatron_llmjp.config.loader import ConfigError
from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.convert import mappings
from megatron_llmjp.convert.driver import claim_tensors
from megatron_llmjp.convert.mappings import Rule
from megatron_llmjp.convert.transforms import TRANSFORMS
from megatron_llmjp.parallel.layout import Layout, smallest_layout
from megatron_llmjp.progress import progress_bar
from megatron_llmjp.upcycle import drop


class UpcycleError(ConfigError):
    """An upcycling that cannot be done; the message names the flag, file or key."""


DENSE_PRE_MLP_NORM = "decoder.layers.mlp.linear_fc1.layer_norm_weight"
MOE_PRE_MLP_NORM = "decoder.layers.pre_mlp_layernorm.weight"
DENSE_FC1 = "decoder.layers.mlp.linear_fc1.weight"
DENSE_FC2 = "decoder.layers.mlp.linear_fc2.weight"
ROUTER = "decoder.layers.mlp.router.weight"
EXPERT_FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
EXPERT_FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"

# Model fields a ``--set`` may not change: the flag that sets them, or where they come from.
_MODEL_FLAGS = {
    "family": "it is always moe",
    "num_experts": "use --experts",
    "moe_router_topk": "use --topk",
    "moe_ffn_hidden_size": "use --expert-ffn",
    "moe_norm_topk_prob": "use --norm-topk-prob / --no-norm-topk-prob",
    "moe_aux_loss_coeff": "use --aux-loss-coeff",
}
_MODEL_SETTABLE = ("name", "moe_z_loss_coeff", "moe_router_dtype")

QWEN3_MOE_NOTE = (
    "the dense model has no q/k norm, so this MoE model has qk_layernorm=false: it trains, but "
    "cannot be exported with llmjp's HF converter (Qwen3MoeForCausalLM always normalises "
    "queries and keys)"
)


@dataclass(frozen=True)
class UpcycleSpec:
    """What to build (the command-line flags)."""

    num_experts: int
    topk: int
    expert_ffn: int
    drop_ratio: float = 0.5
    seed: int = 1234
    router_std: float = 0.02
    norm_topk_prob: bool | None = None
    """Renormalise the top-k probabilities; None: yes for top-k > 1, no for top-1 (where
    megatron-core needs the softmax before the top-k so that the router has a gradient)."""
    aux_loss_coeff: float = 0.01

    @property
    def renormalise(self) -> bool:
        return self.topk > 1 if self.norm_topk_prob is None else self.norm_topk_prob


@dataclass
class Report:
    """What an upcycling did (printed by the CLI, asserted on by tests)."""

    output: Path
    tensors: int
    bytes: int
    seconds: float
    model: dict
    notes: list[str] = field(default_factory=list)


def check_spec(spec: UpcycleSpec) -> None:
    """The flag checks that need no checkpoint."""
    if spec.num_experts < 1:
        raise UpcycleError(f"--experts {spec.num_experts}: need at least 1 expert")
    if not 1 <= spec.topk <= spec.num_experts:
        raise UpcycleError(f"--topk {spec.topk}: must be in [1, --experts={spec.num_experts}]")
    if spec.expert_ffn < 1:
        raise UpcycleError(f"--expert-ffn {spec.expert_ffn}: must be >= 1")
    if not 0.0 <= spec.drop_ratio <= 1.0:
        raise UpcycleError(f"--drop-ratio {spec.drop_ratio}: must be in [0, 1]")
    if spec.topk == 1 and spec.norm_topk_prob:
        raise UpcycleError(
            "--norm-topk-prob with --topk 1: a renormalised top-1 probability is always 1 and "
            "gives the router no gradient (megatron-core refuses it); use --no-norm-topk-prob"
        )
    if not spec.router_std >= 0.0:
        raise UpcycleError(f"--router-std {spec.router_std}: must be >= 0")
    if not spec.aux_loss_coeff >= 0.0:
        raise UpcycleError(f"--aux-loss-coeff {spec.aux_loss_coeff}: must be >= 0")


def _check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if parts[0] != "model":
            continue
        name = parts[1] if len(parts) > 1 else ""
        if name in _MODEL_SETTABLE:
            continue
        why = _MODEL_FLAGS.get(name, "the architecture comes from the dense checkpoint")
        raise UpcycleError(f"--set {key}: not settable here ({why})")


def _rules(arch: str, model: dict) -> list[Rule]:
    """The mapping table's megatron keys for ``model`` (without ``rules_for``'s HF-export
    checks: a dense model with qk-norm, or an MoE model without, is fine to train)."""
    features = {
        "qk_layernorm": bool(model.get("qk_layernorm")),
        "untied": not model["tie_word_embeddings"],
    }
    return [r for r in mappings.TABLES[arch] if r.when is None or features[r.when]]


def _target_config(
    dense_config: Path | None,
    spec: UpcycleSpec,
    overrides: list[str],
    source: str,
    base: list[str] = (),
):
    """The dense run's config with an MoE model section and the ``--set`` flags. A
    Megatron-LM checkpoint has no config file (``dense_config`` None): the defaults with its
    model (``base``, ``model.*`` overrides derived from its args) stand for it."""
    from megatron_llmjp.config.loader import build_config
    from megatron_llmjp.config.validate import WEIGHTS_ONLY, validate_static

    _check_overrides(overrides)
    model_sets = [
        "model.family=moe",
        f"model.num_experts={spec.num_experts}",
        f"model.moe_ffn_hidden_size={spec.expert_ffn}",
        f"model.moe_router_topk={spec.topk}",
        "model.ffn_hidden_size=null",
        f"model.moe_norm_topk_prob={'true' if spec.renormalise else 'false'}",
        f"model.moe_aux_loss_coeff={spec.aux_loss_coeff!r}",
        # Never save into (or resume from) the dense run's checkpoint directory.
        "checkpoint.dir=null",
    ]
    # Only what upcycling uses is checked: the dense run's data section is carried into the
    # MoE config unchecked (the trainer checks it where it runs).
    cfg = build_config(dense_config, [*base, *model_sets, *overrides], uses=WEIGHTS_ONLY)
    model = replace(cfg.model, source=source)
    ckpt = replace(cfg.checkpoint, load_optimizer=False)
    cfg = replace(cfg, model=model, checkpoint=ckpt)
    validate_static(cfg, WEIGHTS_ONLY)
    return cfg


@dataclass
class _Plan:
    directory: Path
    manifest: dict
    cfg: RunConfig
    layout: Layout
    dense: dict
    moe: dict
    dense_rules: list[Rule]
    moe_rules: list[Rule]
    source: dict[str, str]
    dtype: torch.dtype
    reader: TensorReader


def plan(
    src: str | Path, output: str | Path, spec: UpcycleSpec, overrides: list[str], force: bool
) -> _Plan:
    """Every check, from flags to stored shapes; reads metadata only."""
    check_spec(spec)
    output = Path(output)
    if output.exists() and not force:
        raise UpcycleError(f"--output {output} already exists (pass --force to replace it)")
    directory = store.resolve(src, "--input")
    out_abs, in_abs = output.resolve(), directory.resolve()
    root = in_abs.parent  # the dense checkpoint root (``latest`` and the iter_* directories)
    if out_abs == root or root in out_abs.parents or out_abs in root.parents:
        raise UpcycleError(
            f"--output {output} would replace or sit inside the --input checkpoint root {root}"
        )
    manifest = describe_checkpoint(directory)
    mlm = manifest.get("format") == "megatron-lm"
    dense = manifest["model"]
    if dense.get("family") != "dense":
        raise UpcycleError(
            f"--input {directory} holds a {dense.get('family')!r} model ({dense.get('name')}); "
            "Drop-Upcycling starts from a dense checkpoint"
        )
    if not mlm and not (directory / "config.yaml").is_file():
        raise UpcycleError(f"--input {directory}: no config.yaml next to the manifest")
    dense_ffn = dense["ffn_hidden_size"]
    if spec.expert_ffn > dense_ffn:
        raise UpcycleError(
            f"--expert-ffn {spec.expert_ffn}: larger than the dense FFN ({dense_ffn}); an "
            "expert is a slice of it"
        )
    label = (
        f"Drop-Upcycled from {in_abs} (iteration {manifest['iteration']}, {dense.get('name')}): "
        f"{spec.num_experts} experts x ffn {spec.expert_ffn}, top-{spec.topk}, drop ratio "
        f"{spec.drop_ratio}, seed {spec.seed}"
    )
    if mlm:
        from megatron_llmjp.checkpoint.megatron_lm import model_overrides

        base = [o for o in model_overrides(manifest) if not o.startswith("model.name=")]
        base.insert(0, f"model.name={dense['name']}")
        if manifest["train"].get("seq_length"):
            base.append(f"train.seq_length={manifest['train']['seq_length']}")
        cfg = _target_config(None, spec, list(overrides), label, base)
    else:
        cfg = _target_config(directory / "config.yaml", spec, list(overrides), label)
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, load=str(out_abs)))
    layout = smallest_layout(cfg.parallel, cfg.model, cfg.train)
    moe = model_section(cfg.model, layout.tp, "sequential")
    dense_rules = _rules("LlamaForCausalLM", dense)
    moe_rules = _rules("Qwen3MoeForCausalLM", moe)
    dense_keys = {r.mcore for r in dense_rules}
    source = {}
    for r in moe_rules:
        if r.mcore in dense_keys:
            source[r.mcore] = r.mcore
        elif r.mcore == MOE_PRE_MLP_NORM:
            source[r.mcore] = DENSE_PRE_MLP_NORM
    reader = TensorReader(directory)
    claim_tensors(dense_rules, dense, reader, directory)
    dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32
    return _Plan(
        directory, manifest, cfg, layout, dense, moe, dense_rules, moe_rules, source, dtype, reader
    )


def _repad(t: torch.Tensor, dense: dict, moe: dict) -> torch.Tensor:
    """Vocabulary rows for the target TP padding (unchanged when it is the same)."""
    if dense["padded_vocab_size"] == moe["padded_vocab_size"]:
        return t
    split, merge = TRANSFORMS["vocab"]
    return merge(split(t, mappings.dims_of(dense)), mappings.dims_of(moe))


def _layer_slices(p: _Plan, spec: UpcycleSpec, layer: int, fc1, fc2) -> list:
    g = drop.layer_generator(spec.seed, layer, "experts")
    experts = drop.plan_experts(
        p.dense["ffn_hidden_size"], spec.expert_ffn, spec.num_experts, spec.drop_ratio, g
    )
    e_fc1, e_fc2 = drop.upcycle_ffn(fc1, fc2, experts, g)
    router = drop.init_router(
        spec.num_experts,
        p.moe["hidden_size"],
        spec.router_std,
        drop.layer_generator(spec.seed, layer, "router"),
    )
    out = [(ROUTER, (layer,), router.to(p.dtype))]
    for e in range(spec.num_experts):
        out.append((EXPERT_FC1, (layer, e), e_fc1[e].to(p.dtype)))
        out.append((EXPERT_FC2, (layer, e), e_fc2[e].to(p.dtype)))
    return out


def upcycle(
    src: str | Path,
    output: str | Path,
    spec: UpcycleSpec,
    *,
    overrides: list[str] | None = None,
    force: bool = False,
    progress: bool = True,
) -> Report:
    """Write the Drop-Upcycled MoE checkpoint root ``output`` from the dense checkpoint ``src``
    (a root, whose latest is used, or an ``iter_*`` directory), on CPU whatever
    ``LLMJP_DEVICE`` says (``cpu_compat.pin_cpu``: a ``ConfigError`` if this process
    already uses CUDA)."""
    from megatron_llmjp.checkpoint.state import finish_weights_checkpoint
    from megatron_llmjp.parallel import cpu_compat

    t0 = time.perf_counter()
    # Tensors only, on CPU, also on a GPU node (megatron-core is not needed for that).
    cpu_compat.pin_cpu()
    p = plan(src, output, spec, list(overrides or []), force)
    reader = p.reader
    num_layers = p.moe["num_layers"]
    model_rules = [r for r in p.moe_rules if r.scope == "model"]
    pre = [r for r in model_rules if r.mcore.startswith("embedding.")]
    post = [r for r in model_rules if r not in pre]
    layer_copies = [r for r in p.moe_rules if r.scope == "layer" and r.mcore in p.source]
    groups: list[tuple[str, list[Rule], int | None]] = [("embedding", pre, None)]
    groups += [(f"layer {i}", layer_copies, i) for i in range(num_layers)]
    groups.append(("head", post, None))
    total = 0
    with store.staged_output(Path(output), force) as tmp:
        ckpt = tmp / store.iter_name(0)
        writer = TensorWriter(ckpt)
        for r in p.moe_rules:
            writer.declare(r.mcore, mappings.global_shape(r, p.moe), p.dtype)
        bar = progress_bar(len(groups), "[upcycle]", unit="group", enabled=progress)
        for label, rules, layer in groups:
            index = () if layer is None else (layer,)
            requests = [(p.source[r.mcore], index) for r in rules]
            if layer is not None:
                requests += [(DENSE_FC1, index), (DENSE_FC2, index)]
            tensors = reader.read_many(requests)
            slices = []
            for r, t in zip(rules, tensors[: len(rules)], strict=True):
                if r.transform == "vocab":
                    t = _repad(t, p.dense, p.moe)
                slices.append((r.mcore, index, t.to(p.dtype)))
            if layer is not None:
                slices += _layer_slices(p, spec, layer, tensors[-2], tensors[-1])
            writer.write(slices)
            total += sum(t.numel() * t.element_size() for _, _, t in slices)
            del tensors, slices
            bar.set_postfix_str(label, refresh=False)
            bar.update(1)
        bar.close()
        source = {
            "dense_checkpoint": str(p.directory.resolve()),
            "dense_iteration": p.manifest["iteration"],
            "method": "drop-upcycling",
            **asdict(spec),
            "norm_topk_prob": spec.renormalise,
        }
        finish_weights_checkpoint(tmp, writer, p.cfg, p.layout, source)
    notes = [] if p.moe["qk_layernorm"] else [QWEN3_MOE_NOTE]
    return Report(Path(output), len(p.moe_rules), total, time.perf_counter() - t0, p.moe, notes)
