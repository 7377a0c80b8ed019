"""Full resume (``checkpoint.load_optimizer=true``) from a checkpoint Megatron-LM wrote itself:
its distributed-optimizer state in the ``fully_sharded_model_space`` form
(``../shared/data/megatron-lm/checkpoints/dense-tp2pp2``, TP2 x PP2, BF16, iteration 3).

- Loaded at the saved TP2 x PP2 in BF16, the trainer's progress is Megatron-LM's (iteration 3,
  ``args.consumed_train_samples``), every optimizer state carries Adam's step 3, and the main
  weights and moments, saved again by the trainer in its own format, equal the ones Megatron-LM
  stored (un-flattened here from the plain tensors, read without a process group).
- Training continues from there with a finite loss.
- Other layouts, FP32 and a non-distributed optimizer are refused before any process group,
  naming the form and the layout it needs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_llmjp.config.loader import build_config
from tests.distributed.test_megatron_lm import _overrides, _train
from tests.helpers.spawn import spawn
from tests.unit.test_megatron_lm import assert_unchanged

pytestmark = pytest.mark.distributed
NAME = "dense-tp2pp2"


@pytest.fixture
def mlm(shared_data):
    root = shared_data / "megatron-lm"
    if not (root / "SHA256SUMS").is_file():
        pytest.skip(f"{root} not found")
    yield root
    assert_unchanged(root)


def _full(mlm: Path, *extra: str) -> list[str]:
    return [
        *_overrides(mlm, NAME),
        "checkpoint.load_optimizer=true",
        "parallel.tp=2",
        "parallel.pp=2",
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


@pytest.mark.slow
def test_full_resume_restores_megatron_lm_optimizer_state(mlm, tmp_path):
    from megatron_llmjp.checkpoint import store
    from megatron_llmjp.checkpoint.megatron_lm import load_common
    from megatron_llmjp.checkpoint.tensors import TensorReader

    root = mlm / "checkpoints" / NAME
    saved = store.resolve(root, "x")
    args = vars(load_common(saved / "common.pt")["args"])
    ckpt = tmp_path / "ckpt"
    got = spawn(
        _resume_and_save,
        4,
        _full(mlm, "train.iters=3", f"checkpoint.dir={ckpt}", f"output_dir={tmp_path}/a"),
    )
    for rank in got:
        assert rank["progress"]["iteration"] == 3
        assert rank["progress"]["consumed_samples"] == args["consumed_train_samples"] == 12
        assert rank["steps"] == [3.0]
    theirs, ours = TensorReader(saved), TensorReader(store.resolve(ckpt, "x"))
    keys = [k for k in theirs.names() if k.startswith("optimizer.state.")]
    assert len(keys) == 27
    for key in keys:
        _, _, name, model_key = key.split(".", 3)
        shape = theirs.info(model_key).shape
        want = _unflatten(theirs.read(key), shape)
        assert want.abs().max() > 0, key
        mine = ours.read(f"optimizer.state.{'param' if name == 'fp32_param' else name}.{model_key}")
        assert mine.dtype == torch.float32 and torch.equal(mine, want), key
    # The trainer continues from iteration 3 with the restored state.
    out = spawn(_train, 4, _full(mlm, "train.iters=4", f"output_dir={tmp_path}/b"))[-1]
    assert out["iteration"] == 4 and len(out["loss"]) == 1
    assert 0 < out["loss"][0] < 8


@pytest.mark.parametrize(
    "change,needle",
    [
        (["parallel.tp=1"], "parallel.tp=1 (saved 2)"),
        (["parallel.pp=1"], "parallel.pp=1 (saved 2)"),
        (["precision.dtype=fp32"], "precision.dtype=fp32 (saved bf16)"),
        (["optim.use_distributed_optimizer=false"], "optim.use_distributed_optimizer=false"),
    ],
)
def test_full_resume_in_another_layout_is_refused(mlm, tmp_path, change, needle):
    from megatron_llmjp.checkpoint.store import CheckpointError

    with pytest.raises(CheckpointError) as e:
        _preflight(_full(mlm, *change, f"checkpoint.dir={tmp_path / 'ckpt'}"))
    msg = str(e.value)
    assert "'fully_sharded_model_space' form" in msg and needle in msg
    assert "layout it was saved in (tp=2 pp=2 vpp=None ep=1 etp=2" in msg
    assert "flattened_range is not supported" in msg
    assert list(tmp_path.iterdir()) == []
