"""Saving and loading a training state with megatron-core ``dist_checkpointing``.

The state is the model chunks, the optimizer (the distributed optimizer in the form
``checkpoint.optimizer_sharding`` names: ``dp_reshardable``, each rank's own buffer shards, so
only the data-parallel size may change before a resume; or ``fully_reshardable``, gathered at
save time so DP/TP/PP/EP may all change), every RNG, the progress counters (iteration,
consumed samples, skipped steps) and the schedule section. Model tensor keys are global
(layer-stacked), so the weights load into any layout of the same model.
The LR schedule is a pure function of the iteration and ``schedule.*``; it is stored for the
record and a changed schedule applies on resume.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.manifest import (
    OPTIMIZER_SHARDINGS,
    build_manifest,
    check_model,
    describe_checkpoint,
    optimizer_sharding,
    parallel_section,
    write_manifest,
    writer_section,
)
from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.config.loader import dump_yaml, to_dict
from megatron_llmjp.config.schema import RunConfig
from megatron_llmjp.parallel.dist import local_device
from megatron_llmjp.parallel.layout import Layout


def sharding_metadata(sharding: str | None) -> dict:
    """A fresh ``metadata`` dict for megatron-core's ``sharded_state_dict`` calls, for the
    distributed optimizer's state in form ``sharding`` (one of ``OPTIMIZER_SHARDINGS``; None:
    no distributed optimizer). Fresh because megatron-core adds its process group to the dict.

    Without the distributed optimizer the type stays ``fully_reshardable``: megatron-core's
    ``ChainedOptimizer`` prefixes its optimizers' keys with ``chained_N.`` for any other type
    (even for non-distributed optimizers), and these checkpoints have always been saved
    without the prefix."""
    return {
        "distrib_optim_sharding_type": sharding or "fully_reshardable",
        "chained_optim_avoid_prefix": True,
    }


# For model state dicts alone (the optimizer's form does not change the model's tensors).
SHARDING_METADATA = sharding_metadata(None)


@dataclass
class Progress:
    iteration: int = 0
    consumed_samples: int = 0
    """Samples trained on in the whole run (all data stages)."""
    skipped_steps: int = 0
    data_stage: str | None = None
    """Mixture stage being trained (None for text or synthetic data)."""
    stage_start_iteration: int = 0
    stage_consumed_samples: int = 0
    """Position in the current stage's data: where a resumed run continues."""


@dataclass
class ResumePlan:
    """What to load, decided and checked before any process group exists."""

    directory: Path
    manifest: dict
    full: bool
    """Optimizer, RNG and progress too (False: weights only, start at iteration 0)."""
    source: str
    notes: list[str] = field(default_factory=list)
    """Differences in training-only model fields (printed at load time)."""

    @property
    def megatron_lm(self) -> bool:
        """Written by Megatron-LM itself (model derived from ``common.pt``'s args)."""
        return self.manifest.get("format") == "megatron-lm"


def plan_resume(cfg: RunConfig, layout: Layout) -> ResumePlan | None:
    """Find the checkpoint to start from and check it against the config (cheap, no torch)."""
    c = cfg.checkpoint
    if c.dir is not None and _holds_checkpoint(c.dir):
        directory, full, source = store.resolve(c.dir, "checkpoint.dir"), True, "checkpoint.dir"
        if store.iteration_of(directory) == 0:
            full = False  # saved before any step (train.iters=0): weights only, start at 0
    elif c.load is not None:
        directory, full = store.resolve(c.load, "checkpoint.load"), c.load_optimizer
        source = "checkpoint.load"
    else:
        return None
    from megatron_llmjp.checkpoint.megatron_lm import VocabSource

    manifest = describe_checkpoint(
        directory, default_vocab=VocabSource(cfg.model.vocab_size, "model.vocab_size")
    )
    notes = check_model(manifest, cfg.model, directory)
    if full and manifest.get("format") == "megatron-lm":
        from megatron_llmjp.checkpoint.megatron_lm_optimizer import check_resumable

        check_resumable(directory, manifest, cfg, layout, source)
    if full:
        saved_opt = manifest.get("optimizer", {})
        if not saved_opt.get("saved", False):
            raise CheckpointError(
                f"{directory} holds no optimizer state; set checkpoint.load_optimizer=false "
                "to start from its weights"
            )
        if saved_opt.get("distributed") != cfg.optim.use_distributed_optimizer:
            raise CheckpointError(
                f"{directory} was saved with optim.use_distributed_optimizer="
                f"{saved_opt.get('distributed')}; resume with the same setting or set "
                "checkpoint.load_optimizer=false"
            )
        saved_ep = manifest["parallel"]["ep"]
        if cfg.model.is_moe and (saved_ep > 1) != (layout.ep > 1):
            raise CheckpointError(
                f"{directory}: optimizer state saved with parallel.ep={saved_ep} cannot be "
                f"loaded with parallel.ep={layout.ep} (megatron-core keeps expert and dense "
                "optimizer state apart only when ep > 1); keep ep on the same side of 1 or set "
                "checkpoint.load_optimizer=false"
            )
        if manifest.get("format") != "megatron-lm":
            _check_optimizer_sharding(directory, manifest, cfg, layout, source)
    return ResumePlan(directory, manifest, full, source, notes)


