"""Full resume (``checkpoint.load_optimizer=true``) from a checkpoint Megatron-LM wrote itself:
its distributed-optimizer state in the ``fully_sharded_model_space`` form
(``../shared/data/megatron-lm/checkpoints/dense-tp2pp2``, TP2 x PP2, BF16, iteration 3).

- Loaded at the saved TP2 x PP2 in BF16, the trainer's progress is Megatron-LM's (iteration 3,
  ``args.consumed_train_samples``), every optimizer state carries Adam's step 3, and the main
  weights and moments, saved again by the trainer in its own format, equal the ones Megatron-LM
  stored (un-flattened here from the plain tensors, read without a process group).
- Training continues from there with a finite loss.
- Other pipeline, virtual-pipeline and data-parallel sizes load the same state.
- Another tensor or expert split, FP32 and a non-distributed optimizer are refused before any
  process group, naming the form and the layout it needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_llmjp.config.loader import build_config
from tests.distributed.test_megatron_lm_checkpoints import _overrides, _train
from tests.helpers.spawn import spawn

pytestmark = pytest.mark.distributed
NAME = "dense-tp2pp2"
# The layouts the roots were saved in, on 4 processes (moe-ep2: dense DP4, expert DP2).
SAVED = {"dense-tp2pp2": ["parallel.tp=2", "parallel.pp=2"], "moe-ep2": ["parallel.ep=2"]}


def _full(mlm: Path, *extra: str, name: str = NAME) -> list[str]:
    return [
        *_overrides(mlm, name),
        "checkpoint.load_optimizer=true",
        *SAVED[name],
        "precision.dtype=bf16",
        *extra,
    ]


def _preflight(overrides: list[str]):
    """The trainer's checks before any process group, as rank 0 of 4 processes."""
    from megatron_llmjp.parallel.dist import RankInfo
    from megatron_llmjp.training.trainer import check_runtime

    return check_runtime(build_config(overrides=overrides), RankInfo(0, 0, 4, "torchrun"))


def _resume_and_save(overrides: list[str]) -> dict:
    """Load like ``trainer.run`` does, then save at once (``checkpoint.dir``); returns the
    progress and the step counts of this rank's Adam states."""
    from dataclasses import asdict

    from megatron_llmjp.checkpoint.state import load_checkpoint, save_checkpoint
    from megatron_llmjp.parallel import cpu_compat
    from megatron_llmjp.parallel.dist import (
        destroy_distributed,
        discover_ranks,
        init_distributed,
        seed_everything,
    )
    from megatron_llmjp.training import trainer

    cfg = build_config(overrides=overrides)
    info = discover_ranks()
    pre = trainer.check_runtime(cfg, info)
    cpu_compat.install()
    init_distributed(info, pre.layout, cfg.parallel.timeout_minutes)
    try:
        seed_everything(cfg.train.seed)
        state = trainer._build(cfg, pre.layout)
        progress = load_checkpoint(state.model, state.optimizer, cfg, pre.layout, pre.resume)
        steps = set()
        for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
            steps |= {float(s["step"]) for s in opt.optimizer.state.values() if "step" in s}
            steps |= {float(g["step"]) for g in opt.optimizer.param_groups if "step" in g}
        save_checkpoint(state.model, state.optimizer, cfg, pre.layout, progress)
        return {"progress": asdict(progress), "steps": sorted(steps)}
    finally:
        destroy_distributed()


