"""Which layouts may resume a checkpoint's distributed-optimizer state (``plan_resume``, no
process group): megatron-core's ``dp_reshardable`` form stores each tensor-/pipeline-/expert-
parallel rank's own optimizer buffers (keys ``optimizer.distributed.dp_group_idx_<rank in the
tp-pp group>...``) and reshards them across data-parallel ranks only, so a full resume that
changes tp, pp, vpp, cp, ep or etp is refused with the ways out; ``fully_reshardable`` state
(and a manifest from before ``checkpoint.optimizer_sharding``, which records that form) resumes
on any layout.

The checkpoints here are manifests only: ``plan_resume`` reads nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_llmjp.checkpoint import store
from megatron_llmjp.checkpoint.manifest import build_manifest, write_manifest
from megatron_llmjp.checkpoint.state import plan_resume, saved_sharding
from megatron_llmjp.checkpoint.store import CheckpointError
from megatron_llmjp.config.loader import ConfigError, build_config
from megatron_llmjp.parallel.layout import make_layout

DENSE = "llm-jp-4-tiny-dense"
MOE = "llm-jp-4-tiny-moe"


def _cfg(model: str, *overrides: str):
    return build_config(
        overrides=[
            f"model.name={model}",
            "data.synthetic=true",
            "train.global_batch_size=1024",  # divisible by every data-parallel size here
            *overrides,
        ]
    )


def _layout(cfg, world: int):
    return make_layout(cfg.parallel, cfg.model, cfg.train, world)


def saved(root: Path, model: str, world: int, *overrides: str, sharding=None) -> Path:
    """A published iteration-3 checkpoint (manifest only) saved by ``model`` with
    ``overrides`` on ``world`` ranks; ``sharding="omit"`` drops the manifest's field."""
    cfg = _cfg(model, *overrides)
    manifest = build_manifest(
        cfg,
        _layout(cfg, world),
        {"iteration": 3, "consumed_samples": 24, "skipped_steps": 0},
        {},
        optimizer_saved=True,
        experts_layout="sequential" if cfg.model.is_moe else "none",
    )
    if sharding == "omit":
        del manifest["optimizer"]["sharding"]
    elif sharding is not None:
        manifest["optimizer"]["sharding"] = sharding
    directory = root / store.iter_name(3)
    directory.mkdir(parents=True)
    write_manifest(directory, manifest)
    store.atomic_write_text(root / store.LATEST, "3\n")
    return root


def plan(root: Path, model: str, world: int, *overrides: str, layout=None):
    cfg = _cfg(model, f"checkpoint.dir={root}", *overrides)
    return plan_resume(cfg, layout or _layout(cfg, world))


def test_manifest_records_the_configured_form(tmp_path):
    """The manifest's optimizer.sharding is checkpoint.optimizer_sharding (default
    dp_reshardable, Megatron-LM's default), None without the distributed optimizer."""
    for overrides, want in (
        ((), "dp_reshardable"),
        (("checkpoint.optimizer_sharding=fully_reshardable",), "fully_reshardable"),
        (("optim.use_distributed_optimizer=false",), None),
    ):
        cfg = _cfg(DENSE, *overrides)
        m = build_manifest(
            cfg, _layout(cfg, 2), {"iteration": 3}, {}, optimizer_saved=True, experts_layout=""
        )
        assert m["optimizer"]["sharding"] == want, overrides
        assert saved_sharding(m) == want


@pytest.mark.parametrize(
    "save,load,changed",
    [
        ((4, ["parallel.tp=2"]), (2, []), ["parallel.tp 2 -> 1"]),
        (
            (4, ["parallel.pp=2"]),
            (4, ["parallel.tp=2"]),
            ["parallel.tp 1 -> 2", "parallel.pp 2 -> 1"],
        ),
        (
            (2, ["parallel.pp=2"]),
            (2, ["parallel.pp=2", "parallel.vpp=2"]),
            ["parallel.vpp null -> 2"],
        ),
    ],
    ids=["tp", "tp-and-pp", "vpp"],
)
def test_dp_reshardable_state_refuses_another_model_parallel_layout(save, load, changed, tmp_path):
    root = saved(tmp_path / "ckpt", DENSE, save[0], *save[1])
    with pytest.raises(CheckpointError) as e:
        plan(root, DENSE, load[0], *load[1])
    msg = str(e.value)
    assert str(root / store.iter_name(3)) in msg and "dp_reshardable" in msg
    for change in changed:
        assert change in msg, msg
    # The ways out: the saved layout, weights only (checkpoint.dir resumes fully), or the form
    # any layout can resume.
    keep = " ".join(c.split(" ")[0] + "=" + c.split(" ")[1] for c in changed)
    assert f"Resume with {keep}" in msg, msg
    assert "checkpoint.load_optimizer=false" in msg
    assert "checkpoint.optimizer_sharding=fully_reshardable" in msg
    assert not torch.distributed.is_initialized()


def test_expert_layout_change_is_refused_and_data_parallel_change_is_not(tmp_path):
    root = saved(tmp_path / "ckpt", MOE, 2, "parallel.ep=2")
    with pytest.raises(CheckpointError, match=r"parallel\.ep 2 -> 4"):
        plan(root, MOE, 4, "parallel.ep=4")
    # ep=2 on 4 ranks: dense DP 2 -> 4, expert DP 1 -> 2; the buffers are the same.
    assert plan(root, MOE, 4, "parallel.ep=2").full