def saved_sharding(manifest: dict) -> str | None:
    """The form of the distributed optimizer's state in a checkpoint of this package (its
    manifest's ``optimizer.sharding``; ``fully_reshardable`` where a manifest lacks it, the
    only form saved before ``checkpoint.optimizer_sharding``); None without the distributed
    optimizer."""
    opt = manifest.get("optimizer") or {}
    if not opt.get("distributed"):
        return None
    return opt.get("sharding") or "fully_reshardable"


# Layout fields a dp_reshardable optimizer state depends on: the buffers it stores are those of
# one tensor-, pipeline- (and expert-) parallel rank, split over the data-parallel group.
# Context parallelism leaves the buffers alone (the optimizer shards over DP x CP), but a change
# of it is not verified here (it needs Transformer Engine on CUDA) and is refused as well.
DP_RESHARDABLE_FIXED = ("tp", "pp", "vpp", "cp", "ep", "etp")


def _check_optimizer_sharding(
    directory: Path, manifest: dict, cfg: RunConfig, layout: Layout, source: str
) -> None:
    """Refuse (``CheckpointError``) a full resume whose optimizer state this layout cannot read:
    an unknown form, or a ``dp_reshardable`` state saved with another tp, pp, vpp, cp, ep or
    etp (megatron-core reshards that form across data-parallel ranks only)."""
    sharding = saved_sharding(manifest)
    if sharding is None:
        return
    if sharding not in OPTIMIZER_SHARDINGS:
        raise CheckpointError(
            f"{directory}: its manifest records the distributed optimizer's state in the "
            f"{sharding!r} form; this version reads {' and '.join(OPTIMIZER_SHARDINGS)}"
        )
    if sharding != "dp_reshardable":
        return
    saved, now = manifest["parallel"], parallel_section(layout)
    fixed = [k for k in DP_RESHARDABLE_FIXED if cfg.model.is_moe or k not in ("ep", "etp")]
    changed = [k for k in fixed if (saved.get(k) or 1) != (now.get(k) or 1)]
    if not changed:
        _check_buckets(directory, manifest, cfg, layout)
        return

    def value(v) -> str:
        return "null" if v is None else str(v)

    what = ", ".join(f"parallel.{k} {value(saved.get(k))} -> {value(now.get(k))}" for k in changed)
    keep = " ".join(f"parallel.{k}={value(saved.get(k))}" for k in changed)
    if source == "checkpoint.dir":
        weights = (
            "set checkpoint.load to it with checkpoint.load_optimizer=false (and another "
            "checkpoint.dir) to start from its weights at iteration 0"
        )
    else:
        weights = "set checkpoint.load_optimizer=false to start from its weights at iteration 0"
    raise CheckpointError(
        f"{directory}: its distributed-optimizer state was saved in the dp_reshardable form "
        "(checkpoint.optimizer_sharding), which megatron-core reshards across data-parallel "
        f"ranks only, but this run changes {what}. Resume with {keep}; or {weights}; or resume "
        "on the saved layout with checkpoint.optimizer_sharding=fully_reshardable, whose next "
        "save any layout can resume"
    )


