"""Full resume from the distributed-optimizer state Megatron-LM writes with ``torch_dist``.

Megatron-LM (megatron-core up to 0.13, e.g. the llm-jp fork's 0.12) saves the distributed
optimizer in the ``fully_sharded_model_space`` form: for every parameter, the FP32 main weight
and Adam's moments under ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>``
(``chained_N.`` in front when several optimizers are chained, e.g. dense and expert
parameters), and Adam's step count in ``common.pt`` (``optimizer.param_groups[*].step``). The
tensors are *flattened*: a parameter of global shape ``[X, Y, Z]`` cut into local
``[x, y, z]`` tensor-parallel pieces is stored as ``[X/x, Y/y, Z/z, x*y*z]`` (layer-stacking
axes keep their size), each piece flattened row-major along the last axis, whose ranges the
data-parallel ranks wrote (``ShardedTensor.flattened_range``).

megatron-core 0.16.1 keeps the form's name but can no longer read it:
``ShardedTensor.validate_metadata_integrity`` raises "ShardedTensor.flattened_range is not
supported", so ``DistributedOptimizer.sharded_state_dict`` with
``distrib_optim_sharding_type='fully_sharded_model_space'`` fails when it builds the request.
The stored tensors themselves are ordinary ``torch_dist`` tensors, so this module requests each
rank's part of them as plain ``ShardedTensor`` slices of the flattened shape (``requests``) and
copies what was read into the main parameters and moments with megatron-core's own
``_set_main_param_and_optimizer_states`` (``apply``); the step goes through
``DistributedOptimizer.load_state_dict`` with this run's parameter groups, so learning rate and
weight decay stay those of the run's config (Megatron-LM's groups are not loaded).

Because the last axis flattens a tensor-parallel piece, the state is readable only when every
parameter is split among tensor- (and expert-) parallel ranks exactly as when it was saved:
``check_resumable`` requires the saved TP, EP and expert-TP sizes, the distributed optimizer and
the saved parameter dtype, before any process group exists. Pipeline (also virtual) and
data-parallel sizes may differ: layer-stacking axes are global, and a rank's range of the
flattened axis is a plain slice of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron_llmjp.checkpoint.store import CheckpointError

FORM = "fully_sharded_model_space"
# Stored state name -> megatron-core's name in ``_set_main_param_and_optimizer_states``.
STATE_KEYS = {"fp32_param": "param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
_SAME = ("tp", "ep", "etp")


def _instead(source: str) -> str:
    if source == "checkpoint.dir":
        return (
            "To start from its weights at iteration 0, set checkpoint.load to it with "
            "checkpoint.load_optimizer=false and another checkpoint.dir"
        )
    return "Set checkpoint.load_optimizer=false to start from its weights at iteration 0"


def _refusal(directory: Path, opt: dict, why: str, source: str) -> CheckpointError:
    chained = f", chained as {'/'.join(opt['chained'])}" if opt["chained"] else ""
    what = (
        "checkpoint.dir (full resume)"
        if source == "checkpoint.dir"
        else ("checkpoint.load_optimizer=true")
    )
    return CheckpointError(
        f"{what}: {directory} holds Megatron-LM's "
        f"{'distributed ' if opt['distributed'] else ''}{opt['type']} optimizer state in the "
        f"{opt['sharding']!r} form{chained}; {why}. {_instead(source)}"
    )


def check_resumable(
    directory: Path, manifest: dict, cfg, layout, source: str = "checkpoint.load"
) -> None:
    """Refuse (``CheckpointError``) a full resume of a Megatron-LM checkpoint whose optimizer
    state this module cannot load into ``cfg`` at ``layout``: naming the saved form and the
    layout it needs (``source``: the config key that chose the checkpoint). Cheap (the
    manifest only); runs before any process group exists."""
    from megatron_llmjp.checkpoint.manifest import parallel_section

    opt = manifest["optimizer"]
    if not opt["saved"]:
        raise CheckpointError(
            f"{directory} (Megatron-LM) holds no optimizer state (saved with "
            f"--no-save-optim). {_instead(source)}"
        )
    if opt["sharding"] != FORM or not opt["distributed"]:
        raise _refusal(
            directory,
            opt,
            f"only Megatron-LM's distributed optimizer in the {FORM!r} form (its torch_dist "
            "default) is read; megatron-core 0.16.1 cannot map other Megatron-LM forms onto "
            "this trainer's optimizer",
            source,
        )
    if opt["type"] != "adamw":
        raise _refusal(directory, opt, "this trainer resumes Adam(W) state only", source)
    saved = manifest["parallel"]
    now = parallel_section(layout)
    if not cfg.model.is_moe:
        now = {**now, "etp": saved.get("etp")}  # no expert parameters
    wrong = [f"parallel.{k}={now.get(k)} (saved {saved.get(k)})" for k in _SAME]
    wrong = [w for k, w in zip(_SAME, wrong, strict=True) if now.get(k) != saved.get(k)]
    if not cfg.optim.use_distributed_optimizer:
        wrong.append("optim.use_distributed_optimizer=false (saved true)")
    dtype = manifest["precision"]["params_dtype"]
    if cfg.precision.dtype != dtype:
        wrong.append(f"precision.dtype={cfg.precision.dtype} (saved {dtype})")
    if wrong:
        need = " ".join(f"parallel.{k}={saved.get(k)}" for k in _SAME if k in saved)
        raise _refusal(
            directory,
            opt,
            "that form flattens each parameter's state per tensor-parallel piece "
            "(megatron-core 0.16.1 cannot reshard it: ShardedTensor.flattened_range is not "
            f"supported), so it is resumed only with the tensor and expert split it was saved "
            f"with ({need}; any pp, vpp and data-parallel size), "
            f"optim.use_distributed_optimizer=true and precision.dtype={dtype}; this run has "
            + ", ".join(wrong),
            source,
        )


def saved_steps(common: dict, count: int) -> list[float]:
    """Adam's step count of each of ``count`` chained optimizers, from ``common.pt``'s
    ``optimizer`` (``{i: {...}}`` when chained); every parameter group must agree."""
    opt = common.get("optimizer")
    parts = [opt[k] for k in sorted(opt)] if isinstance(opt, dict) and 0 in opt else [opt]
    if len(parts) != count:
        raise CheckpointError(
            f"common.pt holds {len(parts)} optimizer(s), this run builds {count} (experts "
            "and dense parameters are chained only with expert parallelism)"
        )
    steps = []
    for part in parts:
        found = {float(g["step"]) for g in part["optimizer"]["param_groups"] if "step" in g}
        if len(found) != 1:
            raise CheckpointError(f"common.pt: parameter groups disagree on the step: {found}")
        steps.append(found.pop())
    return steps


@dataclass
class _Piece:
    """One rank's slice of one stored flattened tensor: ``shard[dst]`` of the parameter's
    data-parallel shard of the main weight and moments."""

    optimizer: int
    param: object
    dst: slice
    request: str
    """Key of the request in the sharded state dict built by ``requests``."""


def _pieces_of(sh_base) -> list[tuple[object, int]]:
    """The ShardedTensors a model entry stands for, each with its flat offset in the parameter
    (a swiglu ``ShardedTensorFactory`` stores its two halves under one key)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    if not isinstance(sh_base, ShardedTensorFactory):
        return [(sh_base, 0)]
    base = sh_base.data
    out = []
    for sub in sh_base.build():
        if not sub.data.is_contiguous() or sub.data.untyped_storage().data_ptr() != (
            base.untyped_storage().data_ptr()
        ):
            raise CheckpointError(f"{sh_base.key}: a split this loader cannot follow")
        out.append((sub, sub.data.storage_offset() - base.storage_offset()))
    if sum(sub.data.numel() for sub, _ in out) != base.numel():
        raise CheckpointError(f"{sh_base.key}: a split this loader cannot follow")
    return out