def test_context_parallel_change_is_refused(tmp_path):
    """cp changes the DP x CP group the optimizer shards over, not its buffers, but a resume
    across it is not verified (it needs Transformer Engine on CUDA): refused."""
    root = saved(tmp_path / "ckpt", DENSE, 2)
    cfg = _cfg(DENSE, f"checkpoint.dir={root}")
    cp2 = dataclasses.replace(_layout(cfg, 2), cp=2, dp=1)
    with pytest.raises(CheckpointError, match=r"parallel\.cp 1 -> 2"):
        plan_resume(cfg, cp2)


def test_data_parallel_change_resumes(tmp_path):
    root = saved(tmp_path / "ckpt", DENSE, 4, "parallel.tp=2")
    p = plan(root, DENSE, 2, "parallel.tp=2")
    assert p.full and p.manifest["parallel"]["dp"] == 2


@pytest.mark.parametrize("sharding", ["fully_reshardable", "omit"])
def test_fully_reshardable_state_resumes_on_any_layout(sharding, tmp_path):
    """Also a manifest that lacks the field (its form was then always fully_reshardable)."""
    root = saved(tmp_path / "ckpt", DENSE, 4, "parallel.tp=2", "parallel.pp=2", sharding=sharding)
    p = plan(root, DENSE, 1)
    assert p.full and saved_sharding(p.manifest) == "fully_reshardable"


def test_weights_only_load_ignores_the_form(tmp_path):
    root = saved(tmp_path / "ckpt", DENSE, 4, "parallel.tp=2")
    p = plan_resume(
        _cfg(DENSE, f"checkpoint.load={root}", "checkpoint.load_optimizer=false"),
        _layout(_cfg(DENSE), 1),
    )
    assert not p.full


def test_refusal_through_checkpoint_load_names_its_own_way_out(tmp_path):
    root = saved(tmp_path / "ckpt", DENSE, 4, "parallel.tp=2")
    with pytest.raises(CheckpointError) as e:
        plan_resume(_cfg(DENSE, f"checkpoint.load={root}"), _layout(_cfg(DENSE), 1))
    assert "set checkpoint.load_optimizer=false to start from its weights" in str(e.value)


def test_unknown_form_is_refused(tmp_path):
    root = saved(tmp_path / "ckpt", DENSE, 2, sharding="fully_sharded_model_space")
    with pytest.raises(CheckpointError, match="'fully_sharded_model_space' form"):
        plan(root, DENSE, 2)


def test_unknown_config_value_names_the_key():
    with pytest.raises(ConfigError, match="checkpoint.optimizer_sharding"):
        _cfg(DENSE, "checkpoint.optimizer_sharding=bucket")


BIG = "llm-jp-4-8b"  # 8.59 B parameters: many 4e7-element buckets per buffer


@pytest.mark.parametrize(
    "save,load,sizes",
    [
        # overlapped reduction: megatron-core's bucket is max(4e7, 1e6 * dp) elements
        ((128, ["parallel.overlap_grad_reduce=true"]),
         (64, ["parallel.overlap_grad_reduce=true"]), "128,000,000 elements at save, 64,000,000"),
        # overlap off: one bucket per buffer
        ((8, []), (8, ["parallel.overlap_grad_reduce=true"]),
         "one bucket per buffer at save, 40,000,000 elements now"),
    ],
    ids=["dp-above-40", "overlap-toggled"],
)  # fmt: skip
def test_dp_reshardable_state_refuses_other_gradient_buckets(save, load, sizes, tmp_path):
    """Refused before any process group, naming both bucket sizes (from the manifest's
    optimizer.ddp_bucket_size); megatron-core would fail at load (its bucket assertion)."""
    root = saved(tmp_path / "ckpt", BIG, save[0], *save[1])
    with pytest.raises(CheckpointError, match="buckets differ") as e:
        plan(root, BIG, load[0], *load[1])
    assert sizes in str(e.value)
    assert "checkpoint.optimizer_sharding=fully_reshardable" in str(e.value)
    assert not torch.distributed.is_initialized()


def test_same_gradient_buckets_resume(tmp_path):
    """dp 32 -> 16 keeps max(4e7, 1e6 * dp) at 4e7; a model smaller than one bucket (the tiny
    one, 25 M parameters) has one bucket per buffer either way, so overlap may change."""
    over = "parallel.overlap_grad_reduce=true"
    assert plan(saved(tmp_path / "a", BIG, 32, over), BIG, 16, over).full
    assert plan(saved(tmp_path / "b", DENSE, 2), DENSE, 2, over).full
    # A manifest from before the field leaves the check to the load.
    root = saved(tmp_path / "c", BIG, 128, over)
    manifest_path = root / store.iter_name(3) / "manifest.json"
    import json

    m = json.loads(manifest_path.read_text())
    del m["optimizer"]["ddp_bucket_size"]
    manifest_path.write_text(json.dumps(m))
    assert plan(root, BIG, 64, over).full


def test_manifest_bucket_size_is_megatron_cores_formula(tmp_path):
    """max(4e7, 1e6 * dp) with overlap (dp without context parallelism), None without."""
    for world, overrides, want in (
        (8, [], None),
        (8, ["parallel.overlap_grad_reduce=true"], 40_000_000),
        (128, ["parallel.overlap_grad_reduce=true"], 128_000_000),
        (128, ["parallel.overlap_grad_reduce=true", "parallel.tp=4"], 40_000_000),
    ):
        cfg = _cfg(BIG, *overrides)
        m = build_manifest(
            cfg, _layout(cfg, world), {"iteration": 3}, {}, optimizer_saved=True,
            experts_layout="",
        )  # fmt: skip
        assert m["optimizer"]["ddp_bucket_size"] == want, (world, overrides)