def _check_buckets(directory: Path, manifest: dict, cfg: RunConfig, layout: Layout) -> None:
    """Refuse a ``dp_reshardable`` resume whose gradient buckets would differ from the save's:
    megatron-core stores that state per bucket and asserts at load that each holds what it held.
    The buckets are the same when the bucket size is (``manifest.ddp_bucket_size``), or when
    every buffer is one bucket either way: a rank's buffer holds at most the model's
    parameters, and a bucket closes once it reaches the bucket size. A manifest without the
    field (older saves) is left to the load, which names the cause if it fails."""
    from megatron_llmjp.checkpoint.manifest import ddp_bucket_size
    from megatron_llmjp.models.params import count_parameters

    opt = manifest.get("optimizer", {})
    if "ddp_bucket_size" not in opt:
        return
    before, after = opt["ddp_bucket_size"], ddp_bucket_size(cfg, layout)
    if before == after:
        return
    sizes = [x for x in (before, after) if x is not None]
    params = count_parameters(cfg.model, cfg.model.vocab_size).total
    if params < min(sizes):
        return

    def text(size: int | None) -> str:
        return "one bucket per buffer" if size is None else f"{size:,} elements"

    saved_dp = manifest["parallel"].get("dp")
    raise CheckpointError(
        f"{directory}: its distributed-optimizer state is in the dp_reshardable form, stored "
        "per gradient bucket of megatron-core's DDP, and this run's buckets differ: bucket size "
        f"{text(before)} at save, {text(after)} now (parallel.overlap_grad_reduce="
        f"{str(cfg.parallel.overlap_grad_reduce).lower()}, data-parallel size {saved_dp} -> "
        f"{layout.dp}; megatron-core uses max(4e7, 1e6 * dp) with overlap_grad_reduce, one "
        f"bucket without) for a model of {params:,} parameters. Resume with the saved "
        "parallel.overlap_grad_reduce and a data-parallel size that gives the same bucket size; "
        "or resume on the saved layout with checkpoint.optimizer_sharding=fully_reshardable, "
        "whose next save any layout can resume; or set checkpoint.load_optimizer=false to start "
        "from its weights at iteration 0"
    )


def _holds_checkpoint(root: str) -> bool:
    """``checkpoint.dir`` holds a checkpoint to resume: this package's ``latest``, or the
    ``latest_checkpointed_iteration.txt`` of a Megatron-LM run that moves to this trainer
    (its later saves go beside Megatron-LM's, and ``latest`` then takes precedence)."""
    if store.has_checkpoint(root):
        return True
    try:
        return store.read_megatron_lm_latest(Path(root)) is not None
    except CheckpointError:
        return True  # resolve() reports the unreadable pointer


# -- state dicts ---------------------------------------------------------------------------