def _unflatten(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Megatron-LM's flattened form ``[*fragments, piece numel]`` as the global tensor."""
    frags = flat.shape[:-1]
    local = [n // f for n, f in zip(shape, frags, strict=True)]
    t = flat.reshape(*frags, *local)
    n = len(frags)
    order = [d for i in range(n) for d in (i, n + i)]
    return t.permute(order).reshape(shape)


# (root, processes, layout change, optimizer tensors stored). The saved layouts, then other
# pipeline and data-parallel sizes: dense-tp2pp2 at TP2 x PP1 (2 processes); moe-ep2 on 2
# processes (dense DP2 and expert DP1 instead of the saved DP4 and DP2).
RESUMES = [
    ("dense-tp2pp2", 4, [], 27),
    ("moe-ep2", 4, [], 36),
    ("dense-tp2pp2", 2, ["parallel.pp=1"], 27),
    ("dense-tp2pp2", 4, ["parallel.vpp=2"], 27),
    ("moe-ep2", 2, [], 36),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,world,change,count", RESUMES, ids=[f"{n}-{w}-{'-'.join(c)}" for n, w, c, _ in RESUMES]
)
def test_full_resume_restores_megatron_lm_optimizer_state(
    mlm, tmp_path, name, world, change, count
):
    from megatron_llmjp.checkpoint import store
    from megatron_llmjp.checkpoint.megatron_lm import is_optimizer_key, load_common
    from megatron_llmjp.checkpoint.tensors import TensorReader
    from megatron_llmjp.convert.mappings import ALIASES

    root = mlm / "checkpoints" / name
    saved = store.resolve(root, "x")
    args = vars(load_common(saved / "common.pt")["args"])
    ckpt = tmp_path / "ckpt"
    got = spawn(
        _resume_and_save,
        world,
        _full(
            mlm,
            *change,
            "train.iters=3",
            # Global optimizer keys, as Megatron-LM's checkpoint stores them, to compare with.
            "checkpoint.optimizer_sharding=fully_reshardable",
            f"checkpoint.dir={ckpt}",
            f"output_dir={tmp_path}/a",
            name=name,
        ),
    )
    for rank in got:
        assert rank["progress"]["iteration"] == 3
        assert rank["progress"]["consumed_samples"] == args["consumed_train_samples"] == 12
        assert rank["steps"] == [3.0]
    theirs, ours = TensorReader(saved), TensorReader(store.resolve(ckpt, "x"))
    alias = {a: k for k, aliases in ALIASES.items() for a in aliases}
    keys = [k for k in theirs.names() if is_optimizer_key(k)]
    assert len(keys) == count
    for key in keys:
        state, model_key = key.split("optimizer.state.", 1)[1].split(".", 1)
        want = _unflatten(theirs.read(key), theirs.info(model_key).shape)
        assert want.abs().max() > 0, key
        state = "param" if state == "fp32_param" else state
        mine_key = f"optimizer.state.{state}.{model_key}"
        if mine_key not in ours.names():  # the MoE pre-MLP norm under the local spec's key
            mine_key = f"optimizer.state.{state}.{alias[model_key]}"
        mine = ours.read(mine_key)
        assert mine.dtype == torch.float32 and torch.equal(mine, want), key
    # The trainer continues from iteration 3 with the restored state.
    out = spawn(
        _train, world, _full(mlm, *change, "train.iters=4", f"output_dir={tmp_path}/b", name=name)
    )[-1]
    assert out["iteration"] == 4 and len(out["loss"]) == 1
    assert 0 < out["loss"][0] < 8


REFUSED = [
    ("dense-tp2pp2", ["parallel.tp=1"], "parallel.tp=1 (saved 2)"),
    ("dense-tp2pp2", ["precision.dtype=fp32"], "precision.dtype=fp32 (saved bf16)"),
    ("dense-tp2pp2", ["optim.use_distributed_optimizer=false"], "use_distributed_optimizer=false"),
    ("moe-ep2", ["parallel.ep=1"], "parallel.ep=1 (saved 2)"),
]


@pytest.mark.parametrize("name,change,needle", REFUSED, ids=[r[2] for r in REFUSED])
def test_full_resume_in_another_split_is_refused(mlm, tmp_path, name, change, needle):
    from megatron_llmjp.checkpoint.store import CheckpointError

    with pytest.raises(CheckpointError) as e:
        _preflight(_full(mlm, *change, f"checkpoint.dir={tmp_path / 'ckpt'}", name=name))
    msg = str(e.value)
    assert "'fully_sharded_model_space' form" in msg and needle in msg
    assert "flattened_range is not supported" in msg and "any pp, vpp and data-parallel" in msg
    assert list(tmp_path.iterdir()) == []


def _copy_root(mlm: Path, tmp_path: Path) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(mlm / "checkpoints" / NAME, run)
    for p in run.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    run.chmod(0o755)
    return run


@pytest.mark.slow
def test_megatron_lm_root_as_checkpoint_dir_resumes_and_keeps_its_files(mlm, tmp_path):
    """A Megatron-LM run moved to this trainer by pointing ``checkpoint.dir`` at its ``--save``
    root: full resume at iteration 3, the trainer's saves go beside Megatron-LM's (``latest``
    then takes precedence) and pruning never deletes Megatron-LM's checkpoints."""
    run = _copy_root(mlm, tmp_path)
    before = sorted(p.name for p in run.iterdir())
    base = _full(mlm, "parallel.pp=1", f"checkpoint.dir={run}", "checkpoint.keep_last=1")
    out = spawn(_train, 2, [*base, "train.iters=4", f"output_dir={tmp_path}/a"])[-1]
    assert out["iteration"] == 4 and len(out["loss"]) == 1 and 0 < out["loss"][0] < 8
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, "iter_0000004", "latest"])
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    out = spawn(_train, 2, [*base, "train.iters=5", f"output_dir={tmp_path}/b"])[-1]
    assert out["iteration"] == 5 and len(out["loss"]) == 1
    assert sorted(p.name for p in run.iterdir()) == sorted([*before, "iter_0000005", "latest"])


def test_megatron_lm_root_as_checkpoint_dir_refusal_says_what_to_set(mlm, tmp_path):
    from megatron_llmjp.checkpoint.store import CheckpointError

    run = _copy_root(mlm, tmp_path)
    with pytest.raises(CheckpointError) as e:
        _preflight(_full(mlm, "parallel.tp=1", f"checkpoint.dir={run}"))
    msg = str(e.value)
    assert msg.startswith("checkpoint.dir (full resume): ") and "parallel.tp=1 (saved 2)" in msg
    assert "set checkpoint.load to it with checkpoint.load_optimizer=false" in msg