def _flat_request(key: str, sub, lo: int, hi: int):
    """The stored ``[*fragments, piece numel]`` tensor's elements ``lo:hi`` of ``sub``'s piece."""
    import torch
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    p = sub.prepend_axis_num
    frags = tuple(sub.axis_fragmentations)
    index = tuple(
        off if i < p else off // sub.local_shape[i - p] for i, off in enumerate(sub.global_offset)
    )
    numel = 1
    for n in sub.local_shape:
        numel *= n
    shape = (1,) * len(frags) + (hi - lo,)
    return ShardedTensor(
        key=key,
        data=torch.empty(shape, dtype=torch.float32),
        dtype=torch.float32,
        local_shape=shape,
        global_shape=(*frags, numel),
        global_offset=(*index, lo),
        axis_fragmentations=None,
        replica_id=0,
    )


def requests(optimizer, model_sd: dict, chained: bool) -> tuple[dict, list[_Piece]]:
    """This rank's part of the stored optimizer state, as a sharded state dict to load next to
    the model's (``model_sd``: the model's sharded state dict with the checkpoint's keys), and
    where each loaded tensor goes (``apply``)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories

    inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    tensors, _ = extract_sharded_tensors_and_factories(model_sd)
    by_param = {sh.data: sh for sh in nested_values(tensors)}
    sd: dict = {}
    pieces: list[_Piece] = []
    for i, opt in enumerate(inner):
        prefix = f"chained_{i}." if chained else ""
        for gbuf_range_maps in opt.gbuf_ranges:
            for maps in gbuf_range_maps.values():
                for gbuf_range_map in maps:
                    for param, ranges in gbuf_range_map["param_map"].items():
                        rng = ranges["param"]
                        sh_base = by_param.get(param)
                        if sh_base is None:
                            raise CheckpointError("a parameter missing from the model's state")
                        covered = 0
                        for sub, start in _pieces_of(sh_base):
                            lo = max(start, rng.start)
                            hi = min(start + sub.data.numel(), rng.end)
                            if lo >= hi:
                                continue
                            covered += hi - lo
                            name = f"{len(pieces)}"
                            for stored in STATE_KEYS:
                                key = f"{prefix}optimizer.state.{stored}.{sub.key}"
                                sd[f"{name}.{stored}"] = _flat_request(
                                    key, sub, lo - start, hi - start
                                )
                            dst = slice(lo - rng.start, hi - rng.start)
                            pieces.append(_Piece(i, param, dst, name))
                        if covered != rng.end - rng.start:
                            raise CheckpointError(f"{sh_base.key}: shard not covered")
    return sd, pieces


def apply(optimizer, loaded: dict, pieces: list[_Piece], steps: list[float]) -> None:
    """Install the loaded main weights, moments (``loaded``: the result of loading
    ``requests``' state dict) and Adam's step counts into ``optimizer`` (collective-free)."""
    import torch

    from megatron_llmjp.checkpoint import torch_adam

    inner = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    torch_adam.prepare_for_load(optimizer)
    for opt, step in zip(inner, steps, strict=True):
        sd = opt.state_dict()  # this run's parameter groups (lr/wd from its own config)
        for group in sd["optimizer"]["param_groups"]:
            group["step"] = step if not _fused(opt) else int(step)
        opt.load_state_dict(sd)  # allocates the state where empty and sets the step
    torch_adam.after_load(optimizer)
    by_param: dict = {}
    for piece in pieces:
        by_param.setdefault((piece.optimizer, piece.param), []).append(piece)
    for (i, param), mine in by_param.items():
        opt = inner[i]
        current = opt._get_main_param_and_optimizer_states(param)
        tensors = {name: current[name].detach().clone() for name in STATE_KEYS.values()}
        for piece in mine:
            for stored, name in STATE_KEYS.items():
                src = loaded[f"{piece.request}.{stored}"].reshape(-1)
                tensors[name][piece.dst] = src.to(tensors[name].dtype)
        with torch.no_grad():
            opt._set_main_param_and_optimizer_states(param, tensors)


def _fused(opt) -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return bool(distrib_optimizer.HAVE_APEX_OR_TE)