def _capture_rng() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _restore_rng(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _model_state(model: list, metadata: dict) -> dict:
    """Per chunk, unwrapped from DDP (whose generic version would prefix ``module.``)."""
    return {
        f"chunk{i}": m.module.sharded_state_dict(metadata=metadata) for i, m in enumerate(model)
    }


def _state_dict(
    model, optimizer, *, is_loading: bool, with_rng: bool, sharding: str | None
) -> dict:
    """The sharded state dict of a save or a load; ``sharding``: the distributed optimizer's
    form (the configured one to save, the checkpoint's own to load)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    metadata = sharding_metadata(sharding)
    sd = {"model": _model_state(model, metadata)}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd["model"], is_loading=is_loading, metadata=metadata
        )
    if with_rng:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        sd["rng_state"] = ShardedObject(
            "rng_state", _capture_rng(), (world,), (rank,), replica_id=0
        )
    return sd


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def _experts_layout(model: list) -> str:
    for m in model:
        for name, _ in m.named_modules():
            if name.endswith("experts") or ".experts" in name:
                from megatron.core.transformer.moe.experts import SequentialMLP

                mod = dict(m.named_modules())[name]
                return "sequential" if isinstance(mod, SequentialMLP) else "grouped"
    return "none"


# -- save ----------------------------------------------------------------------------------


def _structure(sd) -> tuple:
    """What megatron-core's save plan depends on, per sharded leaf in order: type, key, shapes,
    offsets, dtype and replica (the tensor data is left out; cheap, no communication)."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    out = []
    for leaf in _sharded_leaves(sd):
        if not isinstance(leaf, ShardedBase):
            continue
        data = getattr(leaf, "data", None)
        out.append(
            (
                type(leaf).__name__,
                leaf.key,
                tuple(getattr(leaf, "global_shape", ()) or ()),
                tuple(getattr(leaf, "global_offset", ()) or ()),
                str(getattr(leaf, "replica_id", "")),
                str(getattr(leaf, "flattened_range", "")),
                (tuple(data.shape), str(data.dtype)) if isinstance(data, torch.Tensor) else None,
            )
        )
    return tuple(out)


def _clock() -> float:
    """Wall-clock seconds after the device's queued work (on CUDA), as the step timers."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


class CheckpointSaver:
    """Saves one run's checkpoints, keeping across saves what does not change between them.

    megatron-core's ``torch_dist`` save strategy can reuse its save plan and global metadata
    when the state dict keeps its structure (``TorchDistSaveShardedStrategy(cached_metadata=
    True)``), and ``FullyParallelSaveStrategyWrapper(do_cache_distribution=True)`` its
    assignment of shards to DP ranks; then the sharding needs validating only once
    (``dist_checkpointing.save(validate_access_integrity=...)``). Megatron-LM does the same
    under ``--ckpt-assume-constant-structure``. Here the structure is checked at every save
    (``_structure``, one all-reduce of a flag): a change (the first save with optimizer state,
    a save of iteration 0) starts over with fresh strategies and a full validation.

    ``prepare()`` does the one-off work of a first save before training starts: the imports,
    megatron-core's write-results server (whose first use imports torch in that process), and
    ``gc.freeze()`` of what the setup built (megatron-core's distributed optimizer runs a full
    ``gc.collect()`` twice per save, and an asynchronous save forks the rank: both then skip
    the frozen objects; Python's ``gc.freeze`` documentation).

    Asynchronous saves (``checkpoint.async_save``) write the shards in a forked process (a
    copy-on-write snapshot of the state, so training may change the tensors at once); the
    checkpoint is published by ``finalize_ready()`` at a later step once every rank has
    written. The publishing keeps ``store.publish``'s order (data durable, rename, then
    ``latest``), so a crash at any point leaves the previous checkpoint in place."""

    def __init__(
        self,
        cfg: RunConfig,
        layout: Layout,
        *,
        before_publish=None,
        report: bool = False,
    ) -> None:
        """``before_publish(iteration)`` runs on rank 0 just before a publish (fault
        injection); ``report``: print each save's blocked time on this rank."""
        self.cfg = cfg
        self.layout = layout
        self.before_publish = before_publish
        self.report = report
        self.queue = None
        self._strategy = None
        self._structure: tuple | None = None
        self._warm_up = None
        self._frozen = False
        self._pending: list[list] = []
        """[iteration, seconds blocked so far] of each unpublished asynchronous save."""
        self.saves = 0

    def prepare(self) -> None:
        """The one-off work of a first save (collective-free); call once before training."""
        import gc
        import threading

        from megatron.core.dist_checkpointing.strategies import filesystem_async
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (  # noqa: F401
            FullyParallelSaveStrategyWrapper,
        )
        from megatron.core.dist_checkpointing.strategies.torch import (  # noqa: F401
            TorchDistSaveShardedStrategy,
        )
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.storage import WriteResult

        if self.cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            # Not the persistent worker: it is spawned (no CPU emulation there) and would
            # share, not copy, CPU tensors that training then updates in place.
            self.queue = AsyncCallsQueue()
        # Started from the main thread (its server dies with the thread that started it);
        # the first item it receives makes it import torch.distributed.checkpoint, which
        # takes seconds: done here in a thread while training starts.
        results = filesystem_async._get_write_results_queue()

        def warm_up() -> None:
            # A failure (the run ended first) only leaves the cost to the first save.
            with contextlib.suppress(Exception):
                results.put(
                    WriteResult(index=MetadataIndex("warm-up"), size_in_bytes=0, storage_data=None)
                )
                results.get()

        self._warm_up = threading.Thread(target=warm_up, name="llmjp-ckpt-warm-up", daemon=True)
        self._warm_up.start()
        gc.collect()
        gc.freeze()
        self._frozen = True

    def _strategy_for(self, sd) -> tuple[object, bool]:
        """(save strategy, validate the sharding?) for this state dict (collective)."""
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )
        from megatron.core.dist_checkpointing.strategies.torch import (
            TorchDistSaveShardedStrategy,
        )

        structure = _structure(sd)
        if self._strategy is not None and _agree(structure != self._structure):
            self._strategy = None
        if self._strategy is not None:
            return self._strategy, False
        self._structure = structure
        self._strategy = FullyParallelSaveStrategyWrapper(
            TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True),
            _dp_group(),
            do_cache_distribution=True,
        )
        return self._strategy, True

    def save(self, model: list, optimizer, progress: Progress) -> float:
        """Save ``progress`` with ``model`` and ``optimizer`` (collective); returns the seconds
        training was blocked on this rank. Synchronous saves are published on return."""
        if self._warm_up is not None:
            self._warm_up.join()  # it shares the write-results queue with the save
            self._warm_up = None
        t0 = _clock()
        self.saves += 1
        cfg, root = self.cfg, Path(self.cfg.checkpoint.dir)
        rank = torch.distributed.get_rank()
        tmp = store.tmp_dir(root, progress.iteration)
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        torch.distributed.barrier()
        # Before the first step the optimizer holds no state (megatron cannot even describe
        # it): an iteration-0 checkpoint is weights, RNG and progress only.
        with_optimizer = optimizer is not None and progress.iteration > 0
        # With parallel.overlap_param_gather the all-gather of the updated parameters waits
        # for the next forward pass: finish it now, or the saved weights would hold the other
        # DP ranks' shards as they were before the last step (Megatron-LM syncs before saving).
        for chunk in model:
            if getattr(getattr(chunk, "ddp_config", None), "overlap_param_gather", False):
                chunk.start_param_sync(force_sync=True)
        sharding = optimizer_sharding(cfg)
        sd = _state_dict(
            model,
            optimizer if with_optimizer else None,
            is_loading=False,
            with_rng=True,
            sharding=sharding,
        )
        sd["progress"] = asdict(progress)
        sd["schedule"] = to_dict(cfg.schedule)
        strategy, validate = self._strategy_for(sd)
        experts_layout = _experts_layout(model) if cfg.model.is_moe else "none"
        publish = partial(
            self._publish, tmp, Progress(**asdict(progress)), with_optimizer, experts_layout
        )
        from megatron.core import dist_checkpointing

        request = dist_checkpointing.save(
            sd,
            str(tmp),
            strategy,
            validate_access_integrity=validate,
            async_sharded_save=self.queue is not None,
            # What the checkpoint records of the metadata (without megatron-core's process group).
            content_metadata=sharding_metadata(sharding),
        )
        if request is None:
            publish()
        else:
            request.finalize_fns.append(publish)
            self.queue.schedule_async_request(request)
            self._pending.append([progress.iteration, 0.0])
        blocked = _clock() - t0
        if self.report:
            note = " (shards are written in the background)" if request is not None else ""
            print(
                f"[llmjp] checkpoint of iteration {progress.iteration}: training blocked "
                f"{blocked:.2f} s{note}",
                flush=True,
            )
        return blocked

    def _publish(self, tmp: Path, snapshot: Progress, with_optimizer: bool, experts: str):
        cfg, root = self.cfg, Path(self.cfg.checkpoint.dir)
        if torch.distributed.get_rank() == 0:
            dump_yaml(cfg, tmp / "config.yaml")
            manifest = build_manifest(
                cfg,
                self.layout,
                asdict(snapshot),
                store.file_sizes(tmp),
                optimizer_saved=with_optimizer,
                experts_layout=experts,
            )
            write_manifest(tmp, manifest)
            if self.before_publish is not None:
                self.before_publish(snapshot.iteration)
            store.publish(tmp, root, snapshot.iteration)
            if cfg.checkpoint.keep_last:
                store.prune(root, cfg.checkpoint.keep_last)
            final = root / store.iter_name(snapshot.iteration)
            print(f"[llmjp] saved checkpoint {final}", flush=True)
        torch.distributed.barrier()

    def finalize_ready(self, blocking: bool = False) -> float:
        """Publish the asynchronous saves every rank has finished writing (collective while
        one is pending; ``blocking``: wait for all); returns the seconds this took. The checks
        while a save is still being written count towards that save's blocked time, printed
        when it is published."""
        if self.queue is None or not self._pending:
            return 0.0
        t0 = _clock()
        done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        spent = _clock() - t0
        self._pending[0][1] += spent
        for _ in done:
            iteration, blocked = self._pending.pop(0)
            if self.report and blocking:
                print(f"[llmjp] checkpoint of iteration {iteration} published", flush=True)
            elif self.report:
                print(
                    f"[llmjp] checkpoint of iteration {iteration} published: training blocked "
                    f"{blocked:.2f} s while it was written and published",
                    flush=True,
                )
        return spent

    def close(self, abort: bool = False) -> None:
        """Wait for pending saves and publish them (``abort``: drop them, unpublished); the
        objects ``prepare()`` froze are collectable again."""
        import gc

        if self._frozen:
            gc.unfreeze()
            self._frozen = False
        if self.queue is not None:
            if not abort:
                self.finalize_ready(blocking=True)
            self.queue.close(abort=abort)
            self.queue = None
            self._pending = []


def save_checkpoint(
    model: list,
    optimizer,
    cfg: RunConfig,
    layout: Layout,
    progress: Progress,
    *,
    before_publish=None,
) -> Path:
    """Write ``iter_N.tmp`` on all ranks, then publish it (collective, synchronous); for a
    single save outside a training loop. Returns the published directory."""
    CheckpointSaver(cfg, layout, before_publish=before_publish).save(model, optimizer, progress)
    return Path(cfg.checkpoint.dir) / store.iter_name(progress.iteration)


# -- load ----------------------------------------------------------------------------------


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _agree(flag: bool) -> bool:
    t = torch.tensor([int(flag)], dtype=torch.int32, device=local_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def load_checkpoint(model: list, optimizer, cfg: RunConfig, layout: Layout, plan: ResumePlan):
    """Load ``plan`` into the built model and optimizer (collective); returns ``Progress``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    from megatron_llmjp.checkpoint import torch_adam

    directory = plan.directory
    # RNG states are per rank: restorable when every size matches (sequence parallelism
    # does not change them).
    saved = plan.manifest["parallel"]
    same_layout = all(
        saved.get(k) == v for k, v in parallel_section(layout).items() if k != "sequence_parallel"
    )
    # Megatron-LM's RNG states are its own objects: a resumed run starts fresh RNG streams.
    # CPU and CUDA generator states differ in kind: restored on the device type that wrote them.
    writer = _writer_of(plan.manifest)
    here = writer_section(cfg)
    same_device = writer["device"] in (None, here["device"])
    with_rng = plan.full and same_layout and same_device and not plan.megatron_lm
    own_optimizer = plan.full and not plan.megatron_lm
    if own_optimizer:
        torch_adam.prepare_for_load(optimizer)
    # The form the checkpoint was saved in, whatever checkpoint.optimizer_sharding says.
    sharding = saved_sharding(plan.manifest) if own_optimizer else None
    sd = _state_dict(
        model,
        optimizer if own_optimizer else None,
        is_loading=True,
        with_rng=with_rng,
        sharding=sharding,
    )
    hint = _BUCKETS_HINT if sharding == "dp_reshardable" else ""
    _apply_aliases(sd["model"], _stored_keys(directory))
    common_strategy = None
    mlm_pieces = None
    if plan.megatron_lm:
        from megatron_llmjp.checkpoint import megatron_lm, megatron_lm_optimizer

        # Megatron-LM's per-layer _extra_state objects are sharded differently (and hold no
        # FP8 state a weights-only start keeps): the layers keep their initial value.
        _drop_extra_state(sd["model"])
        common_strategy = megatron_lm.common_load_strategy()
        if plan.full:
            chained = bool(plan.manifest["optimizer"]["chained"])
            sd["megatron_lm_optimizer"], mlm_pieces = megatron_lm_optimizer.requests(
                optimizer, sd["model"], chained
            )
    strategy = FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(directory)), _dp_group()
    )
    # megatron-core's naming: "unexpected" keys are requested by this rank but absent from the
    # checkpoint (an error here); "missing" ones are stored but not requested (e.g. the RNG
    # states when the layout changed, or the optimizer for a weights-only load).
    try:
        loaded, _stored_only, absent = dist_checkpointing.load(
            sd,
            str(directory),
            strategy,
            common_strategy=common_strategy,
            strict=StrictHandling.RETURN_ALL,
        )
        error = None
    except (Exception, CheckpointException) as e:  # re-raised below on every rank
        loaded, absent, error = None, set(), e
    # Converted and upcycled checkpoints hold weights only, and the local spec's layers store
    # no ``_extra_state`` (Transformer Engine's FP8 scaling state, empty without FP8): the
    # layers then keep their initial value. (The other way round, a Transformer Engine
    # checkpoint's entries are stored but not requested by local layers, and not loaded.)
    spec_changed = writer["layer_spec"] not in (None, here["layer_spec"])
    absent = {k for k in absent if not (_is_extra_state(k) and (spec_changed or not plan.full))}
    if _agree(error is not None or bool(absent)):
        if error is not None:
            raise CheckpointError(f"{directory}: loading failed: {error}{hint}") from error
        if absent:
            some = ", ".join(sorted(absent)[:4])
            raise CheckpointError(
                f"{directory} lacks {len(absent)} tensors this model needs (e.g. {some}){hint}"
            )
        raise CheckpointError(f"{directory}: loading failed on another rank (see its log)")
    from megatron.core.transformer.module import Float16Module

    for i, m in enumerate(model):
        # Float16Module delegates to its inner module but returns no key report.
        target = m.module.module if isinstance(m.module, Float16Module) else m.module
        result = target.load_state_dict(loaded["model"][f"chunk{i}"], strict=False)
        wrong = [k for k in result.missing_keys if not _is_extra_state(k)]
        wrong += result.unexpected_keys
        if wrong:
            raise CheckpointError(f"{directory}: state does not fit the model: {wrong[:4]}")
    if plan.full and plan.megatron_lm:
        from megatron_llmjp.checkpoint import megatron_lm_optimizer

        steps = megatron_lm_optimizer.saved_steps(loaded, len(_inner_optimizers(optimizer)))
        megatron_lm_optimizer.apply(optimizer, loaded["megatron_lm_optimizer"], mlm_pieces, steps)
        progress = _megatron_lm_progress(plan.manifest)
    elif plan.full:
        try:
            # megatron-core asserts that dp_reshardable buckets hold what they held at save.
            optimizer.load_state_dict(loaded["optimizer"])
            error = None
        except AssertionError as e:
            error = e
        if _agree(error is not None):
            what = error if error is not None else "failed on another rank (see its log)"
            raise CheckpointError(
                f"{directory}: loading the optimizer state: {what}{hint}"
            ) from error
        torch_adam.after_load(optimizer)
        progress = Progress(**loaded["progress"])
    else:
        if optimizer is not None:
            optimizer.reload_model_params()
        progress = Progress()
    if with_rng:
        _restore_rng(loaded["rng_state"])
    elif plan.full and not plan.megatron_lm:
        from megatron_llmjp.parallel.dist import seed_everything

        seed_everything(cfg.train.seed)
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        if plan.full and not plan.megatron_lm and not with_rng:
            saved_on = f"{writer['device']} with {_describe(plan.manifest)}"
            print(
                f"[llmjp] RNG re-seeded with train.seed={cfg.train.seed}: the checkpoint's RNG "
                f"states were saved on {saved_on}, this run is on {here['device']} with "
                f"{_describe({'parallel': parallel_section(layout)})}",
                flush=True,
            )
        what = "full state" if plan.full else "weights only"
        if plan.full and plan.megatron_lm:
            what = (
                "optimizer state, iteration and consumed samples "
                f"{progress.consumed_samples}; fresh RNG streams"
            )
        relayout = "" if same_layout else " (resharded from " + _describe(plan.manifest) + ")"
        origin = " written by Megatron-LM" if plan.megatron_lm else ""
        print(
            f"[llmjp] loaded {directory}{origin} ({plan.source}, {what}) at iteration "
            f"{progress.iteration}{relayout}",
            flush=True,
        )
        for note in plan.notes:
            print(f"[llmjp] note: {note} (the config's value is used)", flush=True)
    return progress


_BUCKETS_HINT = (
    " (its optimizer state is in the dp_reshardable form, stored per gradient bucket of "
    "megatron-core's DDP, which must be those of the save: a change of "
    "parallel.overlap_grad_reduce changes them, and so, with it on, does a change of the "
    "data-parallel size above 40, as the bucket size is max(4e7, 1e6 * dp) elements)"
)


def _megatron_lm_progress(manifest: dict) -> Progress:
    """Iteration and consumed samples recorded in a Megatron-LM checkpoint's ``common.pt``."""
    consumed = int(manifest["consumed_samples"] or 0)
    return Progress(
        iteration=int(manifest["iteration"]),
        consumed_samples=consumed,
        stage_consumed_samples=consumed,
    )


def _writer_of(manifest: dict) -> dict:
    """The manifest's device and layer spec (``manifest.writer_section``); None for a
    checkpoint that does not record them (Megatron-LM's, and this package's before it did)."""
    return {k: manifest.get(k) for k in ("device", "layer_spec")}


def _is_extra_state(key: str) -> bool:
    return "_extra_state" in key


def _stored_keys(directory: Path) -> set[str]:
    """Tensor keys in the checkpoint's ``.metadata`` (metadata only, no tensor data)."""
    from megatron_llmjp.checkpoint.tensors import TensorReader

    return set(TensorReader(directory).names())


def _sharded_leaves(sd):
    if isinstance(sd, dict):
        for v in sd.values():
            yield from _sharded_leaves(v)
    elif isinstance(sd, list | tuple):
        for v in sd:
            yield from _sharded_leaves(v)
    else:
        yield sd


def _apply_aliases(model_sd: dict, stored: set[str]) -> None:
    """Point each requested tensor whose key is absent from the checkpoint at its stored alias
    (``convert.mappings.ALIASES``: e.g. the MoE pre-MLP norm that megatron-core's local spec
    wrote under ``decoder.layers.mlp.linear_fc1.layer_norm_weight``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_llmjp.convert.mappings import ALIASES

    for leaf in _sharded_leaves(model_sd):
        if isinstance(leaf, ShardedTensor) and leaf.key not in stored:
            alias = next((a for a in ALIASES.get(leaf.key, ()) if a in stored), None)
            if alias is not None:
                leaf.key = alias


def _drop_extra_state(sd: dict) -> None:
    """Remove the ``_extra_state`` objects from a (nested) sharded state dict, in place."""
    for k in list(sd):
        v = sd[k]
        if isinstance(v, dict):
            _drop_extra_state(v)
        elif _is_extra_state(str(k)):
            del sd[k]


def _describe(manifest: dict) -> str:
    p = manifest["parallel"]
    return " ".join(f"{k}={p[k]}" for k in ("tp", "pp", "vpp", "ep", "etp", "dp") if k in p)


def finish_weights_checkpoint(root: Path, writer, cfg: RunConfig, layout: Layout, source: dict):
    """Complete an iteration-0 checkpoint whose tensors ``writer`` (a ``TensorWriter`` on
    ``root/iter_0000000``) wrote outside training, for a conversion or an upcycling: the tensor
    metadata, ``config.yaml``, then the weights-only manifest listing every file (``source``
    says where the weights came from), then ``root/latest``."""
    directory = Path(writer.directory)
    progress = asdict(Progress())
    writer.finish({"progress": progress, "schedule": to_dict(cfg.schedule)})
    dump_yaml(cfg, directory / "config.yaml")
    manifest = build_manifest(
        cfg,
        layout,
        progress,
        store.file_sizes(directory),
        optimizer_saved=False,
        experts_layout="sequential" if cfg.model.is_moe else "none",
        from_model=False,
    )
    manifest["source"] = source
    write_manifest(directory, manifest)
    store.atomic_write_text(Path(root) / store.LATEST, "0\n")
